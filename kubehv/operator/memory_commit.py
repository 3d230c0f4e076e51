"""Committed memory: how much of a node's guest memory an instance takes, for placement.

Why this module exists: with auto-ballooning a guest's memory moves between its min and max,
so "does it fit" cannot be answered from what guests hold right now. An auto-ballooned
guest commits its ``memory.min`` (the balloon may always take it back there); any other
guest commits its ``memory.max``. A node takes an instance when the committed memory of
its guests, the instance included, stays within the node's guest memory (its
``guestMemoryCap``, else its memory minus the host's), and the sum of the maxima within
``memoryOvercommitRatio`` times that. The controller's placement and the migration
scheduler both ask :func:`unfit`, so they agree on what fits. Pure: typed models in, numbers
out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from kubehv import api
from kubehv.operator import translate


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """One instance's claim on a node: committed (min or max) and maximum memory, MiB."""

    committed_mib: int
    max_mib: int

    @classmethod
    def of(cls, vi: api.VirtualInstance) -> Commit:
        mem = vi.spec.memory
        auto = vi.spec.auto_balloon.enabled
        return cls(mem.min_mib if auto else mem.max_mib, mem.max_mib)


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """A node's guest memory (MiB) and how far maxima may overcommit it."""

    guest_mib: int
    ratio: float = 1.0
    capped: bool = False

    @classmethod
    def of(cls, nhv: api.NodeHypervisor) -> Capacity:
        ratio = nhv.spec.memory_overcommit_ratio
        cap = translate.to_mib(nhv.spec.guest_memory_cap)
        if cap is not None:
            return cls(cap, ratio, capped=True)
        total, dom0 = nhv.status.memory_total or 0, nhv.status.memory_dom0 or 0
        return cls(max(0, total - dom0), ratio)


NOTHING = Commit(0, 0)


def unfit(request: Commit, capacity: Capacity, on_node: Iterable[Commit]) -> str:
    """Why ``request`` does not fit next to ``on_node`` (empty string: it fits)."""
    here = list(on_node)
    committed = sum(c.committed_mib for c in here) + request.committed_mib
    if committed > capacity.guest_mib:
        what = "guest memory cap" if capacity.capped else "guest memory"
        return (
            f"committed memory would be {committed} MiB, over its {what} of "
            f"{capacity.guest_mib} MiB"
        )
    limit = int(capacity.guest_mib * capacity.ratio)
    maxima = sum(c.max_mib for c in here) + request.max_mib
    if maxima > limit:
        return (
            f"guests' maximum memory would be {maxima} MiB, over {limit} MiB "
            f"(overcommit ratio {capacity.ratio:g} x {capacity.guest_mib} MiB)"
        )
    return ""


def migration_targets(
    vi: api.VirtualInstance,
    nodes: Iterable[api.NodeHypervisor],
    instances: Iterable[api.VirtualInstance],
) -> tuple[list[api.NodeHypervisor], dict[str, str]]:
    """Split candidate target nodes for migrating ``vi`` by committed memory.

    Returns the NodeHypervisors it fits on (its source node included: it is already
    counted there) and, for the others, why not. Counted on a target: every instance placed
    there (``status.nodeName``) except ``vi`` itself.
    """
    request = Commit.of(vi)
    per_node: dict[str, list[Commit]] = {}
    for other in instances:
        node = other.status.node_name
        if node and other.metadata.uid != vi.metadata.uid:
            per_node.setdefault(node, []).append(Commit.of(other))
    fits: list[api.NodeHypervisor] = []
    unfit_nodes: dict[str, str] = {}
    for nhv in nodes:
        name = nhv.metadata.name or ""
        source = name == vi.status.node_name
        why = "" if source else unfit(request, Capacity.of(nhv), per_node.get(name, []))
        if why:
            unfit_nodes[name] = f"target node {name}: {why}"
        else:
            fits.append(nhv)
    return fits, unfit_nodes
