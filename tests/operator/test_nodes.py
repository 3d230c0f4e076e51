"""NodeHypervisor status from the agents, and heartbeat loss seen by the controller."""

from __future__ import annotations

import pytest

from kubehv.drivers import fake
from tests.fixtures.operator import OperatorCluster, condition, wait_for

pytestmark = pytest.mark.apiserver


def test_node_status_reported(operator_cluster: OperatorCluster) -> None:
    c = operator_cluster
    for node in c.nodes:
        nhv = c.nhv(node)
        assert nhv is not None
        st = nhv["status"]
        assert st["memoryTotal"] == 8192 and st["memoryFree"] <= 8192
        assert st["cpuTotal"] >= 1 and st["lastHeartbeat"]
        assert st["verify"]["ok"] is True and st["canMigrate"] is True
        assert st["capabilities"]["live_migration"] is True
        assert condition(nhv, "Ready")["status"] == "True"
        assert condition(nhv, "Verified")["status"] == "True"
        assert nhv["spec"]["hypervisor"] == "fake"


def test_orphans_listed_not_touched(operator_cluster: OperatorCluster) -> None:
    c = operator_cluster
    fake.add_foreign_instance(str(c.agents["node-a"].state_dir), "stranger")
    nhv = wait_for(
        lambda: ((n := c.nhv("node-a")) and "stranger" in n["status"].get("orphans", []) and n)
        or None,
        30, "orphan reported",
    )  # fmt: skip
    assert nhv["status"]["orphans"] == ["stranger"]


def test_heartbeat_loss_marks_unknown_and_never_starts_twice(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    c.create_vi(namespace, "lonely", nodeName="node-c")
    c.wait_phase(namespace, "lonely", "Running")
    agent = c.agents["node-c"]
    agent.stop()
    try:
        vi = c.wait_phase(namespace, "lonely", "Unknown", timeout=60)
        assert vi["status"]["nodeName"] == "node-c"
        assert condition(vi, "Ready")["reason"] == "NodeLost"
        nhv = wait_for(
            lambda: condition(c.nhv("node-c") or {}, "Ready").get("status") == "Unknown", 30
        )
        assert nhv
        for node in ("node-a", "node-b"):
            assert "lonely" not in c.fake_instances(node, namespace)
        c.create_vi(namespace, "newcomer")
        placed = c.wait_phase(namespace, "newcomer", "Running")
        assert placed["status"]["nodeName"] != "node-c"
    finally:
        agent.start()
    vi = c.wait_phase(namespace, "lonely", "Running", timeout=60)
    assert vi["status"]["nodeName"] == "node-c"
    assert c.fake_instances("node-c", namespace)["lonely"] == "running"
    wait_for(lambda: c.node_ready("node-c"), 30, "node-c Ready again")
