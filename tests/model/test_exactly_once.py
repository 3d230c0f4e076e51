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
OPEN_BUGS: dict[str, tuple[tuple[str, str], ...]] = {
    # Reported to the owner rebuild (FINDINGS.md "TO owner"); each entry is (invariant, a
    # substring of the violation's signature). A violation not listed fails the test; a
    # listed one is printed, so that the fix shows as "0 violations" and the entry goes.
    # (empty: the owner fixed "an instance that never ran is marked lost", 0cf8f10)
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_no_invariant_is_violated(scenario: explore.Scenario):
    result = explore.explore(scenario, adapter_new)
    print(
        f"\nmodel {result.scenario}: depth {result.depth}, {result.states} states, "
        f"{result.settled} recovery runs, {result.cpu_seconds:.1f} s CPU "
        f"({result.seconds:.1f} s wall), "
        f"{len(result.violations)} violations"
    )
    known = OPEN_BUGS.get(scenario.name, ())
    unexpected = {
        key: v
        for key, v in result.violations.items()
        if not any(key[0] == inv and text in key[1] for inv, text in known)
    }
    for v in sorted(result.violations.values(), key=lambda v: len(v.trace))[:1]:
        if not unexpected:
            print(f"open bug (reported, not yet fixed):\n{report.render(v)}")
    shortest = sorted(unexpected.values(), key=lambda v: len(v.trace))[:3]
    assert not unexpected, "\n\n".join(report.render(v) for v in shortest)
    assert result.states > 1


def test_every_scenario_starts_from_a_healthy_instance():
    """The starting points are built by kubehv's own actors and break no invariant."""
    for scenario in SCENARIOS:
        assert invariants.always(scenario.initial) == []
        vi = scenario.initial.vi
        assert vi is not None
        if scenario.name.startswith("new instance"):
            assert vi.stat("nodeName") is None and not any(h.dom for h in scenario.initial.hyp)
            continue
        assert vi.stat("nodeName") == "a"
        assert scenario.initial.hyp[0].dom == ("running" if "Stopped" not in scenario.name else "")
