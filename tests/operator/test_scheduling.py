"""Placement by the controller against the real API server (controller + 3 fake agents)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.fixtures.operator import OperatorCluster, condition

pytestmark = pytest.mark.apiserver


def running(vi: dict[str, Any]) -> bool:
    return (vi.get("status") or {}).get("phase") == "Running"


def test_pin_and_selector(operator_cluster: OperatorCluster, namespace: str) -> None:
    c = operator_cluster
    c.create_vi(namespace, "pinned", nodeName="node-b")
    assert c.wait_vi(namespace, "pinned", running)["status"]["nodeName"] == "node-b"
    c.custom.patch_cluster_custom_object(
        "kubehv.io", "v1alpha1", "nodehypervisors", "node-c",
        {"metadata": {"labels": {"zone": "z-test"}}},
    )  # fmt: skip
    try:
        c.create_vi(namespace, "selected", nodeSelector={"zone": "z-test"})
        assert c.wait_vi(namespace, "selected", running)["status"]["nodeName"] == "node-c"
    finally:
        c.custom.patch_cluster_custom_object(
            "kubehv.io", "v1alpha1", "nodehypervisors", "node-c",
            {"metadata": {"labels": {"zone": None}}},
        )  # fmt: skip


def test_no_fit_says_why_per_node(operator_cluster: OperatorCluster, namespace: str) -> None:
    c = operator_cluster
    c.create_vi(namespace, "huge", memory=("64Gi", "64Gi"))
    vi = c.wait_vi(
        namespace, "huge", lambda v: condition(v, "Scheduled").get("reason") == "NoNodeFits"
    )
    msg = condition(vi, "Scheduled")["message"]
    for node in c.nodes:
        assert re.search(rf"{node}: needs 65536 MiB, \d+ MiB free", msg), msg
    assert vi["status"]["phase"] == "Pending" and not vi["status"].get("nodeName")
    c.create_vi(namespace, "pin-missing", nodeName="no-such-node")
    vi = c.wait_vi(namespace, "pin-missing", lambda v: condition(v, "Scheduled"))
    assert (
        "no-such-node: pinned node has no NodeHypervisor" in condition(vi, "Scheduled")["message"]
    )


def test_spread_and_memory_accounting(operator_cluster: OperatorCluster, namespace: str) -> None:
    c = operator_cluster
    for i in range(6):
        c.create_vi(namespace, f"spread-{i}", memory=("128Mi", "128Mi"))
    nodes = [c.wait_vi(namespace, f"spread-{i}", running)["status"]["nodeName"] for i in range(6)]
    counts = {n: nodes.count(n) for n in c.nodes}
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    assert len(set(nodes)) == 3
