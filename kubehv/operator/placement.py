"""Pure placement: which node gets an unplaced VirtualInstance, or why none can.

Why this module exists: the controller's scheduling decision is a function of the instance
and the nodes as last reported, plus the instances already assigned; keeping it pure lets the
tests cover pins, selectors, memory and spreading without a server. The memory rule is the
startup-memory rule: the instance's *min* must fit in what is free, counting instances
placed on the node that it has not reported yet.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubehv.operator import memory_commit, status, translate

# Phases in which an assigned instance holds (or is about to hold) memory on its node.
HOLDING = frozenset(
    {
        "",
        "Pending",
        "Scheduled",
        "Starting",
        "Running",
        "Paused",
        "Migrating",
        "Stopping",
        "Unknown",
    }
)
UNREPORTED = frozenset({"", "Pending", "Scheduled", "Starting"})


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    hypervisor: str
    labels: Mapping[str, str]
    ready: bool
    ready_reason: str
    schedulable: bool
    drain: bool
    memory_total_mib: int
    memory_free_mib: int
    memory_dom0_mib: int
    last_heartbeat: datetime.datetime | None
    capacity: memory_commit.Capacity | None = None  # None: not counted (a bare view)

    @classmethod
    def of(cls, nhv: Mapping[str, Any]) -> NodeView:
        meta = nhv.get("metadata") or {}
        spec = nhv.get("spec") or {}
        st = nhv.get("status") or {}
        ready = status.condition(st, "Ready") or {}
        return cls(
            name=str(meta.get("name", "")),
            hypervisor=str(spec.get("hypervisor") or "kvm"),
            labels=dict(meta.get("labels") or {}),
            ready=ready.get("status") == "True",
            ready_reason=str(ready.get("reason") or "NoHeartbeat"),
            schedulable=spec.get("schedulable", True) is not False,
            drain=bool(spec.get("drain", False)),
            memory_total_mib=int(st.get("memoryTotal") or 0),
            memory_free_mib=int(st.get("memoryFree") or 0),
            memory_dom0_mib=int(st.get("memoryDom0") or 0),
            last_heartbeat=status.parse_time(st.get("lastHeartbeat")),
            capacity=memory_commit.Capacity.of(nhv),
        )

    def heartbeat_age_s(self, now: datetime.datetime) -> float | None:
        if self.last_heartbeat is None:
            return None
        return (now - self.last_heartbeat).total_seconds()


@dataclasses.dataclass(frozen=True, slots=True)
class Assigned:
    """An instance already on (or headed to) a node, as the controller's cache sees it."""

    node: str
    phase: str
    memory_mib: int  # actual memory if reported, else min memory
    reported: bool
    commit: memory_commit.Commit = memory_commit.NOTHING


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    name: str
    hypervisor: str
    memory_min_mib: int
    pin: str | None
    selector: Mapping[str, str]
    commit: memory_commit.Commit = memory_commit.NOTHING

    @classmethod
    def of(cls, vi: Mapping[str, Any]) -> Request:
        spec = vi.get("spec") or {}
        mem_min, _ = translate.memory_mib(spec)
        return cls(
            name=str((vi.get("metadata") or {}).get("name", "")),
            hypervisor=str(spec.get("hypervisor") or "kvm"),
            memory_min_mib=mem_min,
            pin=spec.get("nodeName") or None,
            selector=dict(spec.get("nodeSelector") or {}),
            commit=memory_commit.Commit.of(vi),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    node: str | None
    reasons: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        if self.node is not None:
            return f"placed on node {self.node}"
        if not self.reasons:
            return "no NodeHypervisor exists"
        return "no node fits: " + "; ".join(self.reasons)


def assigned_of(vi: Mapping[str, Any]) -> Assigned | None:
    st = vi.get("status") or {}
    node = st.get("nodeName")
    phase = str(st.get("phase") or "")
    if not node or phase not in HOLDING:
        return None
    actual = translate.to_mib(st.get("actualMemory"))
    mem_min, _ = translate.memory_mib(vi.get("spec") or {})
    reported = phase not in UNREPORTED and actual is not None
    return Assigned(
        str(node),
        phase,
        actual if actual is not None else mem_min,
        reported,
        memory_commit.Commit.of(vi),
    )


def free_memory(node: NodeView, assigned: Iterable[Assigned]) -> int:
    """What is free for a new instance: the node's report minus what it has not reported yet,
    and never more than total - dom0 - everything assigned."""
    mine = [a for a in assigned if a.node == node.name]
    unreported = sum(a.memory_mib for a in mine if not a.reported)
    by_assignment = node.memory_total_mib - node.memory_dom0_mib - sum(a.memory_mib for a in mine)
    return max(0, min(node.memory_free_mib - unreported, by_assignment))


def choose(request: Request, nodes: Sequence[NodeView], assigned: Sequence[Assigned]) -> Decision:
    """The least loaded node that fits, or why each node does not."""
    fits: list[tuple[int, int, str]] = []
    reasons: list[str] = []
    for node in sorted(nodes, key=lambda n: n.name):
        why = _unfit(request, node, assigned)
        if why:
            reasons.append(f"{node.name}: {why}")
            continue
        count = sum(1 for a in assigned if a.node == node.name)
        fits.append((count, -free_memory(node, assigned), node.name))
    if request.pin and not any(n.name == request.pin for n in nodes):
        reasons.insert(0, f"{request.pin}: pinned node has no NodeHypervisor")
    if not fits:
        return Decision(None, tuple(reasons))
    return Decision(min(fits)[2])


def _unfit(request: Request, node: NodeView, assigned: Sequence[Assigned]) -> str:
    if request.pin and node.name != request.pin:
        return "instance is pinned to another node"
    if node.hypervisor != request.hypervisor:
        return f"runs hypervisor {node.hypervisor}, not {request.hypervisor}"
    for key, value in request.selector.items():
        if node.labels.get(key) != value:
            return f"label {key}={value} does not match"
    if not node.ready:
        return f"not Ready ({node.ready_reason})"
    if not node.schedulable:
        return "not schedulable"
    if node.drain:
        return "draining"
    free = free_memory(node, assigned)
    if request.memory_min_mib > free:
        return f"needs {request.memory_min_mib} MiB, {free} MiB free"
    if node.capacity is None:
        return ""
    mine = (a.commit for a in assigned if a.node == node.name)
    return memory_commit.unfit(request.commit, node.capacity, mine)
