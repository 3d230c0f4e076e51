"""The people-facing commands against the real API server: status, migrate, drain, console.

Why: these commands are how a person sees and steers kubehv; each runs here as a real
process (``kubehv ...`` and ``kubectl kubehv ...`` as a kubectl plugin) against the session's
kube-apiserver. Where a command waits for the operator, the test itself writes the status the
controller and agents would write (through the same API), so the command's own behaviour —
progress drawing, exit codes, drain completion — is what is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from kubehv.devenv import controlplane, kubeaccess
from tests.ship.conftest import GROUP, VERSION, custom, example_instance

pytestmark = pytest.mark.apiserver
VENV_BIN = Path(sys.executable).parent


def kubehv(
    cp: controlplane.ControlPlane,
    *args: str,
    plugin: bool = False,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**cp.env(), **(env or {})}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    argv = [kubeaccess.KUBECTL, "kubehv", *args] if plugin else [str(VENV_BIN / "kubehv"), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture
def admin(kubehv_installed: controlplane.ControlPlane) -> Iterator[Any]:
    api = kubehv_installed.api_client()
    try:
        yield custom(api)
    finally:
        api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def nodes(admin: Any) -> Iterator[list[str]]:
    """Two NodeHypervisors with a Ready status, as agents would write them."""
    suffix = uuid.uuid4().hex[:6]
    names = [f"cli-{suffix}-a", f"cli-{suffix}-b"]
    for name in names:
        admin.create_cluster_custom_object(
            GROUP,
            VERSION,
            "nodehypervisors",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "NodeHypervisor",
                "metadata": {"name": name},
                "spec": {
                    "nodeName": name,
                    "hypervisor": "fake",
                    "connectionURI": f"fake:///tmp/{name}",
                },
            },
        )
        admin.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            "nodehypervisors",
            name,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "Heartbeat",
                            "message": "",
                            "lastTransitionTime": "2025-01-01T00:00:00Z",
                        }
                    ]
                }
            },
        )
    try:
        yield names
    finally:
        for name in names:
            admin.delete_cluster_custom_object(GROUP, VERSION, "nodehypervisors", name)


def place(admin: Any, ns: str, name: str, node: str | None) -> None:
    """Create an instance and put it on ``node`` (the controller's status write)."""
    admin.create_namespaced_custom_object(
        GROUP, VERSION, ns, "virtualinstances", example_instance(name, ns)
    )
    if node:
        admin.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            ns,
            "virtualinstances",
            name,
            {"status": {"nodeName": node, "phase": "Running"}},
        )


def test_status_shows_nodes_and_instances(
    kubehv_installed: controlplane.ControlPlane, admin: Any, nodes: list[str], user_namespace: str
) -> None:
    place(admin, user_namespace, "web", nodes[0])
    place(admin, user_namespace, "db", nodes[0])
    for plugin in (False, True):
        proc = kubehv(kubehv_installed, "status", "-n", user_namespace, plugin=plugin)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:3] == ["NODE", "HYPERVISOR", "READY"]
        row_a = next(line.split() for line in lines if line.startswith(nodes[0]))
        assert row_a[1:5] == ["fake", "True", "no", "2"]
        row_b = next(line.split() for line in lines if line.startswith(nodes[1]))
        assert row_b[4] == "0"
        web = next(line.split() for line in lines if " web " in f" {line} ")
        assert web[:4] == [user_namespace, "web", "Running", nodes[0]]


def test_migrate_creates_a_migration(
    kubehv_installed: controlplane.ControlPlane, admin: Any, nodes: list[str], user_namespace: str
) -> None:
    place(admin, user_namespace, "vm", nodes[0])
    proc = kubehv(
        kubehv_installed,
        "migrate",
        "vm",
        "-n",
        user_namespace,
        "--to",
        nodes[1],
        "--mode",
        "non-live",
    )
    assert proc.returncode == 0, proc.stderr
    created = proc.stdout.split()[0].split("/")[1]
    mig = admin.get_namespaced_custom_object(GROUP, VERSION, user_namespace, "migrations", created)
    # What the CLI sent, plus the server's schema defaults (nothing else).
    assert mig["spec"] == {
        "instance": "vm",
        "targetNode": nodes[1],
        "mode": "non-live",
        "allowUnsafeVersionPair": False,
        "completionTimeout": 600,
    }

    missing = kubehv(kubehv_installed, "migrate", "nope", "-n", user_namespace)
    assert missing.returncode == 1
    assert "no VirtualInstance nope" in missing.stderr


