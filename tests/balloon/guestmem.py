"""Driving the test guest's memory from outside: typed console commands, answers read back.

Why: the balloon tests make a real guest busy or idle. The test guest (tests/guest/init)
reads ``mem-alloc N`` / ``mem-free`` / ``mem-report`` from its serial console and answers
with a ``KUBEHV-GUEST-MEM`` line. The console is libvirt's ``<serial type='pty'>``: its PTY
path is in the live domain XML, and writing a line there is typing it on the console.
(A libvirt console stream would need an event loop in the test process; the PTY needs none.)
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

from kubehv.devenv import serial

MEM_MARKER = "KUBEHV-GUEST-MEM"
OOM_PATTERNS = ("Out of memory", "oom-kill", "invoked oom-killer")
_REPORT = re.compile(
    MEM_MARKER + r" (\w+) held_mib=(\d+) available_mib=(\d+) oom_kills=(\d+)(?: took_s=([\d.]+))?"
)


def pty_path(domain_xml: str) -> str:
    """The host PTY of the domain's serial console (from ``virsh dumpxml``)."""
    root = ET.fromstring(domain_xml)
    for el in root.iterfind("devices/serial/source"):
        path = el.get("path")
        if path:
            return path
    raise AssertionError("the domain has no serial PTY in its live XML")


def type_line(pty: str, line: str, settle_s: float = 1.5) -> None:
    """Type ``line`` (plus Enter) on the console behind ``pty``.

    QEMU's pty backend polls about once a second for a connected reader and drops input
    written while it thinks nobody is connected: keep the PTY open a moment before and after.
    """
    fd = os.open(pty, os.O_WRONLY | os.O_NOCTTY)
    try:
        time.sleep(settle_s)
        os.write(fd, (line + "\n").encode())
        time.sleep(settle_s)
    finally:
        os.close(fd)


def reports(log_path: str) -> list[tuple[str, int, int, int]]:
    """Every answer so far: (kind, held MiB, MemAvailable MiB, oom_kill counter)."""
    return [
        (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in _REPORT.finditer(serial.read_log(log_path))
    ]


def alloc_seconds(log_path: str) -> list[float]:
    """How long each ``mem-alloc`` waited for its memory, by the guest's own clock."""
    return [
        float(m.group(5))
        for m in _REPORT.finditer(serial.read_log(log_path))
        if m.group(5) is not None
    ]


def oom_lines(log_path: str) -> list[str]:
    """Console lines in which the guest kernel reports an OOM kill."""
    return [
        line
        for line in serial.read_log(log_path).splitlines()
        if any(p in line for p in OOM_PATTERNS)
    ]


def command(
    pty: str, log_path: str, line: str, kind: str, wait: Callable[[Callable[[], bool]], object]
) -> tuple[str, int, int, int]:
    """Type ``line`` and wait (with ``wait``) for a new answer of ``kind``; return it."""
    before = len([r for r in reports(log_path) if r[0] == kind])
    type_line(pty, line)
    wait(lambda: len([r for r in reports(log_path) if r[0] == kind]) > before)
    return [r for r in reports(log_path) if r[0] == kind][-1]
