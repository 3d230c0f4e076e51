"""The instance's own status and the watcher's restart policy, as pure functions.

Why this module exists: what the agent shows in a VirtualInstance's status (phase, Ready,
memory, console) is a plain function of the typed object and the hypervisor's answer, and
the restart policy (Ganeti's watcher: restart with a growing pause, then give up) is a plain
value; the owner's decision (:mod:`owner_logic`) and its I/O (:mod:`instances`) share them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kubehv import api
from kubehv.api import quantity
from kubehv.api import virtualinstance as vim
from kubehv.drivers import values
from kubehv.operator import status

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


def history_wait(attempts: int, history: History, now: float, policy: Policy) -> float:
    """Seconds still to wait before the next attempt (0 when due)."""
    if not history.restarts or attempts <= 0:
        return 0.0
    due = history.restarts[-1] + policy.backoff(attempts)
    return max(0.0, due - now)


# --- status ----------------------------------------------------------------------------


def status_of(vi: api.VirtualInstance) -> dict[str, Any]:
    """The instance's status as the wire form (the base of a merge patch)."""
    return vi.status.model_dump(mode="json", by_alias=True, exclude_none=True)


def phase_for(vi: api.VirtualInstance, observed: Observed) -> str:
    state = observed.state
    if state == values.InstanceState.RUNNING:
        return RUNNING
    if state == values.InstanceState.PAUSED:
        return PAUSED
    if state == values.InstanceState.SHUTTING_DOWN:
        return "Stopping"
    if vi.spec.run_state is vim.RunState.STOPPED:
        return STOPPED
    return "Starting"


def desired_status(
    vi: api.VirtualInstance,
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
    """The agent-owned status fields for ``vi`` given what the hypervisor reports.

    ``phase``/``ready_reason``/``message`` override the defaults (Failed, CrashLoop...).
    """
    info = observed.info
    phase = phase or phase_for(vi, observed)
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
    generation = vi.metadata.generation or 0
    conditions = status.merge_model_conditions(vi.status.conditions, updates, generation, now)
    live = info if info is not None and info.state.is_alive else None
    out: dict[str, Any] = {
        "phase": phase,
        "hypervisorId": live.id if live else None,
        "actualMemory": quantity.format_mib(live.memory_mib) if live else None,
        "vcpus": live.vcpus if live else None,
        "conditions": conditions,
        "observedGeneration": generation,
        "message": text,
    }
    if restart_count is not None:
        out["restartCount"] = restart_count
    if reboot_generation is not None:
        out["rebootGeneration"] = reboot_generation
    if console is not None:
        out["console"] = console or None
    return out


def status_patch(vi: api.VirtualInstance, desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only what changed: an empty dict means no write is needed."""
    return status.changed_fields(status_of(vi), desired)
