"""The scenarios the checker explores: where the instance starts and which faults may strike.

Why this module exists: one search over every fault at once would not finish in CI; each
scenario fixes the starting point (built by the adapter's own actors: the instance is
created, placed, started and settled by kubehv's code, not written by hand) and the faults
that may be injected, with a budget of how many per run.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from tests.model import explore, sim, world
from tests.model.world import Agent, Hyp, Node, Obj

LIVE_FAULTS = frozenset({"abort", "delete-instance", "delete-migration", "late", "lose-write"})


def created(run_state: str = "Running", eviction: str = "LiveMigrate") -> world.State:
    """A VirtualInstance just created (no status, no finalizer), nothing running anywhere."""
    vi = Obj(rv=1, spec=sim.vi_spec(run_state, eviction))
    return world.State(
        vi=vi,
        mig=None,
        nodes=(Node(), Node()),
        hyp=(Hyp(), Hyp()),
        agents=(Agent(), Agent()),
        ctl_cache=vi,
    )


def at_rest(adapter: ModuleType, state: world.State) -> world.State:
    final, _path, bad = explore.settle(world.canonical(state), adapter, job_ok=True)
    assert not bad, f"the scenario's starting point is already broken: {bad}"
    return final


def migrating(adapter: ModuleType, target: str | None = "b") -> world.State:
    """Running on node a (placed there by kubehv), a Migration to ``target`` just created."""
    base = at_rest(adapter, created())
    assert base.vi is not None and base.vi.stat("nodeName") == "a", base
    mig = Obj(rv=1, spec=sim.mig_spec(target), name=world.MIGRATION)
    return dataclasses.replace(base, mig=mig)


def draining(adapter: ModuleType, run_state: str, eviction: str) -> world.State:
    base = at_rest(adapter, created(run_state, eviction))
    assert base.vi is not None and base.vi.stat("nodeName") == "a", base
    return dataclasses.replace(base, nodes=(Node(drain=True), base.nodes[1]))


def all_scenarios(adapter: ModuleType, depth: int) -> list[explore.Scenario]:
    d = depth
    return [
        explore.Scenario(
            "live migration a->b, source agent faults",
            migrating(adapter),
            frozenset({"crash:a", "freeze:a"}) | LIVE_FAULTS,
            budget=2,
            depth=d,
        ),
        explore.Scenario(
            "live migration a->b, target agent faults",
            migrating(adapter),
            frozenset({"crash:b", "freeze:b"}) | LIVE_FAULTS,
            budget=2,
            depth=d,
        ),
        explore.Scenario(
            "new instance: placement and first start",
            created(),
            frozenset({"crash:a", "freeze:a", "delete-instance", "lose-write"}),
            budget=2,
            depth=d,
        ),
        explore.Scenario(
            "drain node a: Stopped instance (evictionPolicy LiveMigrate)",
            draining(adapter, "Stopped", "LiveMigrate"),
            frozenset({"crash:a"}),
            budget=1,
            depth=d,
        ),
        explore.Scenario(
            "drain node a: running instance, evictionPolicy Stop",
            draining(adapter, "Running", "Stop"),
            frozenset({"crash:a", "lose-write"}),
            budget=1,
            depth=d,
        ),
        explore.Scenario(
            "drain node a: running instance, evictionPolicy LiveMigrate",
            draining(adapter, "Running", "LiveMigrate"),
            frozenset({"crash:a", "freeze:a", "delete-instance"}),
            budget=1,
            depth=d,
        ),
    ]
