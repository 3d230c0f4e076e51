"""Guest memory statistics from libvirt's virtio balloon, and the balloon's XML options.

Why this module exists: the balloon policy needs, per guest, what the balloon driver inside
it reports (libvirt ``virDomainMemoryStats``: KiB figures plus fault and swap counters), as
one typed :class:`~kubehv.drivers.values.MemoryStats`. The stats period is in the domain
XML (``<memballoon><stats period=.../>``) and set again on the live domain after start
(``setMemoryStatsPeriod``), because a guest that never gets a period never reports. Free
page reporting (``<memballoon freePageReporting='on'>``) lets a guest hand freed pages back
to the host without a balloon move; it is per instance and off by default.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping

import libvirt

from kubehv.drivers import values

_KIB_FIELDS = {
    "unused": "unused_mib",
    "available": "available_mib",
    "usable": "usable_mib",
    "disk_caches": "disk_caches_mib",
    "swap_in": "swap_in_mib",
    "swap_out": "swap_out_mib",
    "rss": "rss_mib",
}
_COUNT_FIELDS = {
    "major_fault": "major_faults",
    "minor_fault": "minor_faults",
    "last_update": "last_update_s",
}


def from_libvirt(raw: Mapping[str, int], fallback_actual_kib: int = 0) -> values.MemoryStats:
    """Translate ``virDomain.memoryStats()`` (KiB and counters) into MiB and counters."""
    actual = int(raw.get("actual", fallback_actual_kib)) // 1024
    kwargs: dict[str, int | None] = {}
    for key, field in _KIB_FIELDS.items():
        kwargs[field] = int(raw[key]) // 1024 if key in raw else None
    for key, field in _COUNT_FIELDS.items():
        kwargs[field] = int(raw[key]) if key in raw else None
    return values.MemoryStats(actual_mib=actual, **kwargs)


def read(dom: libvirt.virDomain) -> values.MemoryStats:
    """The running domain's balloon statistics."""
    raw = dom.memoryStats()
    fallback = 0 if "actual" in raw else int(dom.info()[2])
    return from_libvirt(raw, fallback)


def start_period(dom: libvirt.virDomain, period_s: int) -> None:
    """Make sure a just-started guest reports every ``period_s`` (0 leaves it off).

    Best effort: drivers without balloon statistics (libvirt's test:///) refuse it, and a
    guest without a balloon driver simply never reports.
    """
    if period_s <= 0:
        return
    with contextlib.suppress(libvirt.libvirtError):
        dom.setMemoryStatsPeriod(period_s, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def memballoon(devices: ET.Element, period_s: int, free_page_reporting: bool) -> ET.Element:
    """The ``<memballoon>`` element: virtio, a stats period, free page reporting if asked."""
    attrs = {"model": "virtio"}
    if free_page_reporting:
        attrs["freePageReporting"] = "on"
    balloon = ET.SubElement(devices, "memballoon", attrs)
    if period_s > 0:
        ET.SubElement(balloon, "stats", period=str(period_s))
    return balloon
