"""The node's memory pressure as the balloon policy reads it: MemAvailable and PSI.

Why this module exists: the policy (:mod:`balloon_policy`) is pure; something has to read
``/proc/meminfo`` and ``/proc/pressure/memory`` (PSI, absent on kernels without it or in
some containers). Parsing is separate from reading so it is tested on fixed text.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class NodeMemory:
    mem_available_mib: int | None
    psi_some_avg10: float | None


def parse_meminfo_available(text: str) -> int | None:
    """``MemAvailable`` in MiB from /proc/meminfo text (None if the line is missing)."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) // 1024
    return None


def parse_psi_some_avg10(text: str) -> float | None:
    """The ``some avg10`` figure (percent of time stalled) from /proc/pressure/memory."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def read(meminfo: str = "/proc/meminfo", psi: str = "/proc/pressure/memory") -> NodeMemory:
    """This machine's MemAvailable and PSI (each ``None`` where it cannot be read)."""
    mi, ps = _read(meminfo), _read(psi)
    return NodeMemory(
        mem_available_mib=parse_meminfo_available(mi) if mi is not None else None,
        psi_some_avg10=parse_psi_some_avg10(ps) if ps is not None else None,
    )
