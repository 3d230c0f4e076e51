"""Exactly once under faults, on real kvm guests: one test per scenario of kvm_matrix.py.

Why: issue 11's Proof B. The scenarios run side by side (one per lane, kvm_lanes.py) the
first time any of them is asked for, only those selected (``-k`` works); each test then
asserts its own scenario's outcome: passed, no double run, nothing lost. The table of all
outcomes is printed at the end of the session (tests/faults/conftest.py). Behaviour only:
every wait is generous and no timing is asserted.

``KUBEHV_FAULT_LANES`` sets how many scenarios run at once (default 4).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kvm_matrix
import pytest
from kvm_lanes import FaultKvmCluster
from kvm_matrix import SCENARIOS, run_all
from kvm_report import SummaryPlugin
from kvm_scenario import Outcome

from tests.e2e.conftest import kvm_parts
from tests.fixtures.operator import started

pytestmark = [pytest.mark.faults, pytest.mark.real_libvirt, pytest.mark.apiserver]

LANES = int(os.environ.get("KUBEHV_FAULT_LANES", "4"))


@pytest.fixture(scope="module")
def fault_kvm(request: pytest.FixtureRequest) -> Iterator[FaultKvmCluster]:
    control_plane, nodes, image = kvm_parts(request)
    workdir = Path(tempfile.mkdtemp(prefix="kubehv-faults-kvm-"))
    with started(FaultKvmCluster(control_plane, nodes, image, workdir, LANES), workdir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, fault_kvm: FaultKvmCluster) -> dict[str, Outcome]:
    selected = [
        str(item.callspec.params["scenario"])
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_exactly_once"
        and hasattr(item, "callspec")
    ]
    plugins = request.config.pluginmanager
    if not plugins.has_plugin("kubehv-fault-matrix"):
        plugin = SummaryPlugin(kvm_matrix.RESULTS, kvm_matrix.WALL, kvm_matrix.grace_note())
        plugins.register(plugin, "kubehv-fault-matrix")
    return run_all(fault_kvm, selected)


@pytest.mark.timeout(2400)  # the first test's setup runs the whole matrix
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_exactly_once(matrix: dict[str, Any], scenario: str) -> None:
    outcome: Outcome = matrix[scenario]
    assert outcome.double_runs == 0, f"the guest ran twice: {outcome.detail}"
    assert outcome.lost == 0, f"the guest was lost: {outcome.detail}"
    assert outcome.passed, outcome.detail
