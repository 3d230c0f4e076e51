"""The world the model checker explores: an API server, two libvirt-like hypervisors, actors.

Why this module exists: the exactly-once promise (issue "Exactly once", invariants I1-I4) is
about interleavings no real-part test can enumerate. This module holds the *world* side of
the model only — what the API server and the hypervisors do, independent of kubehv's code:

* the API server keeps one VirtualInstance, at most one Migration and two NodeHypervisors;
  every write bumps ``resourceVersion``; writes guarded by a resourceVersion fail with
  :class:`Conflict` when it is stale (optimistic concurrency); a deleted object with
  finalizers lingers with ``deleting`` until the last finalizer goes;
* each hypervisor holds at most one domain of the instance (running / paused, or the paused
  *incoming* copy of a live migration) and, on the source, the migration *job*, which lives
  in libvirtd: it completes or fails on its own whether or not the agent that started it is
  alive (libvirt's peer-to-peer migration);
* actors' memories (watch caches, monitor tasks, the driver's in-process migration tracker)
  are plain data here; the adapters (``adapter_*.py``) turn them into calls of kubehv's own
  pure decision functions.

States are frozen, hashable values; :func:`canonical` renumbers resourceVersions by rank so
two histories that differ only in how many writes they made meet in one state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kubehv.drivers import errors

NODES = ("a", "b")
NAMESPACE = "ns"
INSTANCE = "vm"
MIGRATION = "move-vm"
DOMAIN = f"{NAMESPACE}.{INSTANCE}"
T0 = "2026-01-01T00:00:00Z"

Frozen = Any  # a JSON value made hashable: dicts as sorted item tuples, lists as tuples


def freeze(value: Any) -> Frozen:
    """A JSON value as a hashable one; condition timestamps are dropped (time is abstract)."""
    if isinstance(value, Mapping):
        return (
            "{}",
            tuple(
                sorted(
                    (str(k), freeze(v))
                    for k, v in value.items()
                    if k not in ("lastTransitionTime", "startTime", "endTime", "lastHeartbeat")
                )
            ),
        )
    if isinstance(value, list | tuple):
        return ("[]", tuple(freeze(v) for v in value))
    return value


def thaw(value: Frozen) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "{}":
        out = {k: thaw(v) for k, v in value[1]}
        if "type" in out and "status" in out:  # a condition: give it back a timestamp
            out["lastTransitionTime"] = T0
        return out
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "[]":
        return [thaw(v) for v in value[1]]
    return value


EMPTY: Frozen = freeze({})


def get(frozen: Frozen, key: str, default: Any = None) -> Any:
    """One top-level field of a frozen dict, thawed."""
    for k, v in frozen[1]:
        if k == key:
            return thaw(v)
    return default


class _Cached:
    """Frozen values hashed once: states are hashed and compared very often in a search."""

    def __hash__(self) -> int:
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]
            object.__setattr__(self, "_hash", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self) or hash(self) != hash(other):
            return False
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )


class Conflict(Exception):
    """409: the write was guarded by a stale resourceVersion (or the write was lost)."""


class NotFound(Exception):
    """404: the object is gone."""


@dataclasses.dataclass(frozen=True, eq=False)
class Obj(_Cached):
    """An API object as the server, or an actor's cache, holds it."""

    rv: int
    spec: Frozen
    name: str = ""
    status: Frozen = EMPTY
    deleting: bool = False
    finalizers: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    def stat(self, key: str, default: Any = None) -> Any:
        return get(self.status, key, default)


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """A NodeHypervisor: Ready as last heartbeat (or heartbeat loss) says, drain, Drained."""

    ready: str = "True"  # "True" | "Unknown" (heartbeat lost)
    drain: bool = False
    drained: str = ""  # the Drained condition's status, "" when absent


@dataclasses.dataclass(frozen=True, slots=True)
class Hyp:
    """One hypervisor (libvirtd), as far as this instance goes."""

    dom: str = ""  # "" absent | "running" | "paused"
    incoming: bool = False  # the paused copy libvirt keeps for an incoming migration
    job: str = ""  # source side: "" | "active" | "aborting" (abortJob sent, may still complete)


@dataclasses.dataclass(frozen=True, eq=False)
class Agent(_Cached):
    """One node agent process: its memory (lost by a crash) and its durable state dir."""

    proc: str = "up"  # "up" | "crashed" | "frozen"
    stale: bool = False  # silent for longer than the heartbeat grace
    cache: Obj | None = None  # the instance reconciler's watch cache (status.nodeName=<node>)
    mcache: Obj | None = None  # the agent's watch cache of the instance's Migration
    monitor: str = ""  # "" | "drive" | "watch": a migration monitor task of this process
    abort_by: str = ""  # the monitor asked libvirt to abort: "" | "user" | "deadline"
    tracker: str = ""  # the driver's in-process migration record: "" active completed failed
    evicting: Obj | None = None  # drain: guest shut down, the Evicted write (on this copy) due
    journal: Frozen = None  # durable journal in the state dir (used by the new code)


@dataclasses.dataclass(frozen=True, eq=False)
class State(_Cached):
    vi: Obj | None
    mig: Obj | None
    nodes: tuple[Node, Node]
    hyp: tuple[Hyp, Hyp]
    agents: tuple[Agent, Agent]
    ctl_cache: Obj | None = None  # the controller's watch cache of the instance
    late: bool = False  # every deadline (completionTimeout, stall) has passed
    faults: int = 0  # faults injected so far (bounded per scenario)


