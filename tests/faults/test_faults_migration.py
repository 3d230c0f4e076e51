"""kill -9 the source or the target agent at each Migration phase, then restart it.

What must hold (issue 6): whatever the moment of the crash, the Migration ends Succeeded or
Failed (never stuck), and the guest runs exactly once: one live copy across all nodes' fake
state directories, on the node the VirtualInstance names. The fake driver's
``migration_duration_s`` keeps the transfer (phase Running) long enough to be hit; the short
phases are hit by a watch that kills the agent the moment the phase is written.
"""

from __future__ import annotations

import uuid
from typing import Any

import fault_helpers as fh
import pytest

from tests.fixtures.operator import OperatorCluster, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.faults]

fault_cluster = fh.cluster_fixture("fmig")

TERMINAL = ("Succeeded", "Failed", "Aborted")
PHASES = ["Preparing", "TargetReady", "Running", "Finalizing"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("victim", ["source", "target"])
def test_agent_killed_at_phase(
    fault_cluster: OperatorCluster, namespace: str, victim: str, phase: str
) -> None:
    c = fault_cluster
    vm = f"vm-{uuid.uuid4().hex[:6]}"
    c.create_vi(namespace, vm, params={"migration_duration_s": 2.0})
    vi = c.wait_phase(namespace, vm, "Running")
    source = vi["status"]["nodeName"]
    target = next(n for n in c.nodes if n != source)
    agent = c.agents[source if victim == "source" else target]

    mig = f"mig-{uuid.uuid4().hex[:6]}"
    trigger = fh.PhaseTrigger(c, namespace, mig, phase, agent.kill).start()
    fh.create_migration(c, namespace, vm, name=mig, targetNode=target)
    try:
        fired = trigger.wait(60)
        assert fired, f"phase {phase} never written; phases seen: {trigger.seen}"
        assert not agent.alive()
    finally:
        agent.start()

    def terminal() -> dict[str, Any] | None:
        body = fh.get_migration(c, namespace, mig)
        return body if (body.get("status") or {}).get("phase") in TERMINAL else None

    body = wait_for(terminal, 120, f"Migration {mig} terminal after {victim} killed at {phase}")
    assert body is not None
    status = body["status"]
    assert status["phase"] in ("Succeeded", "Failed"), status
    if status["phase"] == "Failed":
        assert status.get("failureReason"), status

    # The guest runs exactly once, where the VirtualInstance says it does.
    expected = target if status["phase"] == "Succeeded" else source

    def settled() -> dict[str, Any] | None:
        v = c.get_vi(namespace, vm) or {}
        st = v.get("status") or {}
        alive = fh.alive_nodes(c, namespace, vm)
        ok = st.get("phase") == "Running" and st.get("nodeName") == expected and alive == [expected]
        return v if ok else None

    wait_for(settled, 90, f"{vm} running once on {expected}; copies {fh.copies(c, namespace, vm)}")
    assert fh.alive_nodes(c, namespace, vm) == [expected], fh.copies(c, namespace, vm)
