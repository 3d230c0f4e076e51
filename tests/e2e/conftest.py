"""E2E fixtures: the kvm driver on two netns libvirt nodes, one agent per node + the controller.

Why: issue 4's end-to-end proof needs every real part at once: the real apiserver
(``control_plane``, ``crds_installed``), two libvirt hosts that can live-migrate between each
other (``libvirt_nodes``), the real test guest (``guest_image``) and ``kubehv agent`` /
``kubehv controller`` as processes, started exactly as an operator installs them (flags, no
test hooks). The agents run in the root namespace and reach their node's libvirtd over
``qemu+tcp://<node address>/system``, like a DaemonSet pod talking to the host's libvirtd.
The guest's serial console is written by the node's virtlogd at the driver's default
``/var/log/libvirt/qemu/<name>.serial.log`` *inside the node*: tests read it through
``LibvirtNode.host_path``. The guest's kernel and initrd stay in the build cache, which is
visible inside the nodes (only libvirt's folders are private there) and is passed to the
driver as its ``allowed_dirs``.

When a piece is missing the tests skip, and fail under KUBEHV_REQUIRE_REAL=1
(tests.fixtures.real). Teardown stops every process, deletes the NodeHypervisors and the
namespace; the session fixtures destroy whatever domain is left on the nodes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import tempfile
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pluggy
import pytest

from kubehv.devenv import serial
from kubehv.devenv.guest import GuestImage
from kubehv.devenv.netns import LibvirtNode, NodeSet
from tests.fixtures import reporting
from tests.fixtures.kube import fresh_namespace
from tests.fixtures.operator import (
    GROUP,
    NHV,
    VERSION,
    Proc,
    get_object,
    started,
    wait_for,
)

SERIAL_LOG_DIR = serial.DEFAULT_SERIAL_LOG_DIR
NODE_STORAGE = "/var/lib/libvirt/kubehv"


class KvmCluster:
    """The controller and one kvm agent per libvirt node, against one control plane."""

    def __init__(
        self, control_plane: Any, nodes: NodeSet, image: GuestImage, workdir: Path
    ) -> None:
        self.control_plane = control_plane
        self.node_set = nodes
        self.nodes: dict[str, LibvirtNode] = {n.name: n for n in nodes}
        self.image = image
        self.workdir = workdir
        self.kubeconfig = str(control_plane.kubeconfig)
        env = control_plane.env()
        env["PYTHONUNBUFFERED"] = "1"
        self.api: Any = control_plane.api_client()
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        py = [sys.executable, "-m", "kubehv.cli"]
        guest_dir = str(Path(image.kernel).parent)
        self.agents: dict[str, Proc] = {}
        for node in nodes:
            state = workdir / node.name
            state.mkdir(parents=True, exist_ok=True)
            argv = [
                *py, "agent", "--node-name", node.name, "--hypervisor", "kvm",
                "--connection-uri", node.uri, "--migration-address", node.address,
                "--state-dir", str(state), "--kubeconfig", self.kubeconfig,
                "--heartbeat-interval", "2", "--resync-interval", "1",
                "--driver-param", f"serial_log_dir={SERIAL_LOG_DIR}",
                "--driver-param", f"allowed_dirs={guest_dir}",
                # Node-local instance storage: the same path inside every node (its private
                # /var/lib/libvirt), reached by the agent through the node's host folder.
                "--driver-param", f"storage_dir={NODE_STORAGE}",
                "--driver-param", f"storage_dir_agent={node.host_path(NODE_STORAGE)}",
                "--restart-backoff", "1", "--stop-timeout", "5",
            ]  # fmt: skip
            self.agents[node.name] = Proc(
                f"agent-{node.name}", argv, workdir / f"agent-{node.name}.log", env
            )
        ctl = [
            *py, "controller", "--kubeconfig", self.kubeconfig,
            "--heartbeat-grace", "20", "--check-interval", "1",
            "--lease-name", f"kubehv-e2e-{uuid.uuid4().hex[:6]}",
        ]  # fmt: skip
        self.controller = Proc("controller", ctl, workdir / "controller.log", env)

    def guest_manifest(self, namespace: str, name: str) -> str:
        """A kvm VirtualInstance booting the test guest (JSON for ``kubectl apply -f -``)."""
        body = guest_body(self.image, name)
        body["metadata"]["namespace"] = namespace
        return json.dumps(body)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> KvmCluster:
        self.controller.start()
        for agent in self.agents.values():
            agent.start()
        for name in self.nodes:
            wait_for(
                functools.partial(self.node_ready, name), timeout, f"NodeHypervisor {name} Ready"
            )
        return self

    def stop(self) -> None:
        for proc in [self.controller, *self.agents.values()]:
            proc.stop()
        for name in self.nodes:
            with contextlib.suppress(Exception):
                self.custom.delete_cluster_custom_object(GROUP, VERSION, NHV, name)
        self.api.close()

    def logs(self, lines: int = 80) -> str:
        return "\n".join(
            f"===== {p.name} ({p.log}) =====\n{p.tail(lines)}"
            for p in [self.controller, *self.agents.values()]
        )

    # --- reading ---------------------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 240.0) -> str:
        out: str = self.control_plane.kubectl(*args, input=stdin, timeout=timeout).stdout
        return out

    def nhv(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, NHV, name)
        return body

    def node_ready(self, name: str) -> bool:
        try:
            conds = (self.nhv(name).get("status") or {}).get("conditions") or []
        except kubernetes.client.ApiException:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return get_object(self.custom, namespace, plural, name)

    def domains(self, node: str, all_: bool = False) -> list[str]:
        """Domain names on ``node`` by ``virsh list`` (running only unless ``all_``)."""
        proc = self.nodes[node].virsh("list", "--name", *(["--all"] if all_ else []))
        assert proc.returncode == 0, f"virsh list on {node}: {proc.stderr}"
        return [line.strip() for line in proc.stdout.splitlines() if line.strip()]

    def serial_log(self, node: str, instance: str) -> str:
        return self.nodes[node].host_path(serial.serial_log_path(instance, SERIAL_LOG_DIR))

    def balloon_actual_kib(self, node: str, instance: str) -> int | None:
        """``actual`` from ``virsh dommemstat`` on the node (the balloon's current size)."""
        proc = self.nodes[node].virsh("dommemstat", instance)
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "actual":
                return int(value)
        return None


def guest_body(image: GuestImage, name: str, **spec: Any) -> dict[str, Any]:
    """A kvm VirtualInstance booting the test guest (128 MiB, 1 vCPU), ``spec`` on top."""
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": {
            "hypervisor": "kvm",
            "runState": "Running",
            "memory": {"min": "64Mi", "max": "128Mi"},
            "vcpus": 1,
            "boot": {
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "cmdline": image.cmdline,
            },
            # Nested KVM hangs on these machines (runtime-facts.md): emulate.
            "hypervisorParameters": {"accelerator": "tcg"},
            **spec,
        },
    }


