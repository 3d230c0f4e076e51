"""The real-libvirt infrastructure works: libvirtd, the test guest, netns nodes, migration.

Why: every real_libvirt, e2e and fault test stands on these parts; when one breaks, this
module says which, with ``virsh`` only (the libvirt driver has its own tests). Proof comes
from the guest's serial console (markers printed by tests/guest/init) and from libvirt.
Figures (boot and migration time) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kubehv.devenv.guest import GuestImage
from kubehv.devenv.libvirtd import LocalLibvirtd
from kubehv.devenv.netns import LibvirtNode, NodeSet
from kubehv.devenv.serial import (
    DEFAULT_SERIAL_LOG_DIR,
    alive_counters,
    count_marker,
    serial_log_path,
    wait_for_marker,
    wait_for_more,
)

pytestmark = pytest.mark.real_libvirt

TIMEOUT = 120.0  # TCG guests on two cores shared with other sessions


def domain_xml(name: str, guest: GuestImage, memory_mib: int) -> str:
    """The smallest domain following the serial-log convention of kubehv.devenv.serial."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = guest.kernel
    ET.SubElement(os_el, "initrd").text = guest.initrd
    ET.SubElement(os_el, "cmdline").text = guest.cmdline
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")  # the power button
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    devices = ET.SubElement(dom, "devices")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=serial_log_path(name), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} failed: {proc.stderr}"
    return proc.stdout


def domstate(uri: str, name: str) -> str:
    return virsh(uri, "domstate", name).stdout.strip()


