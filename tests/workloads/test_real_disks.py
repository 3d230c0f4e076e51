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
from tests.e2e.conftest import NODE_STORAGE
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
    names = getattr(drv, "test_names", None)  # the root driver fixture cleans these up
    if names is not None:
        names.append(f"team-a.{name}")
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


# --- storage migration between two netns nodes (the tiny guest; the Debian one is e2e) ----


def _node_driver(node: Any, guest: Any, state: Path) -> LibvirtHypervisor:
    return LibvirtHypervisor(
        values.DriverConfig(
            node_name=node.name,
            uri=node.uri,
            state_dir=str(state),
            params={
                "allowed_dirs": os.path.dirname(guest.kernel),
                "serial_log_dir": serial.DEFAULT_SERIAL_LOG_DIR,
                "storage_dir": NODE_STORAGE,
                "storage_dir_agent": node.host_path(NODE_STORAGE),
            },
        )
    )


def _remove_everywhere(spec: values.InstanceSpec, *drivers: LibvirtHypervisor) -> None:
    for drv in drivers:
        with contextlib.suppress(errors.HypervisorError):
            drv.stop_instance(None, force=True, name=spec.name)
            drv.cleanup_instance(spec.name)
        drv.release_instance_storage(spec)


def test_storage_migration_moves_the_overlay(
    libvirt_nodes: Any, guest_image: Any, image_server: ImageServer, tmp_path: Path
) -> None:
    src_node, dst_node = libvirt_nodes[0], libvirt_nodes[1]
    src = _node_driver(src_node, guest_image, tmp_path / "a")
    dst = _node_driver(dst_node, guest_image, tmp_path / "b")
    base = make_qcow2(image_server.root / "base.qcow2", "32M")
    image = values.Disk(
        source=values.DiskSource.IMAGE,
        name="root",
        image=values.ImageRef(image_server.url("base.qcow2"), sha256(base)),
    )
    spec = _spec(src, guest_image, "smig", image)
    folder = f"{NODE_STORAGE}/instances/team-a/{spec.name.removeprefix('team-a.')}"
    try:
        src.start_instance(spec)
        log = src_node.host_path(serial.serial_log_path(spec.name))
        serial.wait_for_marker(log, guest_image.boot_marker)
        info = src.migration_info(spec)
        dst.accept_instance(spec, info, dst_node.address)
        assert Path(dst_node.host_path(f"{folder}/root.qcow2")).is_file()  # ready to receive
        target = values.MigrationTarget(dst_node.name, dst_node.address, dst_node.uri)
        src.migrate_instance(spec, target, live=True)
        dst.finalize_migration_dst(spec, info, True)
        src.finalize_migration_source(spec, True, True)
        assert src.get_instance_info(spec.name) is None
        running = dst.get_instance_info(spec.name)
        assert running is not None and running.state is values.InstanceState.RUNNING
        assert not Path(src_node.host_path(folder)).exists()  # the disks went with the guest
        conn = libvirt.open(dst.uri)
        try:
            disk = domxml.parse(conn.lookupByName(spec.name).XMLDesc(0)).find("devices/disk")
        finally:
            conn.close()
        assert disk is not None
        assert disk.find("source").get("file") == f"{folder}/root.qcow2"  # type: ignore[union-attr]
        chain = disk.find("backingStore/source")
        assert chain is not None and chain.get("file") == dst.storage.to_qemu(
            dst.storage.cache.path_of(sha256(base))
        )
        serial.wait_for_more(
            dst_node.host_path(serial.serial_log_path(spec.name)),
            guest_image.alive_marker,
            after=serial.count_marker(
                dst_node.host_path(serial.serial_log_path(spec.name)), guest_image.alive_marker
            )
            + 1,
        )
    finally:
        _remove_everywhere(spec, src, dst)


def test_disk_declared_shared_is_not_copied(
    libvirt_nodes: Any, guest_image: Any, image_server: ImageServer, tmp_path: Path
) -> None:
    """A disk declared shared is left out of the storage copy. The test nodes' storage is
    not really shared, and libvirt itself then refuses ("without shared storage is unsafe")
    -- which proves the disk was not copied -- and the guest stays, whole, on the source."""
    src_node, dst_node = libvirt_nodes[0], libvirt_nodes[1]
    src = _node_driver(src_node, guest_image, tmp_path / "a")
    dst = _node_driver(dst_node, guest_image, tmp_path / "b")
    shared = values.Disk(
        source=values.DiskSource.BLANK, name="nfs", size_bytes=8 << 20, shared=True
    )
    scratch = values.Disk(source=values.DiskSource.BLANK, name="scratch", size_bytes=8 << 20)
    spec = _spec(src, guest_image, "shared", shared, scratch)
    folder = f"{NODE_STORAGE}/instances/team-a/{spec.name.removeprefix('team-a.')}"
    try:
        src.start_instance(spec)
        serial.wait_for_marker(
            src_node.host_path(serial.serial_log_path(spec.name)), guest_image.boot_marker
        )
        before = sorted(os.listdir(src_node.host_path(folder)))
        assert before == ["cidata.iso", "nfs.qcow2", "scratch.qcow2"]
        info = src.migration_info(spec)
        dst.accept_instance(spec, info, dst_node.address)
        target = values.MigrationTarget(dst_node.name, dst_node.address, dst_node.uri)
        with pytest.raises(errors.MigrationError, match="without shared storage is unsafe"):
            src.migrate_instance(spec, target, live=True)
        dst.finalize_migration_dst(spec, info, False)
        src.finalize_migration_source(spec, False, True)
        running = src.get_instance_info(spec.name)
        assert running is not None and running.state is values.InstanceState.RUNNING
        assert sorted(os.listdir(src_node.host_path(folder))) == before
        assert os.listdir(dst_node.host_path(folder)) == ["nfs.qcow2"]  # shared: never removed
    finally:
        _remove_everywhere(spec, src, dst)


def test_failed_migration_removes_what_the_target_prepared(
    libvirt_nodes: Any, guest_image: Any, image_server: ImageServer, tmp_path: Path
) -> None:
    dst_node = libvirt_nodes[1]
    dst = _node_driver(dst_node, guest_image, tmp_path / "b")
    base = make_qcow2(image_server.root / "base.qcow2", "32M")
    image = values.Disk(
        source=values.DiskSource.IMAGE,
        image=values.ImageRef(image_server.url("base.qcow2"), sha256(base)),
    )
    spec = _spec(dst, guest_image, "failmig", image)
    folder = Path(dst_node.host_path(f"{NODE_STORAGE}/instances/team-a"))
    dst.accept_instance(spec, "", dst_node.address)
    assert any(folder.rglob("*.qcow2"))
    dst.finalize_migration_dst(spec, "", False)
    assert not folder.exists() or not any(folder.rglob("*"))