def idx(node: str) -> int:
    return NODES.index(node)


def other(node: str) -> str:
    return NODES[1 - idx(node)]


def put(seq: tuple[Any, Any], node: str, value: Any) -> tuple[Any, Any]:
    return (value, seq[1]) if node == NODES[0] else (seq[0], value)


def canonical(state: State) -> State:
    """Renumber resourceVersions by rank (only equality and order of them matter)."""
    vi_rvs: set[int] = set()
    mig_rvs: set[int] = set()
    for obj in (state.vi, state.ctl_cache):
        if obj is not None:
            vi_rvs.add(obj.rv)
    for a in state.agents:
        for obj in (a.cache, a.evicting):
            if obj is not None:
                vi_rvs.add(obj.rv)
        if a.mcache is not None:
            mig_rvs.add(a.mcache.rv)
    if state.mig is not None:
        mig_rvs.add(state.mig.rv)
    rank = {rv: i + 1 for i, rv in enumerate(sorted(vi_rvs))}
    mrank = {rv: i + 1 for i, rv in enumerate(sorted(mig_rvs))}
    if all(k == v for k, v in rank.items()) and all(k == v for k, v in mrank.items()):
        return state

    def re(obj: Obj | None, ranks: dict[int, int]) -> Obj | None:
        if obj is None or ranks[obj.rv] == obj.rv:
            return obj
        return dataclasses.replace(obj, rv=ranks[obj.rv])

    agents = tuple(
        dataclasses.replace(
            a,
            cache=re(a.cache, rank),
            evicting=re(a.evicting, rank),
            mcache=re(a.mcache, mrank),
        )
        for a in state.agents
    )
    return dataclasses.replace(
        state,
        vi=re(state.vi, rank),
        ctl_cache=re(state.ctl_cache, rank),
        agents=(agents[0], agents[1]),
        mig=re(state.mig, mrank),
    )


# --- the API server ----------------------------------------------------------------------


def merge_status(obj: Obj, patch: Mapping[str, Any]) -> Frozen:
    """A JSON merge patch on the status (None deletes a key, lists are replaced)."""
    current = thaw(obj.status)
    for key, value in patch.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    return freeze(current)


def bump(obj: Obj, **changes: Any) -> Obj:
    return dataclasses.replace(obj, rv=obj.rv + 1, **changes)


# --- hypervisor semantics (libvirt's, as kubehv's kvm driver sees them) -------------------


class Hypervisors:
    """Mutable view of both hypervisors during one step; libvirt's behaviour, not kubehv's."""

    def __init__(self, hyp: tuple[Hyp, Hyp]) -> None:
        self.h = {NODES[0]: hyp[0], NODES[1]: hyp[1]}

    def frozen(self) -> tuple[Hyp, Hyp]:
        return (self.h[NODES[0]], self.h[NODES[1]])

    def dom(self, node: str) -> str:
        return self.h[node].dom

    def _set(self, node: str, **changes: Any) -> None:
        self.h[node] = dataclasses.replace(self.h[node], **changes)

    def start(self, node: str, paused: bool = False) -> None:
        if self.h[node].dom:
            raise errors.InstanceAlreadyRunning(DOMAIN)
        self._set(node, dom="paused" if paused else "running", incoming=False)

    def destroy(self, node: str) -> None:
        """Shut the domain off (shutdown, destroy, finalize with success=False)."""
        h = self.h[node]
        if not h.dom:
            return
        peer = other(node)
        if h.incoming and self.h[peer].job:  # the target copy went: the source's job fails
            self._set(peer, job="")
        if h.job and self.h[peer].incoming:  # the source went mid-job: the incoming copy too
            self._set(peer, dom="", incoming=False)
        self._set(node, dom="", incoming=False, job="")

    def resume(self, node: str) -> None:
        if self.h[node].dom == "paused":
            self._set(node, dom="running", incoming=False)

    def pause(self, node: str) -> None:
        if self.h[node].dom == "running":
            self._set(node, dom="paused")

    def start_migration(self, src: str, dst: str) -> None:
        if not self.h[src].dom:
            raise errors.InstanceNotFound(DOMAIN)
        if self.h[src].job:
            raise errors.MigrationError("a migration job is already running")
        if self.h[dst].dom:
            raise errors.MigrationError(f"domain {DOMAIN} already exists on {dst}")
        self._set(src, job="active")
        self._set(dst, dom="paused", incoming=True)

    def abort_job(self, src: str) -> None:
        if self.h[src].job == "active":
            self._set(src, job="aborting")

    def complete_job(self, src: str) -> None:
        """libvirt finished the copy: the target resumes, the transient source vanishes."""
        dst = other(src)
        self._set(dst, dom="running", incoming=False)
        self._set(src, dom="", incoming=False, job="")

    def fail_job(self, src: str) -> None:
        """libvirt gave up (or was aborted): the incoming copy goes, the source runs on."""
        dst = other(src)
        if self.h[dst].incoming:
            self._set(dst, dom="", incoming=False)
        self._set(src, job="")
        self.resume(src)
