"""The real-kvm fault cluster: one controller, several *lanes* of two agents on two libvirt nodes.

Why: the exactly-once matrix (issue 11, Proof B) kills, freezes and restarts agents at every
migration phase on real QEMU guests. Run one after the other, its ~40 scenarios would take
half an hour on two cores; run side by side on one agent pair, one scenario's kill would hit
every other scenario. So each *lane* is its own pair of agents (node names ``<tag>-l<i>a`` /
``<tag>-l<i>b``) on the session's two netns libvirt nodes (``libvirt_nodes``): agent ``a`` of
every lane talks to libvirt node 0, agent ``b`` to node 1. Agents only ever touch the
instances assigned to their own node name and domains are named ``<namespace>.<name>``, so
lanes share the two libvirtds without meeting. The NodeHypervisors of a lane carry the label
``LANE_LABEL=<i>`` and every test instance selects its lane with ``nodeSelector``; one
scenario runs on a lane at a time. The controller is shared: scenarios that kill it or
restart the API server run alone (see kvm_matrix.py).

Processes are ``kubehv agent`` / ``kubehv controller`` started exactly as the e2e cluster
starts them (tests/e2e/conftest.py), with short heartbeats and grace so that "past the
grace" costs seconds. They are started from one long-lived launcher thread: a child is bound
to the thread that started it (parent-death signal, kubehv.devenv.controlplane), and
scenarios restart processes from short-lived worker threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import queue
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import libvirt

from kubehv.devenv import serial
from kubehv.devenv.guest import GuestImage
from kubehv.devenv.netns import LibvirtNode, NodeSet
from tests.fixtures.operator import GROUP, NHV, VERSION, Proc, wait_for

T = TypeVar("T")
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # lookups of absent domains
LANE_LABEL = "faults.kubehv.io/lane"
HEARTBEAT_S = 1.0
GRACE_S = 8.0
"""The controller's heartbeat grace for this cluster; a freeze "past the grace" is longer."""
FREEZE_S = GRACE_S + 6.0


