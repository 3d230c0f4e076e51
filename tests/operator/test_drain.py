"""Draining a node: the pure plan, and every instance leaving a drained node (real apiserver)."""

from __future__ import annotations

from typing import Any

import migration_helpers as h
import pytest

from kubehv.operator import drain
from kubehv.operator import migration_logic as ml


def inst(name: str, node: str | None = "a", policy: str = "LiveMigrate", phase: str = "Running"):
    return ml.InstanceView(
        name=name,
        namespace="ns",
        node_name=node,
        phase=phase,
        hypervisor="fake",
        memory_min_mib=256,
        memory_max_mib=512,
        actual_memory_mib=None,
        eviction_policy=policy,
    )


def test_plan_per_policy() -> None:
    instances = [
        inst("live"),
        inst("cold", policy="Migrate"),
        inst("stopme", policy="Stop"),
        inst("stopped", policy="Stop", phase=drain.PHASE_EVICTED),
        inst("elsewhere", node="b"),
    ]
    to_migrate, to_replace, message = drain.plan("a", instances, [])
    assert [i.name for i in to_migrate] == ["live", "cold"]
    assert [i.name for i in to_replace] == ["stopped"]
    assert "4 instance(s) left" in message and "stopme" in message
    assert drain.drain_migration(to_migrate[1], "a")["spec"]["mode"] == "non-live"
    assert drain.drain_migration(to_migrate[0], "a")["spec"]["mode"] == "live"


def test_plan_skips_busy_and_reports_failed() -> None:
    running = ml.MigrationView.from_body(
        {
            "metadata": {"name": "x", "namespace": "ns", "uid": "1"},
            "spec": {"instance": "live"},
            "status": {"phase": "Running", "sourceNode": "a", "targetNode": "b"},
        }
    )
    failed = ml.MigrationView.from_body(
        {
            "metadata": {
                "name": drain.drain_migration_name("cold", "a"),
                "namespace": "ns",
                "uid": "2",
            },
            "spec": {"instance": "cold"},
            "status": {
                "phase": "Failed",
                "failureReason": "no node can take the instance",
                "sourceNode": "a",
                "targetNode": "b",
                "conditions": [ml.condition(ml.COND_SOURCE_FINALIZED, True, "x", "x")],
            },
        }
    )
    to_migrate, _, message = drain.plan(
        "a", [inst("live"), inst("cold", policy="Migrate")], [running, failed]
    )
    assert to_migrate == []
    assert "no node can take the instance" in message
    assert drain.plan("a", [], []) == ([], [], "")


@pytest.mark.apiserver
@pytest.mark.xfail(
    run=False,
    reason=(
        "known open problem (issue 4, drain): an Evicted instance pinned to the draining node "
        "has nowhere to go, and instances of earlier tests' terminating namespaces were seen "
        "to stay on node-a for minutes, so Drained never turns True; not yet root-caused"
    ),
)
def test_drain_moves_every_instance_per_policy(operator_cluster: Any, namespace: str) -> None:
    cluster = operator_cluster
    node = sorted(cluster.agents)[0]
    names = {"dr-live": "LiveMigrate", "dr-cold": "Migrate", "dr-stop": "Stop"}
    for name, policy in names.items():
        h.create_instance(cluster, namespace, name, policy=policy, pin=node)
    for name in names:
        h.wait_instance_running(cluster, namespace, name)
    api = h.custom(cluster)
    api.patch_cluster_custom_object(h.G, h.V, "nodehypervisors", node, {"spec": {"drain": True}})
    try:

        def drained() -> bool:
            nhv = api.get_cluster_custom_object(h.G, h.V, "nodehypervisors", node)
            conds = {c["type"]: c for c in (nhv.get("status") or {}).get("conditions", [])}
            return conds.get("Drained", {}).get("status") == "True"

        h.wait_for(f"node {node} Drained", drained, timeout=180)
        for name in names:
            vi = h.wait_instance_running(cluster, namespace, name)
            assert vi["status"]["nodeName"] != node
            assert not h.alive_on(cluster.agents[node].state_dir, namespace, name)
        migs = api.list_namespaced_custom_object(h.G, h.V, namespace, "migrations")["items"]
        modes = {m["spec"]["instance"]: m["spec"].get("mode", "live") for m in migs}
        assert modes == {"dr-live": "live", "dr-cold": "non-live"}
    finally:
        api.patch_cluster_custom_object(
            h.G, h.V, "nodehypervisors", node, {"spec": {"drain": False}}
        )
