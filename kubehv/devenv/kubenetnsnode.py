"""A second real Kubernetes node: a kubelet + containerd inside a netns libvirt node.

Why: a live migration "between pods of the shipped DaemonSet" needs two kubelet nodes, and
this machine has one host. A netns libvirt node (:class:`kubehv.devenv.netns.LibvirtNode`:
its own network namespace, and a mount namespace in which /run/libvirt, /var/lib/libvirt,
... are its own) can host a second kubelet whose DaemonSet pod then reaches *that* node's
libvirtd through the hostPath /run/libvirt. What it takes (each found by trying):

- ``ip netns exec`` mounts a fresh sysfs, which hides the host's cgroup mounts: the cgroup
  v1 hierarchies (and the unified one) are mounted again inside the node's mount namespace
  (same hierarchies: there is no cgroup namespace), and the kubelet gets its own
  ``cgroupRoot`` (``/kubehv-node-<node>``, created beforehand in every hierarchy) so its
  ``kubepods`` never meet the first node's (a node session killed before its teardown
  leaves them; the next node's restore removes them, :mod:`hostrestore`);
- the node's ``/var/lib/kubehv`` (the agent's state hostPath), ``/var/log/pods`` and
  ``/var/log/containers`` are bind-mounted from folders of its own, as the per-node libvirt
  folders are (with shared pod log folders each kubelet deletes the other's pods' logs as
  orphans, and ``kubectl logs`` fails);
- the kubelet and kube-proxy reach the API server at the first node's bridge address (the
  node's loopback is its own), by a route through the host; pods get ``10.244.<n>.0/24`` on
  a bridge inside the netns, and the host routes that subnet to the node's address;
- containerd, the kubelet and kube-proxy run inside the node (``nsenter``); their images
  are imported again (containerd's store is per instance).

``stop`` undoes it: pods killed, processes stopped, the host route removed, the cgroups
removed; everything else lived in the node's namespaces and goes with them.
"""

from __future__ import annotations

import json
import subprocess
import time

import yaml

from kubehv.devenv import binaries, hostrestore, image, kubenode
from kubehv.devenv.containerd import Containerd
from kubehv.devenv.controlplane import ManagedProcess, log_tail
from kubehv.devenv.netns import LibvirtNode

CPUSET = "/sys/fs/cgroup/cpuset"
CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


