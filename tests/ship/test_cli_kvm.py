"""The CLI on real guests: ``kubehv console`` attaches to the real domain, the verbs drive it.

Why: the console's domain name (``<namespace>.<name>``, not the bare name) and the URI it
dials are only proven by attaching to a running QEMU guest: here two netns libvirt nodes, kvm
agents and the controller (tests/e2e's KvmCluster), the test guest printing
``KUBEHV-GUEST-ALIVE <n>`` every second on its serial port, and ``kubehv console`` run in a
pseudo-terminal as a person would. ``kubehv restart`` must reboot that guest (a second
``KUBEHV-GUEST-BOOTED`` in its serial log), ``stop`` must shut the domain off.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import KvmCluster, e2e_namespace, kvm_cluster  # noqa: F401
from tests.fixtures.operator import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.real_libvirt, pytest.mark.apiserver]
VM = "cli-vm"
KUBEHV = str(Path(sys.executable).parent / "kubehv")
ESCAPE = b"\x1d"  # Ctrl-]: virsh console's escape


def cli(cluster: KvmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = cluster.control_plane.env()
    return subprocess.run(
        [KUBEHV, *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )


def read_console(argv: list[str], env: dict[str, str], want: bytes, timeout: float) -> bytes:
    """Run ``argv`` on a pseudo-terminal until ``want`` appears; then leave with Ctrl-]."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + timeout
        while want not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break  # the other side closed
        with contextlib.suppress(OSError):
            os.write(master, ESCAPE)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    finally:
        os.close(master)
    return seen


def test_console_attaches_to_the_real_guest_and_verbs_drive_it(
    kvm_cluster: KvmCluster,  # noqa: F811
    e2e_namespace: str,  # noqa: F811
) -> None:
    c, ns = kvm_cluster, e2e_namespace
    c.kubectl("apply", "-f", "-", stdin=c.guest_manifest(ns, VM))

    def running() -> dict[str, Any] | None:
        vi = c.get("virtualinstances", ns, VM)
        status = (vi or {}).get("status") or {}
        return vi if status.get("phase") == "Running" else None

    vi = wait_for(running, 180, f"{VM} Running")
    node = vi["status"]["nodeName"]
    domain = f"{ns}.{VM}"
    serial_log = Path(c.serial_log(node, domain))
    wait_for(lambda: b"KUBEHV-GUEST-BOOTED" in serial_log.read_bytes(), 120, "first boot")

    printed = cli(c, "console", VM, "-n", ns, "--print")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.split() == ["virsh", "-c", c.nodes[node].uri, "console", domain]

    seen = read_console(
        [KUBEHV, "console", VM, "-n", ns], c.control_plane.env(), b"KUBEHV-GUEST-ALIVE", 90
    )
    assert f"connecting to {domain}".encode() in seen, seen[-2000:]
    assert b"KUBEHV-GUEST-ALIVE" in seen, seen[-2000:]

    restart = cli(c, "restart", VM, "-n", ns, "--wait", "--timeout", "150")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    wait_for(
        lambda: serial_log.read_bytes().count(b"KUBEHV-GUEST-BOOTED") >= 2, 120, "a second boot"
    )

    stop = cli(c, "stop", VM, "-n", ns, "--wait", "--timeout", "150")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert domain not in c.domains(node)
    start = cli(c, "start", VM, "-n", ns, "--wait", "--timeout", "150")
    assert start.returncode == 0, start.stdout + start.stderr
    assert domain in c.domains(node)


def test_vnc_prints_the_endpoint_qemu_really_serves(
    kvm_cluster: KvmCluster,  # noqa: F811
    e2e_namespace: str,  # noqa: F811
) -> None:
    c, ns, name = kvm_cluster, e2e_namespace, "cli-vnc"
    manifest = json.loads(c.guest_manifest(ns, name))
    manifest["spec"]["console"] = {"serial": True, "vnc": {"enabled": True}}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))

    def endpoint() -> tuple[str, str] | None:
        status = (c.get("virtualinstances", ns, name) or {}).get("status") or {}
        console = str(status.get("console") or "")
        if status.get("phase") == "Running" and console.startswith("vnc://"):
            return status["nodeName"], console
        return None

    node, console = wait_for(endpoint, 180, f"{name} Running with a VNC endpoint")
    proc = cli(c, "vnc", name, "-n", ns)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{name}: {console} on node {node}"
    host, port = console.removeprefix("vnc://").rsplit(":", 1)
    assert f"ssh -N -L {port}:{host}:{port} {node}" in proc.stdout  # loopback on the node
    # What listens there is QEMU's VNC server: its RFB greeting, read inside the node.
    probe = (
        f"import socket; s = socket.create_connection(({host!r}, {port}), timeout=10); "
        "print(s.recv(12).decode())"
    )
    greeting = subprocess.run(
        [*c.nodes[node].nsenter_argv(), sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert greeting.stdout.startswith("RFB 003."), greeting.stdout + greeting.stderr
