"""A real Kubernetes node on this machine: control plane + controllers + containerd + kubelet.

Why: the shipped manifests (DaemonSet, Deployment, webhook Service, probes, RBAC) can only be
proven by running them, and no Docker engine runs here for kind. This starts, as processes,
etcd + kube-apiserver (``ControlPlane`` with the flags a node needs), kube-controller-manager,
kube-scheduler, containerd + runc (``kubehv.devenv.containerd``), the kubelet and kube-proxy,
imports the pause and kubehv images (``kubehv.devenv.image``) and waits for the node Ready.

One node per machine at a time (a lock file): the kubelet, kube-proxy's iptables chains and
the CNI bridge are host-wide. Pods get 10.244.0.0/24 on the bridge ``kubehv-br0`` (host side
10.244.0.1, the node's InternalIP), Services 10.0.0.0/24: both off the netns nodes' 10.200.x.
``stop`` leaves the host as it was: pods killed, mounts under the data dir unmounted, the
``kubepods`` cgroups, the bridge and the KUBE-*/CNI-* iptables chains removed, and the sysctls
the kubelet, the bridge plugin and kube-proxy change restored (``kubehv.devenv.hostrestore``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from kubehv.devenv import binaries, hostrestore, image
from kubehv.devenv.containerd import Containerd
from kubehv.devenv.controlplane import ControlPlane, ManagedProcess, free_port, log_tail

LOCK_FILE = Path("/run/kubehv-kubenode.lock")
BRIDGE = "kubehv-br0"
POD_SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
READY_TIMEOUT = 300.0


class KubeNodeError(RuntimeError):
    """The node did not come up; the message names the part and its log tail."""


class KubeNode:
    """The whole single-node cluster. Use as a context manager or start()/stop()."""

    def __init__(self, data_dir: Path | None = None, *, node_name: str = "kubehv-node") -> None:
        self._given_dir = data_dir
        self.node_name = node_name
        self.dir = Path()
        self.control_plane: ControlPlane | None = None
        self.containerd: Containerd | None = None
        self._procs: list[ManagedProcess] = []
        self._lock: IO[str] | None = None
        self._host: hostrestore.HostState | None = None
        self.timings: dict[str, float] = {}

    # ---- public -------------------------------------------------------------------------------
    @property
    def cp(self) -> ControlPlane:
        if self.control_plane is None:
            raise KubeNodeError("node not started")
        return self.control_plane

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, **kw)

    def __enter__(self) -> KubeNode:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> KubeNode:
        began = time.monotonic()
        self.dir = self._given_dir or Path(tempfile.mkdtemp(prefix="kubehv-node-"))
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self._take_lock()
        atexit.register(self.stop)
        try:
            bins = binaries.find()
            node_bins = binaries.find_node()
            self._step("binaries", began)
            self._host = hostrestore.HostState.record(self.dir, BRIDGE)
            hostrestore.create_bridge(BRIDGE, f"{NODE_IP}/24")
            self._start_control_plane(bins)
            self._start_containerd(node_bins)
            self._start_images(node_bins)
            self._start_controllers(node_bins)
            self._start_kubelet(node_bins)
            self._start_kube_proxy(node_bins)
            self._wait_node_ready()
            self._step("node Ready", began)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything and undo every change to the host; safe to call twice."""
        atexit.unregister(self.stop)
        if self._lock is None:
            return
        try:
            kubelet = next((p for p in self._procs if p.name == "kubelet"), None)
            if kubelet is not None:
                kubelet.stop(grace=10)
            if self.containerd is not None:
                self.containerd.stop()
            for proc in reversed(self._procs):
                proc.stop(grace=10)
            self._procs = []
            if self.control_plane is not None:
                self.control_plane.stop()
            if self._host is not None:
                self._host.restore(BRIDGE, self.dir)
        finally:
            if self._given_dir is None:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._lock.close()
            self._lock = None

    def logs(self, lines: int = 40) -> str:
        parts = [p for p in self._procs]
        if self.containerd is not None and self.containerd.proc is not None:
            parts.append(self.containerd.proc)
        return "\n".join(f"===== {p.name} =====\n{log_tail(p.log, lines)}" for p in parts)

    # ---- steps ----------------------------------------------------------------------------------
    def _step(self, name: str, began: float) -> None:
        self.timings[name] = round(time.monotonic() - began, 1)

    def _take_lock(self, timeout: float = 900.0) -> None:
        fh = LOCK_FILE.open("w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise KubeNodeError(f"another real node holds {LOCK_FILE}") from None
                time.sleep(1)
        self._lock = fh

    def _start_control_plane(self, bins: binaries.ControlPlaneBinaries) -> None:
        began = time.monotonic()
        # Pods reach the API through the `kubernetes` Service, whose endpoint is the advertise
        # address: the bridge's host side. exec/logs go to the kubelet at the node's InternalIP.
        cp = ControlPlane(
            self.dir / "cp",
            remove_data=False,
            bins=bins,
            extra_ips=(NODE_IP,),
            extra_args=[
                "--bind-address=0.0.0.0",
                f"--advertise-address={NODE_IP}",
                "--enable-admission-plugins=ServiceAccount",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # The admin pair is in system:masters; the kubelet trusts the same CA.
                f"--kubelet-client-certificate={self.dir / 'cp' / 'pki' / 'admin.crt'}",
                f"--kubelet-client-key={self.dir / 'cp' / 'pki' / 'admin.key'}",
            ],
        )
        self.control_plane = cp
        cp.start()
        self.timings["control plane"] = round(time.monotonic() - began, 1)

    def _start_containerd(self, node_bins: binaries.NodeBinaries) -> None:
        began = time.monotonic()
        cni = self.dir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-kubehv.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        self.containerd = Containerd(
            self.dir / "containerd",
            cni_conf_dir=cni,
            sandbox_image=f"docker.io/library/{image.PAUSE_REF}",
        )
        self.containerd.start()
        self.timings["containerd"] = round(time.monotonic() - began, 1)

    def _cni_config(self) -> dict[str, Any]:
        return cni_config("kubehv", BRIDGE, POD_SUBNET, NODE_IP, self.dir / "cni-ipam")

    def _start_images(self, node_bins: binaries.NodeBinaries) -> None:
        began = time.monotonic()
        assert self.containerd is not None
        out = self.dir / "images"
        out.mkdir(exist_ok=True)
        self.containerd.import_image(image.pause_image(node_bins.pause, out).path)
        built = image.kubehv_image()
        self.timings["image build"] = round(time.monotonic() - began, 1)
        self.containerd.import_image(built.path)
        self.timings["images"] = round(time.monotonic() - began, 1)

    def _admin_args(self) -> list[str]:
        return [f"--kubeconfig={self.kubeconfig}"]

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.dir / "logs" / f"{name}.log")
        proc.start()
        self._procs.append(proc)
        return proc

    def _start_controllers(self, nb: binaries.NodeBinaries) -> None:
        c = self.cp.certs
        self._spawn(
            "kube-controller-manager",
            [
                str(nb.kube_controller_manager),
                *self._admin_args(),
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={c.sa_key}",
                f"--root-ca-file={c.ca_cert}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(nb.kube_scheduler),
                *self._admin_args(),
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )

    def _start_kubelet(self, nb: binaries.NodeBinaries) -> None:
        assert self.containerd is not None
        root = self.dir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        config = kubelet_config(NODE_IP, self.cp.certs.ca_cert, self.containerd.endpoint)
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet",
            [
                str(nb.kubelet),
                f"--config={root / 'config.yaml'}",
                *self._admin_args(),
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                f"--hostname-override={self.node_name}",
                f"--node-ip={NODE_IP}",
                "--node-labels=kubehv.io/hypervisor=true",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self, nb: binaries.NodeBinaries) -> None:
        config = kube_proxy_config(self.kubeconfig, POD_SUBNET, self.node_name)
        path = self.dir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [str(nb.kube_proxy), f"--config={path}", "--v=1"])

    def _wait_node_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if not proc.alive():
                    raise KubeNodeError(f"{proc.name} exited; {proc.log}:\n{log_tail(proc.log)}")
            status, body = self.cp.request("GET", f"/api/v1/nodes/{self.node_name}")
            if status == 200:
                conds = json.loads(body).get("status", {}).get("conditions") or []
                ready = [c for c in conds if c.get("type") == "Ready"]
                if ready and ready[0].get("status") == "True":
                    return
                last = json.dumps(ready)
            time.sleep(1)
        raise KubeNodeError(f"node {self.node_name} not Ready ({last}):\n{self.logs()}")

    def wait_pods_ready(self, namespace: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every pod of ``namespace`` exists and is Ready."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.kubectl(
                "wait", "-n", namespace, "--for=condition=Ready", "pod", "--all",
                f"--timeout={int(timeout)}s", timeout=timeout + 30,
            )  # fmt: skip
            return
        pods = self.kubectl("get", "pods", "-n", namespace, "-o", "wide").stdout
        raise KubeNodeError(f"pods in {namespace} not Ready:\n{pods}\n{self.logs()}")


# ---- configuration shared with a second node (kubehv.devenv.kubenetnsnode) ---------------------
def cni_config(name: str, bridge: str, subnet: str, gateway: str, ipam_dir: Path) -> dict[str, Any]:
    # No ipMasq, no portmap: pods talk only to the host, each other and Services, so the
    # bridge plugin adds no iptables rules of its own.
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def kubelet_config(address: str, ca_cert: Path, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": False,
        "containerRuntimeEndpoint": endpoint,
        "serializeImagePulls": False,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "resolvConf": "/etc/resolv.conf",
        "fileCheckFrequency": "5s",
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        **extra,
    }


def kube_proxy_config(kubeconfig: Path, cluster_cidr: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": cluster_cidr,
        "hostnameOverride": node_name,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{free_port()}",
        "metricsBindAddress": f"127.0.0.1:{free_port()}",
        # 0 = leave the host's conntrack settings alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False},
    }
