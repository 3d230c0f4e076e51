"""The Migration protocol against the real API server: controller + 3 fake agents as processes.

Each test uses its own namespace and instance names, so tests can share the cluster.
Behaviour only: phases reached, where the fake VM runs (the agents' state directories),
reasons written; never how long anything took.
"""

from __future__ import annotations

from typing import Any

import migration_helpers as h
import pytest

pytestmark = pytest.mark.apiserver

SLOW = {"migration_duration_s": 3}


def placed(cluster: Any, namespace: str, name: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    h.create_instance(cluster, namespace, name, **kw)
    vi = h.wait_instance_running(cluster, namespace, name)
    return vi["status"]["nodeName"], vi


def state_dir(cluster: Any, node: str) -> Any:
    return cluster.agents[node].state_dir


def other_node(cluster: Any, node: str) -> str:
    others: list[str] = sorted(n for n in cluster.agents if n != node)
    return others[0]


@pytest.mark.parametrize("mode", ["live", "non-live"])
def test_migration_succeeds_with_progress(operator_cluster: Any, namespace: str, mode: str) -> None:
    cluster = operator_cluster
    source, _ = placed(cluster, namespace, "vm-ok", params=SLOW)
    target = other_node(cluster, source)
    name = h.create_migration(cluster, namespace, "vm-ok", targetNode=target, mode=mode)
    watch = h.PhaseWatch(cluster, namespace, name)
    body = watch.until({"Succeeded", "Failed", "Aborted"})
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert "Running" in watch.phases
    assert watch.progress_while_running, "no progress seen while Running"
    assert body["status"]["sourceNode"] == source
    assert body["status"]["targetNode"] == target

    def moved() -> bool:
        vi = h.get(cluster, namespace, "virtualinstances", "vm-ok") or {}
        return (vi.get("status") or {}).get("nodeName") == target

    h.wait_for("nodeName moved to the target", moved)
    assert h.alive_on(state_dir(cluster, target), namespace, "vm-ok")
    assert "vm-ok" not in h.fake_instances(state_dir(cluster, source), namespace)
    h.wait_instance_running(cluster, namespace, "vm-ok")


@pytest.mark.parametrize("step", ["migration_info", "accept", "migrate"])
def test_injected_failure_leaves_vm_on_source(
    operator_cluster: Any, namespace: str, step: str
) -> None:
    cluster = operator_cluster
    vm = f"vm-fail-{step.replace('_', '-')}"
    source, _ = placed(cluster, namespace, vm, params={"fail_migration_at": step})
    target = other_node(cluster, source)
    name = h.create_migration(cluster, namespace, vm, targetNode=target)
    body = h.PhaseWatch(cluster, namespace, name).until({"Succeeded", "Failed", "Aborted"})
    status = body["status"]
    assert status["phase"] == "Failed", status
    assert status.get("failureReason")

    def cleaned() -> bool:
        b = h.get(cluster, namespace, "migrations", name) or {}
        conds = {c["type"]: c["status"] for c in (b.get("status") or {}).get("conditions", [])}
        return conds.get("SourceFinalized") == "True" and conds.get("TargetFinalized") == "True"

    h.wait_for("both sides finalized", cleaned)
    assert h.alive_on(state_dir(cluster, source), namespace, vm)
    assert vm not in h.fake_instances(state_dir(cluster, target), namespace)
    vi = h.wait_instance_running(cluster, namespace, vm)
    assert vi["status"]["nodeName"] == source


def test_target_finalize_failure_keeps_the_only_copy(operator_cluster: Any, namespace: str) -> None:
    """The copy completed, then the target failed to take it over: the source copy is gone
    (as with libvirt), so the only copy is on the target. It must be kept and run there,
    exactly once; never destroyed by a rollback."""
    cluster = operator_cluster
    vm = "vm-fail-finalize-dst"
    source, _ = placed(cluster, namespace, vm, params={"fail_migration_at": "finalize_dst"})
    target = other_node(cluster, source)
    name = h.create_migration(cluster, namespace, vm, targetNode=target)
    h.PhaseWatch(cluster, namespace, name).until({"Succeeded", "Failed", "Aborted"})

    def moved() -> bool:
        b = h.get(cluster, namespace, "migrations", name) or {}
        conds = {c["type"]: c["status"] for c in (b.get("status") or {}).get("conditions", [])}
        return conds.get("InstanceMoved") == "True"

    h.wait_for("the instance handed to the target", moved)
    assert h.alive_on(state_dir(cluster, target), namespace, vm)
    assert vm not in h.fake_instances(state_dir(cluster, source), namespace)
    vi = h.wait_instance_running(cluster, namespace, vm)
    assert vi["status"]["nodeName"] == target


def test_finalize_source_failure_still_succeeds(operator_cluster: Any, namespace: str) -> None:
    """Once the VM runs on the target, a source cleanup problem must not run it twice."""
    cluster = operator_cluster
    source, _ = placed(cluster, namespace, "vm-fs", params={"fail_migration_at": "finalize_source"})
    name = h.create_migration(cluster, namespace, "vm-fs")
    body = h.PhaseWatch(cluster, namespace, name).until({"Succeeded", "Failed"})
    target = body["status"]["targetNode"]
    assert body["status"]["phase"] == "Succeeded"
    assert h.alive_on(state_dir(cluster, target), namespace, "vm-fs")
    assert not h.alive_on(state_dir(cluster, source), namespace, "vm-fs")


@pytest.mark.parametrize("how", ["delete", "annotate"])
def test_abort_during_running(operator_cluster: Any, namespace: str, how: str) -> None:
    cluster = operator_cluster
    vm = f"vm-abort-{how}"
    source, _ = placed(cluster, namespace, vm, params={"migration_duration_s": 30})
    name = h.create_migration(cluster, namespace, vm)
    watch = h.PhaseWatch(cluster, namespace, name)
    watch.until({"Running"})
    api = h.custom(cluster)
    if how == "delete":
        # The finalizer keeps the deleted Migration until the abort is recorded, then lets it
        # go at once: follow every state through a watch instead of polling for it.
        since = watch.body["metadata"]["resourceVersion"]
        api.delete_namespaced_custom_object(h.G, h.V, namespace, "migrations", name)
        history = h.history_until_deleted(cluster, namespace, name, since)
        body = history[-1]
        assert h.get(cluster, namespace, "migrations", name) is None
    else:
        api.patch_namespaced_custom_object(
            h.G,
            h.V,
            namespace,
            "migrations",
            name,
            {"metadata": {"annotations": {"kubehv.io/abort": "true"}}},
        )
        body = watch.until({"Aborted", "Failed", "Succeeded"})
    assert body["status"]["phase"] == "Aborted", body["status"]
    vi = h.wait_instance_running(cluster, namespace, vm)
    assert vi["status"]["nodeName"] == source
    assert h.alive_on(state_dir(cluster, source), namespace, vm)


def test_second_migration_for_same_instance_refused(operator_cluster: Any, namespace: str) -> None:
    cluster = operator_cluster
    placed(cluster, namespace, "vm-two", params={"migration_duration_s": 6})
    first = h.create_migration(cluster, namespace, "vm-two")
    h.PhaseWatch(cluster, namespace, first).until(
        {"Scheduled", "Preparing", "TargetReady", "Running"}
    )
    second = h.create_migration(cluster, namespace, "vm-two")
    body = h.PhaseWatch(cluster, namespace, second).until({"Failed", "Succeeded", "Scheduled"})
    assert body["status"]["phase"] == "Failed"
    assert first in body["status"]["failureReason"]
    assert (
        h.PhaseWatch(cluster, namespace, first).until({"Succeeded", "Failed"})["status"]["phase"]
        == "Succeeded"
    )


@pytest.mark.parametrize("victim", ["source", "target"])
def test_agent_killed_mid_migration_runs_once(
    operator_cluster: Any, namespace: str, victim: str
) -> None:
    cluster = operator_cluster
    vm = f"vm-kill-{victim}"
    source, _ = placed(cluster, namespace, vm, params={"migration_duration_s": 6})
    target = other_node(cluster, source)
    name = h.create_migration(cluster, namespace, vm, targetNode=target)
    watch = h.PhaseWatch(cluster, namespace, name)
    watch.until({"Running"})
    node = source if victim == "source" else target
    cluster.agents[node].kill()
    cluster.agents[node].start()
    body = watch.until({"Succeeded", "Failed", "Aborted"}, timeout=180)
    phase = body["status"]["phase"]
    where = target if phase == "Succeeded" else source
    elsewhere = source if where == target else target

    def once() -> bool:
        return h.alive_on(state_dir(cluster, where), namespace, vm) and not h.alive_on(
            state_dir(cluster, elsewhere), namespace, vm
        )

    h.wait_for(f"{vm} alive on {where} only after {phase}", once)
    vi = h.wait_for(
        "nodeName to match where the VM runs",
        lambda: (
            (h.get(cluster, namespace, "virtualinstances", vm) or {})
            .get("status", {})
            .get("nodeName")
            == where
        ),
    )
    assert vi
    print(f"killed {victim} agent while Running -> {phase}: {body['status'].get('failureReason')}")


def test_instance_left_migrating_without_a_migration_is_released(
    operator_cluster: Any, namespace: str
) -> None:
    """A VirtualInstance stuck in phase Migrating with no Migration owning it (what a
    Migration force-deleted mid-flight leaves behind) goes back to Running on its node."""
    cluster = operator_cluster
    node, vi = placed(cluster, namespace, "vm-stuck")
    stale = "2020-01-01T00:00:00Z"
    conds = [c for c in vi["status"]["conditions"] if c["type"] != "Migrating"]
    conds.append(
        {
            "type": "Migrating",
            "status": "True",
            "reason": "MigrationStarted",
            "message": "migrating to nowhere (a Migration that no longer exists)",
            "lastTransitionTime": stale,
        }
    )
    h.custom(cluster).patch_namespaced_custom_object_status(
        h.G, h.V, namespace, "virtualinstances", "vm-stuck",
        {"status": {"phase": "Migrating", "conditions": conds}},
    )  # fmt: skip

    def released() -> dict[str, Any] | None:
        got = h.get(cluster, namespace, "virtualinstances", "vm-stuck") or {}
        status = got.get("status") or {}
        mig = {c["type"]: c for c in status.get("conditions") or []}.get("Migrating", {})
        ok = status.get("phase") == "Running" and mig.get("reason") == "MigrationGone"
        return got if ok else None

    got = h.wait_for("vm-stuck released from Migrating", released, timeout=60)
    assert got["status"]["nodeName"] == node
    assert h.alive_on(state_dir(cluster, node), namespace, "vm-stuck")
