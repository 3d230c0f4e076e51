"""A guest killed from outside its agent: restarted with an Event; a crash loop is bounded.

Why: a hypervisor process can die under the agent (OOM killer, a QEMU bug, an operator's
kill). The agent's drift watcher must notice, start the guest again on the same node, say so
with an Event and ``status.restartCount``, and, if the guest keeps dying, stop after the
crash limit with phase Failed / reason CrashLoop instead of restarting forever. The crash is
injected with the fake driver's ``crash_instance`` from the test process (another process,
as a real crash would be); the agents run with the default crash limit (5 within 600 s).
"""

from __future__ import annotations

import json
from typing import Any

import fault_helpers as fh
import pytest

from kubehv.drivers import fake
from kubehv.operator import translate
from tests.fixtures.operator import OperatorCluster, condition, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.faults]

fault_cluster = fh.cluster_fixture("fcrash")

CRASH_LIMIT = 5  # the agent's default --crash-limit


def _record(c: OperatorCluster, node: str, vi: dict[str, Any]) -> dict[str, Any]:
    path = c.agents[node].state_dir / "instances" / f"{translate.instance_name(vi)}.json"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _crash(c: OperatorCluster, node: str, vi: dict[str, Any]) -> None:
    fake.crash_instance(str(c.agents[node].state_dir), translate.instance_name(vi), "killed -9")


def test_killed_guest_is_restarted_with_an_event(
    fault_cluster: OperatorCluster, namespace: str
) -> None:
    c = fault_cluster
    c.create_vi(namespace, "victim")
    vi = c.wait_phase(namespace, "victim", "Running")
    node = vi["status"]["nodeName"]
    booted = _record(c, node, vi)["running_since"]
    _crash(c, node, vi)

    def restarted(v: dict[str, Any]) -> bool:
        st = v.get("status") or {}
        return st.get("phase") == "Running" and (st.get("restartCount") or 0) >= 1

    vi = c.wait_vi(namespace, "victim", restarted, 60, "victim restarted")
    assert vi["status"]["nodeName"] == node
    assert _record(c, node, vi)["running_since"] > booted  # a new boot, not the old guest
    assert fh.alive_nodes(c, namespace, "victim") == [node]
    events = wait_for(
        lambda: [e for e in c.events(namespace, "victim") if e["reason"] == "Restarted"],
        30, "a Restarted event",
    )  # fmt: skip
    assert events[0]["type"] == "Warning" and node in events[0]["message"]


def test_repeated_kills_end_in_a_bounded_crash_loop(
    fault_cluster: OperatorCluster, namespace: str
) -> None:
    c = fault_cluster
    c.create_vi(namespace, "flappy")
    vi = c.wait_phase(namespace, "flappy", "Running")
    node = vi["status"]["nodeName"]
    kills = 0
    while True:
        current = c.get_vi(namespace, "flappy") or {}
        if (current.get("status") or {}).get("phase") == "Failed":
            break
        assert kills <= CRASH_LIMIT + 1, f"still restarting after {kills} kills: {current}"
        rec = _record(c, node, vi)
        if rec["status"] == "running":
            _crash(c, node, vi)
            kills += 1
            before = rec["running_since"]

            # Wait for the agent's answer: a new boot, or giving up.
            def answered(before: float = before) -> bool:
                if (c.get_vi(namespace, "flappy") or {}).get("status", {}).get("phase") == "Failed":
                    return True
                since: float = _record_or_empty(c, node, vi).get("running_since") or 0
                return since > before

            wait_for(answered, 90, "a restart or the crash loop verdict")
        else:
            was = rec["status"]
            changed = lambda was=was: _record_or_empty(c, node, vi).get("status") != was  # noqa: E731
            wait_for(changed, 30)
    vi = c.get_vi(namespace, "flappy") or {}
    assert condition(vi, "Ready")["reason"] == "CrashLoop"
    assert kills == CRASH_LIMIT + 1, kills
    assert vi["status"]["restartCount"] == CRASH_LIMIT
    reasons = [e["reason"] for e in c.events(namespace, "flappy")]
    assert reasons.count("Restarted") >= 1 and "CrashLoop" in reasons
    # Given up: the guest is not running anywhere, and no other node picked it up.
    assert fh.alive_nodes(c, namespace, "flappy") == []


def _record_or_empty(c: OperatorCluster, node: str, vi: dict[str, Any]) -> dict[str, Any]:
    try:
        return _record(c, node, vi)
    except (OSError, ValueError):
        return {}
