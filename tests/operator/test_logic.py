"""Unit tests of the agent's and controller's pure decisions (no server, no processes)."""

from __future__ import annotations

import datetime
from typing import Any

import pydantic
import pytest

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import values
from kubehv.operator import heartbeat, instance_logic, placement, status, translate, webhook
from kubehv.operator import owner_logic as ol

L = instance_logic
Do = ol.Act
POLICY = L.Policy(backoff_base_s=1.0, crash_limit=3, crash_window_s=100.0)


def vi(
    spec: dict[str, Any] | None = None,
    st: dict[str, Any] | None = None,
    finalizer: bool = True,
    **meta: Any,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "vm",
            "namespace": "ns",
            "uid": "u1",
            "generation": 1,
            "finalizers": [constants.INSTANCE_FINALIZER] if finalizer else [],
            **meta,
        },
        "spec": {"hypervisor": "fake", "memory": {"min": "256Mi", "max": "512Mi"}, **(spec or {})},
        "status": {"nodeName": "n1", "phase": "Scheduled", **(st or {})},
    }


def info(state: values.InstanceState = values.InstanceState.RUNNING, mem: int = 512) -> L.Observed:
    return L.Observed(values.InstanceInfo("vm", "id1", mem, 1, state, 0.0))


NONE = L.Observed(None)


def model(body: dict[str, Any]) -> api.VirtualInstance:
    return api.VirtualInstance.model_validate(body)


def decide(
    body: dict[str, Any], observed: L.Observed, hist: L.History | None = None, now: float = 1000.0
) -> ol.Action:
    """The owner's decision on a fresh read, with no Migration and no journal entry."""
    return ol.decide(
        ol.Inputs(
            node="n1",
            instance=model(body),
            fresh=True,
            migration=None,
            domain=observed.info,
            journal=None,
            node_draining=False,
            history=hist or L.History(),
            now=now,
            policy=POLICY,
        )
    )


def test_first_finalizer_then_start() -> None:
    assert decide(vi(finalizer=False), NONE).act is Do.ADD_FINALIZER
    assert decide(vi(), NONE).act is Do.START


def test_running_instance_needs_nothing_and_status_is_stable() -> None:
    body = vi(st={"phase": "Running"})
    assert decide(body, info()).act is Do.NOTHING
    desired = L.desired_status(model(body), info(), now="2020-01-01T00:00:00Z")
    body["status"].update(desired)
    again = L.desired_status(model(body), info(), now="2030-01-01T00:00:00Z")
    assert L.status_patch(model(body), again) == {}  # no write when nothing changed
    assert desired["phase"] == "Running" and desired["actualMemory"] == "512Mi"


def test_run_states() -> None:
    assert decide(vi({"runState": "Paused"}, {"phase": "Running"}), info()).act is Do.PAUSE
    paused = info(values.InstanceState.PAUSED)
    assert decide(vi({"runState": "Running"}, {"phase": "Paused"}), paused).act is Do.RESUME
    assert decide(vi({"runState": "Stopped"}, {"phase": "Running"}), info()).act is Do.STOP
    assert decide(vi({"runState": "Stopped"}, {"phase": "Stopped"}), NONE).act is Do.NOTHING
    crashed = info(values.InstanceState.CRASHED)
    assert decide(vi({"runState": "Stopped"}), crashed).act is Do.CLEANUP


def test_reboot_on_generation_bump_only() -> None:
    body = vi({"rebootGeneration": 2}, {"phase": "Running", "rebootGeneration": 1})
    assert decide(body, info()).act is Do.REBOOT
    body["status"]["rebootGeneration"] = 2
    assert decide(body, info()).act is Do.NOTHING


def test_balloon_into_range_and_to_auto_target() -> None:
    body = vi({"memory": {"min": "128Mi", "max": "384Mi"}}, {"phase": "Running"})
    action = decide(body, info(mem=512))
    assert action.act is Do.BALLOON and action.memory_mib == 384
    body["spec"]["autoBalloon"] = {"enabled": True, "target": "200Mi"}
    assert decide(body, info(mem=384)).memory_mib == 200
    body["spec"]["autoBalloon"]["target"] = "128Mi"  # the minimum itself
    assert decide(body, info(mem=384)).memory_mib == 128
    body["spec"]["autoBalloon"]["target"] = "64Mi"  # below min: refused where it is parsed
    with pytest.raises(pydantic.ValidationError, match=r"between memory\.min and memory\.max"):
        model(body)


def test_drift_restart_with_backoff_then_crash_loop() -> None:
    body = vi(st={"phase": "Running"})
    hist = L.History()
    assert decide(body, NONE, hist, 1000.0).act is Do.RESTART
    hist.restarts.append(1000.0)
    assert decide(body, NONE, hist, 1000.5).act is Do.WAIT  # backoff 1 s
    assert decide(body, NONE, hist, 1001.5).act is Do.RESTART
    hist.restarts += [1001.5, 1004.0]
    action = decide(body, NONE, hist, 1010.0)
    assert action.act is Do.CRASH_LOOP and "not restarting" in action.message
    # old restarts leave the window
    assert decide(body, NONE, hist, 5000.0).act is Do.RESTART


def test_failed_waits_for_a_spec_change() -> None:
    body = vi(st={"phase": "Failed", "observedGeneration": 1})
    assert decide(body, NONE).act is Do.NOTHING
    body["metadata"]["generation"] = 2
    assert decide(body, NONE).act is Do.START


