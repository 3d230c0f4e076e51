"""Explicit-state search over the model: faults, watch lag, and a fair recovery run.

Why this module exists: it is the checker itself. From a scenario's initial state it explores
every interleaving breadth-first up to a depth bound (states hashed after
:func:`world.canonical`, so each is expanded once): every actor step the adapter offers, the
watch caches catching up one at a time (lag), the migration job completing or failing on its
own, and — within the scenario's fault budget — kill -9 and SIGSTOP of an agent (and the
heartbeat grace running out while it is silent), a lost or conflicting API write, abort,
deletion of the Migration or of the instance, and every deadline passing. I1 is checked in
every state. From every state reached it then runs a *recovery*: faults stop, every agent
comes back, actors take turns (round robin, the migration job ending only when nothing else
moves) until nothing changes; I1 is checked along that run and I2-I4 (and "a drain
completes") at its end. A recovery that does not settle within :data:`SETTLE_STEPS` steps
violates I4 (bounded time).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from tests.model import invariants, world
from tests.model.sim import Sim
from tests.model.world import NODES

SETTLE_STEPS = 120
Step = Callable[[Sim], None]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    initial: world.State
    faults: frozenset[str]
    """Fault kinds: crash:<node>, freeze:<node>, abort, delete-instance, delete-migration,
    lose-write, late."""
    budget: int
    depth: int


@dataclasses.dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    trace: tuple[tuple[str, world.State], ...]
    faults: tuple[str, ...]


@dataclasses.dataclass
class Result:
    scenario: str
    depth: int
    states: int
    settled: int
    seconds: float
    cpu_seconds: float
    violations: dict[tuple[str, str], Violation]


# --- transitions ----------------------------------------------------------------------------


def _run(state: world.State, fn: Step, drop: int | None = None) -> tuple[world.State, Sim]:
    sim = Sim(state, drop)
    fn(sim)
    return world.canonical(sim.frozen()), sim


def _described(label: str, sim: Sim) -> str:
    return f"{label}: {sim.did}" if sim.did else label


def _set_agent(node: str, **changes: Any) -> Step:
    def step(sim: Sim) -> None:
        sim.set_agent(node, **changes)

    return step


def _crash(node: str) -> Step:
    return _set_agent(
        node,
        proc="crashed",
        cache=None,
        monitor="",
        abort_by="",
        tracker="",
        evicting=None,
        mcache=None,
    )


def _restart(adapter: ModuleType, node: str) -> Step:
    def step(sim: Sim) -> None:
        adapter.restart(sim, node)

    return step


def _thaw(node: str) -> Step:
    def step(sim: Sim) -> None:
        sim.set_agent(node, proc="up", stale=False)
        sim.set_node(node, ready="True")

    return step


def _job_end(src: str, ok: bool) -> Step:
    def step(sim: Sim) -> None:
        if ok:
            sim.hv.complete_job(src)
        else:
            sim.hv.fail_job(src)
        agent = sim.agent(src)
        if agent.proc != "crashed" and agent.tracker == "active":
            sim.set_agent(src, tracker="completed" if ok else "failed")

    return step


def _deliver(node: str | None) -> Step:
    def step(sim: Sim) -> None:
        if node is None:
            sim.ctl_cache = sim.vi
        else:
            sim.set_agent(node, cache=sim.vi if sim.list_vi_on(node) else None)

    return step


def _user_delete_instance(sim: Sim) -> None:
    assert sim.vi is not None
    obj = world.bump(sim.vi, deleting=True)
    sim.vi = obj if obj.finalizers else None


def _user_delete_migration(sim: Sim) -> None:
    assert sim.mig is not None
    obj = world.bump(sim.mig, deleting=True)
    sim.mig = obj if obj.finalizers else None


def _user_abort(sim: Sim) -> None:
    assert sim.mig is not None
    sim.mig = world.bump(sim.mig, annotations=(("kubehv.io/abort", "true"),))


def _late(sim: Sim) -> None:
    sim.state = dataclasses.replace(sim.state, late=True)


def _deliver_migration(node: str) -> Step:
    def step(sim: Sim) -> None:
        sim.set_agent(node, mcache=sim.mig)

    return step


def world_steps(state: world.State, adapter: ModuleType) -> list[tuple[str, Step]]:
    """What happens without any fault: watches catch up, one event at a time."""
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        agent = state.agents[i]
        mig = state.mig
        if (
            agent.proc == "up"
            and getattr(adapter, "WATCHES_MIGRATIONS", False)
            and agent.mcache != mig
            and (mig is None or node in (mig.stat("sourceNode"), mig.stat("targetNode")))
        ):
            out.append((f"{node}: watch delivers the Migration", _deliver_migration(node)))
        if agent.proc == "up":
            wanted = (
                state.vi if state.vi is not None and state.vi.stat("nodeName") == node else None
            )
            if agent.cache != wanted:
                out.append((f"{node}: watch delivers the instance", _deliver(node)))
    if state.ctl_cache != state.vi:
        out.append(("controller: watch delivers the instance", _deliver(None)))
    return out


def job_steps(state: world.State) -> list[tuple[str, Step]]:
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        if state.hyp[i].job:
            out.append(
                (
                    f"libvirt: migration job {node}->{world.other(node)} completes",
                    _job_end(node, True),
                )
            )
            out.append(
                (f"libvirt: migration job {node}->{world.other(node)} fails", _job_end(node, False))
            )
    return out


def recovery_steps(state: world.State, adapter: ModuleType) -> list[tuple[str, Step]]:
    """Agents coming back (not faults: what follows a crash or a stop)."""
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        agent = state.agents[i]
        if agent.proc != "up" and not agent.stale:
            out.append((f"{node}: silent past the heartbeat grace", _set_agent(node, stale=True)))
        if agent.proc == "crashed":
            out.append((f"{node}: agent restarts", _restart(adapter, node)))
        if agent.proc == "frozen":
            out.append((f"{node}: agent continues (SIGCONT)", _thaw(node)))
    return out


def fault_steps(state: world.State, faults: frozenset[str]) -> list[tuple[str, Step]]:
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        if state.agents[i].proc != "up":
            continue
        if f"crash:{node}" in faults:
            out.append((f"FAULT {node}: agent killed (kill -9)", _crash(node)))
        if f"freeze:{node}" in faults:
            out.append((f"FAULT {node}: agent stopped (SIGSTOP)", _set_agent(node, proc="frozen")))
    mig = state.mig
    if (
        mig is not None
        and "abort" in faults
        and not mig.annotations
        and mig.stat("phase") not in ("Succeeded", "Failed", "Aborted")
    ):
        out.append(("FAULT user: abort the Migration", _user_abort))
    if mig is not None and "delete-migration" in faults and not mig.deleting:
        out.append(("FAULT user: delete the Migration", _user_delete_migration))
    if state.vi is not None and "delete-instance" in faults and not state.vi.deleting:
        out.append(("FAULT user: delete the instance", _user_delete_instance))
    if "late" in faults and not state.late:
        out.append(("FAULT time: every deadline passes", _late))
    return out


def successors(
    state: world.State, adapter: ModuleType, scenario: Scenario
) -> Iterable[tuple[str, world.State]]:
    can_fault = state.faults < scenario.budget
    plain = [
        *adapter.steps(state),
        *world_steps(state, adapter),
        *job_steps(state),
        *recovery_steps(state, adapter),
    ]
    for label, fn in plain:
        nxt, sim = _run(state, fn)
        writes = sim.writes
        if nxt != state:
            yield _described(label, sim), nxt
        if (
            can_fault
            and "lose-write" in scenario.faults
            and not label.startswith(("libvirt", "a: watch", "b: watch", "controller: watch"))
        ):
            for i in range(writes):
                lost, sim = _run(state, fn, drop=i)
                if lost != state:
                    yield (
                        f"FAULT {_described(label, sim)} (API write #{i + 1} lost: 409)",
                        dataclasses.replace(lost, faults=lost.faults + 1),
                    )
    if can_fault:
        for label, fn in fault_steps(state, scenario.faults):
            nxt, _ = _run(state, fn)
            yield label, dataclasses.replace(nxt, faults=nxt.faults + 1)


# --- the recovery run ----------------------------------------------------------------------


SettleResult = tuple[world.State, tuple[tuple[str, world.State], ...], list[tuple[str, str]]]


def settle(
    state: world.State,
    adapter: ModuleType,
    job_ok: bool,
    memo: dict[tuple[world.State, bool, bool], SettleResult] | None = None,
    lazy: bool = False,
) -> SettleResult:
    """Run without faults until nothing changes; (final state, steps, violations).

    The schedule is fixed (watches catch up first — or, ``lazy``, only when nothing else
    moves, so actors decide on caches as old as they can be —, then agents come back, then
    actors in the adapter's order, the migration job ending — as ``job_ok`` says — only
    when nothing else moves), so the outcome is a function of the state and is memoised.
    """
    memo = {} if memo is None else memo
    visited: list[world.State] = []
    steps: list[tuple[str, world.State]] = []
    late_tried = state.late
    result: SettleResult | None = None
    for _ in range(SETTLE_STEPS):
        known = memo.get((state, job_ok, lazy))
        if known is not None:
            result = known
            break
        visited.append(state)
        bad = invariants.always(state)
        if bad:
            result = (state, (), bad)
            break
        watches = world_steps(state, adapter)
        options = [*recovery_steps(state, adapter), *adapter.steps(state)]
        options = [*options, *watches] if lazy else [*watches, *options]
        options += [
            (label, fn) for label, fn in job_steps(state) if ("completes" in label) == job_ok
        ]
        nxt = None
        for label, fn in options:
            nxt, sim = _run(state, fn)
            if nxt != state:
                steps.append((_described(label, sim), nxt))
                break
            nxt = None
        if nxt is None:
            bad = invariants.at_rest(state)
            if bad and not late_tried:
                late_tried = True
                nxt = dataclasses.replace(state, late=True)
                steps.append(("time: every deadline passes", nxt))
            else:
                result = (state, (), bad)
                break
        state = nxt
    if result is None:
        result = (state, (), [("I4", f"no rest: {SETTLE_STEPS} recovery steps and still busy")])
    final, tail, bad = result
    path = tuple(steps) + tail
    for i, seen in enumerate(visited):
        memo[(seen, job_ok, lazy)] = (final, path[i:], bad)
    return final, path, bad


# --- the search ---------------------------------------------------------------------------


def _trace(
    parents: dict[world.State, tuple[world.State, str] | None], state: world.State
) -> list[tuple[str, world.State]]:
    steps: list[tuple[str, world.State]] = []
    while True:
        link = parents[state]
        if link is None:
            steps.append(("start", state))
            break
        prev, label = link
        steps.append((label, state))
        state = prev
    return steps[::-1]


def explore(scenario: Scenario, adapter: ModuleType, depth: int | None = None) -> Result:
    start, cpu = time.monotonic(), time.process_time()
    depth = scenario.depth if depth is None else depth
    init = world.canonical(scenario.initial)
    parents: dict[world.State, tuple[world.State, str] | None] = {init: None}
    found: dict[tuple[str, str], Violation] = {}
    settled = 0
    memo: dict[tuple[world.State, bool, bool], SettleResult] = {}

    def record(inv: str, message: str, trace: list[tuple[str, world.State]]) -> None:
        faults = tuple(label for label, _ in trace if label.startswith("FAULT"))
        last = trace[-1][0].split(": ", 1)[-1] if len(trace) > 1 else ""
        key = (inv, _signature(message, faults, last))
        old = found.get(key)
        if old is None or len(trace) < len(old.trace):
            found[key] = Violation(inv, message, tuple(trace), faults)

    frontier = collections.deque([init])
    for _level in range(depth + 1):
        nxt_frontier: collections.deque[world.State] = collections.deque()
        for state in frontier:
            trace = _trace(parents, state)
            bad = invariants.always(state)
            for inv, message in bad:
                record(inv, message, trace)
            if bad:
                continue
            for job_ok in (True, False) if any(h.job for h in state.hyp) else (True,):
                settled += 1
                _final, path, rest_bad = settle(state, adapter, job_ok, memo)
                for inv, message in rest_bad:
                    record(
                        inv, message, [*trace, ("-- recovery (no more faults) --", state), *path]
                    )
            if _level == depth:
                continue
            for label, nxt in successors(state, adapter, scenario):
                if nxt in parents:
                    continue
                parents[nxt] = (state, label)
                nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return Result(
        scenario.name,
        depth,
        len(parents),
        settled,
        time.monotonic() - start,
        time.process_time() - cpu,
        found,
    )


FAULT_KINDS = (
    ("kill -9", "kill -9"),
    ("SIGSTOP", "SIGSTOP"),
    ("lost: 409", "lost write"),
    ("abort", "abort"),
    ("delete the instance", "delete instance"),
    ("delete the Migration", "delete Migration"),
    ("deadline", "deadlines pass"),
)


def _signature(message: str, faults: tuple[str, ...], last: str) -> str:
    kinds = sorted({kind for f in faults for text, kind in FAULT_KINDS if text in f})
    head = message.split(":", maxsplit=1)[0]
    if head.startswith("two copies"):  # which decision made the second copy tells the bugs apart
        head += " after " + last
    return head + " | faults: " + (", ".join(kinds) or "none")
