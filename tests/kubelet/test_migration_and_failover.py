"""On the real nodes: a live migration between two DaemonSet pods, and the leader failover.

Why: issue 13 §2 and §4. The migration's source is the agent pod of the shipped DaemonSet on
the kubelet node (driving the host's libvirtd); its target is the DaemonSet's agent pod on a
second kubelet node, which runs inside a netns libvirt node (kubehv.devenv.kubenetnsnode) and
drives that node's libvirtd through the same hostPath /run/libvirt. Failover: the
Deployment's two controller replicas, the leader's pod deleted; the standby takes the Lease,
the webhook answers all along (every replica serves it), and no container is restarted by
its liveness probe.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from kubehv.devenv.netns import LibvirtNode
from tests.fixtures.operator import wait_for
from tests.kubelet.conftest import SYSTEM_NS, Deployed

pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(1800)]


def _status(obj: dict[str, Any] | None) -> dict[str, Any]:
    return (obj or {}).get("status") or {}


def _schedulable(d: Deployed, node: str, on: bool) -> None:
    patch = json.dumps({"spec": {"schedulable": on}})
    d.kubectl("patch", "nhv", node, "--type=merge", "-p", patch)


def test_live_migration_between_daemonset_pods(
    deployed: Deployed, netns_node: LibvirtNode, vi_namespace: str
) -> None:
    name = f"m-{uuid.uuid4().hex[:5]}"
    home = deployed.node.node_name
    # Start it on the kubelet node (a pinned spec.nodeName could not migrate): the netns
    # node takes no new instance until then.
    _schedulable(deployed, netns_node.name, False)
    try:
        deployed.kubectl("apply", "-f", "-", stdin=deployed.guest_manifest(vi_namespace, name))
        wait_for(
            lambda: _status(deployed.vi(vi_namespace, name)).get("phase") == "Running",
            300,
            f"{name} Running",
        )
    finally:
        _schedulable(deployed, netns_node.name, True)
    assert _status(deployed.vi(vi_namespace, name))["nodeName"] == home
    migration = {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "Migration",
        "metadata": {"name": f"{name}-move", "namespace": vi_namespace},
        "spec": {"instance": name, "mode": "live", "targetNode": netns_node.name},
    }
    deployed.kubectl("apply", "-f", "-", stdin=json.dumps(migration))

    def finished() -> dict[str, Any] | None:
        got = deployed.custom.get_namespaced_custom_object(
            "kubehv.io", "v1alpha1", vi_namespace, "migrations", f"{name}-move"
        )
        status = _status(got)
        return status if status.get("phase") in ("Succeeded", "Failed", "Aborted") else None

    status = wait_for(finished, 600, "the migration to finish", interval=1.0)
    assert status["phase"] == "Succeeded", status
    wait_for(
        lambda: _status(deployed.vi(vi_namespace, name)).get("nodeName") == netns_node.name,
        120,
        "the instance's status to name the target",
    )
    on_target = netns_node.virsh("list", "--name").stdout.split()
    assert f"{vi_namespace}.{name}" in on_target
    # Both ends were pods of the shipped DaemonSet, one per kubelet node.
    for node in (home, netns_node.name):
        pod = deployed.agent_pod(node)
        assert [o.kind for o in pod.metadata.owner_references] == ["DaemonSet"], node


def _lease_holder(d: Deployed) -> str:
    lease = d.kubectl("get", "lease", "kubehv-controller", "-n", SYSTEM_NS, "-o", "json")
    return str(json.loads(lease)["spec"].get("holderIdentity") or "")


def _webhook_answers(d: Deployed, namespace: str) -> str:
    """Empty when the webhook refused the bad object (it answered), else what kubectl said."""
    bad = d.guest_manifest(namespace, "probe", hypervisorParameters={"accelerator": "nope"})
    out = d.kubectl("apply", "--dry-run=server", "-f", "-", stdin=bad, check=False)
    return "" if 'admission webhook "validate.kubehv.io" denied' in out else out.strip()


def test_leader_pod_deleted_standby_takes_over(deployed: Deployed, vi_namespace: str) -> None:
    leader = wait_for(lambda: _lease_holder(deployed), 120, "a lease holder")
    names = {p.metadata.name for p in deployed.pods("kubehv-controller")}
    assert leader in names, (leader, names)
    standby = (names - {leader}).pop()
    deployed.kubectl("delete", "pod", "-n", SYSTEM_NS, leader, "--wait=false")

    # The webhook keeps answering while the leader goes and the standby takes over.
    deadline = time.monotonic() + 180
    probes: list[str] = []
    while True:
        probes.append(_webhook_answers(deployed, vi_namespace))
        if _lease_holder(deployed) not in ("", leader):
            break
        assert time.monotonic() < deadline, "the standby did not take the lease"
        time.sleep(1)
    assert probes and not any(probes), f"webhook failures during the failover: {probes}"
    # The standby, or the Deployment's replacement pod if it started first and won the race
    # when the old leader released the lease on exit (after its preStop sleep).
    new = _lease_holder(deployed)
    assert new != leader
    assert new in {standby} | {p.metadata.name for p in deployed.pods("kubehv-controller")}
    assert _webhook_answers(deployed, vi_namespace) == ""

    # The Deployment replaces the deleted pod; no container restarted by its probe.
    pods = wait_for(deployed.settled_controllers, 240, "two Ready controllers again", interval=1)
    for pod in pods:
        assert all(c.restart_count == 0 for c in pod.status.container_statuses), pod.metadata.name
