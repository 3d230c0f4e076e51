"""The demo's hypervisor nodes: two netns libvirt nodes where the machine can, else one.

Why: kubehv's headline is live migration, and a one-node demo answers ``kubehv migrate`` with
"no other nodes". Where the demo runs as root with libvirt, QEMU and the test guest, it starts
two libvirt nodes the way the tests do (``kubehv.devenv.netns``: a network + mount namespace
each, with its own libvirtd reachable over ``qemu+tcp`` on a private 10.200.x address), so a
Migration really runs. Otherwise (not root, namespaces refused) it falls back to the machine's
own libvirtd as the one node, and says why. ``make demo`` then starts one agent per node.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubehv.devenv import guest, libvirtd, netns
from kubehv.drivers import errors as driver_errors
from kubehv.drivers import registry


@dataclass(frozen=True)
class DemoNode:
    """One node as its agent is told about it."""

    name: str
    uri: str
    migration_address: str | None = None


class KvmSetup:
    """What the kvm driver needs in the demo: the nodes and the test guest's boot files."""

    def __init__(
        self,
        uri: str,
        kernel: Path,
        initrd: Path,
        cmdline: str = "console=ttyS0",
        *,
        daemon: libvirtd.LocalLibvirtd | None = None,
        node_set: netns.NodeSet | None = None,
    ) -> None:
        self.uri, self.kernel, self.initrd, self.cmdline = uri, kernel, initrd, cmdline
        self._daemon = daemon  # our lease on libvirtd: stopped only if we started it
        self._node_set = node_set  # the netns nodes, when the demo has two

    def nodes(self, local_name: str) -> list[DemoNode]:
        if self._node_set is not None:
            return [DemoNode(n.name, n.uri, n.address) for n in self._node_set]
        return [DemoNode(local_name, self.uri)]

    def stop(self) -> None:
        """Stop the netns nodes (destroying their guests) and release libvirtd."""
        if self._node_set is not None:
            self._node_set.stop()
        self._node_set = None
        if self._daemon is not None:
            self._daemon.stop()
        self._daemon = None


def _two_nodes(report: Callable[[str], None]) -> tuple[netns.NodeSet | None, str]:
    if os.geteuid() != 0:
        return None, "not root (network namespaces need root)"
    report("two libvirt nodes: network + mount namespaces, one libvirtd each")
    nodes = netns.NodeSet(count=2)
    try:
        nodes.start()
    except (libvirtd.LibvirtdError, OSError, subprocess.SubprocessError) as exc:
        return None, f"netns nodes could not start: {exc}"
    return nodes, ""


def prepare_kvm(
    report: Callable[[str], None], two_nodes: bool = True
) -> tuple[KvmSetup | None, str]:
    """Decide whether the kvm driver can run here; (setup, reason) or (None, why not)."""
    missing = [b for b in ("qemu-system-x86_64", "libvirtd", "virsh") if not shutil.which(b)]
    if missing:
        return None, f"not installed: {', '.join(missing)}"
    if importlib.util.find_spec("libvirt") is None:
        return None, "the libvirt Python binding is not installed"
    try:
        registry.get_driver_class("kvm")
    except driver_errors.UnknownDriver as exc:
        return None, f"the kvm driver does not load: {exc}"
    report("test guest: Debian cloud kernel + busybox initramfs (built once, then cached)")
    try:
        image = guest.ensure_guest()
    except guest.GuestBuildError as exc:
        return None, f"the test guest cannot be built: {exc}"
    kernel, initrd = Path(image.kernel), Path(image.initrd)
    why_one = "asked for one node"
    if two_nodes:
        node_set, why_one = _two_nodes(report)
        if node_set is not None:
            where = ", ".join(f"{n.name} at {n.uri}" for n in node_set)
            setup = KvmSetup(node_set[0].uri, kernel, initrd, image.cmdline, node_set=node_set)
            return setup, f"two nodes ({where}), guest kernel {image.kernel}"
    report(f"one node only ({why_one}): the machine's libvirtd (started if needed)")
    daemon = libvirtd.LocalLibvirtd()
    try:
        daemon.ensure()
    except (libvirtd.LibvirtdError, OSError, subprocess.SubprocessError) as exc:
        daemon.stop()
        return None, f"libvirtd cannot be started: {exc}"
    started = "started by the demo" if daemon.started_by_us else "already running"
    setup = KvmSetup(daemon.uri, kernel, initrd, image.cmdline, daemon=daemon)
    return setup, f"libvirtd at {daemon.uri} ({started}), guest kernel {image.kernel}"
