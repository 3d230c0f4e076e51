"""A hypervisor that does not answer a start: the agent says so in Ready, then goes on.

Why: a start that never returned once left an instance silent for minutes (the owner waited,
nothing in its status said why). The agent now reports a call still running after
``--slow-call`` seconds; this proves it through the real API server on a fake node whose
start takes longer than that (``start_delay_s``), in its own module so that no other
controller shares the API server meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.operator import OperatorCluster, condition, running_and_ready, running_cluster

pytestmark = pytest.mark.apiserver


@pytest.fixture(scope="module")
def slow_call_cluster(control_plane: Any, crds_installed: Any) -> Iterator[OperatorCluster]:
    """One fake node whose agent reports calls still running after 1 s (--slow-call 1)."""
    with running_cluster(control_plane, ["node-s"], agent_args=["--slow-call", "1"]) as cluster:
        yield cluster


def test_a_start_the_hypervisor_does_not_answer_shows_in_ready(
    slow_call_cluster: OperatorCluster, namespace: str
) -> None:
    """A start that has not returned is not silent: Ready says so (and an Event) while the
    agent waits; when the hypervisor answers, the instance runs and Ready turns True."""
    c = slow_call_cluster
    c.create_vi(namespace, "slow", params={"start_delay_s": 6.0})

    def waiting(vi: dict[str, Any]) -> bool:
        return condition(vi, "Ready").get("reason") == "HypervisorNotResponding"

    vi = c.wait_vi(namespace, "slow", waiting, what="Ready HypervisorNotResponding")
    ready = condition(vi, "Ready")
    assert ready["status"] == "False" and vi["status"]["phase"] == "Starting"
    assert "start_instance has not returned after 1 s" in ready["message"]
    assert "node-s" in ready["message"]
    assert "HypervisorNotResponding" in {e["reason"] for e in c.events(namespace, "slow")}
    c.wait_vi(namespace, "slow", running_and_ready, what="Running once the start returned")
