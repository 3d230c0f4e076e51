"""The Migration protocol as pure functions: who acts at which phase, and what they write.

Why this module exists: a migration is a hand-off between three processes (controller, source
agent, target agent) that may each die at any moment. Keeping every decision here, free of
kopf, Kubernetes clients and drivers, lets the whole state machine be unit-tested without a
server, and makes the acting modules (:mod:`migration_source`, :mod:`migration_target`,
:mod:`migration_controller`) thin: read the object, ask :func:`next_step`, do that one step,
write the status guarded by
``metadata.resourceVersion`` (so a concurrent writer gets 409 and re-reads: one winner).

The order is Ganeti's::

    Pending --controller--> Scheduled --source: migration_info--> Preparing
      --target: accept_instance--> TargetReady --source claims--> Running
      --source: migrate_instance ok--> Finalizing --target: finalize_migration_dst(True)
      [condition TargetFinalized] --source: finalize_migration_source(True)--> Succeeded
      --controller: VirtualInstance status.nodeName := target [condition InstanceMoved]

Any failure writes Failed (or Aborted) first; then each side that has not yet done so calls
its finalize with ``success=False`` and records ``SourceFinalized`` / ``TargetFinalized``.
Only then does the controller drop its finalizer from a deleted Migration.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from kubehv import api
from kubehv.api import constants
from kubehv.api import migration as migration_api
from kubehv.drivers import values
from kubehv.operator import status as status_mod

# Condition types on a Migration.
COND_TARGET_FINALIZED = "TargetFinalized"
COND_SOURCE_FINALIZED = "SourceFinalized"
COND_INSTANCE_MOVED = "InstanceMoved"
COND_QUEUED = "Queued"
COND_MEMORY_REDUCED = "MemoryReduced"
REASON_COMPLETED_ANYWAY = "MigrationCompleted"
"""TargetFinalized reason: asked to roll back, the target found the copy complete and kept it."""

DEFAULT_COMPLETION_TIMEOUT_S = 600


Phase = migration_api.Phase
"""The Migration's phases, as the API defines them (kubehv.api.migration)."""

TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.ABORTED})
UNSUCCESSFUL = frozenset({Phase.FAILED, Phase.ABORTED})
# Phases in which nothing irreversible has happened yet: the controller may abort or time out.
BEFORE_RUNNING = frozenset({Phase.PENDING, Phase.SCHEDULED, Phase.PREPARING, Phase.TARGET_READY})


class Role(enum.StrEnum):
    CONTROLLER = "controller"
    SOURCE = "source"
    TARGET = "target"


class Step(enum.StrEnum):
    """The one thing a role should do now for a Migration (NONE: nothing)."""

    NONE = "None"
    SCHEDULE = "Schedule"  # controller: Pending -> Scheduled (or Failed / stay queued)
    PREPARE = "Prepare"  # source: migration_info, Scheduled -> Preparing
    ACCEPT = "Accept"  # target: accept_instance, Preparing -> TargetReady
    MIGRATE = "Migrate"  # source: claim Running, then migrate_instance
    TRACK_COPY = "TrackCopy"  # source: follow a Running copy (after a restart: recover it)
    ABORT = "Abort"  # controller: abort requested before Running -> Aborted
    TIME_OUT = "TimeOut"  # controller: stuck before Running past completionTimeout -> Failed
    FINALIZE_TARGET = "FinalizeTarget"  # target: finalize_migration_dst(True)
    FINALIZE_SOURCE = "FinalizeSource"  # source: finalize_migration_source(True) -> Succeeded
    CLEANUP_TARGET = "CleanupTarget"  # target: finalize_migration_dst(False)
    CLEANUP_SOURCE = "CleanupSource"  # source: finalize_migration_source(False)
    SUCCEED_WITHOUT_SOURCE = "SucceedWithoutSource"  # controller: Finalizing, source silent
    HAND_OFF = "HandOff"  # controller: move VirtualInstance status.nodeName to the target
    RELEASE = "Release"  # controller: drop the finalizer of a deleted, settled Migration


