"""Committed memory: how much of a node's guest memory an instance takes, for placement.

Why this module exists: with auto-ballooning a guest's memory moves between its min and max,
so "does it fit" cannot be answered from what guests hold right now. An auto-ballooned
guest commits its ``memory.min`` (the balloon may always take it back there); any other
guest commits its ``memory.max``. A node takes an instance when the committed memory of
its guests, the instance included, stays within the node's guest memory (its
``guestMemoryCap``, else its memory minus the host's), and the sum of the maxima within
``memoryOvercommitRatio`` times that. The controller's placement and the migration
scheduler both ask :func:`unfit`, so they agree on what fits. Pure: dicts in, numbers out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from kubehv.operator import translate


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """One instance's claim on a node: committed (min or max) and maximum memory, MiB."""

    committed_mib: int
    max_mib: int

    @classmethod
    def of(cls, vi: Mapping[str, Any]) -> Commit:
        spec = vi.get("spec") or {}
        mem_min, mem_max = translate.memory_mib(spec)
        auto = (spec.get("autoBalloon") or {}).get("enabled") is True
        return cls(mem_min if auto else mem_max, mem_max)


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """A node's guest memory (MiB) and how far maxima may overcommit it."""

    guest_mib: int
    ratio: float = 1.0
    capped: bool = False

    @classmethod
    def of(cls, nhv: Mapping[str, Any]) -> Capacity:
        spec = nhv.get("spec") or {}
        st = nhv.get("status") or {}
        ratio = float(spec.get("memoryOvercommitRatio") or 1.0)
        cap = translate.to_mib(spec.get("guestMemoryCap"))
        if cap is not None:
            return cls(cap, ratio, capped=True)
        total, dom0 = int(st.get("memoryTotal") or 0), int(st.get("memoryDom0") or 0)
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


NodeBody = TypeVar("NodeBody", bound=Mapping[str, Any])


def migration_targets(
    vi: Mapping[str, Any],
    nhvs: Iterable[NodeBody],
    instances: Iterable[Mapping[str, Any]],
) -> tuple[list[NodeBody], dict[str, str]]:
    """Split candidate target nodes for migrating ``vi`` by committed memory.

    Returns the NodeHypervisors it fits on (its source node included: it is already
    counted there) and, for the others, why not. Counted on a target: every instance placed
    there (``status.nodeName``) except ``vi`` itself.
    """
    uid = (vi.get("metadata") or {}).get("uid")
    source = (vi.get("status") or {}).get("nodeName")
    request = Commit.of(vi)
    per_node: dict[str, list[Commit]] = {}
    for other in instances:
        node = (other.get("status") or {}).get("nodeName")
        if node and (other.get("metadata") or {}).get("uid") != uid:
            per_node.setdefault(str(node), []).append(Commit.of(other))
    fits: list[NodeBody] = []
    unfit_nodes: dict[str, str] = {}
    for nhv in nhvs:
        name = str((nhv.get("metadata") or {}).get("name", ""))
        why = "" if name == source else unfit(request, Capacity.of(nhv), per_node.get(name, []))
        if why:
            unfit_nodes[name] = f"target node {name}: {why}"
        else:
            fits.append(nhv)
    return fits, unfit_nodes