def test_deleting_and_migrating() -> None:
    assert decide(vi(deletionTimestamp="x"), info()).act is Do.FINALIZE
    assert decide(vi(finalizer=False, deletionTimestamp="x"), info()).act is Do.NOTHING
    # Migrating with no Migration owning it: given back on this fresh read (it used to stay
    # Migrating until a separate orphan sweep); with one, the Migration decides (owner tests).
    assert decide(vi(st={"phase": "Migrating"}), NONE).act is Do.RELEASE_MIGRATING


def test_conditions_keep_transition_time_and_others() -> None:
    current = [{"type": "Scheduled", "status": "True", "reason": "S", "message": ""}]
    out = status.merge_conditions(current, [status.Condition("Ready", True, "R")], 1, "t1")
    out2 = status.merge_conditions(out, [status.Condition("Ready", True, "R2")], 1, "t2")
    assert [c["type"] for c in out2] == ["Scheduled", "Ready"]
    assert out2[1]["lastTransitionTime"] == "t1" and out2[1]["reason"] == "R2"
    out3 = status.merge_conditions(out2, [status.Condition("Ready", False, "R")], 1, "t3")
    assert out3[1]["lastTransitionTime"] == "t3"


def test_translate_merges_node_defaults_under_instance_params() -> None:
    body = vi({"hypervisorParameters": {"fail_start": True}, "vcpus": 2, "disks": [{"path": "/d"}]})
    spec = translate.instance_spec(body, {"fail_start": False, "shutdown_delay_s": 1.0})
    assert spec.params == {"fail_start": True, "shutdown_delay_s": 1.0}
    assert (spec.memory_min_mib, spec.memory_max_mib, spec.vcpus) == (256, 512, 2)
    assert spec.disks[0].path == "/d"
    assert translate.to_mib("1Gi") == 1024 and translate.to_mib("bogus") is None


def test_webhook_problems() -> None:
    assert webhook.problems(vi()) is None
    assert "unknown parameter 'nope'" in (
        webhook.problems(vi({"hypervisorParameters": {"nope": 1}})) or ""
    )
    assert "unknown hypervisor" in (webhook.problems(vi({"hypervisor": "xen"})) or "")


NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def node(
    name: str,
    free: int = 4096,
    ready: bool = True,
    *,
    labels: dict[str, str] | None = None,
    hypervisor: str = "fake",
    drain: bool = False,
    schedulable: bool = True,
) -> api.NodeHypervisor:
    return api.NodeHypervisor.model_validate(
        {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "nodeName": name,
                "hypervisor": hypervisor,
                "drain": drain,
                "schedulable": schedulable,
            },
            "status": {
                "memoryTotal": free,
                "memoryFree": free,
                "memoryDom0": 0,
                "lastHeartbeat": "2030-01-01T00:00:00Z",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "AgentReady" if ready else "NoHeartbeat",
                    }
                ],
            },
        }
    )


def req(mem: int = 256, pin: str | None = None, **sel: str) -> placement.Request:
    return placement.Request("vm", "fake", mem, pin, sel)


def test_placement_spreads_and_counts_unreported() -> None:
    nodes = [node("a"), node("b")]
    assert placement.choose(req(), nodes, []).node == "a"
    assigned = [placement.Assigned("a", "Scheduled", 256, reported=False)]
    assert placement.choose(req(), nodes, assigned).node == "b"
    # 'a' would have room by its stale report, but not after what it has not reported yet
    tight = [node("a", free=500), node("b", free=100)]
    d = placement.choose(req(300), tight, assigned)
    assert d.node is None
    assert "a: needs 300 MiB, 244 MiB free" in d.message and "b: needs 300 MiB" in d.message


def test_placement_pin_selector_readiness_and_hypervisor() -> None:
    nodes = [
        node("a"),
        node("b", labels={"zone": "z1"}),
        node("c", ready=False),
        node("d", hypervisor="kvm"),
    ]
    assert placement.choose(req(pin="c"), nodes, []).node is None
    assert placement.choose(req(pin="b"), nodes, []).node == "b"
    assert placement.choose(req(zone="z1"), nodes, []).node == "b"
    msg = placement.choose(req(zone="z9"), nodes, []).message
    assert "label zone=z9 does not match" in msg
    assert "c: " in placement.choose(req(pin="c"), nodes, []).message
    drained = [node("a", drain=True), node("b", schedulable=False)]
    m = placement.choose(req(), drained, []).message
    assert "draining" in m and "not schedulable" in m


def test_heartbeat_marks_once() -> None:
    nhv: dict[str, Any] = {
        "metadata": {"name": "a"},
        "spec": {"nodeName": "a"},
        "status": {
            "lastHeartbeat": "2029-12-31T23:59:00Z",
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady"}],
        },
    }
    typed = api.NodeHypervisor.model_validate(nhv)
    assert heartbeat.is_stale(typed, NOW, 30) and not heartbeat.is_stale(typed, NOW, 120)
    patch = heartbeat.node_status_patch(typed, NOW, 30)
    assert patch["conditions"][0]["status"] == "Unknown"
    nhv["status"].update(patch)
    assert heartbeat.node_status_patch(api.NodeHypervisor.model_validate(nhv), NOW, 30) == {}
    vpatch = heartbeat.instance_status_patch(model(vi(st={"phase": "Running"})), "a")
    assert vpatch["phase"] == "Unknown"
    assert heartbeat.instance_status_patch(model(vi(st={"phase": "Unknown"})), "a") == {}
    # A migrating instance belongs to its Migration: heartbeat loss never rewrites its phase
    # (the "Unknown overwrites Migrating, then decide starts it").
    assert heartbeat.instance_status_patch(model(vi(st={"phase": "Migrating"})), "a") == {}