# --- reading a Migration ---------------------------------------------------------------------


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class MigrationView:
    """The fields of a Migration object the protocol looks at, typed."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    instance: str
    requested_target: str | None
    live: bool
    bandwidth_mib_s: int | None
    max_downtime_ms: int | None
    completion_timeout_s: int
    allow_unsafe_version_pair: bool
    phase: Phase
    source_node: str | None
    target_node: str | None
    migration_info: str
    start_time: datetime.datetime | None
    creation_time: datetime.datetime | None
    conditions: Mapping[str, api.Condition]
    deleting: bool
    abort_annotated: bool
    finalizers: tuple[str, ...]
    failure_reason: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> MigrationView:
        """Parse a raw Migration (a watch event, a GET) into the model, then the view.
        Raises ``pydantic.ValidationError`` (a ValueError) for an object that is not one."""
        return cls.of(api.Migration.model_validate(body))

    @classmethod
    def of(cls, mig: api.Migration) -> MigrationView:
        """The protocol's view of a typed Migration (the model parsed at the edge)."""
        meta, spec, st = mig.metadata, mig.spec, mig.status
        phase = st.phase if st.phase is not None else Phase.PENDING
        timeout = spec.completion_timeout
        return cls(
            name=meta.name or "",
            namespace=meta.namespace or "",
            uid=meta.uid or "",
            resource_version=meta.resource_version or "",
            instance=spec.instance,
            requested_target=spec.target_node or None,
            live=spec.mode is not migration_api.Mode.NON_LIVE,
            bandwidth_mib_s=spec.bandwidth,
            max_downtime_ms=spec.max_downtime,
            completion_timeout_s=timeout if timeout > 0 else DEFAULT_COMPLETION_TIMEOUT_S,
            allow_unsafe_version_pair=spec.allow_unsafe_version_pair,
            phase=phase,
            source_node=st.source_node or None,
            target_node=st.target_node or None,
            migration_info=st.migration_info or "",
            start_time=status_mod.parse_time(st.start_time),
            creation_time=status_mod.parse_time(meta.creation_timestamp),
            conditions={c.type: c for c in st.conditions},
            deleting=bool(meta.deletion_timestamp),
            abort_annotated=meta.annotations.get(constants.ABORT_ANNOTATION, "").lower() == "true",
            finalizers=tuple(meta.finalizers),
            failure_reason=st.failure_reason or "",
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def abort_requested(self) -> bool:
        return self.deleting or self.abort_annotated

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def condition_true(self, ctype: str) -> bool:
        cond = self.conditions.get(ctype)
        return cond is not None and cond.status is api.conditions.ConditionStatus.TRUE

    @property
    def target_kept(self) -> bool:
        """Failed or Aborted, yet the target found the copy complete and kept it (the only
        copy): the instance must move to the target all the same."""
        cond = self.conditions.get(COND_TARGET_FINALIZED)
        return (
            self.phase in UNSUCCESSFUL
            and cond is not None
            and cond.reason == REASON_COMPLETED_ANYWAY
        )

    @property
    def settled(self) -> bool:
        """Terminal and every involved side has done its last step: safe to forget."""
        if not self.terminal:
            return False
        moves = self.phase is Phase.SUCCEEDED or self.target_kept
        if moves and not self.condition_true(COND_INSTANCE_MOVED):
            return False
        if self.phase is Phase.SUCCEEDED:
            return True
        if self.source_node is None:  # never scheduled: nobody did anything
            return True
        return self.condition_true(COND_SOURCE_FINALIZED) and self.condition_true(
            COND_TARGET_FINALIZED
        )

    @property
    def occupies_instance(self) -> bool:
        """True while this Migration owns its instance (no other may start)."""
        if self.phase is Phase.PENDING:
            return False
        if self.phase in UNSUCCESSFUL:
            # The instance is free again once the source has cleaned up (its copy runs on);
            # a target that is gone for good must not block the instance forever.
            if self.target_kept and not self.condition_true(COND_INSTANCE_MOVED):
                return True
            return self.source_node is not None and not self.condition_true(COND_SOURCE_FINALIZED)
        return not self.settled

    def options(self) -> values.MigrationOptions:
        return values.MigrationOptions(
            bandwidth_mib_s=self.bandwidth_mib_s, max_downtime_ms=self.max_downtime_ms
        )


# --- who does what ---------------------------------------------------------------------------


def role_of(view: MigrationView, node: str) -> Role | None:
    """An agent's role for this Migration (None: not involved)."""
    if view.source_node == node:
        return Role.SOURCE
    if view.target_node == node:
        return Role.TARGET
    return None


def next_step(
    view: MigrationView,
    role: Role,
    moment: datetime.datetime | None = None,
    silent: Collection[str] = (),
) -> Step:
    """The single step ``role`` should take now. Pure: depends only on the object, the time
    and (for the controller) which nodes' agents have gone silent."""
    phase = view.phase
    if role is Role.CONTROLLER:
        return _controller_step(view, moment or now(), silent)
    if role is Role.SOURCE:
        if phase is Phase.SCHEDULED and not view.abort_requested:
            return Step.PREPARE
        if phase is Phase.TARGET_READY and not view.abort_requested:
            return Step.MIGRATE
        if phase is Phase.RUNNING:
            return Step.TRACK_COPY
        if phase is Phase.FINALIZING and view.condition_true(COND_TARGET_FINALIZED):
            return Step.FINALIZE_SOURCE
        if (
            phase in UNSUCCESSFUL
            and view.source_node is not None
            and not view.condition_true(COND_SOURCE_FINALIZED)
        ):
            return Step.CLEANUP_SOURCE
        return Step.NONE
    # target
    if phase is Phase.PREPARING and not view.abort_requested:
        return Step.ACCEPT
    if phase is Phase.FINALIZING and not view.condition_true(COND_TARGET_FINALIZED):
        return Step.FINALIZE_TARGET
    if (
        phase in UNSUCCESSFUL
        and view.target_node is not None
        and not view.condition_true(COND_TARGET_FINALIZED)
    ):
        return Step.CLEANUP_TARGET
    return Step.NONE


def _controller_step(
    view: MigrationView, moment: datetime.datetime, silent: Collection[str]
) -> Step:
    phase = view.phase
    if phase in BEFORE_RUNNING and view.abort_requested:
        return Step.ABORT
    if phase is Phase.PENDING:
        return Step.SCHEDULE
    if phase in BEFORE_RUNNING and timed_out(view, moment):
        return Step.TIME_OUT
    if (
        phase is Phase.FINALIZING
        and view.condition_true(COND_TARGET_FINALIZED)
        and view.source_node in silent
        and timed_out(view, moment)
    ):
        # The copy runs on the target (it said so) and the source's agent is gone past its
        # deadline: the migration did succeed; the source's leftover is an orphan until its
        # agent returns. Keeps I4 (terminal in bounded time) without touching any guest.
        return Step.SUCCEED_WITHOUT_SOURCE
    if (phase is Phase.SUCCEEDED or view.target_kept) and not view.condition_true(
        COND_INSTANCE_MOVED
    ):
        return Step.HAND_OFF
    if view.deleting and constants.MIGRATION_FINALIZER in view.finalizers and view.settled:
        return Step.RELEASE
    return Step.NONE


def timed_out(view: MigrationView, moment: datetime.datetime) -> bool:
    if view.start_time is None:
        return False
    return (moment - view.start_time).total_seconds() > view.completion_timeout_s


# --- status writes (merge patches guarded by resourceVersion) --------------------------------


def condition(
    ctype: str, status: bool, reason: str, message: str, moment: datetime.datetime | None = None
) -> api.Condition:
    return api.Condition(
        type=ctype,
        status=api.conditions.ConditionStatus.TRUE
        if status
        else api.conditions.ConditionStatus.FALSE,
        reason=reason,
        message=message,
        last_transition_time=format_time(moment or now()),
    )


ConditionLike = api.Condition | Mapping[str, Any]
_STATUS = {True: api.conditions.ConditionStatus.TRUE, False: api.conditions.ConditionStatus.FALSE}


def _typed(cond: ConditionLike) -> api.Condition:
    return cond if isinstance(cond, api.Condition) else api.Condition.model_validate(cond)


def merged_conditions(
    existing: Iterable[ConditionLike], updates: Iterable[ConditionLike]
) -> list[dict[str, Any]]:
    """Replace conditions by type (:func:`kubehv.api.conditions.set_condition`: the
    lastTransitionTime stays when the status did not change), in wire form."""
    result = [_typed(c) for c in existing]
    for raw in updates:
        new = _typed(raw)
        result = api.conditions.set_condition(
            result,
            new.type,
            new.status,
            new.reason,
            new.message,
            new.observed_generation,
            new.last_transition_time,
        )
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result]


