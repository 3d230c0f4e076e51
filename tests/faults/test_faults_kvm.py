"""Faults on real guests: a QEMU killed under the agent, and a libvirtd restarted under it.

Why: the fake-driver fault tests prove the agent's logic; only a real QEMU and a real
libvirtd prove the kvm driver feeds that logic. (1) A guest's QEMU killed with SIGKILL must be
noticed by the agent's drift watcher and started again on the same node: a second boot
marker on its serial console, ``status.restartCount`` up, a Warning Event ``Restarted``, and
one domain of that name across both nodes. (2) A libvirtd killed and started again (its
guests survive) must be reconnected to: the VI stays Running and Ready, the guest keeps
printing alive markers, the NodeHypervisor heartbeats again with Ready True, and a spec
change made after the restart is still applied. Behaviour only, never timings.

The cluster is the e2e one (``tests/e2e/conftest.py``: two netns libvirt nodes, a kvm agent
per node and the controller, as processes against the real apiserver), imported as fixtures.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from kubehv.devenv import serial
from tests.e2e.conftest import KvmCluster, kvm_cluster  # noqa: F401  (fixture)
from tests.fixtures.kube import fresh_namespace
from tests.fixtures.operator import condition, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.real_libvirt, pytest.mark.apiserver]

BOOT_TIMEOUT = 180.0


@pytest.fixture
def namespace(kvm_cluster: KvmCluster) -> Iterator[str]:  # noqa: F811
    with fresh_namespace(kvm_cluster.control_plane, f"fkvm-{uuid.uuid4().hex[:6]}") as name:
        yield name


@contextlib.contextmanager
def running_guest(cluster: KvmCluster, namespace: str, name: str) -> Iterator[dict[str, Any]]:
    """Apply a kvm VI, wait until Ready and booted; delete it and check no domain is left."""
    domain = f"{namespace}.{name}"
    cluster.kubectl("apply", "-f", "-", stdin=cluster.guest_manifest(namespace, name))
    try:
        cluster.kubectl(
            "wait", "--for=condition=Ready", f"virtualinstance/{name}", "-n", namespace,
            f"--timeout={int(BOOT_TIMEOUT)}s",
        )  # fmt: skip
        vi = cluster.get("virtualinstances", namespace, name)
        assert vi is not None
        node = vi["status"]["nodeName"]
        serial.wait_for_marker(
            cluster.serial_log(node, domain), cluster.image.boot_marker, timeout=BOOT_TIMEOUT
        )
        yield vi
    finally:
        cluster.control_plane.kubectl(
            "delete", "virtualinstance", name, "-n", namespace, "--timeout=120s", check=False
        )
        leftovers = [n for n in cluster.nodes if domain in cluster.domains(n, all_=True)]
        for n in leftovers:  # never leave a guest behind, even when the product failed to
            cluster.nodes[n].virsh("destroy", domain, timeout=30)
            cluster.nodes[n].virsh("undefine", domain, "--nvram", timeout=30)
        assert not leftovers, f"domain {domain} left on {leftovers} after delete"


def _domain_nodes(cluster: KvmCluster, domain: str) -> list[str]:
    return [n for n in cluster.nodes if domain in cluster.domains(n, all_=True)]


def _qemu_pids(domain: str) -> list[int]:
    """PIDs of QEMU processes whose command line has ``-name guest=<domain>``."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    pattern = re.compile(r"-name\s+guest=" + re.escape(domain) + r"(,|\s|$)")
    pids = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "qemu-system-x86_64" in args and pattern.search(args):
            pids.append(int(pid))
    return pids


def _events(cluster: KvmCluster, namespace: str, name: str) -> list[Any]:
    core = kubernetes.client.CoreV1Api(cluster.api)
    items: list[Any] = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return items


def _status(cluster: KvmCluster, namespace: str, name: str) -> dict[str, Any]:
    vi = cluster.get("virtualinstances", namespace, name)
    return dict((vi or {}).get("status") or {})


