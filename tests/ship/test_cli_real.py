"""The CLI against objects written by real agents: status, the power verbs, console, vnc.

Why: tests/ship/test_cli.py plays the operator's status writes itself; a field renamed in
the agent (``memoryFree``, ``lastHeartbeat``) would then go unnoticed — which is how
``kubehv status`` printed ``-`` for months. Here a real ``kubehv agent`` (fake driver) and
the real controller write every status; the commands run as processes and their output is
compared with what the API holds. The verbs are checked end to end: the spec patch, then the
agent acting on it (the fake driver's records on the node).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from typing import Any

import pytest

from kubehv.cli import agent as agent_cli
from kubehv.devenv import controlplane
from tests.fixtures.operator import GROUP, VERSION, OperatorCluster, running_cluster
from tests.ship.test_cli import kubehv

pytestmark = pytest.mark.apiserver
NODE = "cli-real-a"
HOST_IP = "192.0.2.10"  # TEST-NET-1: never routed; only written into the NodeHypervisor


@pytest.fixture(scope="module")
def cluster(control_plane: Any, crds_installed: Any) -> Iterator[OperatorCluster]:
    with running_cluster(
        control_plane,
        [NODE],
        heartbeat_s=1.0,
        agent_args=["--host-ip", HOST_IP, "--migration-address", ""],
    ) as c:
        yield c


def row(output: str, first: str) -> list[str]:
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


def test_status_shows_the_agents_free_memory_and_heartbeat(
    cluster: OperatorCluster, control_plane: controlplane.ControlPlane, namespace: str
) -> None:
    cluster.create_vi(namespace, "web")
    cluster.wait_phase(namespace, "web", "Running")
    nhv = cluster.nhv(NODE)
    assert nhv is not None
    free = nhv["status"]["memoryFree"]
    assert isinstance(free, int) and free > 0, nhv["status"]

    seen = datetime.datetime.fromisoformat(nhv["status"]["lastHeartbeat"])
    proc = kubehv(control_plane, "status", "-n", namespace)
    ended = datetime.datetime.now(datetime.UTC)
    assert proc.returncode == 0, proc.stderr
    node = row(proc.stdout, NODE)
    everywhere = cluster.custom.list_cluster_custom_object(GROUP, VERSION, "virtualinstances")
    here = [i for i in everywhere["items"] if (i.get("status") or {}).get("nodeName") == NODE]
    assert node[1:5] == ["fake", "True", "no", str(len(here))], proc.stdout
    # MEM FREE is the agent's status.memoryFree (it may have moved by a heartbeat since).
    mem = re.fullmatch(r"(\d+)Mi", node[5])
    assert mem is not None, f"MEM FREE {node[5]!r}"
    after = cluster.nhv(NODE)
    assert after is not None
    assert int(mem.group(1)) in {free, after["status"]["memoryFree"]}
    # HEARTBEAT is the age of status.lastHeartbeat: at most the age, when the command ended,
    # of the heartbeat read before it ran (a later beat only makes it younger).
    beat = re.fullmatch(r"(\d+)s", node[6])
    assert beat is not None, f"HEARTBEAT {node[6]!r}"
    assert int(beat.group(1)) <= (ended - seen).total_seconds() + 1, (node[6], seen, ended)
    web = row(proc.stdout, namespace)
    assert web[1:4] == ["web", "Running", NODE], proc.stdout


def test_agent_advertises_the_node_address(cluster: OperatorCluster) -> None:
    """--host-ip (HOST_IP from the downward API) becomes the node's migrationAddress."""
    nhv = cluster.nhv(NODE)
    assert nhv is not None
    assert nhv["spec"]["migrationAddress"] == HOST_IP


@pytest.mark.parametrize(
    ("local", "host", "transport", "advertised"),
    [
        ("qemu:///system", "10.0.0.5", "tls", "qemu+tls://10.0.0.5/system"),
        ("qemu:///system", "fd00::5", "tcp", "qemu+tcp://[fd00::5]/system"),
        ("qemu+tcp://10.200.0.2/system", "10.0.0.5", "tls", "qemu+tcp://10.200.0.2/system"),
        ("qemu:///system", None, "tls", "qemu:///system"),
        ("fake:///tmp/x", "10.0.0.5", "tls", "fake:///tmp/x"),
        (None, "10.0.0.5", "tls", None),
    ],
)
def test_advertised_uri(
    local: str | None, host: str | None, transport: str, advertised: str | None
) -> None:
    assert agent_cli.advertised_uri(local, host, transport) == advertised


def fake_record(cluster: OperatorCluster, namespace: str, name: str) -> str:
    return cluster.fake_instances(NODE, namespace).get(name, "")


def test_power_verbs_drive_the_agent(
    cluster: OperatorCluster, control_plane: controlplane.ControlPlane, namespace: str
) -> None:
    cluster.create_vi(namespace, "vm")
    cluster.wait_phase(namespace, "vm", "Running")

    def verb(*args: str, code: int = 0) -> str:
        proc = kubehv(control_plane, *args, "vm", "-n", namespace, "--wait", "--timeout", "90")
        assert proc.returncode == code, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    assert "virtualinstance.kubehv.io/vm stopped" in verb("stop")
    vi = cluster.get_vi(namespace, "vm")
    assert vi is not None
    assert (vi["spec"]["runState"], vi["status"]["phase"]) == ("Stopped", "Stopped")
    assert fake_record(cluster, namespace, "vm") == "", "a stopped fake instance has no record"
    assert "already stopped" in verb("stop")
    assert "it is stopped, not paused: use kubehv start" in verb("unpause", code=1)

    assert "vm is Running" in verb("start")
    assert fake_record(cluster, namespace, "vm") == "running"
    assert "vm is Paused" in verb("pause")
    assert fake_record(cluster, namespace, "vm") == "paused"
    assert "it is paused: use kubehv unpause" in verb("start", code=1)
    assert "vm is Running" in verb("unpause")
    assert fake_record(cluster, namespace, "vm") == "running"

    before = cluster.get_vi(namespace, "vm")
    assert before is not None
    assert "virtualinstance.kubehv.io/vm restarted" in verb("restart")
    after = cluster.get_vi(namespace, "vm")
    assert after is not None
    generation = before["spec"].get("rebootGeneration", 0) + 1
    assert after["spec"]["rebootGeneration"] == generation
    assert after["status"]["rebootGeneration"] == generation
    assert after["status"]["phase"] == "Running"

    missing = kubehv(control_plane, "stop", "nope", "-n", namespace)
    assert missing.returncode == 1
    assert "no VirtualInstance nope" in missing.stderr


def test_console_and_vnc_on_a_fake_node(
    cluster: OperatorCluster, control_plane: controlplane.ControlPlane, namespace: str
) -> None:
    cluster.create_vi(namespace, "quiet")
    cluster.wait_phase(namespace, "quiet", "Running")
    proc = kubehv(control_plane, "console", "quiet", "-n", namespace)
    assert proc.returncode == 0, proc.stderr
    assert f"quiet is a fake instance on node {NODE}: it has no console" in proc.stdout
    vnc = kubehv(control_plane, "vnc", "quiet", "-n", namespace)
    assert vnc.returncode == 1
    assert "quiet has no VNC console (spec.console.vnc.enabled is false)" in vnc.stderr
