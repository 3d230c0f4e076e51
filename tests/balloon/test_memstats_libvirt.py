"""The kvm driver's guest memory statistics and free page reporting, on a real guest.

Why: ``get_instance_memory_stats`` is only as true as the balloon driver inside the guest;
a real TCG guest on the root libvirtd proves the stats period is set at start (the guest
reports on its own), the figures follow a balloon move, the memballoon carries
``freePageReporting`` when asked, and a stopped guest has no stats.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from kubehv.devenv import serial
from kubehv.drivers import values
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from tests.fixtures.operator import wait_for

pytestmark = pytest.mark.real_libvirt


@pytest.fixture
def guest(libvirtd: Any, guest_image: Any) -> Iterator[tuple[LibvirtHypervisor, Any]]:
    allowed = os.path.dirname(guest_image.kernel)
    drv = LibvirtHypervisor(
        values.DriverConfig(node_name="memstats", params={"allowed_dirs": allowed})
    )
    spec = values.InstanceSpec(
        name=f"memstats-{os.getpid()}-{uuid.uuid4().hex[:4]}",
        uid=str(uuid.uuid4()),
        memory_min_mib=96,
        memory_max_mib=192,
        boot=values.KernelBoot(guest_image.kernel, guest_image.initrd, guest_image.cmdline),
        params={"balloon_stats_period_s": 1, "accelerator": "tcg"},
        free_page_reporting=True,
    )
    try:
        yield drv, spec
    finally:
        drv.stop_instance(None, force=True, name=spec.name)
        drv.cleanup_instance(spec.name)
        log = serial.serial_log_path(spec.name)
        if os.path.exists(log):
            os.unlink(log)


def test_stats_follow_the_balloon_and_free_page_reporting_is_on(
    guest: tuple[LibvirtHypervisor, Any],
) -> None:
    drv, spec = guest
    drv.start_instance(spec)
    serial.wait_for_marker(serial.serial_log_path(spec.name), serial.BOOT_MARKER, timeout=180)

    def reported() -> values.MemoryStats | None:
        stats = drv.get_instance_memory_stats(spec.name)
        return stats if stats is not None and stats.reported else None

    first = wait_for(reported, 120, "the guest's first balloon report", 0.5)
    assert first.actual_mib == spec.memory_max_mib
    assert first.used_mib is not None and 0 < first.used_mib < spec.memory_max_mib
    assert first.last_update_s is not None

    conn = libvirt.open(drv.uri)
    try:
        xml = conn.lookupByName(spec.name).XMLDesc(0)
    finally:
        conn.close()
    assert "freePageReporting='on'" in xml, xml
    assert "<stats period='1'/>" in xml, xml

    drv.balloon_instance_memory(spec, 128)

    def shrunk() -> values.MemoryStats | None:
        stats = reported()
        if stats is None or stats.actual_mib != 128 or stats.usable_mib is None:
            return None
        return stats if stats.usable_mib < (first.usable_mib or 0) else None

    after = wait_for(shrunk, 120, "stats after ballooning to 128 MiB", 0.5)
    assert after.used_mib is not None and after.used_mib <= 128

    drv.stop_instance(spec, force=True)
    assert drv.get_instance_memory_stats(spec.name) is None
