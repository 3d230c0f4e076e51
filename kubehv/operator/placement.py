"""Pure placement: which node gets an unplaced VirtualInstance, or why none can.

Why this module exists: the controller's scheduling decision is a function of the instance
and the nodes as last reported (typed ``kubehv.api`` models), plus the instances already
assigned; keeping it pure lets the
tests cover pins, selectors, memory and spreading without a server. The memory rule is the
startup-memory rule: the instance's *min* must fit in what is free, counting instances
placed on the node that it has not reported yet.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Collection, Iterable, Mapping, Sequence

from kubehv import api
from kubehv.api import conditions, constants
from kubehv.operator import status, translate

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


def heartbeat_age_s(node: api.NodeHypervisor, now: datetime.datetime) -> float | None:
    """Seconds since the node's agent last reported (None: it never did)."""
    last = status.parse_time(node.status.last_heartbeat)
    if last is None:
        return None
    return (now - last).total_seconds()


def _ready(node: api.NodeHypervisor) -> tuple[bool, str]:
    cond = conditions.get_condition(node.status.conditions, constants.COND_READY)
    if cond is None:
        return False, "NoHeartbeat"
    return cond.status is conditions.ConditionStatus.TRUE, cond.reason or "NoHeartbeat"


@dataclasses.dataclass(frozen=True, slots=True)
class Assigned:
    """An instance already on (or headed to) a node, as the controller's cache sees it."""

    node: str
    phase: str
    memory_mib: int  # actual memory if reported, else min memory
    reported: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    name: str
    hypervisor: str
    memory_min_mib: int
    pin: str | None
    selector: Mapping[str, str]

    @classmethod
    def of(cls, vi: api.VirtualInstance) -> Request:
        spec = vi.spec
        return cls(
            name=vi.metadata.name or "",
            hypervisor=spec.hypervisor,
            memory_min_mib=spec.memory.min_mib,
            pin=spec.node_name or None,
            selector=dict(spec.node_selector),
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


def assigned_of(vi: api.VirtualInstance) -> Assigned | None:
    st = vi.status
    phase = st.phase.value if st.phase is not None else ""
    if not st.node_name or phase not in HOLDING:
        return None
    actual = translate.to_mib(st.actual_memory)
    reported = phase not in UNREPORTED and actual is not None
    memory = actual if actual is not None else vi.spec.memory.min_mib
    return Assigned(st.node_name, phase, memory, reported)


def free_memory(node: api.NodeHypervisor, assigned: Iterable[Assigned]) -> int:
    """What is free for a new instance: the node's report minus what it has not reported yet,
    and never more than total - dom0 - everything assigned."""
    name = node.metadata.name
    st = node.status
    mine = [a for a in assigned if a.node == name]
    unreported = sum(a.memory_mib for a in mine if not a.reported)
    total, dom0, free = st.memory_total or 0, st.memory_dom0 or 0, st.memory_free or 0
    by_assignment = total - dom0 - sum(a.memory_mib for a in mine)
    return max(0, min(free - unreported, by_assignment))


def choose(
    request: Request,
    nodes: Sequence[api.NodeHypervisor],
    assigned: Sequence[Assigned],
    silent: Collection[str] = (),
) -> Decision:
    """The least loaded node that fits, or why each node does not. Nodes named in
    ``silent`` lost their heartbeat: they are not Ready whatever they last reported."""
    fits: list[tuple[int, int, str]] = []
    reasons: list[str] = []
    for node in sorted(nodes, key=lambda n: n.metadata.name or ""):
        name = node.metadata.name or ""
        why = _unfit(request, node, assigned, name in silent)
        if why:
            reasons.append(f"{name}: {why}")
            continue
        count = sum(1 for a in assigned if a.node == name)
        fits.append((count, -free_memory(node, assigned), name))
    if request.pin and not any(n.metadata.name == request.pin for n in nodes):
        reasons.insert(0, f"{request.pin}: pinned node has no NodeHypervisor")
    if not fits:
        return Decision(None, tuple(reasons))
    return Decision(min(fits)[2])


def _unfit(
    request: Request, node: api.NodeHypervisor, assigned: Sequence[Assigned], silent: bool
) -> str:
    if request.pin and node.metadata.name != request.pin:
        return "instance is pinned to another node"
    if node.spec.hypervisor != request.hypervisor:
        return f"runs hypervisor {node.spec.hypervisor}, not {request.hypervisor}"
    for key, value in request.selector.items():
        if node.metadata.labels.get(key) != value:
            return f"label {key}={value} does not match"
    ready, reason = _ready(node)
    if silent:
        ready, reason = False, "HeartbeatLost"
    if not ready:
        return f"not Ready ({reason})"
    if not node.spec.schedulable:
        return "not schedulable"
    if node.spec.drain:
        return "draining"
    free = free_memory(node, assigned)
    if request.memory_min_mib > free:
        return f"needs {request.memory_min_mib} MiB, {free} MiB free"
    return ""
