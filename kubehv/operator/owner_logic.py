"""The owner of one instance on one node: every driver action on it, decided in one place.

Why this module exists: an instance must run exactly once (docs/architecture.md, I1-I4).
On a node, one serialised owner per instance (:mod:`owner`) does every driver action on it:
start, stop, reboot, pause, balloon, evict for a drain, and both roles of a migration. This
module is that owner's decision, as one pure function of typed inputs:

* the VirtualInstance (``kubehv.api`` model) and whether it was read *fresh* (a GET, not the
  watch cache),
* the open Migration of the instance, if any (``kubehv.api`` model),
* what this node's hypervisor reports (the domain, and the migration job if one is asked),
* this node's migration journal entry for the instance (:mod:`journal`),
* whether this node is being drained, the restart history, the time and the policy.

:func:`decide` returns one :class:`Action`; the owner performs it and asks again until the
answer is NOTHING or WAIT. No I/O, no clocks, no kopf: the model checker in tests/model
drives this very function.

Fences (invariant I1): START/RESTART only on a fresh read that shows the instance assigned
to this node, no Migration occupying it, no unresolved journal entry, and a phase that
allows it (never from Unknown, Migrating or a drain eviction). A decision on cached inputs
that would start, evict or re-phase the instance answers REREAD instead.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from kubehv import api
from kubehv.api import constants
from kubehv.api import virtualinstance as vim
from kubehv.drivers import values
from kubehv.operator import instance_logic, journal, translate
from kubehv.operator import migration_logic as ml

Policy = instance_logic.Policy
History = instance_logic.History
VIPhase = vim.Phase
State = values.InstanceState

REASON_LOST = "LostWhileUnknown"
REASON_MIGRATED_AWAY = "MigratedAway"


class Act(enum.StrEnum):
    """What the owner does next."""

    NOTHING = "Nothing"  # refresh status from the hypervisor, if it is ours
    WAIT = "Wait"  # look again after ``delay_s``
    REREAD = "Reread"  # read the instance and its Migrations fresh (GET), then decide again
    ADD_FINALIZER = "AddFinalizer"
    FINALIZE = "Finalize"  # being deleted: stop, clean up, drop our finalizer
    START = "Start"
    RESTART = "Restart"  # should run but does not: start again, count it
    CRASH_LOOP = "CrashLoop"  # give up restarting (Failed) until the spec changes
    MARK_LOST = "MarkLost"  # was Unknown and is gone: Failed with a reason; never started
    STOP = "Stop"
    CLEANUP = "Cleanup"  # a dead record of an instance that should be stopped
    PAUSE = "Pause"
    RESUME = "Resume"
    REBOOT = "Reboot"
    BALLOON = "Balloon"
    EVICT = "Evict"  # drain, evictionPolicy Stop: phase Evicted first, then shut down
    RELEASE_MIGRATING = "ReleaseMigrating"  # phase Migrating with no Migration: give back
    CLEAR_JOURNAL = "ClearJournal"  # this node's part of that migration is over
    # migration, source role
    PREPARE = "Prepare"  # migration_info (and balloon to fit): Scheduled -> Preparing
    MIGRATE = "Migrate"  # claim Running, start the copy, follow it
    TRACK_COPY = (
        "TrackCopy"  # Running: follow the copy; after a restart, recover it from the hypervisor
    )
    FINALIZE_SOURCE = "FinalizeSource"  # finalize_migration_source(True) -> Succeeded
    CLEANUP_SOURCE = "CleanupSource"  # finalize_migration_source(False), restore memory
    # migration, target role
    ACCEPT = "Accept"  # accept_instance: Preparing -> TargetReady
    TAKE_OVER = "TakeOver"  # Running past its deadline and the copy runs here: -> Finalizing
    FAIL_NOT_ARRIVED = "FailNotArrived"  # Running past its deadline, nothing arrived: Failed
    FINALIZE_TARGET = "FinalizeTarget"  # finalize_migration_dst(True)
    CLEANUP_TARGET = "CleanupTarget"  # finalize_migration_dst(False); never destroys a resumed copy
    # migration, either role, instance deleted
    ABANDON = "Abandon"  # undo this node's side, record it; the Migration ends (I4)


NEEDS_FRESH = frozenset(
    {Act.START, Act.RESTART, Act.EVICT, Act.MARK_LOST, Act.RELEASE_MIGRATING, Act.CRASH_LOOP}
)
"""Acts that are irreversible or re-phase the instance: only on a fresh read."""

MIGRATION_ACTS = frozenset(
    {
        Act.PREPARE,
        Act.MIGRATE,
        Act.TRACK_COPY,
        Act.FINALIZE_SOURCE,
        Act.CLEANUP_SOURCE,
        Act.ACCEPT,
        Act.TAKE_OVER,
        Act.FAIL_NOT_ARRIVED,
        Act.FINALIZE_TARGET,
        Act.CLEANUP_TARGET,
        Act.ABANDON,
    }
)

_STEP_ACT: dict[ml.Step, Act] = {
    ml.Step.PREPARE: Act.PREPARE,
    ml.Step.MIGRATE: Act.MIGRATE,
    ml.Step.TRACK_COPY: Act.TRACK_COPY,
    ml.Step.FINALIZE_SOURCE: Act.FINALIZE_SOURCE,
    ml.Step.CLEANUP_SOURCE: Act.CLEANUP_SOURCE,
    ml.Step.ACCEPT: Act.ACCEPT,
    ml.Step.FINALIZE_TARGET: Act.FINALIZE_TARGET,
    ml.Step.CLEANUP_TARGET: Act.CLEANUP_TARGET,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Inputs:
    """Everything the owner of one instance on ``node`` decides from."""

    node: str
    instance: api.VirtualInstance | None
    """None: the VirtualInstance does not exist (deleted, its finalizer gone)."""
    fresh: bool
    """``instance`` and ``migration`` come from a GET/LIST just now, not the watch cache."""
    migration: api.Migration | None
    """The Migration of this instance that is not settled (see :func:`open_migration`)."""
    domain: values.InstanceInfo | None
    """This node's hypervisor about the instance (None: no such domain here)."""
    journal: journal.Entry | None
    """This node's journal entry for the instance."""
    node_draining: bool
    history: History
    now: float
    """Seconds since the epoch (restart backoff, migration deadlines)."""
    policy: Policy = dataclasses.field(default_factory=Policy)


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    act: Act
    memory_mib: int | None = None
    delay_s: float = 0.0
    message: str = ""


