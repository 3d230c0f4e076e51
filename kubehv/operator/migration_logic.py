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
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubehv import api
from kubehv.api import migration as migration_api
from kubehv.drivers import values
from kubehv.operator import status as status_mod

GROUP = "kubehv.io"
VERSION = "v1alpha1"
PLURAL = "migrations"
ABORT_ANNOTATION = "kubehv.io/abort"
FINALIZER = "kubehv.io/migration"
DRAIN_LABEL = "kubehv.io/drain"

# Condition types on a Migration.
COND_TARGET_FINALIZED = "TargetFinalized"
COND_SOURCE_FINALIZED = "SourceFinalized"
COND_INSTANCE_MOVED = "InstanceMoved"
COND_QUEUED = "Queued"
COND_MEMORY_REDUCED = "MemoryReduced"

DEFAULT_COMPLETION_TIMEOUT_S = 600


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    PREPARING = "Preparing"
    TARGET_READY = "TargetReady"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"


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
    conditions: Mapping[str, Mapping[str, Any]]
    deleting: bool
    abort_annotated: bool
    finalizers: tuple[str, ...]
    failure_reason: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> MigrationView:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        annotations = meta.get("annotations") or {}
        raw_phase = status.get("phase") or Phase.PENDING.value
        try:
            phase = Phase(raw_phase)
        except ValueError:
            phase = Phase.PENDING
        conds = {
            str(c.get("type")): c
            for c in (status.get("conditions") or [])
            if isinstance(c, Mapping) and c.get("type")
        }
        timeout = _int_or_none(spec.get("completionTimeout"))
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            instance=str(spec.get("instance", "")),
            requested_target=spec.get("targetNode") or None,
            live=(spec.get("mode") or "live") != "non-live",
            bandwidth_mib_s=_int_or_none(spec.get("bandwidth")),
            max_downtime_ms=_int_or_none(spec.get("maxDowntime")),
            completion_timeout_s=(
                timeout if timeout and timeout > 0 else DEFAULT_COMPLETION_TIMEOUT_S
            ),
            allow_unsafe_version_pair=bool(spec.get("allowUnsafeVersionPair", False)),
            phase=phase,
            source_node=status.get("sourceNode") or None,
            target_node=status.get("targetNode") or None,
            migration_info=str(status.get("migrationInfo") or ""),
            start_time=status_mod.parse_time(status.get("startTime")),
            creation_time=status_mod.parse_time(meta.get("creationTimestamp")),
            conditions=conds,
            deleting=bool(meta.get("deletionTimestamp")),
            abort_annotated=str(annotations.get(ABORT_ANNOTATION, "")).lower() == "true",
            finalizers=tuple(meta.get("finalizers") or ()),
            failure_reason=str(status.get("failureReason") or ""),
        )

    @classmethod
    def of(cls, mig: api.Migration) -> MigrationView:
        """The protocol's view of a typed Migration (the model parsed at the edge)."""
        meta, spec, st = mig.metadata, mig.spec, mig.status
        try:
            phase = Phase(st.phase.value) if st.phase is not None else Phase.PENDING
        except ValueError:
            phase = Phase.PENDING
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
            conditions={c.type: c.model_dump(mode="json", by_alias=True) for c in st.conditions},
            deleting=bool(meta.deletion_timestamp),
            abort_annotated=meta.annotations.get(ABORT_ANNOTATION, "").lower() == "true",
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
        return bool(cond) and str(cond.get("status")) == "True"  # type: ignore[union-attr]

    @property
    def settled(self) -> bool:
        """Terminal and every involved side has done its last step: safe to forget."""
        if not self.terminal:
            return False
        if self.phase is Phase.SUCCEEDED:
            return self.condition_true(COND_INSTANCE_MOVED)
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


def next_step(view: MigrationView, role: Role, moment: datetime.datetime | None = None) -> Step:
    """The single step ``role`` should take now. Pure: depends only on the object and time."""
    phase = view.phase
    if role is Role.CONTROLLER:
        return _controller_step(view, moment or now())
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


def _controller_step(view: MigrationView, moment: datetime.datetime) -> Step:
    phase = view.phase
    if phase in BEFORE_RUNNING and view.abort_requested:
        return Step.ABORT
    if phase is Phase.PENDING:
        return Step.SCHEDULE
    if phase in BEFORE_RUNNING and timed_out(view, moment):
        return Step.TIME_OUT
    if phase is Phase.SUCCEEDED and not view.condition_true(COND_INSTANCE_MOVED):
        return Step.HAND_OFF
    if view.deleting and FINALIZER in view.finalizers and view.settled:
        return Step.RELEASE
    return Step.NONE