class _Launcher:
    """Runs callables on one daemon thread that lives as long as the test process."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.Queue()
        )
        threading.Thread(target=self._run, name="kubehv-launcher", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread().name == "kubehv-launcher":
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut.result(timeout=120)


LAUNCHER = _Launcher()


class FaultProc(Proc):
    """A kubehv process that can also be frozen (SIGSTOP) and thawed (SIGCONT)."""

    frozen = False

    def start(self) -> None:
        LAUNCHER.call(super().start)

    def _signal(self, sig: signal.Signals) -> None:
        p = self.proc
        if p is not None and p.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        self.thaw()  # a stopped group still dies of SIGKILL, but keep the flag honest
        super().kill()


class Lane:
    """Two agents (node names ``a`` on libvirt node 0, ``b`` on node 1) used by one scenario."""

    def __init__(self, index: int, names: tuple[str, str], libvirt_nodes: list[LibvirtNode]):
        self.index = index
        self.names = names
        self.libvirt: dict[str, LibvirtNode] = dict(zip(names, libvirt_nodes, strict=True))
        self.agents: dict[str, FaultProc] = {}

    def other(self, node: str) -> str:
        return self.names[1] if node == self.names[0] else self.names[0]


class FaultKvmCluster:
    """The controller (one, or two replicas) and ``lanes`` pairs of kvm agents."""

    def __init__(
        self,
        control_plane: Any,
        nodes: NodeSet,
        image: GuestImage,
        workdir: Path,
        lanes: int,
    ) -> None:
        self.control_plane = control_plane
        self.image = image
        self.workdir = workdir
        self.kubeconfig = str(control_plane.kubeconfig)
        self.env = control_plane.env()
        self.env["PYTHONUNBUFFERED"] = "1"
        self.libvirt_nodes = list(nodes)
        tag = uuid.uuid4().hex[:4]
        self.tag = tag
        self.py = [sys.executable, "-m", "kubehv.cli"]
        self.guest_dir = str(Path(image.kernel).parent)
        self.lanes = [
            Lane(i, (f"fk{tag}-l{i}a", f"fk{tag}-l{i}b"), self.libvirt_nodes) for i in range(lanes)
        ]
        for lane in self.lanes:
            for name, node in lane.libvirt.items():
                lane.agents[name] = self._agent(name, node)
        self.lease = f"kubehv-faults-{tag}"
        self.controllers: list[FaultProc] = [self.new_controller("controller-0")]
        self._conns: dict[str, libvirt.virConnect] = {}
        self._conn_lock = threading.Lock()

    def _agent(self, name: str, node: LibvirtNode) -> FaultProc:
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            *self.py, "agent", "--node-name", name, "--hypervisor", "kvm",
            "--connection-uri", node.uri, "--migration-address", node.address,
            "--state-dir", str(state), "--kubeconfig", self.kubeconfig,
            "--heartbeat-interval", str(HEARTBEAT_S), "--resync-interval", "1",
            "--driver-param", f"serial_log_dir={serial.DEFAULT_SERIAL_LOG_DIR}",
            "--driver-param", f"allowed_dirs={self.guest_dir}",
            "--restart-backoff", "1", "--stop-timeout", "5", "--crash-limit", "2",
        ]  # fmt: skip
        return FaultProc(f"agent-{name}", argv, self.workdir / f"agent-{name}.log", self.env)

    def new_controller(self, identity: str, health_port: int = 0) -> FaultProc:
        argv = [
            *self.py, "controller", "--kubeconfig", self.kubeconfig,
            "--heartbeat-grace", str(GRACE_S), "--check-interval", "1",
            "--lease-name", self.lease, "--identity", identity,
            *(["--health-port", str(health_port)] if health_port else []),
        ]  # fmt: skip
        return FaultProc(identity, argv, self.workdir / f"{identity}.log", self.env)

    @property
    def controller(self) -> FaultProc:
        return self.controllers[0]

    def processes(self) -> list[FaultProc]:
        return [*self.controllers, *(a for lane in self.lanes for a in lane.agents.values())]

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> FaultKvmCluster:
        for proc in self.processes():
            proc.start()
        with self.api() as custom:
            for lane in self.lanes:
                for name in lane.names:
                    wait_for(
                        functools.partial(self.node_ready, custom, name),
                        timeout,
                        f"NodeHypervisor {name} Ready",
                        interval=0.5,
                    )
                    custom.patch_cluster_custom_object(
                        GROUP, VERSION, NHV, name,
                        {"metadata": {"labels": {LANE_LABEL: str(lane.index)}}},
                    )  # fmt: skip
        return self

    def stop(self) -> None:
        for proc in self.processes():
            proc.thaw()
            proc.stop()
        with self.api() as custom:
            for lane in self.lanes:
                for name in lane.names:
                    with contextlib.suppress(Exception):
                        custom.delete_cluster_custom_object(GROUP, VERSION, NHV, name)
        for conn in self._conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def logs(self, lines: int = 60, only: list[FaultProc] | None = None) -> str:
        return "\n".join(
            f"===== {p.name} ({p.log}) =====\n{p.tail(lines)}" for p in only or self.processes()
        )

    # --- API -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def api(self) -> Any:
        """A fresh CustomObjectsApi (one per thread: clients are closed after use)."""
        client = self.control_plane.api_client()
        try:
            yield kubernetes.client.CustomObjectsApi(client)
        finally:
            client.close()

    @staticmethod
    def node_ready(custom: Any, name: str) -> bool:
        try:
            body = custom.get_cluster_custom_object(GROUP, VERSION, NHV, name)
        except kubernetes.client.ApiException:
            return False
        conds = (body.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    # --- the hypervisors ---------------------------------------------------------------------
    def _conn(self, node: LibvirtNode) -> libvirt.virConnect:
        with self._conn_lock:
            conn = self._conns.get(node.name)
            if conn is None or not conn.isAlive():
                conn = libvirt.open(node.uri)
                self._conns[node.name] = conn
            return conn

    def domain_states(self, domain: str) -> dict[str, str]:
        """libvirt node name -> state (``running``, ``paused``, ...) of every active copy.

        Read straight from both libvirtds (what ``virsh list`` shows), never from kubehv.
        """
        out: dict[str, str] = {}
        for node in self.libvirt_nodes:
            for _ in range(3):
                try:
                    dom = self._conn(node).lookupByName(domain)
                    if dom.isActive():
                        out[node.name] = _STATE_NAMES.get(dom.state()[0], "other")
                    break
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        break
                    with self._conn_lock:
                        self._conns.pop(node.name, None)
        return out

    def virsh_running(self, domain: str) -> list[str]:
        """Libvirt nodes whose ``virsh list`` (active domains) names ``domain``."""
        found = []
        for node in self.libvirt_nodes:
            proc = node.virsh("list", "--name", timeout=60)
            if domain in [line.strip() for line in proc.stdout.splitlines()]:
                found.append(node.name)
        return found

    def scrub(self, domain: str) -> list[str]:
        """Destroy whatever is left of ``domain`` on both nodes; the nodes that had some."""
        had = []
        for node in self.libvirt_nodes:
            names = node.virsh("list", "--all", "--name", timeout=60).stdout.split()
            if domain in names:
                had.append(node.name)
                node.virsh("destroy", domain, timeout=30)
                node.virsh("undefine", domain, "--nvram", timeout=30)
        return had


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}
