"""Proof A of the issue "Exactly once": the model checker over kubehv's own decisions.

Why this module exists: it runs the explicit-state search of :mod:`tests.model.explore` in
``make test`` with a bounded depth (``KUBEHV_MODEL_DEPTH`` for deeper runs outside CI) and
prints the depth, states explored and time of each scenario. On the logic as filed it must
find every bug the issue lists (:mod:`tests.model.found_old`); a checker that finds nothing
there would prove nothing elsewhere.
"""

from __future__ import annotations

import os

import pytest

from tests.model import adapter_old, explore, found_old, invariants, report, scenarios

DEPTH = int(os.environ.get("KUBEHV_MODEL_DEPTH", "9"))


@pytest.fixture(scope="module")
def old_results() -> list[explore.Result]:
    results = found_old.run(adapter_old, DEPTH)
    for r in results:
        print(
            f"\nmodel (old logic) {r.scenario}: depth {r.depth}, {r.states} states, "
            f"{r.settled} recovery runs, {r.seconds:.1f} s, {len(r.violations)} violations"
        )
    return results


@pytest.mark.parametrize("bug", found_old.BUGS, ids=lambda b: b.name[:60])
def test_finds_the_bug_on_the_old_logic(old_results: list[explore.Result], bug: found_old.Bug):
    hits = [v for r in old_results if (v := found_old.matches(bug, r)) is not None]
    assert hits, f"the checker no longer finds: {bug.name}"
    best = min(hits, key=lambda v: len(v.trace))
    assert best.invariant == bug.invariant
    print("\n" + report.render(best))


def test_every_scenario_starts_from_a_healthy_instance():
    """The starting points are built by kubehv's own actors and break no invariant."""
    for scenario in scenarios.all_scenarios(adapter_old, 0):
        assert invariants.always(scenario.initial) == []
        vi = scenario.initial.vi
        assert vi is not None and vi.stat("nodeName") == "a"