# --- facts about the typed inputs ---------------------------------------------------------


def hypervisor_name(namespace: str, name: str) -> str:
    """The hypervisor-level name of a VirtualInstance (see translate.instance_name)."""
    return translate.hypervisor_name(namespace, name)


def has_finalizer(vi: api.VirtualInstance) -> bool:
    return constants.INSTANCE_FINALIZER in vi.metadata.finalizers


def deleting(vi: api.VirtualInstance) -> bool:
    return bool(vi.metadata.deletion_timestamp)


def migration_view(mig: api.Migration) -> ml.MigrationView:
    return ml.MigrationView.of(mig)


def open_migration(
    migrations: Sequence[api.Migration], namespace: str, instance: str, node: str
) -> api.Migration | None:
    """The Migration the owner on ``node`` must heed: the one occupying the instance, else
    one that is not settled and still has a step for ``node`` (a cleanup after failure).

    Only one Migration is ever scheduled per instance; Pending ones have no roles yet.
    """
    views = [
        (m, ml.MigrationView.of(m))
        for m in migrations
        if m.metadata.namespace == namespace and m.spec.instance == instance
    ]
    for mig, view in views:
        if view.occupies_instance:
            return mig
    for mig, view in views:
        if (
            view.phase is not ml.Phase.PENDING
            and not view.settled
            and ml.role_of(view, node) is not None
        ):
            return mig
    return None


def alive(domain: values.InstanceInfo | None) -> bool:
    return domain is not None and domain.state.is_alive


# --- the decision --------------------------------------------------------------------------


def decide(inputs: Inputs) -> Action:
    """The owner's next act for one instance on ``inputs.node``. Pure."""
    action = _decide(inputs)
    if action.act in NEEDS_FRESH and not inputs.fresh:
        return Action(Act.REREAD, message=f"{action.act} needs a fresh read")
    return action