class NetnsKubelet:
    """The kubelet node ``libvirt_node.name`` joined to ``first``'s cluster."""

    def __init__(
        self, first: kubenode.KubeNode, libvirt_node: LibvirtNode, bridge_address: str, n: int = 1
    ) -> None:
        self.first, self.node, self.bridge_address = first, libvirt_node, bridge_address
        self.name = libvirt_node.name
        self.pod_subnet, self.gateway = f"10.244.{n}.0/24", f"10.244.{n}.1"
        self.cgroup = hostrestore.EXTRA_NODE_CGROUPS.replace("*", self.name)
        self.dir = first.dir / f"node-{self.name}"
        self.containerd: Containerd | None = None
        self.procs: list[ManagedProcess] = []

    def _sh(self, script: str) -> None:
        proc = subprocess.run(
            [*self.node.nsenter_argv(), "sh", "-ec", script],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise kubenode.KubeNodeError(f"node {self.name}: {script!r}: {proc.stderr.strip()}")

    def start(self) -> NetnsKubelet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        nb = binaries.find_node()
        self.dir.mkdir(parents=True)
        (self.dir / "kubehv-state").mkdir()
        subprocess.run(
            ["ip", "-n", self.name, "route", "replace", kubenode.POD_SUBNET,
             "via", self.bridge_address],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        subprocess.run(
            ["ip", "route", "replace", self.pod_subnet, "via", self.node.address],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        mounts = [
            "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup",
            *(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
              for c in CGROUP_V1),
            "mkdir -p /sys/fs/cgroup/systemd",
            "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified",
            f"for c in /sys/fs/cgroup/*/; do mkdir -p ${{c}}{self.cgroup}; done",
            # a new cpuset cgroup has no CPUs or memory nodes until given its parent's
            *(f"cat {CPUSET}/cpuset.{k} > {CPUSET}/{self.cgroup}/cpuset.{k}"
              for k in ("cpus", "mems")),
            f"mkdir -p /var/lib/kubehv && mount --bind {self.dir / 'kubehv-state'} /var/lib/kubehv",
            # the kubelet's pod logs: shared, each kubelet removes the other's as orphans
            *(f"mkdir -p /var/log/{d} {self.dir / d} && mount --bind {self.dir / d} /var/log/{d}"
              for d in ("pods", "containers")),
        ]  # fmt: skip
        self._sh(" && ".join(mounts))
        kubeconfig = self.dir / "kubeconfig"
        kubeconfig.write_text(
            self.first.kubeconfig.read_text().replace(
                "https://127.0.0.1:", f"https://{kubenode.NODE_IP}:"
            )
        )
        self._start_containerd(nb)
        root = self.dir / "kubelet"
        root.mkdir()
        assert self.containerd is not None
        config = kubenode.kubelet_config(
            self.node.address, self.first.cp.certs.ca_cert, self.containerd.endpoint,
            cgroupRoot=f"/{self.cgroup}",
        )  # fmt: skip
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kubelet", [
            str(nb.kubelet), f"--config={root / 'config.yaml'}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={root}", f"--cert-dir={root / 'pki'}",
            f"--hostname-override={self.name}", f"--node-ip={self.node.address}",
            "--node-labels=kubehv.io/hypervisor=true", "--v=1",
        ])  # fmt: skip
        proxy = kubenode.kube_proxy_config(kubeconfig, "10.244.0.0/16", self.name)
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy))
        self._spawn("kube-proxy", [str(nb.kube_proxy), f"--config={self.dir / 'kube-proxy.yaml'}"])
        self._wait_ready()

    def _start_containerd(self, nb: binaries.NodeBinaries) -> None:
        cni = self.dir / "cni"
        cni.mkdir()
        conf = kubenode.cni_config(
            "kubehv", f"kubehv-br{self.pod_subnet.split('.')[2]}", self.pod_subnet,
            self.gateway, self.dir / "cni-ipam",
        )  # fmt: skip
        (cni / "10-kubehv.conflist").write_text(json.dumps(conf, indent=2))
        self.containerd = Containerd(
            self.dir / "containerd",
            cni_conf_dir=cni,
            sandbox_image=f"docker.io/library/{image.PAUSE_REF}",
            enter=tuple(self.node.nsenter_argv()),
        )
        self.containerd.start()
        self.containerd.import_image(image.pause_image(nb.pause, self.dir).path)
        self.containerd.import_image(image.kubehv_image().path)

    def _spawn(self, name: str, argv: list[str]) -> None:
        proc = ManagedProcess(
            f"{name}-{self.name}", [*self.node.nsenter_argv(), *argv], self.dir / f"{name}.log"
        )
        proc.start()
        self.procs.append(proc)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + kubenode.READY_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                if not proc.alive():
                    raise kubenode.KubeNodeError(f"{proc.name} exited:\n{log_tail(proc.log)}")
            status, body = self.first.cp.request("GET", f"/api/v1/nodes/{self.name}")
            if status == 200:
                conds = json.loads(body).get("status", {}).get("conditions") or []
                if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds):
                    return
            time.sleep(1)
        raise kubenode.KubeNodeError(f"node {self.name} not Ready:\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"===== {p.name} =====\n{log_tail(p.log, lines)}" for p in self.procs)

    def stop(self) -> None:
        """Stop the node's processes and pods; remove the host route and its cgroups."""
        for proc in self.procs:
            if proc.name.startswith("kubelet"):
                proc.stop(grace=10)
        if self.containerd is not None:
            self.containerd.stop()
            self.containerd = None
        for proc in reversed(self.procs):
            proc.stop(grace=10)
        self.procs = []
        subprocess.run(
            ["ip", "route", "del", self.pod_subnet], capture_output=True, timeout=30, check=False
        )
        hostrestore.remove_cgroups(self.cgroup)
        self.first.kubectl("delete", "node", self.name, "--wait=false", check=False)