def wait_state(uri: str, name: str, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while domstate(uri, name) != state:
        assert time.monotonic() < deadline, f"{name} never reached {state!r} on {uri}"
        time.sleep(0.2)


class Guest:
    """A defined test domain on one libvirtd; ``log`` is its serial log seen from the host."""

    def __init__(self, uri: str, name: str, log: str) -> None:
        self.uri, self.name, self.log = uri, name, log
        self.also_on: list[str] = []  # other libvirtds to clean up on (migration targets)

    def start(self) -> float:
        """Start and wait for the boot marker; return the seconds from start to marker."""
        began = time.monotonic()
        ok(virsh(self.uri, "start", self.name))
        wait_for_marker(self.log, "KUBEHV-GUEST-BOOTED", timeout=TIMEOUT)
        return time.monotonic() - began


GuestFactory = Callable[..., Guest]


@pytest.fixture
def make_guest(
    guest_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[GuestFactory]:
    """Define guests on a libvirtd (root or node); destroy and undefine them afterwards."""
    made: list[Guest] = []

    def make(uri: str, host_path: Callable[[str], str] = str, memory_mib: int = 128) -> Guest:
        name = f"khvt-{os.getpid()}-{request.node.name[5:30]}-{len(made)}".replace("_", "-")
        log = host_path(serial_log_path(name))
        Path(log).unlink(missing_ok=True)
        xml = tmp_path / f"{name}.xml"
        xml.write_text(domain_xml(name, guest_image, memory_mib))
        ok(virsh(uri, "define", str(xml)))
        guest = Guest(uri, name, log)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        for uri in {guest.uri, *guest.also_on}:
            virsh(uri, "destroy", guest.name)
            virsh(uri, "undefine", guest.name)
        Path(guest.log).unlink(missing_ok=True)
        Path(guest.log.replace(".serial.log", ".log")).unlink(missing_ok=True)  # QEMU's log


def test_libvirtd_answers(libvirtd: LocalLibvirtd) -> None:
    assert libvirtd.is_running()
    out = ok(virsh(libvirtd.uri, "version"))
    assert "QEMU" in out
    # Idempotent: a second ensure finds the running daemon and does not start another.
    again = LocalLibvirtd().ensure()
    assert not again.started_by_us
    again.stop()  # gives up its lease only
    assert libvirtd.is_running()


def test_guest_boots_and_stops_gracefully(
    libvirtd: LocalLibvirtd, make_guest: GuestFactory
) -> None:
    guest = make_guest(libvirtd.uri)
    assert guest.log.startswith(DEFAULT_SERIAL_LOG_DIR)
    seconds = guest.start()
    print(f"\nguest boot on qemu:///system (start -> boot marker): {seconds:.2f}s")
    wait_for_more(
        guest.log, "KUBEHV-GUEST-ALIVE", after=count_marker(guest.log, "KUBEHV-GUEST-ALIVE")
    )
    ok(virsh(libvirtd.uri, "shutdown", guest.name))
    wait_state(libvirtd.uri, guest.name, "shut off")
    assert count_marker(guest.log, "KUBEHV-GUEST-POWER-BUTTON") == 1  # graceful, not destroyed


def test_reboot_shows_boot_marker_twice(libvirtd: LocalLibvirtd, make_guest: GuestFactory) -> None:
    guest = make_guest(libvirtd.uri)
    guest.start()
    ok(virsh(libvirtd.uri, "reboot", guest.name))
    wait_for_marker(guest.log, "KUBEHV-GUEST-BOOTED", count=2, timeout=TIMEOUT)
    assert domstate(libvirtd.uri, guest.name) == "running"
    counters = alive_counters(guest.log)
    assert 1 in counters[1:], "the alive counter restarts after the reboot"


def test_setmem_changes_actual_balloon(libvirtd: LocalLibvirtd, make_guest: GuestFactory) -> None:
    guest = make_guest(libvirtd.uri, memory_mib=128)
    guest.start()

    def actual_kib() -> int:
        for line in ok(virsh(libvirtd.uri, "dommemstat", guest.name)).splitlines():
            key, _, value = line.partition(" ")
            if key == "actual":
                return int(value)
        raise AssertionError("dommemstat has no 'actual'")

    assert actual_kib() == 128 * 1024
    ok(virsh(libvirtd.uri, "setmem", guest.name, "64M", "--live"))
    deadline = time.monotonic() + TIMEOUT
    while actual_kib() != 64 * 1024:
        assert time.monotonic() < deadline, "the balloon never reached 64 MiB"
        time.sleep(0.2)


def test_node_is_a_separate_libvirt_host(libvirt_nodes: NodeSet) -> None:
    a, b = libvirt_nodes[0], libvirt_nodes[1]
    assert a.address != b.address and a.uri != b.uri
    uuids = {ET.fromstring(ok(n.virsh("capabilities"))).findtext("host/uuid") for n in (a, b)}
    assert len(uuids) == 2, "each node needs its own host UUID or libvirt refuses to migrate"
    assert a.host_path("/var/log/libvirt/qemu/x.log") == str(a.dir / "log" / "qemu" / "x.log")
    assert a.host_path("/srv/x") == "/srv/x"
    # Node a reaches node b's libvirtd from inside its namespaces.
    inside = subprocess.run(
        [*a.nsenter_argv(), "virsh", "-c", b.uri, "version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert inside.returncode == 0, inside.stderr
    refused = virsh(libvirt_nodes.unreachable_uri, "version")
    assert refused.returncode != 0


def test_guest_boots_on_a_node(libvirt_nodes: NodeSet, make_guest: GuestFactory) -> None:
    node = libvirt_nodes[0]
    guest = make_guest(node.uri, node.host_path)
    seconds = guest.start()
    print(f"\nguest boot on netns node {node.name}: {seconds:.2f}s")
    assert guest.log.startswith(str(node.dir))


def test_live_migration_between_nodes(libvirt_nodes: NodeSet, make_guest: GuestFactory) -> None:
    src, dst = libvirt_nodes[0], libvirt_nodes[1]
    guest = make_guest(src.uri, src.host_path, memory_mib=128)
    guest.also_on.append(dst.uri)
    guest.start()
    wait_for_marker(guest.log, "KUBEHV-GUEST-ALIVE", count=2)
    began = time.monotonic()
    ok(src.virsh("migrate", "--live", "--p2p", guest.name, dst.uri, dst.migration_uri))
    seconds = time.monotonic() - began
    print(f"\nlive migration of a 128 MiB guest {src.name} -> {dst.name}: {seconds:.2f}s")
    dst_log = dst.host_path(serial_log_path(guest.name))
    wait_for_marker(dst_log, "KUBEHV-GUEST-ALIVE", count=2, timeout=TIMEOUT)
    assert domstate(dst.uri, guest.name) == "running"
    assert src.virsh("domstate", guest.name).stdout.strip() != "running"
    # The same guest goes on counting on the target: no second boot.
    assert count_marker(dst_log, "KUBEHV-GUEST-BOOTED") == 0
    assert alive_counters(dst_log)[0] > alive_counters(guest.log)[0]


def test_node_libvirtd_restart_keeps_guest(
    libvirt_nodes: NodeSet, make_guest: GuestFactory
) -> None:
    node: LibvirtNode = libvirt_nodes[1]
    guest = make_guest(node.uri, node.host_path)
    guest.start()
    node.kill_libvirtd()
    assert not node.is_running()
    seen = count_marker(guest.log, "KUBEHV-GUEST-ALIVE")
    wait_for_more(guest.log, "KUBEHV-GUEST-ALIVE", after=seen)  # QEMU runs on without libvirtd
    node.restart()
    assert node.is_running()
    assert domstate(node.uri, guest.name) == "running"