def _decide(inputs: Inputs) -> Action:
    journal_action = _journal(inputs)
    if journal_action is not None:
        return journal_action
    if inputs.instance is None:
        return _instance_gone(inputs)
    if inputs.migration is not None:
        view = ml.MigrationView.of(inputs.migration)
        migration_action = _migration(inputs, view)
        if migration_action is not None:
            return migration_action
        if view.occupies_instance:
            return Action(Act.NOTHING, message=f"Migration {view.name} owns the instance")
    return _lifecycle(inputs)


def _journal(inputs: Inputs) -> Action | None:
    """A journal entry whose migration is no longer open: resolve it before anything else."""
    entry = inputs.journal
    if entry is None:
        return None
    mig = inputs.migration
    if mig is not None and mig.metadata.uid == entry.migration_uid:
        view = ml.MigrationView.of(mig)
        done = (
            ml.COND_SOURCE_FINALIZED
            if entry.role is journal.Role.SOURCE
            else ml.COND_TARGET_FINALIZED
        )
        if view.terminal and view.condition_true(done):
            return Action(Act.CLEAR_JOURNAL)
        return None  # the migration is open: its steps resolve the entry
    if not inputs.fresh:
        return Action(Act.REREAD, message="journal entry without an open Migration")
    if entry.role is journal.Role.TARGET and inputs.domain is not None:
        # An incoming domain no Migration speaks for any more. finalize_migration_dst(False)
        # removes it only while it is a paused incoming copy; a resumed one is kept.
        return Action(
            Act.CLEANUP_TARGET,
            message=f"incoming copy of {entry.migration} has no open Migration",
        )
    return Action(Act.CLEAR_JOURNAL)


def _instance_gone(inputs: Inputs) -> Action:
    """The VirtualInstance no longer exists: end this node's part of its Migration (I4)."""
    if inputs.migration is None:
        return Action(Act.NOTHING)
    view = ml.MigrationView.of(inputs.migration)
    role = ml.role_of(view, inputs.node)
    done = {ml.Role.SOURCE: ml.COND_SOURCE_FINALIZED, ml.Role.TARGET: ml.COND_TARGET_FINALIZED}
    if role in done and not view.condition_true(done[role]):
        if not inputs.fresh:
            return Action(Act.REREAD, message="the instance seems gone")
        return Action(Act.ABANDON, message=f"VirtualInstance {view.instance} was deleted")
    return Action(Act.NOTHING)


def _migration(inputs: Inputs, view: ml.MigrationView) -> Action | None:
    """The migration step of this node, or NOTHING while the Migration owns the instance."""
    role = ml.role_of(view, inputs.node)
    if role is None or role is ml.Role.CONTROLLER:
        return None
    assert inputs.instance is not None
    if deleting(inputs.instance) and not view.abort_requested:
        # A deleted instance is not moved: no further forward step (the copy in flight is
        # aborted by the source's monitor; the controller aborts before Running).
        view = dataclasses.replace(view, abort_annotated=True)
    step = ml.next_step(view, role)
    act = _STEP_ACT.get(step)
    if act is not None:
        return Action(act)
    if (
        role is ml.Role.TARGET
        and view.phase is ml.Phase.RUNNING
        and view.start_time is not None
        and inputs.now - view.start_time.timestamp()
        > view.completion_timeout_s + inputs.policy.migration_takeover_grace_s
    ):
        # The source did not finish the migration in time (its agent may be dead while its
        # hypervisor went on). Judge by what arrived here.
        domain = inputs.domain
        if domain is None:
            return Action(
                Act.FAIL_NOT_ARRIVED,
                message=(
                    f"the migration did not finish within {view.completion_timeout_s} s and "
                    f"nothing arrived on {inputs.node}"
                ),
            )
        if domain.state is State.RUNNING:
            return Action(Act.TAKE_OVER, message=f"the copy runs on {inputs.node}")
        return Action(Act.NOTHING)  # still a paused incoming copy: the hypervisor decides
    return None


