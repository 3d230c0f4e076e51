"""Image, blank and cloud-init disks on the real libvirtd with a real QEMU (TCG) guest.

Why: only libvirt itself shows that the domain XML's pinned backing chain is accepted and
used (the live XML reports the chain libvirt opened), that the overlay QEMU writes is the
instance's own file and survives a stop and start, and that a failing image start leaves no
domain and no file. The image is served from a loopback HTTP server as in production.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kubehv.devenv import serial
from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import domxml
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from tests.workloads.conftest import ImageServer, make_qcow2, sha256

pytestmark = pytest.mark.real_libvirt


@pytest.fixture
def storage_dir() -> Iterator[Path]:
    # Not under pytest's 0700 tmp: a path any QEMU user could traverse, removed afterwards.
    path = Path(f"/var/tmp/kubehv-workloads-{os.getpid()}")
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def driver(libvirtd: Any, guest_image: Any, storage_dir: Path) -> Iterator[LibvirtHypervisor]:
    drv = LibvirtHypervisor(
        values.DriverConfig(
            node_name="root",
            uri=libvirtd.uri,
            state_dir=str(storage_dir / "state"),
            params={
                "allowed_dirs": os.path.dirname(guest_image.kernel),
                "storage_dir": str(storage_dir / "storage"),
            },
        )
    )
    names: list[str] = []
    drv.test_names = names  # type: ignore[attr-defined]
    yield drv
    for name in names:
        with contextlib.suppress(errors.HypervisorError):
            drv.stop_instance(None, force=True, name=name)
            drv.cleanup_instance(name)
        with contextlib.suppress(OSError):
            os.unlink(serial.serial_log_path(name))


def _spec(
    drv: LibvirtHypervisor, guest: Any, label: str, *disks: values.Disk
) -> values.InstanceSpec:
    name = f"wl{os.getpid()}-{label}"
    drv.test_names.append(f"team-a.{name}")  # type: ignore[attr-defined]
    return values.InstanceSpec(
        name=f"team-a.{name}",
        uid=f"uid-{name}",
        memory_min_mib=96,
        memory_max_mib=128,
        boot=values.KernelBoot(kernel=guest.kernel, initrd=guest.initrd, cmdline=guest.cmdline),
        disks=disks,
        namespace="team-a",
        cloud_init=values.CloudInit(
            f"uid-{name}", name, ssh_authorized_keys=("ssh-ed25519 AAAA k",)
        ),
        params={"accelerator": "tcg"},
    )


def _live_disks(drv: LibvirtHypervisor, name: str) -> list[Any]:
    conn = libvirt.open(drv.uri)
    try:
        return domxml.parse(conn.lookupByName(name).XMLDesc(0)).findall("devices/disk")
    finally:
        conn.close()


def test_image_overlay_boots_and_survives_restart(
    driver: LibvirtHypervisor, guest_image: Any, image_server: ImageServer, storage_dir: Path
) -> None:
    base = make_qcow2(image_server.root / "base.qcow2", "32M")
    image = values.Disk(
        source=values.DiskSource.IMAGE,
        name="root",
        image=values.ImageRef(image_server.url("base.qcow2"), sha256(base)),
        size_bytes=64 << 20,
    )
    blank = values.Disk(source=values.DiskSource.BLANK, name="data", size_bytes=16 << 20)
    spec = _spec(driver, guest_image, "overlay", image, blank)
    driver.start_instance(spec)
    serial.wait_for_marker(serial.serial_log_path(spec.name), guest_image.boot_marker)
    overlay_el, blank_el, cdrom_el = _live_disks(driver, spec.name)
    folder = storage_dir / "storage/instances/team-a" / spec.name.removeprefix("team-a.")
    overlay = folder / "root.qcow2"
    assert overlay_el.find("source").get("file") == str(overlay)
    chain = overlay_el.find("backingStore/source")
    assert chain is not None and chain.get("file") == driver.storage.cache.path_of(sha256(base))
    assert blank_el.find("source").get("file") == str(folder / "data.qcow2")
    assert cdrom_el.get("device") == "cdrom"
    assert cdrom_el.find("source").get("file") == str(folder / "cidata.iso")
    inode = overlay.stat().st_ino

    driver.stop_instance(spec, force=True)
    driver.cleanup_instance(spec.name)
    driver.start_instance(spec)  # start again: the same overlay file, not a new one
    assert overlay.stat().st_ino == inode
    driver.stop_instance(spec, force=True)
    driver.cleanup_instance(spec.name)

    removed = driver.release_instance_storage(spec)
    assert sorted(os.path.basename(p) for p in removed) == [
        "cidata.iso",
        "data.qcow2",
        "root.qcow2",
    ]
    assert not folder.exists()
    assert image_server.requests == ["/base.qcow2"]  # the restart reused the cache


def test_wrong_checksum_starts_nothing_and_leaves_nothing(
    driver: LibvirtHypervisor, guest_image: Any, image_server: ImageServer, storage_dir: Path
) -> None:
    make_qcow2(image_server.root / "base.qcow2", "32M")
    image = values.Disk(
        source=values.DiskSource.IMAGE,
        image=values.ImageRef(image_server.url("base.qcow2"), "0" * 64),
    )
    spec = _spec(driver, guest_image, "badsum", image)
    with pytest.raises(errors.HypervisorError) as exc:
        driver.start_instance(spec)
    assert exc.value.reason == "ImageChecksumMismatch"
    assert driver.get_instance_info(spec.name) is None
    assert not any((storage_dir / "storage").rglob("*.qcow2"))
    assert not any((storage_dir / "storage").rglob("*.iso"))
    assert not any((storage_dir / "storage/images").glob("*.img"))


def test_uefi_firmware_starts(driver: LibvirtHypervisor, guest_image: Any) -> None:
    spec = dataclasses.replace(_spec(driver, guest_image, "uefi"), firmware=values.Firmware.UEFI)
    driver.start_instance(spec)
    conn = libvirt.open(driver.uri)
    try:
        root = domxml.parse(conn.lookupByName(spec.name).XMLDesc(0))
    finally:
        conn.close()
    loader = root.find("os/loader")
    assert loader is not None and loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    info = driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING
