"""Reading a real guest's serial console log: the only witness of what happened inside it.

Why: the real-libvirt, e2e and fault tests prove a guest booted, kept running after a migration
or rebooted by counting marker lines the test guest prints (see tests/guest/init). The
convention shared with the libvirt driver: the guest's console is ``<serial type='pty'>`` with
``<log file='{serial_log_dir}/{instance_name}.serial.log' append='on'/>`` (virtlogd writes it;
``serial_log_dir`` defaults to ``/var/log/libvirt/qemu``; inside a netns node read it through
``LibvirtNode.host_path``). The file may not exist yet when a test starts waiting.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

DEFAULT_SERIAL_LOG_DIR = "/var/log/libvirt/qemu"
BOOT_MARKER = "KUBEHV-GUEST-BOOTED"
ALIVE_MARKER = "KUBEHV-GUEST-ALIVE"
DEFAULT_TIMEOUT = 120.0  # TCG guests on two shared cores: boot takes seconds, allow minutes


class MarkerTimeout(AssertionError):
    """A marker did not show up in time; the message carries the log's tail."""


def serial_log_path(instance_name: str, serial_log_dir: str = DEFAULT_SERIAL_LOG_DIR) -> str:
    """Where the driver's domain XML tells virtlogd to write the console of ``instance_name``."""
    return f"{serial_log_dir.rstrip('/')}/{instance_name}.serial.log"


def read_log(path: str | Path) -> str:
    """The log's text so far, or "" when it does not exist yet."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def count_marker(path: str | Path, marker: str) -> int:
    """How many lines of the log contain ``marker``."""
    return sum(1 for line in read_log(path).splitlines() if marker in line)


def alive_counters(path: str | Path) -> list[int]:
    """The numbers of every ``KUBEHV-GUEST-ALIVE <n>`` line, in order (they restart per boot)."""
    pattern = re.compile(re.escape(ALIVE_MARKER) + r" (\d+)")
    return [int(m.group(1)) for m in pattern.finditer(read_log(path))]


def tail(path: str | Path, lines: int = 20) -> str:
    text = read_log(path)
    if not text:
        return f"(no serial log yet at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_marker(
    path: str | Path,
    marker: str,
    count: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.1,
) -> int:
    """Wait until ``marker`` occurs on at least ``count`` lines; return the count seen.

    Raises ``MarkerTimeout`` (an AssertionError, so pytest shows it as a failure) with the
    log's tail when the marker does not appear in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        seen = count_marker(path, marker)
        if seen >= count:
            return seen
        if time.monotonic() > deadline:
            raise MarkerTimeout(
                f"{marker!r} seen {seen} times in {path}, wanted {count} within {timeout:.0f}s;"
                f" tail:\n{tail(path)}"
            )
        time.sleep(interval)


def wait_for_more(
    path: str | Path, marker: str, after: int, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """Wait until ``marker`` occurs more often than ``after`` times (e.g. the guest still runs)."""
    return wait_for_marker(path, marker, count=after + 1, timeout=timeout)