def _lifecycle(inputs: Inputs) -> Action:
    vi = inputs.instance
    assert vi is not None
    st = vi.status
    spec = vi.spec
    node = inputs.node
    name = hypervisor_name(vi.metadata.namespace or "", vi.metadata.name or "")
    if st.node_name != node:
        return Action(Act.NOTHING, message=f"instance is assigned to {st.node_name}, not {node}")
    if deleting(vi):
        return Action(Act.FINALIZE) if has_finalizer(vi) else Action(Act.NOTHING)
    phase = st.phase
    domain = inputs.domain
    if phase is VIPhase.MIGRATING:
        # No Migration occupies it (else _migration answered): give it back.
        return Action(Act.RELEASE_MIGRATING, message="no Migration owns the instance any more")
    if phase is VIPhase.EVICTED and inputs.node_draining:
        return Action(Act.NOTHING, message="evicted by the drain; the controller re-places it")
    if not has_finalizer(vi):
        return Action(Act.ADD_FINALIZER)
    if (
        inputs.node_draining
        and spec.eviction_policy is vim.EvictionPolicy.STOP
        and phase is not VIPhase.EVICTED
    ):
        return Action(Act.EVICT, message=f"node {node} is draining (evictionPolicy Stop)")
    generation = vi.metadata.generation or 0
    if (
        phase is VIPhase.FAILED
        and st.observed_generation == generation
        and not alive(domain)
        and spec.run_state is not vim.RunState.STOPPED
    ):
        return Action(Act.NOTHING, message="given up until the spec changes")
    state = domain.state if domain is not None else None
    if spec.run_state is vim.RunState.STOPPED:
        if alive(domain):
            return Action(Act.STOP)
        if state is not None:
            return Action(Act.CLEANUP)
        return Action(Act.NOTHING)
    if not alive(domain):
        if state is State.SHUTTING_DOWN:
            return Action(Act.NOTHING)
        if phase is VIPhase.UNKNOWN and st.hypervisor_id is not None:
            # It ran here when its node went silent and is gone now: it may run elsewhere.
            # (One that never ran — no hypervisor id reported — is started below, fenced.)
            return Action(
                Act.MARK_LOST,
                message=(
                    f"instance {name} was not found on node {node} after its agent lost "
                    "contact; it is not restarted automatically because it may run elsewhere. "
                    "Check the other nodes, then change the spec (for example runState "
                    "Stopped and back to Running) to start it"
                ),
            )
        return _restart(
            inputs,
            name,
            was_running=phase in (VIPhase.RUNNING, VIPhase.PAUSED) or state is State.CRASHED,
        )
    assert domain is not None
    if spec.reboot_generation > (st.reboot_generation or 0):
        return Action(Act.REBOOT)
    if spec.run_state is vim.RunState.PAUSED and state is State.RUNNING:
        return Action(Act.PAUSE)
    if spec.run_state is vim.RunState.RUNNING and state is State.PAUSED:
        return Action(Act.RESUME)
    target = balloon_target(vi, domain.memory_mib)
    if target != domain.memory_mib and spec.memory.min_mib > 0:
        return Action(Act.BALLOON, memory_mib=target)
    return Action(Act.NOTHING)


def _restart(inputs: Inputs, name: str, *, was_running: bool) -> Action:
    hist, policy, now = inputs.history, inputs.policy, inputs.now
    if not was_running:
        if hist.failed_starts:
            wait = instance_logic.history_wait(hist.failed_starts, hist, now, policy)
            if wait > 0:
                return Action(Act.WAIT, delay_s=wait)
        return Action(Act.START)
    recent = hist.recent(now, policy.crash_window_s)
    if recent >= policy.crash_limit:
        return Action(
            Act.CRASH_LOOP,
            message=(
                f"instance {name} stopped running {recent + 1} times within "
                f"{int(policy.crash_window_s)}s; not restarting it until its spec changes"
            ),
        )
    wait = instance_logic.history_wait(recent, hist, now, policy)
    if wait > 0:
        return Action(Act.WAIT, delay_s=wait)
    return Action(Act.RESTART)


def balloon_target(vi: api.VirtualInstance, actual_mib: int) -> int:
    """Memory the instance should have: the autoBalloon target, else actual kept in range."""
    memory = vi.spec.memory
    lo, hi = memory.min_mib, max(memory.min_mib, memory.max_mib)
    auto = vi.spec.auto_balloon
    wanted = actual_mib
    if auto.enabled and auto.target is not None:
        wanted = api.quantity.to_mib(auto.target)
    return max(lo, min(hi, wanted))