def status_patch(
    view: MigrationView,
    fields: Mapping[str, Any] | None = None,
    conditions: Sequence[ConditionLike] = (),
) -> dict[str, Any]:
    """A merge patch for the status subresource, guarded by the view's resourceVersion."""
    status: dict[str, Any] = dict(fields or {})
    if conditions:
        status["conditions"] = merged_conditions(view.conditions.values(), conditions)
    return {"metadata": {"resourceVersion": view.resource_version}, "status": status}


def transition(
    view: MigrationView,
    to: Phase,
    fields: Mapping[str, Any] | None = None,
    conditions: Sequence[ConditionLike] = (),
    moment: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The patch that moves ``view`` to phase ``to`` (refuses illegal moves)."""
    if not allowed(view.phase, to):
        raise ValueError(f"illegal Migration phase change {view.phase} -> {to}")
    body: dict[str, Any] = {"phase": to.value, **(fields or {})}
    if to in TERMINAL:
        body.setdefault("endTime", format_time(moment or now()))
    return status_patch(view, body, conditions)


def fail(
    view: MigrationView,
    reason: str,
    *,
    aborted: bool = False,
    extra_conditions: Sequence[ConditionLike] = (),
) -> dict[str, Any]:
    phase = Phase.ABORTED if aborted else Phase.FAILED
    return transition(view, phase, {"failureReason": reason}, extra_conditions)


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.SCHEDULED, Phase.FAILED, Phase.ABORTED}),
    Phase.SCHEDULED: frozenset({Phase.PREPARING, Phase.FAILED, Phase.ABORTED}),
    Phase.PREPARING: frozenset({Phase.TARGET_READY, Phase.FAILED, Phase.ABORTED}),
    Phase.TARGET_READY: frozenset({Phase.RUNNING, Phase.FAILED, Phase.ABORTED}),
    Phase.RUNNING: frozenset({Phase.FINALIZING, Phase.FAILED, Phase.ABORTED}),
    Phase.FINALIZING: frozenset({Phase.SUCCEEDED, Phase.FAILED}),
    Phase.SUCCEEDED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.ABORTED: frozenset(),
}


def allowed(src: Phase, dst: Phase) -> bool:
    return dst in _ALLOWED[src]
