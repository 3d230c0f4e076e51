"""Proof A of the issue "Exactly once": the model checker over kubehv's own decisions.

Why this module exists: it runs the explicit-state search of :mod:`tests.model.explore` over
the owner model's adapter (:mod:`tests.model.adapter_new`, which calls
``owner_logic.decide``, the Migration protocol's ``next_step`` / ``recover_running`` /
``schedule``, ``heartbeat.instance_status_patch``, ``placement.choose`` and ``drain.plan``)
in ``make test`` with a bounded depth (``KUBEHV_MODEL_DEPTH`` for deeper runs outside CI),
and asserts that no invariant (I1-I4, drains complete) is violated in any state reached.
Each scenario prints its depth, the number of states explored and the time taken. What the
same search found on the logic as filed is recorded in ``FOUND_ON_OLD_LOGIC.md``.
"""

from __future__ import annotations

import os

import pytest

from tests.model import adapter_new, explore, invariants, report, scenarios

DEPTH = int(os.environ.get("KUBEHV_MODEL_DEPTH", "7"))
SCENARIOS = scenarios.all_scenarios(adapter_new, DEPTH)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_no_invariant_is_violated(scenario: explore.Scenario):
    result = explore.explore(scenario, adapter_new)
    print(
        f"\nmodel {result.scenario}: depth {result.depth}, {result.states} states, "
        f"{result.settled} recovery runs, {result.seconds:.1f} s, "
        f"{len(result.violations)} violations"
    )
    shortest = sorted(result.violations.values(), key=lambda v: len(v.trace))[:3]
    assert not result.violations, "\n\n".join(report.render(v) for v in shortest)
    assert result.states > 1


def test_every_scenario_starts_from_a_healthy_instance():
    """The starting points are built by kubehv's own actors and break no invariant."""
    for scenario in SCENARIOS:
        assert invariants.always(scenario.initial) == []
        vi = scenario.initial.vi
        assert vi is not None and vi.stat("nodeName") == "a"
        assert scenario.initial.hyp[0].dom == ("running" if "Stopped" not in scenario.name else "")
