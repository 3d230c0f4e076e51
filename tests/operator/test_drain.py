"""Draining a node: the pure plan, and every instance leaving a drained node (real apiserver)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import migration_helpers as h
import pytest

from kubehv.operator import drain
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_scheduling as sched


def inst(
    name: str, node: str | None = "a", policy: str = "LiveMigrate", phase: str = "Running"
) -> sched.InstanceFacts:
    return sched.InstanceFacts(
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


def test_plan_replaces_what_runs_nowhere_whatever_its_policy() -> None:
    """A Stopped or Failed instance needs no live migration (issue: Drained never True)."""
    instances = [
        inst("stopped-live", phase="Stopped"),
        inst("failed-cold", policy="Migrate", phase="Failed"),
        inst("paused", phase="Paused"),
    ]
    to_migrate, to_replace, _ = drain.plan("a", instances, [])
    assert [i.name for i in to_replace] == ["stopped-live", "failed-cold"]
    assert [i.name for i in to_migrate] == ["paused"]


def test_plan_names_pinned_instances_instead_of_migrating_them() -> None:
    pinned = dataclasses.replace(inst("pinned"), pin="a")
    to_migrate, _, message = drain.plan("a", [pinned, inst("free")], [])
    assert [i.name for i in to_migrate] == ["free"]
    assert "pinned to a by spec.nodeName" in message and "pinned" in message


def test_plan_keeps_stopped_instances_whose_disks_are_only_here() -> None:
    """Re-placing a stopped instance with node-local disks would start it elsewhere on a
    fresh overlay (its data left behind): it stays, and Drained says why."""
    here = dataclasses.replace(inst("db", phase="Stopped"), local_disks=True)
    running = dataclasses.replace(inst("web"), local_disks=True)
    to_migrate, to_replace, message = drain.plan(
        "a", [here, running, inst("tmp", phase="Failed")], []
    )
    assert [i.name for i in to_migrate] == ["web"]  # a migration carries the disks along
    assert [i.name for i in to_replace] == ["tmp"]
    assert "not running, with disks only on a" in message and "db" in message


def test_migration_target_respects_pin_and_selector() -> None:
    facts = dataclasses.replace(inst("vm"), selector={"zone": "z1"})
    source = sched.NodeFacts("a", True, True, True, "fake", 4096, "1.0", True, "a")
    wrong = sched.NodeFacts("b", True, True, False, "fake", 4096, "1.0", True, "b")
    right = dataclasses.replace(wrong, name="c", labels={"zone": "z1"})
    view = ml.MigrationView.from_body({"metadata": {"name": "m"}, "spec": {"instance": "vm"}})
    assert "nodeSelector zone=z1" in (sched._target_problem(view, facts, source, wrong, "b") or "")
    assert sched._target_problem(view, facts, source, right, "c") is None
    pinned = dataclasses.replace(facts, pin="a")
    assert "pinned to node a" in (sched._target_problem(view, pinned, source, right, "c") or "")


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


def kubehv_cli(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubehv.cli", *args, "--kubeconfig", cluster.kubeconfig],
        capture_output=True, text=True, timeout=200, check=False, env=cluster.env,
    )  # fmt: skip


@pytest.mark.apiserver
def test_drain_moves_every_instance_per_policy(operator_cluster: Any, namespace: str) -> None:
    """LiveMigrate and Migrate leave by Migration, Stop is stopped and started cold elsewhere;
    a Stop instance *pinned* to the node waits (Pending, saying why) until the drain ends.

    All four are pinned to the node to put them there; the three that may move are unpinned
    once Running (a running instance stays where it is; the pin only steers placement).
    """
    cluster = operator_cluster
    node = sorted(cluster.agents)[0]
    movers = {"dr-live": "LiveMigrate", "dr-cold": "Migrate", "dr-stop": "Stop"}
    pinned = "dr-pinned"
    for name, policy in {**movers, pinned: "Stop"}.items():
        h.create_instance(cluster, namespace, name, policy=policy, pin=node)
    for name in [*movers, pinned]:
        h.wait_instance_running(cluster, namespace, name)
    api = h.custom(cluster)
    for name in movers:
        api.patch_namespaced_custom_object(
            h.G, h.V, namespace, "virtualinstances", name, {"spec": {"nodeName": None}}
        )
    try:
        # The way an administrator does it: `kubehv drain NODE --wait` (the CLI follows the
        # controller's Drained condition).
        proc = kubehv_cli(cluster, "drain", node, "--wait", "--timeout", "150")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"node {node} is drained" in proc.stdout
        assert "left on" in proc.stdout, proc.stdout  # progress was shown while it drained
        nhv = api.get_cluster_custom_object(h.G, h.V, "nodehypervisors", node)
        conds = {c["type"]: c for c in (nhv.get("status") or {}).get("conditions", [])}
        assert conds["Drained"]["status"] == "True"
        for name in movers:
            vi = h.wait_instance_running(cluster, namespace, name)
            assert vi["status"]["nodeName"] != node
            assert not h.alive_on(cluster.agents[node].state_dir, namespace, name)
        migs = api.list_namespaced_custom_object(h.G, h.V, namespace, "migrations")["items"]
        modes = {m["spec"]["instance"]: m["spec"].get("mode", "live") for m in migs}
        assert modes == {"dr-live": "live", "dr-cold": "non-live"}
        assert all(m["status"]["phase"] == "Succeeded" for m in migs)
        # dr-stop was stopped (Evicted) and started cold on another node: no Migration for it.
        dr_stop = h.get(cluster, namespace, "virtualinstances", "dr-stop")
        assert dr_stop is not None
        stop_conds = {c["type"]: c for c in dr_stop["status"]["conditions"]}
        assert stop_conds["Evicted"]["reason"] == "NodeDrained"

        waiting = h.get(cluster, namespace, "virtualinstances", pinned)
        assert waiting is not None
        status = waiting["status"]
        assert status["phase"] == "Pending" and not status.get("nodeName")
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["Evicted"]["status"] == "True"
        assert conds["Scheduled"]["reason"] == "NoNodeFits"
        assert f"{node}: draining" in conds["Scheduled"]["message"]
        assert not h.alive_on(cluster.agents[node].state_dir, namespace, pinned)
    finally:
        undo = kubehv_cli(cluster, "drain", "--undo", node)
        assert undo.returncode == 0, undo.stdout + undo.stderr
    # The drain is over: the pinned instance goes back to its node, and Drained is removed.
    vi = h.wait_instance_running(cluster, namespace, pinned)
    assert vi["status"]["nodeName"] == node
    assert h.alive_on(cluster.agents[node].state_dir, namespace, pinned)

    def condition_removed() -> bool:
        nhv = api.get_cluster_custom_object(h.G, h.V, "nodehypervisors", node)
        return all(c["type"] != "Drained" for c in (nhv.get("status") or {}).get("conditions", []))

    h.wait_for("Drained condition removed", condition_removed, timeout=30)
