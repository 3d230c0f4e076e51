"""VirtualInstance lifecycle against the real API server: controller + 3 fake agents as processes.

Behaviour only (phases, conditions, the fake node's records, Events); never timings.
"""

from __future__ import annotations

import kubernetes
import pytest

from tests.fixtures.operator import OperatorCluster, condition, running_and_ready, wait_for

pytestmark = pytest.mark.apiserver


def test_create_runs_and_delete_cleans_up(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    c.create_vi(namespace, "life")
    vi = c.wait_vi(namespace, "life", running_and_ready, what="Running + Ready")
    st = vi["status"]
    node = st["nodeName"]
    assert condition(vi, "Scheduled")["status"] == "True"
    assert condition(vi, "ParametersValid")["status"] == "True"
    assert st["observedGeneration"] == vi["metadata"]["generation"]
    assert st["hypervisorId"]
    assert "kubehv.io/instance" in vi["metadata"]["finalizers"]
    assert c.fake_instances(node, namespace).get("life") == "running"
    reasons = {e["reason"] for e in c.events(namespace, "life")}
    assert {"Scheduled", "Started"} <= reasons

    c.custom.delete_namespaced_custom_object(
        "kubehv.io", "v1alpha1", namespace, "virtualinstances", "life"
    )
    wait_for(lambda: c.get_vi(namespace, "life") is None, 60, "VI gone (finalizer removed)")
    assert "life" not in c.fake_instances(node, namespace)


def test_run_states_reboot_and_balloon(operator_cluster: OperatorCluster, namespace: str) -> None:
    c = operator_cluster
    c.create_vi(namespace, "states", memory=("256Mi", "1Gi"))
    vi = c.wait_vi(namespace, "states", running_and_ready)
    node = vi["status"]["nodeName"]

    c.patch_vi(namespace, "states", {"spec": {"runState": "Paused"}})
    c.wait_phase(namespace, "states", "Paused")
    assert c.fake_instances(node, namespace)["states"] == "paused"

    c.patch_vi(namespace, "states", {"spec": {"runState": "Running"}})
    c.wait_vi(namespace, "states", running_and_ready)

    c.patch_vi(namespace, "states", {"spec": {"rebootGeneration": 1}})
    c.wait_vi(namespace, "states", lambda v: v["status"].get("rebootGeneration") == 1)
    assert "Rebooted" in {e["reason"] for e in c.events(namespace, "states")}

    c.patch_vi(namespace, "states", {"spec": {"memory": {"min": "128Mi", "max": "384Mi"}}})
    c.wait_vi(namespace, "states", lambda v: v["status"].get("actualMemory") == "384Mi")
    c.patch_vi(namespace, "states", {"spec": {"autoBalloon": {"enabled": True, "target": "200Mi"}}})
    c.wait_vi(namespace, "states", lambda v: v["status"].get("actualMemory") == "200Mi")

    c.patch_vi(namespace, "states", {"spec": {"runState": "Stopped"}})
    c.wait_phase(namespace, "states", "Stopped")
    assert "states" not in c.fake_instances(node, namespace)
    got = c.get_vi(namespace, "states")
    assert got is not None and got["status"]["nodeName"] == node  # stays placed while stopped

    c.patch_vi(namespace, "states", {"spec": {"runState": "Running"}})
    c.wait_vi(namespace, "states", running_and_ready)
    assert c.fake_instances(node, namespace)["states"] == "running"


def test_crash_loop_restarts_with_events_then_fails(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    c.create_vi(namespace, "crashy", params={"crash_after_s": 1})
    vi = c.wait_phase(namespace, "crashy", "Failed", timeout=120)
    assert condition(vi, "Ready")["reason"] == "CrashLoop"
    assert vi["status"]["restartCount"] >= 1
    reasons = [e["reason"] for e in c.events(namespace, "crashy")]
    assert "Restarted" in reasons and "CrashLoop" in reasons
    for agent in c.agents.values():
        assert agent.alive()


def test_bad_parameter_rejected_by_webhook(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    with pytest.raises(kubernetes.client.ApiException) as info:
        c.create_vi(namespace, "bad", params={"no_such_param": True})
    assert info.value.status in (400, 422)
    assert "unknown parameter 'no_such_param'" in str(info.value.body)
    with pytest.raises(kubernetes.client.ApiException) as info2:
        c.create_vi(namespace, "bad2", params={"crash_after_s": -1})
    assert "crash_after_s" in str(info2.value.body)
    assert c.get_vi(namespace, "bad") is None


def test_start_failure_is_reported(operator_cluster: OperatorCluster, namespace: str) -> None:
    c = operator_cluster
    c.create_vi(namespace, "nostart", params={"fail_start": True})
    vi = c.wait_phase(namespace, "nostart", "Failed", timeout=120)
    assert condition(vi, "Ready")["reason"] == "StartFailed"
    assert all(a.alive() for a in c.agents.values())
