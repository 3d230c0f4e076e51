"""Pure decisions for one VirtualInstance on its node: what to do next, and what status to show.

Why this module exists: the agent's kopf handlers stay thin; everything that decides (start,
stop, pause, reboot, balloon, restart after drift with backoff, give up on a crash loop) is a
plain function of the object, the hypervisor's answer and the restart history, unit-tested
without a server. Ganeti's watcher lives here as :func:`decide` on "should run but does not".
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from kubehv.api import quantity
from kubehv.drivers import values
from kubehv.operator import k8s, status, translate

RUNNING, STOPPED, PAUSED = "Running", "Stopped", "Paused"
REASON_CRASH_LOOP = "CrashLoop"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the watcher (Ganeti's watcher restarts with a growing pause, then gives up)."""

    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    crash_limit: int = 5
    crash_window_s: float = 600.0
    stop_timeout_s: float = 30.0
    migration_takeover_grace_s: float = 60.0
    """A target judges a Running migration by what arrived once it is this far past its
    completionTimeout (the source had that long to finish or abort it)."""

    def backoff(self, attempts: int) -> float:
        """The wait before restart number ``attempts + 1`` (0 waits nothing)."""
        if attempts <= 0:
            return 0.0
        return float(min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1)))


@dataclasses.dataclass(frozen=True, slots=True)
class Observed:
    """What the hypervisor says about the instance (``info is None``: not on this node)."""

    info: values.InstanceInfo | None

    @property
    def alive(self) -> bool:
        return self.info is not None and self.info.state.is_alive

    @property
    def state(self) -> values.InstanceState | None:
        return None if self.info is None else self.info.state


@dataclasses.dataclass
class History:
    """Restarts the agent did for one instance (in memory; ``restartCount`` persists)."""

    restarts: list[float] = dataclasses.field(default_factory=list)
    failed_starts: int = 0

    def recent(self, now: float, window_s: float) -> int:
        self.restarts = [t for t in self.restarts if now - t <= window_s]
        return len(self.restarts)


class Do(enum.StrEnum):
    NOTHING = "nothing"
    START = "start"
    RESTART = "restart"  # should run but does not: start again, count it, post an Event
    WAIT = "wait"  # restart due but backing off: look again after ``delay_s``
    CRASH_LOOP = "crash-loop"
    STOP = "stop"
    CLEANUP = "cleanup"  # crashed/leftover record of an instance that should be stopped
    PAUSE = "pause"
    RESUME = "resume"
    REBOOT = "reboot"
    BALLOON = "balloon"
    FINALIZE = "finalize"  # being deleted: stop, clean up, drop our finalizer
    ADD_FINALIZER = "add-finalizer"


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    do: Do
    memory_mib: int | None = None
    delay_s: float = 0.0
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class View:
    """The parts of a VirtualInstance the decisions read."""

    name: str
    generation: int
    deleting: bool
    has_finalizer: bool
    run_state: str
    spec_reboot_generation: int
    status_reboot_generation: int
    memory_min_mib: int
    memory_max_mib: int
    auto_balloon_target_mib: int | None
    phase: str
    failed_reason: str | None
    observed_generation: int | None
    status: Mapping[str, Any]

    @classmethod
    def of(cls, vi: Mapping[str, Any]) -> View:
        meta = vi.get("metadata") or {}
        spec = vi.get("spec") or {}
        st = vi.get("status") or {}
        mem_min, mem_max = translate.memory_mib(spec)
        auto = spec.get("autoBalloon") or {}
        target = translate.to_mib(auto.get("target")) if auto.get("enabled") else None
        ready = status.condition(st, "Ready") or {}
        return cls(
            # The hypervisor-level name (namespace-qualified): every driver call uses it.
            name=translate.instance_name(vi),
            generation=int(meta.get("generation") or 0),
            deleting=bool(meta.get("deletionTimestamp")),
            has_finalizer=k8s.FINALIZER in (meta.get("finalizers") or []),
            run_state=str(spec.get("runState") or RUNNING),
            spec_reboot_generation=int(spec.get("rebootGeneration") or 0),
            status_reboot_generation=int(st.get("rebootGeneration") or 0),
            memory_min_mib=mem_min,
            memory_max_mib=mem_max,
            auto_balloon_target_mib=target,
            phase=str(st.get("phase") or ""),
            failed_reason=str(ready.get("reason")) if st.get("phase") == "Failed" else None,
            observed_generation=st.get("observedGeneration"),
            status=st,
        )


def balloon_target(view: View, actual_mib: int) -> int:
    """Memory the instance should have: the autoBalloon target, else actual kept in range."""
    lo, hi = view.memory_min_mib, max(view.memory_min_mib, view.memory_max_mib)
    wanted = view.auto_balloon_target_mib if view.auto_balloon_target_mib else actual_mib
    return max(lo, min(hi, wanted))


