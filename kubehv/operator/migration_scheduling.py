"""The controller's scheduling of a Migration: which target, or why none, or wait.

Why this module exists: choosing a target needs the cluster-wide view (every
NodeHypervisor, the other Migrations, the parallel limits, hypervisor versions, free
memory) that no agent has. :func:`schedule` is a pure function of the typed objects
(``kubehv.api`` models, parsed once where they arrive); the facts it compares are read
from them by :class:`NodeFacts` and :class:`InstanceFacts`, never from raw dicts.

Memory: the instance fits a target whose free memory holds what it uses now; if only its
minimum fits, the source balloons it down first (the target drivers accept an instance
whose minimum fits, as ``drivers.base.startup_memory`` does), and gives the memory back if
the migration fails.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from kubehv import api
from kubehv.api import conditions, constants, quantity
from kubehv.operator.migration_logic import MigrationView, Phase, now


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What scheduling compares about a NodeHypervisor."""

    name: str
    ready: bool
    schedulable: bool
    drain: bool
    hypervisor: str
    memory_free_mib: int | None
    hypervisor_version: str
    can_migrate: bool
    migration_address: str | None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, node: api.NodeHypervisor) -> NodeFacts:
        st = node.status
        return cls(
            name=node.metadata.name or "",
            ready=conditions.is_true(st.conditions, constants.COND_READY),
            schedulable=node.spec.schedulable,
            drain=node.spec.drain,
            hypervisor=node.spec.hypervisor,
            memory_free_mib=st.memory_free,
            hypervisor_version=st.hypervisor_version or "",
            can_migrate=st.can_migrate is not False,
            migration_address=node.spec.migration_address or None,
            labels=dict(node.metadata.labels),
        )


@dataclasses.dataclass(frozen=True)
class InstanceFacts:
    """What scheduling compares about a VirtualInstance."""

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
    pin: str | None = None
    selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    local_disks: bool = False  # image/blank disks not declared shared: only on its node

    @classmethod
    def of(cls, vi: api.VirtualInstance) -> InstanceFacts:
        st = vi.status
        actual = quantity.to_mib(st.actual_memory) if st.actual_memory is not None else None
        return cls(
            name=vi.metadata.name or "",
            namespace=vi.metadata.namespace or "",
            node_name=st.node_name or None,
            phase=st.phase.value if st.phase is not None else "",
            hypervisor=vi.spec.hypervisor,
            memory_min_mib=vi.spec.memory.min_mib,
            memory_max_mib=vi.spec.memory.max_mib,
            actual_memory_mib=actual,
            eviction_policy=vi.spec.eviction_policy.value,
            deleting=bool(vi.metadata.deletion_timestamp),
            pin=vi.spec.node_name or None,
            selector=dict(vi.spec.node_selector),
            local_disks=any(
                (d.image is not None or d.blank is not None) and not d.shared for d in vi.spec.disks
            ),
        )

    @property
    def memory_in_use_mib(self) -> int:
        return self.actual_memory_mib if self.actual_memory_mib else self.memory_max_mib


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


def memory_problem(instance: InstanceFacts, node: NodeFacts) -> tuple[str | None, int | None]:
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
    vi: api.VirtualInstance | None,
    node_models: Sequence[api.NodeHypervisor],
    others: Sequence[MigrationView],
    limits: Limits,
) -> Decision:
    """The controller's Pending decision: Scheduled, Refused (-> Failed) or Queued (wait)."""
    if vi is None:
        return Refused(f"VirtualInstance {migration.instance} does not exist")
    instance = InstanceFacts.of(vi)
    nodes = [NodeFacts.of(n) for n in node_models]
    if instance.deleting:
        return Refused(f"VirtualInstance {migration.instance} is being deleted")
    if instance.node_name is None:
        return Refused(f"VirtualInstance {instance.name} is not placed on any node")
    # One migration per instance: name the Migration already moving it before judging the
    # instance's phase (it reads Migrating while that Migration runs).
    for other in others:
        if (
            other.uid == migration.uid
            or other.namespace != migration.namespace
            or other.instance != migration.instance
        ):
            continue  # another Migration, or one of a same-named instance elsewhere
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
    instance: InstanceFacts,
    source: NodeFacts,
    target: NodeFacts | None,
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
    if instance.pin is not None and instance.pin != name:
        return f"the instance is pinned to node {instance.pin} (spec.nodeName)"
    for key, value in instance.selector.items():
        if target.labels.get(key) != value:
            return f"target node {name} does not match the instance's nodeSelector {key}={value}"
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
    instance: InstanceFacts,
    source: NodeFacts,
    nodes: Sequence[NodeFacts],
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
