"""Undo what a real node changes on the host: sysctls, iptables chains, mounts, cgroups, bridge.

Why: the kubelet, the bridge CNI plugin and kube-proxy change host-wide state that outlives
them (runtime-facts.md lists what was measured): the kubelet sets ``kernel.panic``,
``kernel.panic_on_oops`` and ``vm.overcommit_memory``, the bridge plugin
``net.ipv4.ip_forward``, kube-proxy adds KUBE-* chains that ``kube-proxy --cleanup`` does not
all remove; pod volumes stay mounted under the kubelet's root and the ``kubepods`` cgroups
stay behind. A test bed that leaves these would change every later test on the machine, so
the values are recorded before the node starts and put back when it stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil

SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The running node's record, outside its data dir: a session killed before its teardown
# (kill -9, a CI timeout) leaves it behind, and the next node restores the host from it.
LEFTOVER = Path("/run/kubehv-kubenode-host.json")
KUBEPODS = "kubepods"
EXTRA_NODE_CGROUPS = "kubehv-node-*"
"""cgroupRoot of the second kubelets (kubehv.devenv.kubenetnsnode): one node session owns
them all (the node lock), so a restore removes any left behind."""


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key


def read_sysctls() -> dict[str, str]:
    out: dict[str, str] = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            out[key] = _sysctl_path(key).read_text().strip()
    return out


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def create_bridge(name: str, cidr: str) -> None:
    """The pods' bridge, made before the API server so it can advertise the host side."""
    if _run("ip", "link", "show", name).returncode != 0:
        _run("ip", "link", "add", name, "type", "bridge")
    _run("ip", "addr", "replace", cidr, "dev", name)
    _run("ip", "link", "set", name, "up")


def remove_iptables_chains(prefixes: tuple[str, ...] = CHAIN_PREFIXES) -> list[str]:
    """Delete every rule that jumps to, and every chain named, ``prefixes``*; returns them."""
    removed: list[str] = []
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            dump = _run(f"{tool}-save", "-t", table)
            if dump.returncode != 0:
                continue
            chains: list[str] = []
            for line in dump.stdout.splitlines():
                if line.startswith(":") and line[1:].startswith(prefixes):
                    chains.append(line[1:].split()[0])
                elif line.startswith("-A "):
                    words = line.split()
                    owner = words[1]
                    target = words[words.index("-j") + 1] if "-j" in words else ""
                    if not owner.startswith(prefixes) and target.startswith(prefixes):
                        # The dump's quoting is what iptables reads back (iptables-restore);
                        # run the delete through a one-rule restore to keep it exact.
                        _restore_delete(tool, table, line)
            for chain in chains:
                _run(tool, "-t", table, "-F", chain)
            for chain in chains:
                if _run(tool, "-t", table, "-X", chain).returncode == 0:
                    removed.append(f"{tool}/{table}/{chain}")
    return removed


def _restore_delete(tool: str, table: str, rule: str) -> None:
    script = f"*{table}\n-D{rule[2:]}\nCOMMIT\n"
    subprocess.run(
        [f"{tool}-restore", "--noflush"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def unmount_under(directory: Path) -> None:
    """Lazily unmount everything mounted at or below ``directory`` (deepest first)."""
    prefix = str(directory.resolve())
    points: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        _run("umount", "-l", point)


def kill_leftover_processes(directory: Path, *, pods: bool) -> None:
    """SIGKILL a dead node's pods (with ``pods``: every process in the kubepods cgroups, which
    it created) and the processes whose command line names its data dir (containerd's shims
    outlive their parent)."""
    if not directory.is_absolute() or len(directory.parts) < 3:
        return  # not a node's data dir: match nothing rather than too much
    pids: set[int] = set()
    for procs in CGROUP_ROOT.glob(f"*/{KUBEPODS}/**/cgroup.procs") if pods else []:
        with contextlib.suppress(OSError, ValueError):
            pids |= {int(p) for p in procs.read_text().split()}
    marker = str(directory) + "/"
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in proc.info["cmdline"] or []):
            pids.add(proc.pid)
    pids.discard(os.getpid())
    victims = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            victims.append(psutil.Process(pid))
            os.kill(pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=15)  # cgroups can only go once they are empty


def remove_cgroups(name: str = KUBEPODS) -> None:
    """rmdir ``name`` (and every child, deepest first) in every cgroup hierarchy."""
    for top in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()] if CGROUP_ROOT.is_dir() else []:
        base = top / name
        if not base.is_dir():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for d in [*reversed(dirs), base]:
            with contextlib.suppress(OSError):
                d.rmdir()


@dataclasses.dataclass
class HostState:
    """What the host looked like before the node started (also saved as JSON in the dir)."""

    sysctls: dict[str, str]
    bridge_existed: bool
    kubepods_existed: bool
    directory: str = ""

    @classmethod
    def record(cls, directory: Path, bridge: str) -> HostState:
        """Record the host (call with the node lock held); first undo a dead node's leftovers."""
        cls.restore_leftover(bridge)
        state = cls(
            sysctls=read_sysctls(),
            bridge_existed=_run("ip", "link", "show", bridge).returncode == 0,
            kubepods_existed=(CGROUP_ROOT / "memory" / KUBEPODS).is_dir(),
            directory=str(directory),
        )
        text = json.dumps(dataclasses.asdict(state))
        (directory / "host-state.json").write_text(text)
        LEFTOVER.write_text(text)
        return state

    @classmethod
    def restore_leftover(cls, bridge: str) -> bool:
        """Restore what a node that died without its teardown left; True if there was one."""
        try:
            state = cls(**json.loads(LEFTOVER.read_text()))
        except (OSError, ValueError, TypeError):
            return False
        kill_leftover_processes(Path(state.directory), pods=not state.kubepods_existed)
        state.restore(bridge, Path(state.directory))
        if Path(state.directory).name.startswith("kubehv-node-"):  # a temporary data dir
            shutil.rmtree(state.directory, ignore_errors=True)
        return True

    def restore(self, bridge: str, directory: Path) -> None:
        unmount_under(directory)
        if not self.kubepods_existed:
            remove_cgroups()
        for name in {p.name for p in CGROUP_ROOT.glob(f"*/{EXTRA_NODE_CGROUPS}")}:
            remove_cgroups(name)
        if not self.bridge_existed:
            _run("ip", "link", "del", bridge)
        remove_iptables_chains()
        now = read_sysctls()
        for key, before in self.sysctls.items():
            if now.get(key) != before:
                with contextlib.suppress(OSError):
                    _sysctl_path(key).write_text(before + "\n")
        LEFTOVER.unlink(missing_ok=True)