def _play_migration(admin: Any, ns: str, final: str, reason: str = "") -> threading.Thread:
    """Write the statuses the controller and agents would write, once the CLI created it."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = admin.list_namespaced_custom_object(GROUP, VERSION, ns, "migrations")["items"]
            if items:
                break
            time.sleep(0.1)
        else:
            return
        name = items[0]["metadata"]["name"]
        steps: list[dict[str, Any]] = [
            {"phase": "Scheduled", "targetNode": "node-b"},
            {"phase": "Running", "progress": {"percent": 40}},
            {"phase": "Running", "progress": {"percent": 90}},
            {"phase": final, **({"failureReason": reason} if reason else {})},
        ]
        if final == "Succeeded":  # then the controller moves the instance: --wait waits for it
            moved = {"type": "InstanceMoved", "status": "True", "reason": "Moved",
                     "message": "moved", "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
            steps.append({"phase": final, "conditions": [moved]})
        for step in steps:
            time.sleep(0.2)
            admin.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, "migrations", name, {"status": step}
            )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("final", "code"), [("Succeeded", 0), ("Failed", 1)])
def test_migrate_wait_draws_progress_until_terminal(
    kubehv_installed: controlplane.ControlPlane,
    admin: Any,
    nodes: list[str],
    user_namespace: str,
    final: str,
    code: int,
) -> None:
    place(admin, user_namespace, "vm", nodes[0])
    player = _play_migration(admin, user_namespace, final, "target refused: no room")
    proc = kubehv(kubehv_installed, "migrate", "vm", "-n", user_namespace, "--wait")
    player.join()
    assert proc.returncode == code, proc.stdout + proc.stderr
    bars = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert any(" 40%  Running" in line for line in bars), proc.stdout
    assert bars[-1].split()[1:3] == (["100%", "Succeeded"] if code == 0 else ["90%", "Failed"])
    if code:
        assert "reason: target refused: no room" in proc.stdout


def test_drain_sets_and_undoes_the_flag(
    kubehv_installed: controlplane.ControlPlane, admin: Any, nodes: list[str]
) -> None:
    """The flag only (a merge patch that keeps the rest of the spec); ``drain --wait`` with the
    real controller and agents moving instances is tests/operator/test_drain.py's."""
    proc = kubehv(kubehv_installed, "drain", nodes[0], plugin=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"nodehypervisor/{nodes[0]} draining" in proc.stdout
    nhv = admin.get_cluster_custom_object(GROUP, VERSION, "nodehypervisors", nodes[0])
    assert nhv["spec"]["drain"] is True
    assert nhv["spec"]["connectionURI"].startswith("fake://"), "merge patch kept the rest"

    undo = kubehv(kubehv_installed, "drain", "--undo", nodes[0])
    assert undo.returncode == 0, undo.stderr
    nhv = admin.get_cluster_custom_object(GROUP, VERSION, "nodehypervisors", nodes[0])
    assert nhv["spec"]["drain"] is False

    missing = kubehv(kubehv_installed, "drain", "no-such-node")
    assert missing.returncode == 1
    assert "no NodeHypervisor named no-such-node" in missing.stderr


def test_console_follows_the_instance_to_its_node(
    kubehv_installed: controlplane.ControlPlane, admin: Any, nodes: list[str], user_namespace: str
) -> None:
    place(admin, user_namespace, "fakevm", nodes[0])
    proc = kubehv(kubehv_installed, "console", "fakevm", "-n", user_namespace)
    assert proc.returncode == 0, proc.stderr
    assert f"fakevm is a fake instance on node {nodes[0]}: it has no console" in proc.stdout

    # A kvm node: the command is virsh against that node's connection URI.
    admin.patch_cluster_custom_object(
        GROUP,
        VERSION,
        "nodehypervisors",
        nodes[1],
        {"spec": {"hypervisor": "kvm", "connectionURI": "qemu+tcp://10.0.0.2/system"}},
    )
    place(admin, user_namespace, "kvmvm", nodes[1])
    proc = kubehv(kubehv_installed, "console", "kvmvm", "-n", user_namespace, "--print")
    assert proc.returncode == 0, proc.stderr
    # The domain is <namespace>.<name>; the URI names a host, so virsh runs from here.
    want = f"virsh -c qemu+tcp://10.0.0.2/system console {user_namespace}.kvmvm"
    assert proc.stdout.strip() == want

    place(admin, user_namespace, "unplaced", None)
    proc = kubehv(kubehv_installed, "console", "unplaced", "-n", user_namespace)
    assert proc.returncode == 1
    assert "not placed on a node yet" in proc.stderr


def agent_pod(kubehv_installed: controlplane.ControlPlane, node: str) -> Iterator[str]:
    """A kubehv agent Pod bound to ``node``, Running (no kubelet here: the test writes the
    kubelet's status, as the other tests here write the operator's)."""
    core = k8s_client.CoreV1Api(kubehv_installed.api_client())
    name = f"kubehv-agent-{uuid.uuid4().hex[:5]}"
    core.create_namespaced_pod(
        "kubehv-system",
        k8s_client.V1Pod(
            metadata=k8s_client.V1ObjectMeta(
                name=name, labels={"app.kubernetes.io/name": "kubehv-agent"}
            ),
            spec=k8s_client.V1PodSpec(
                node_name=node,
                containers=[k8s_client.V1Container(name="agent", image="kubehv:dev")],
            ),
        ),
    )
    core.patch_namespaced_pod_status(name, "kubehv-system", {"status": {"phase": "Running"}})
    try:
        yield name
    finally:
        core.delete_namespaced_pod(name, "kubehv-system", grace_period_seconds=0)


def test_console_from_a_workstation_goes_through_the_agent_pod(
    kubehv_installed: controlplane.ControlPlane, admin: Any, nodes: list[str], user_namespace: str
) -> None:
    """The agent advertises qemu+tls://<node address>/system. From a workstation virsh runs in
    the agent pod on that node, on the node-local URI (no TLS client certificate, no route to
    the node needed); on the node itself, locally; with no agent pod, on the advertised URI."""
    node = nodes[1]

    def uri(value: str) -> None:
        admin.patch_cluster_custom_object(
            GROUP, VERSION, "nodehypervisors", node,
            {"spec": {"hypervisor": "kvm", "connectionURI": value}},
        )  # fmt: skip

    def printed(**env: str) -> subprocess.CompletedProcess[str]:
        return kubehv(kubehv_installed, "console", "vm", "-n", user_namespace, "--print", env=env)

    place(admin, user_namespace, "vm", node)
    domain = f"{user_namespace}.vm"
    uri("qemu:///system")  # a node-local URI and no agent pod: nothing can reach it
    proc = printed()
    assert proc.returncode == 1
    assert f"no running kubehv agent pod on node {node}" in proc.stderr

    uri("qemu+tls://192.0.2.7/system")
    proc = printed()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["virsh", "-c", "qemu+tls://192.0.2.7/system", "console", domain]

    for pod in agent_pod(kubehv_installed, node):
        proc = printed()
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [
            "kubectl", "exec", "-it", "-n", "kubehv-system", pod, "-c", "agent", "--",
            "virsh", "-c", "qemu:///system", "console", domain,
        ]  # fmt: skip
        # On the node itself (NODE_NAME, as in the agent pod): the local URI, here.
        on_node = printed(NODE_NAME=node)
        assert on_node.stdout.split() == ["virsh", "-c", "qemu:///system", "console", domain]
        # Forced direct from a workstation: the advertised URI.
        forced = kubehv(
            kubehv_installed, "console", "vm", "-n", user_namespace, "--print", "--via", "direct"
        )
        assert forced.stdout.split()[2] == "qemu+tls://192.0.2.7/system"
