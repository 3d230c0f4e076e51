"""Faults of the control plane and of a whole node: the API server restarts, an agent dies.

Why: kopf watches and the operator's own status writes all go through kube-apiserver; a
restart in the middle of a 100-instance reconcile must cost time, never state (every
instance still reaches Running, each exactly once). An agent stopped for good must turn
its instances Unknown (the controller's heartbeat check) and nothing may start a second copy
elsewhere: Ganeti's rule that an instance whose node is unreachable is never assumed dead.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import fault_helpers as fh
import kubernetes
import pytest

from tests.fixtures.operator import GROUP, VERSION, OperatorCluster, condition, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.faults]

fault_cluster = fh.cluster_fixture("fcp")

SCALE = 100


def _phases(c: OperatorCluster, namespace: str) -> dict[str, str]:
    items = c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "virtualinstances")[
        "items"
    ]
    return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}


def supervise(c: OperatorCluster) -> None:
    """Play the Deployment's part: restart the controller if it exited, and say why it did.

    The controller is crash-only: when it cannot renew its leader Lease for a whole lease
    duration (the API server is down that long), it exits with status 3 so that it never
    acts as a leader it may no longer be. Only that deliberate exit is accepted; agents must
    ride out the outage in-process.
    """
    proc = c.controller.proc
    if proc is None or proc.popen is None or proc.popen.poll() is None:
        return
    code, log = proc.popen.returncode, c.controller.tail(200)
    assert code == 3 and "could not renew the lease in time" in log, (
        f"controller exited with {code}:\n{log}"
    )
    c.controller.proc = None
    c.controller.start()


def test_apiserver_restart_during_scale_reconcile(
    fault_cluster: OperatorCluster, control_plane: Any, namespace: str
) -> None:
    c = fault_cluster
    names = [f"scale-{i:03d}" for i in range(SCALE)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: c.create_vi(namespace, n, memory=("16Mi", "32Mi")), names))
    # Restart while the agents are still working through the batch.
    control_plane.restart_apiserver()
    # The fixture's client pool holds connections to the old process: use a fresh client.
    c.api.close()
    c.api = control_plane.api_client()
    c.custom = kubernetes.client.CustomObjectsApi(c.api)
    c.core = kubernetes.client.CoreV1Api(c.api)

    def all_running() -> bool:
        supervise(c)
        phases = _phases(c, namespace)
        return len(phases) == SCALE and all(p == "Running" for p in phases.values())

    try:
        wait_for(all_running, 240, "all instances Running after the API server restart", 1.0)
    except AssertionError:
        phases = _phases(c, namespace)
        stuck = {n: p for n, p in phases.items() if p != "Running"}
        raise AssertionError(
            f"{len(stuck)} not Running: {dict(list(stuck.items())[:10])}"
        ) from None
    for name in names:
        assert len(fh.alive_nodes(c, namespace, name)) == 1, (name, fh.copies(c, namespace, name))
    for agent in c.agents.values():
        assert agent.alive(), f"{agent.name} died across the API server restart:\n{agent.tail()}"


def test_agent_stopped_for_good_instances_unknown_never_twice(
    fault_cluster: OperatorCluster, namespace: str
) -> None:
    c = fault_cluster
    supervise(c)
    lost_node = c.nodes[-1]
    names = [f"pinned-{i}" for i in range(5)]
    for name in names:
        c.create_vi(namespace, name, nodeName=lost_node)
    for name in names:
        c.wait_phase(namespace, name, "Running")
    agent = c.agents[lost_node]
    agent.stop()
    try:
        for name in names:
            vi = c.wait_phase(namespace, name, "Unknown", timeout=90)
            assert vi["status"]["nodeName"] == lost_node
            assert condition(vi, "Ready")["reason"] == "NodeLost"
        # A newcomer is placed elsewhere while the lost node's instances stay put.
        others = [n for n in c.nodes if n != lost_node]
        probe = f"probe-{namespace[-6:]}"
        c.create_vi(namespace, probe)
        placed = c.wait_phase(namespace, probe, "Running")
        assert placed["status"]["nodeName"] in others
        for name in names:
            vi = c.get_vi(namespace, name) or {}
            assert vi["status"]["phase"] == "Unknown"
            assert vi["status"]["nodeName"] == lost_node
            for node in others:
                assert name not in c.fake_instances(node, namespace), (name, node)
        # The lost node's copies were never touched by anyone else: still running there.
        for name in names:
            assert fh.alive_nodes(c, namespace, name) == [lost_node]
    finally:
        agent.start()
    # When the node comes back, its instances are reported Running again, still once.
    for name in names:
        c.wait_phase(namespace, name, "Running", timeout=90)
        assert fh.alive_nodes(c, namespace, name) == [lost_node]
