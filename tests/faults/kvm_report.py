"""The fault matrix's end-of-run table: scenario, passed, double-runs, lost (issue 11).

Why: the real-kvm matrix runs its scenarios side by side inside one fixture
(kvm_matrix.run_all); its outcomes are printed once, after every test, so that a CI log
shows the whole matrix at a glance, also when some scenarios failed. The fixture registers
:class:`SummaryPlugin` with pytest's plugin manager (tests/faults has no conftest of its own:
two top-level ``conftest`` modules would collide).
"""

from __future__ import annotations

from typing import Any

from kvm_scenario import Outcome


class SummaryPlugin:
    def __init__(self, results: dict[str, Outcome], wall: dict[str, float], note: str) -> None:
        self.results, self.wall, self.note = results, wall, note

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in table(self.results, self.wall.get("matrix", 0.0), self.note):
            terminalreporter.write_line(line)


def table(results: dict[str, Outcome], wall_s: float, note: str) -> list[str]:
    if not results:
        return []
    width = max(len(s) for s in results)
    lines = [
        "",
        "=== kubehv exactly-once fault matrix (real kvm guests) ===",
        f"{'scenario':<{width}}  passed  double-runs  lost  {'hit':<14}  seconds",
    ]
    for name, o in results.items():
        lines.append(
            f"{name:<{width}}  {'yes' if o.passed else 'NO':<6}  {o.double_runs:<11}  "
            f"{o.lost:<4}  {o.hit[:14]:<14}  {o.seconds:7.0f}"
        )
    passed = sum(o.passed for o in results.values())
    doubles = sum(o.double_runs for o in results.values())
    lost = sum(o.lost for o in results.values())
    lines.append(
        f"{len(results)} scenarios, {passed} passed, {doubles} double-runs, {lost} lost; "
        f"matrix wall time {wall_s:.0f} s ({note})"
    )
    return lines
