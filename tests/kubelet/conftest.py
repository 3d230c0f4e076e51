"""Fixtures: the real node (kubelet + containerd) with the shipped manifests deployed on it.

Why: issue 13's proof is the manifests running as a user runs them: ``kubectl apply
--server-side -k manifests/overlays/local`` on a real kubelet node (kubehv.devenv.kubenode),
the agent pod driving the host's libvirtd through /run/libvirt, the controller pods serving
the webhook and leading by lease. One node per session (it is host-wide: the kubelet,
kube-proxy's iptables, the CNI bridge); it needs root, containerd, runc, the CNI plugins,
debootstrap and the node binaries (built once by ``hack/controlplane/build.sh --node``).
Missing pieces skip, and fail under KUBEHV_REQUIRE_REAL=1; with them present, a node that
does not come up is an error.

The test guest's kernel and initrd are copied under /var/lib/libvirt/images (the directory
the DaemonSet mounts for the driver's node checks) and, for the migration target, into the
same path inside the netns node (whose /var/lib/libvirt is private to it). That second node
runs its own kubelet (kubehv.devenv.kubenetnsnode), so both ends of the migration are pods
of the shipped DaemonSet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pluggy
import pytest

from kubehv.devenv import binaries, kubenetnsnode, kubenode
from kubehv.devenv.controlplane import log_tail
from kubehv.devenv.guest import GuestImage
from kubehv.devenv.libvirtd import LocalLibvirtd
from kubehv.devenv.netns import LibvirtNode, NodeSet
from tests.fixtures import reporting
from tests.fixtures.operator import GROUP, NHV, VERSION, get_object, wait_for
from tests.fixtures.real import missing_real_part

REPO = binaries.REPO_ROOT
OVERLAY = REPO / "manifests" / "overlays" / "local"
SYSTEM_NS = "kubehv-system"
GUEST_DIR = "/var/lib/libvirt/images/kubehv-kubelet-tests"
TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "debootstrap", "iptables-save")


class Deployed:
    """The node with manifests/overlays/local applied and every kubehv pod Ready."""

    def __init__(self, node: kubenode.KubeNode, guest: GuestImage) -> None:
        self.node = node
        self.api: Any = node.cp.api_client()
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        self.kernel = f"{GUEST_DIR}/vmlinuz"
        self.initrd = f"{GUEST_DIR}/initrd.img"
        self.cmdline = guest.cmdline
        self.extra_logs: list[Path] = []

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        proc = self.node.kubectl(*args, input=stdin, check=check, timeout=300)
        return str(proc.stdout) + ("" if check else str(proc.stderr))

    def pods(self, name: str) -> list[Any]:
        selector = f"app.kubernetes.io/name={name}"
        return list(self.core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items)

    def agent_pod(self, node: str) -> Any:
        """The DaemonSet's agent pod on ``node``."""
        pods = [p for p in self.pods("kubehv-agent") if p.spec.node_name == node]
        assert len(pods) == 1, f"agent pods on {node}: {[p.metadata.name for p in pods]}"
        return pods[0]

    def settled_controllers(self) -> list[Any]:
        """The two controller pods once both run and are Ready (none terminating), else []."""
        pods = [p for p in self.pods("kubehv-controller") if not p.metadata.deletion_timestamp]
        ready = [p for p in pods if all(c.ready for c in p.status.container_statuses or [])]
        return pods if len(pods) == 2 and len(ready) == 2 else []

    def webhook_answers(self) -> bool:
        """A server-side dry-run create of a VirtualInstance got past the webhook call."""
        probe = self.guest_manifest("default", f"probe-{uuid.uuid4().hex[:5]}")
        out = self.kubectl("apply", "--dry-run=server", "-f", "-", stdin=probe, check=False)
        answered = "created" in out or "denied the request" in out
        return answered and "failed calling webhook" not in out

    def vi(self, namespace: str, name: str) -> dict[str, Any] | None:
        return get_object(self.custom, namespace, "virtualinstances", name)

    def nhv(self, name: str) -> dict[str, Any] | None:
        with contextlib.suppress(kubernetes.client.ApiException):
            body: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, NHV, name)
            return body
        return None

    def guest_manifest(self, namespace: str, name: str, **spec: Any) -> str:
        return json.dumps(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "VirtualInstance",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "hypervisor": "kvm",
                    "runState": "Running",
                    "memory": {"min": "64Mi", "max": "128Mi"},
                    "vcpus": 1,
                    "boot": {"kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline},
                    # Nested KVM hangs on these machines (runtime-facts.md): emulate.
                    "hypervisorParameters": {"accelerator": "tcg"},
                    **spec,
                },
            }
        )

    def logs(self) -> str:
        out = [self.node.logs(20)]
        for what in (("get", "vi,mig", "-A", "-o", "wide"), ("get", "events", "-A")):
            proc = self.node.kubectl(*what, check=False)
            out.append(f"===== kubectl {' '.join(what)} =====\n{proc.stdout[-6000:]}")
        for extra in self.extra_logs:
            out.append(f"===== {extra} =====\n{log_tail(extra, 60)}")
        for app in ("kubehv-agent", "kubehv-controller"):
            for pod in self.pods(app):
                if app == "kubehv-agent":  # its threads' stacks first (faulthandler, SIGUSR1)
                    self.node.kubectl(
                        "exec", "-n", SYSTEM_NS, pod.metadata.name, "--",
                        "sh", "-c", "kill -USR1 1", check=False,
                    )  # fmt: skip
                tail = "--tail=200" if app == "kubehv-agent" else "--tail=40"
                proc = self.node.kubectl(
                    "logs", "-n", SYSTEM_NS, pod.metadata.name, tail, check=False
                )
                out.append(f"===== pod {pod.metadata.name} =====\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)


def _need_node_parts() -> None:
    if os.geteuid() != 0:
        missing_real_part("real node", "needs root (kubelet, containerd, iptables)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or not Path("/usr/lib/cni/bridge").exists():
        missing_real_part("real node", f"not installed: {missing or 'CNI plugins'} (make apt)")
    try:
        binaries.find()
        binaries.find_node()
    except binaries.BinariesUnavailable as exc:
        missing_real_part("real node", str(exc))


def _copy_guest(guest: GuestImage, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(guest.kernel, target / "vmlinuz")
    shutil.copy2(guest.initrd, target / "initrd.img")


@pytest.fixture(scope="session")
def real_node(libvirtd: LocalLibvirtd, guest_image: GuestImage) -> Iterator[kubenode.KubeNode]:
    _need_node_parts()
    _copy_guest(guest_image, Path(GUEST_DIR))
    node = kubenode.KubeNode().start()
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(GUEST_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def deployed(real_node: kubenode.KubeNode, guest_image: GuestImage) -> Iterator[Deployed]:
    """``kubectl apply --server-side -k manifests/overlays/local``, then every pod Ready."""
    d = Deployed(real_node, guest_image)
    d.kubectl("apply", "--server-side", "-k", str(OVERLAY))
    try:
        real_node.wait_pods_ready(SYSTEM_NS)
        wait_for(lambda: _ready(d.nhv(real_node.node_name)), 180, "the agent pod's node Ready")
        # Pods Ready is not yet "the API server reaches the webhook through its Service"
        # (kube-proxy programs the Service a moment later: "connection refused" seen once).
        wait_for(d.webhook_answers, 120, "the webhook to answer through its Service", 1.0)
        yield d
    except BaseException:
        print(d.logs())
        raise
    finally:
        with contextlib.suppress(Exception):  # the agent pod stops the guests while it runs
            d.kubectl("delete", "vi", "--all", "-A", "--wait=true", "--timeout=120s")
        d.api.close()


def _ready(obj: dict[str, Any] | None) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


@pytest.fixture(scope="session")
def netns_node(
    deployed: Deployed, real_node: kubenode.KubeNode, guest_image: GuestImage
) -> Iterator[LibvirtNode]:
    """A second kubelet node: a netns libvirtd with its own kubelet and containerd
    (kubehv.devenv.kubenetnsnode); the shipped DaemonSet runs its agent pod there."""
    nodes = NodeSet(count=1)
    try:
        nodes.start()
    except OSError as exc:
        missing_real_part("netns libvirt node", str(exc))
    node = nodes[0]
    _copy_guest(guest_image, Path(node.host_path(GUEST_DIR)))
    second = kubenetnsnode.NetnsKubelet(real_node, node, nodes.bridge_address)
    try:
        second.start()
        deployed.extra_logs += [p.log for p in second.procs]
        wait_for(lambda: _ready(deployed.nhv(node.name)), 240, f"NodeHypervisor {node.name}")
        yield node
    finally:
        second.stop()  # its agent pod first: it would register the node again
        with contextlib.suppress(Exception):
            deployed.custom.delete_cluster_custom_object(GROUP, VERSION, NHV, node.name)
        nodes.stop()


@pytest.fixture
def vi_namespace(deployed: Deployed) -> Iterator[str]:
    name = f"kubelet-{uuid.uuid4().hex[:6]}"
    deployed.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            deployed.kubectl("delete", "vi,mig", "--all", "-n", name, "--timeout=120s")
        deployed.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: Any
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    reporting.attach_logs(outcome.get_result(), item, "deployed", "real node and pod logs")