def timed_out(view: MigrationView, moment: datetime.datetime) -> bool:
    if view.start_time is None:
        return False
    return (moment - view.start_time).total_seconds() > view.completion_timeout_s


# --- status writes (merge patches guarded by resourceVersion) --------------------------------


def condition(
    ctype: str, status: bool, reason: str, message: str, moment: datetime.datetime | None = None
) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": format_time(moment or now()),
    }


def merged_conditions(
    existing: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Replace conditions by type, keeping lastTransitionTime when the status did not change."""
    result = [dict(c) for c in existing]
    for new in updates:
        for i, old in enumerate(result):
            if old.get("type") == new.get("type"):
                merged = dict(new)
                if old.get("status") == new.get("status") and old.get("lastTransitionTime"):
                    merged["lastTransitionTime"] = old["lastTransitionTime"]
                result[i] = merged
                break
        else:
            result.append(dict(new))
    return result


def status_patch(
    view: MigrationView,
    fields: Mapping[str, Any] | None = None,
    conditions: Sequence[Mapping[str, Any]] = (),
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
    conditions: Sequence[Mapping[str, Any]] = (),
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
    extra_conditions: Sequence[Mapping[str, Any]] = (),
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


# --- scheduling (controller) -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeView:
    """What the controller knows about a NodeHypervisor."""

    name: str
    ready: bool
    schedulable: bool
    drain: bool
    hypervisor: str
    memory_free_mib: int | None
    hypervisor_version: str
    can_migrate: bool
    migration_address: str | None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NodeView:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and str(c.get("status")) == "True"
            for c in (status.get("conditions") or [])
            if isinstance(c, Mapping)
        )
        return cls(
            name=str(meta.get("name", "")),
            ready=ready,
            schedulable=bool(spec.get("schedulable", True)),
            drain=bool(spec.get("drain", False)),
            hypervisor=str(spec.get("hypervisor") or ""),
            memory_free_mib=_int_or_none(status.get("memoryFree")),
            hypervisor_version=str(status.get("hypervisorVersion") or ""),
            can_migrate=bool(status.get("canMigrate", True)),
            migration_address=spec.get("migrationAddress") or None,
        )


@dataclasses.dataclass(frozen=True)
class InstanceView:
    """What the protocol needs of a VirtualInstance."""

    name: str
    namespace: str
    node_name: str | None
    phase: str
    hypervisor: str
    memory_min_mib: int
    memory_max_mib: int
    actual_memory_mib: int | None
    eviction_policy: str
    deleting: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> InstanceView:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        memory = spec.get("memory") or {}
        mem_min = parse_mib(memory.get("min")) or 0
        mem_max = parse_mib(memory.get("max")) or mem_min
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            node_name=status.get("nodeName") or None,
            phase=str(status.get("phase") or ""),
            hypervisor=str(spec.get("hypervisor") or ""),
            memory_min_mib=mem_min,
            memory_max_mib=mem_max,
            actual_memory_mib=parse_mib(status.get("actualMemory")),
            eviction_policy=str(spec.get("evictionPolicy") or "LiveMigrate"),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    @property
    def memory_in_use_mib(self) -> int:
        return self.actual_memory_mib if self.actual_memory_mib else self.memory_max_mib


_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?|[kMGT]|)\s*$")
_FACTOR_MIB = {
    "": 1 / (1024 * 1024),
    "Ki": 1 / 1024,
    "k": 1000 / (1024 * 1024),
    "K": 1000 / (1024 * 1024),
    "Mi": 1,
    "M": 1000**2 / 1024**2,
    "Gi": 1024,
    "G": 1000**3 / 1024**2,
    "Ti": 1024**2,
    "T": 1000**4 / 1024**2,
}


def parse_mib(value: Any) -> int | None:
    """Memory in MiB from an int (already MiB) or a Kubernetes quantity string ("512Mi")."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    match = _QUANTITY.match(str(value))
    if not match:
        return None
    number, unit = match.groups()
    if unit == "":  # a bare number in a manifest's memory field means MiB
        return int(float(number))
    return int(float(number) * _FACTOR_MIB[unit])


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = _VERSION.search(text or "")
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def version_pair_problem(source: str, target: str) -> str | None:
    """Why migrating from a node at version ``source`` to one at ``target`` is unsafe, or None.

    Ganeti refuses to migrate between differing hypervisor versions unless forced; we accept
    the same major.minor (patch releases keep the migration stream compatible) with the
    target not older than the source.
    """
    if source == target:
        return None
    src, dst = parse_version(source), parse_version(target)
    if src is None or dst is None:
        return (
            f"cannot compare hypervisor versions {source or 'unknown'!r} (source) and "
            f"{target or 'unknown'!r} (target)"
        )
    if src[:2] != dst[:2]:
        return (
            f"hypervisor versions differ: source {source}, target {target} (major.minor must match)"
        )
    if dst < src:
        return f"target hypervisor {target} is older than source {source}"
    return None


@dataclasses.dataclass(frozen=True)
class Limits:
    per_node: int = 2
    per_cluster: int = 10


@dataclasses.dataclass(frozen=True)
class Scheduled:
    source: str
    target: str
    balloon_to_mib: int | None = None


@dataclasses.dataclass(frozen=True)
class Refused:
    reason: str


@dataclasses.dataclass(frozen=True)
class Queued:
    reason: str


Decision = Scheduled | Refused | Queued


def _active_counts(others: Iterable[MigrationView]) -> tuple[dict[str, int], int]:
    per_node: dict[str, int] = {}
    total = 0
    for other in others:
        if other.phase is Phase.PENDING or other.terminal:
            continue
        total += 1
        for node in {other.source_node, other.target_node}:
            if node:
                per_node[node] = per_node.get(node, 0) + 1
    return per_node, total


def memory_problem(instance: InstanceView, node: NodeView) -> tuple[str | None, int | None]:
    """(refusal reason, balloon target): does the instance fit the node's free memory?"""
    free = node.memory_free_mib
    if free is None:
        return f"target node {node.name} has not reported its free memory yet", None
    need = instance.memory_in_use_mib
    if need <= free:
        return None, None
    if instance.memory_min_mib <= free:
        return None, free
    return (
        f"instance {instance.name} uses {need} MiB (minimum {instance.memory_min_mib} MiB) but "
        f"target node {node.name} has only {free} MiB free",
        None,
    )


def schedule(
    migration: MigrationView,
    instance: InstanceView | None,
    nodes: Sequence[NodeView],
    others: Sequence[MigrationView],
    limits: Limits,
) -> Decision:
    """The controller's Pending decision: Scheduled, Refused (-> Failed) or Queued (wait)."""
    if instance is None or instance.deleting:
        return Refused(f"VirtualInstance {migration.instance} does not exist (or is being deleted)")
    if instance.node_name is None:
        return Refused(f"VirtualInstance {instance.name} is not placed on any node")
    # One migration per instance: name the Migration already moving it before judging the
    # instance's phase (it reads Migrating while that Migration runs).
    for other in others:
        if other.uid == migration.uid or other.instance != migration.instance:
            continue
        if other.occupies_instance or (
            other.phase is Phase.PENDING and _older(other, migration) and not other.terminal
        ):
            return Refused(
                f"VirtualInstance {instance.name} already has an active Migration {other.name}"
            )
    if instance.phase not in ("Running", "Paused"):
        return Refused(
            f"VirtualInstance {instance.name} is {instance.phase or 'not running'}; only a "
            "running instance can be migrated"
        )
    by_name = {n.name: n for n in nodes}
    source = by_name.get(instance.node_name)
    if source is None:
        return Refused(f"source node {instance.node_name} has no NodeHypervisor")
    per_node, total = _active_counts(o for o in others if o.uid != migration.uid)
    if total >= limits.per_cluster:
        return Queued(
            f"{total} migrations already running in the cluster (limit {limits.per_cluster})"
        )
    if per_node.get(source.name, 0) >= limits.per_node:
        return Queued(
            f"source node {source.name} already takes part in {per_node[source.name]} "
            f"migrations (limit {limits.per_node})"
        )
    if migration.requested_target is not None:
        target = by_name.get(migration.requested_target)
        problem = _target_problem(migration, instance, source, target, migration.requested_target)
        if problem is not None:
            return Refused(problem)
        assert target is not None
        if per_node.get(target.name, 0) >= limits.per_node:
            return Queued(
                f"target node {target.name} already takes part in {per_node[target.name]} "
                f"migrations (limit {limits.per_node})"
            )
        mem_problem, balloon = memory_problem(instance, target)
        if mem_problem is not None:
            return Refused(mem_problem)
        return Scheduled(source.name, target.name, balloon)
    return _pick_target(
        migration, instance=instance, source=source, nodes=nodes, per_node=per_node, limits=limits
    )


def _older(a: MigrationView, b: MigrationView) -> bool:
    ka = (a.creation_time or now(), a.name)
    kb = (b.creation_time or now(), b.name)
    return ka < kb


def _target_problem(
    migration: MigrationView,
    instance: InstanceView,
    source: NodeView,
    target: NodeView | None,
    name: str,
) -> str | None:
    if target is None:
        return f"target node {name} has no NodeHypervisor"
    if target.name == source.name:
        return f"target node {name} is the node the instance already runs on"
    if not target.ready:
        return f"target node {name} is not Ready"
    if not target.schedulable or target.drain:
        return f"target node {name} is not schedulable (cordoned or draining)"
    if instance.hypervisor and target.hypervisor and target.hypervisor != instance.hypervisor:
        return (
            f"target node {name} runs {target.hypervisor}, the instance needs {instance.hypervisor}"
        )
    if not target.can_migrate or not source.can_migrate:
        return f"the hypervisor on {source.name} or {name} cannot migrate"
    if not target.migration_address:
        return f"target node {name} has no migrationAddress"
    if not migration.allow_unsafe_version_pair:
        problem = version_pair_problem(source.hypervisor_version, target.hypervisor_version)
        if problem is not None:
            return (
                f"unsafe hypervisor version pair: {problem}; set allowUnsafeVersionPair: true "
                "to migrate anyway"
            )
    return None


def _pick_target(
    migration: MigrationView,
    *,
    instance: InstanceView,
    source: NodeView,
    nodes: Sequence[NodeView],
    per_node: Mapping[str, int],
    limits: Limits,
) -> Decision:
    reasons: list[str] = []
    fitting: list[tuple[bool, int, int, str, int | None]] = []
    busy = False
    for node in nodes:
        if node.name == source.name:
            continue
        problem = _target_problem(migration, instance, source, node, node.name)
        if problem is None:
            problem, balloon = memory_problem(instance, node)
        if problem is not None:
            reasons.append(problem)
            continue
        if per_node.get(node.name, 0) >= limits.per_node:
            busy = True
            continue
        free = node.memory_free_mib or 0
        fitting.append((balloon is not None, -free, per_node.get(node.name, 0), node.name, balloon))
    if fitting:
        fitting.sort()
        best = fitting[0]
        return Scheduled(source.name, best[3], best[4])
    if busy:
        return Queued("every node that fits already takes part in its limit of migrations")
    return Refused("no node can take the instance: " + ("; ".join(reasons) or "no other nodes"))


# --- progress (source agent) -----------------------------------------------------------------


def progress_dict(
    status: values.MigrationStatus, rate_bytes_s: float | None = None
) -> dict[str, int]:
    result = {
        "memoryTotal": int(status.memory_total_bytes),
        "memoryProcessed": int(status.memory_processed_bytes),
        "memoryRemaining": int(status.memory_remaining_bytes),
        "percent": int(status.percent),
    }
    if rate_bytes_s is not None:
        result["rateBytesPerSecond"] = int(rate_bytes_s)
    return result


@dataclasses.dataclass
class ProgressTracker:
    """Turns successive MigrationStatus samples into a rate and a no-progress verdict."""

    stall_timeout_s: float
    last_processed: int = -1
    last_remaining: int = -1
    last_change_at: float | None = None
    last_sample_at: float | None = None
    rate_bytes_s: float | None = None

    def update(self, status: values.MigrationStatus, at: float) -> bool:
        """Record a sample taken at monotonic time ``at``; True if it shows progress."""
        moved = (
            status.memory_processed_bytes != self.last_processed
            or status.memory_remaining_bytes != self.last_remaining
        )
        if (
            self.last_sample_at is not None
            and self.last_processed >= 0
            and at > self.last_sample_at
        ):
            delta = status.memory_processed_bytes - self.last_processed
            if delta >= 0:
                self.rate_bytes_s = delta / (at - self.last_sample_at)
        if moved or self.last_change_at is None:
            self.last_change_at = at
        self.last_processed = status.memory_processed_bytes
        self.last_remaining = status.memory_remaining_bytes
        self.last_sample_at = at
        return moved

    def stalled(self, at: float) -> bool:
        return self.last_change_at is not None and at - self.last_change_at > self.stall_timeout_s


# --- restart of the source agent (Ganeti's cleanup mode) -------------------------------------


class Recovery(enum.StrEnum):
    RESUME_WATCH = "ResumeWatch"  # the hypervisor still migrates: poll until it ends
    COMPLETED = "Completed"  # the instance left the source: go to Finalizing
    INTERRUPTED = "Interrupted"  # still on the source, no migration going on: Failed


def recover_running(alive_on_source: bool, status: values.MigrationStatus | None) -> Recovery:
    """Where does a Running migration stand after the source agent restarted?

    Ganeti's cleanup mode asks where the instance really runs. The source node knows whether
    its copy is alive and whether the hypervisor still has a migration job; the target's view
    is checked by the target agent in Finalizing (finalize_migration_dst fails if the
    instance did not arrive).
    """
    if status is not None and status.state is values.MigrationState.ACTIVE:
        return Recovery.RESUME_WATCH
    if status is not None and status.state is values.MigrationState.COMPLETED:
        return Recovery.COMPLETED
    if not alive_on_source:
        return Recovery.COMPLETED
    return Recovery.INTERRUPTED