def decide(view: View, observed: Observed, history: History, now: float, policy: Policy) -> Action:
    """The next step for one instance. Call again after each step until ``NOTHING``/``WAIT``."""
    if view.deleting:
        return Action(Do.FINALIZE) if view.has_finalizer else Action(Do.NOTHING)
    if view.phase == "Migrating":
        return Action(Do.NOTHING)  # the migration protocol owns the instance meanwhile
    if view.phase == "Evicted":
        return Action(Do.NOTHING)  # stopped by a drain; the controller re-places it
    if not view.has_finalizer:
        return Action(Do.ADD_FINALIZER)
    if (
        view.phase == "Failed"
        and view.observed_generation == view.generation
        and not observed.alive
        and view.run_state != STOPPED
    ):
        return Action(Do.NOTHING)  # given up until the spec changes
    state = observed.state
    if view.run_state == STOPPED:
        if observed.alive:
            return Action(Do.STOP)
        if state is not None:
            return Action(Do.CLEANUP)
        return Action(Do.NOTHING)
    if not observed.alive:
        if state == values.InstanceState.SHUTTING_DOWN:
            return Action(Do.NOTHING)
        was_running = view.phase in (RUNNING, PAUSED) or state == values.InstanceState.CRASHED
        if not was_running:
            if history.failed_starts:
                wait = history_wait(history.failed_starts, history, now, policy)
                if wait > 0:
                    return Action(Do.WAIT, delay_s=wait)
            return Action(Do.START)
        recent = history.recent(now, policy.crash_window_s)
        if recent >= policy.crash_limit:
            return Action(
                Do.CRASH_LOOP,
                message=(
                    f"instance {view.name} stopped running {recent + 1} times within "
                    f"{int(policy.crash_window_s)}s; not restarting it until its spec changes"
                ),
            )
        wait = history_wait(recent, history, now, policy)
        if wait > 0:
            return Action(Do.WAIT, delay_s=wait)
        return Action(Do.RESTART)
    assert observed.info is not None
    if view.spec_reboot_generation > view.status_reboot_generation:
        return Action(Do.REBOOT)
    if view.run_state == PAUSED and state == values.InstanceState.RUNNING:
        return Action(Do.PAUSE)
    if view.run_state == RUNNING and state == values.InstanceState.PAUSED:
        return Action(Do.RESUME)
    target = balloon_target(view, observed.info.memory_mib)
    if target != observed.info.memory_mib and view.memory_min_mib > 0:
        return Action(Do.BALLOON, memory_mib=target)
    return Action(Do.NOTHING)


def history_wait(attempts: int, history: History, now: float, policy: Policy) -> float:
    """Seconds still to wait before the next attempt (0 when due)."""
    if not history.restarts or attempts <= 0:
        return 0.0
    due = history.restarts[-1] + policy.backoff(attempts)
    return max(0.0, due - now)


# --- status ----------------------------------------------------------------------------


def phase_for(view: View, observed: Observed) -> str:
    state = observed.state
    if state == values.InstanceState.RUNNING:
        return RUNNING
    if state == values.InstanceState.PAUSED:
        return PAUSED
    if state == values.InstanceState.SHUTTING_DOWN:
        return "Stopping"
    if view.run_state == STOPPED:
        return STOPPED
    return "Starting"


def desired_status(
    view: View,
    observed: Observed,
    *,
    phase: str | None = None,
    ready_reason: str | None = None,
    message: str | None = None,
    params_valid: status.Condition | None = None,
    restart_count: int | None = None,
    reboot_generation: int | None = None,
    console: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The agent-owned status fields for ``view`` given what the hypervisor reports.

    ``phase``/``ready_reason``/``message`` override the defaults (Failed, CrashLoop...).
    """
    info = observed.info
    phase = phase or phase_for(view, observed)
    ready = phase == RUNNING
    reason = ready_reason or {
        RUNNING: "Running",
        PAUSED: "Paused",
        STOPPED: "Stopped",
        "Stopping": "Stopping",
        "Starting": "Starting",
    }.get(phase, phase)
    text = message if message is not None else f"instance is {phase.lower()}"
    updates = [status.Condition("Ready", ready, reason, text)]
    if params_valid is not None:
        updates.append(params_valid)
    conditions = status.merge_conditions(
        view.status.get("conditions") or [], updates, view.generation, now
    )
    live = info if info is not None and info.state.is_alive else None
    out: dict[str, Any] = {
        "phase": phase,
        "hypervisorId": live.id if live else None,
        "actualMemory": quantity.format_mib(live.memory_mib) if live else None,
        "vcpus": live.vcpus if live else None,
        "conditions": conditions,
        "observedGeneration": view.generation,
        "message": text,
    }
    if restart_count is not None:
        out["restartCount"] = restart_count
    if reboot_generation is not None:
        out["rebootGeneration"] = reboot_generation
    if console is not None:
        out["console"] = console or None
    return out


def status_patch(view: View, desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only what changed: an empty dict means no write is needed."""
    return status.changed_fields(view.status, desired)