def _parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def test_killed_qemu_is_restarted_by_the_agent(
    kvm_cluster: KvmCluster,  # noqa: F811
    namespace: str,
) -> None:
    cluster, name = kvm_cluster, "victim"
    domain = f"{namespace}.{name}"
    with running_guest(cluster, namespace, name) as vi:
        node = vi["status"]["nodeName"]
        log = cluster.serial_log(node, domain)
        boots = serial.count_marker(log, cluster.image.boot_marker)
        restarts = vi["status"].get("restartCount") or 0
        pids = _qemu_pids(domain)
        assert len(pids) == 1, f"QEMU processes for {domain}: {pids}"

        os.kill(pids[0], signal.SIGKILL)

        serial.wait_for_marker(
            log, cluster.image.boot_marker, count=boots + 1, timeout=BOOT_TIMEOUT
        )

        def restarted_vi() -> dict[str, Any]:
            st = _status(cluster, namespace, name)
            ok = st.get("phase") == "Running" and (st.get("restartCount") or 0) > restarts
            return st if ok else {}

        st = wait_for(restarted_vi, BOOT_TIMEOUT, "VI Running with a higher restartCount")
        assert st["nodeName"] == node
        new_pids = wait_for(lambda: _qemu_pids(domain), 30, "the new QEMU process")
        assert len(new_pids) == 1 and new_pids[0] != pids[0], (pids, new_pids)

        def restarted_events() -> list[Any]:
            return [
                e
                for e in _events(cluster, namespace, name)
                if e.reason == "Restarted" and e.type == "Warning"
            ]

        events = wait_for(restarted_events, 60, "a Warning Event Restarted")
        assert events
        assert _domain_nodes(cluster, domain) == [node]


def test_libvirtd_restart_is_survived(
    kvm_cluster: KvmCluster,  # noqa: F811
    namespace: str,
) -> None:
    cluster, name = kvm_cluster, "survivor"
    domain = f"{namespace}.{name}"
    with running_guest(cluster, namespace, name) as vi:
        node = vi["status"]["nodeName"]
        log = cluster.serial_log(node, domain)
        boots = serial.count_marker(log, cluster.image.boot_marker)
        alive = serial.wait_for_marker(log, serial.ALIVE_MARKER, timeout=BOOT_TIMEOUT)

        cluster.nodes[node].restart(hard=True)
        restarted_at = datetime.datetime.now(datetime.UTC)

        # The agent reconnects: heartbeats newer than the restart, with Ready True.
        def fresh_and_ready() -> bool:
            st = cluster.nhv(node).get("status") or {}
            beat = _parse_time(st.get("lastHeartbeat"))
            return bool(beat and beat > restarted_at and cluster.node_ready(node))

        wait_for(fresh_and_ready, 120, f"NodeHypervisor {node} heartbeat after the restart")
        # The guest was never stopped: it keeps printing alive markers, no new boot.
        serial.wait_for_more(log, serial.ALIVE_MARKER, after=alive + 1)
        assert serial.count_marker(log, cluster.image.boot_marker) == boots
        wait_for(
            lambda: (
                (v := cluster.get("virtualinstances", namespace, name)) is not None
                and v["status"].get("phase") == "Running"
                and condition(v, "Ready").get("status") == "True"
            ),
            120,
            "VI Running and Ready after the libvirtd restart",
        )
        # A change made after the restart still reaches the guest through the new connection.
        patch = {"spec": {"memory": {"min": "64Mi", "max": "96Mi"}}}
        cluster.kubectl(
            "patch", "virtualinstance", name, "-n", namespace, "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip
        wait_for(
            lambda: _status(cluster, namespace, name).get("actualMemory") == "96Mi",
            120,
            "status.actualMemory 96Mi",
        )
        assert cluster.balloon_actual_kib(node, domain) == 96 * 1024
        assert _domain_nodes(cluster, domain) == [node]
        assert serial.count_marker(log, cluster.image.boot_marker) == boots