@pytest.fixture(scope="module")
def kvm_cluster(request: pytest.FixtureRequest) -> Iterator[KvmCluster]:
    """Real apiserver + CRDs, two libvirt nodes, the guest, the controller and two kvm agents."""
    control_plane, nodes, image = kvm_parts(request)
    workdir = Path(tempfile.mkdtemp(prefix="kubehv-e2e-"))
    with started(KvmCluster(control_plane, nodes, image, workdir), workdir) as cluster:
        yield cluster


def kvm_parts(request: pytest.FixtureRequest) -> tuple[Any, NodeSet, GuestImage]:
    """The real parts a kvm cluster runs on: control plane (CRDs installed), nodes, guest."""
    control_plane = request.getfixturevalue("control_plane")
    request.getfixturevalue("crds_installed")
    image: GuestImage = request.getfixturevalue("guest_image")
    nodes: NodeSet = request.getfixturevalue("libvirt_nodes")
    return control_plane, nodes, image


@pytest.fixture(scope="module")
def e2e_namespace(kvm_cluster: KvmCluster) -> Iterator[str]:
    with fresh_namespace(kvm_cluster.control_plane, f"e2e-{uuid.uuid4().hex[:6]}") as name:
        yield name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: Any
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    reporting.attach_logs(outcome.get_result(), item, "kvm_cluster", "kubehv process logs")
