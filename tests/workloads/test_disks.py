"""Per-instance disks and the cloud-init seed, made on disk with the real qemu-img and pycdlib.

Why: what users rely on -- an instance's overlay is its own, survives a stop and start,
goes away on delete unless retained, and no manifest can name another namespace's disk or the
agent's files -- is checked on the files themselves (qemu-img info, the ISO's contents).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pycdlib
import pytest

from kubehv.drivers import values
from kubehv.drivers.storage import cloudinit, disks, errors
from tests.workloads.conftest import ImageServer, make_qcow2, qemu_img, sha256

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKubehvTestKeyOnly test@kubehv"


def _storage(tmp_path: Path, state: Path | None = None) -> disks.NodeStorage:
    forbidden = (str(state),) if state else ()
    return disks.NodeStorage(str(tmp_path / "storage"), forbidden=forbidden)


def _spec(namespace: str, name: str, *disk_list: values.Disk, **kw: object) -> values.InstanceSpec:
    return values.InstanceSpec(
        name=f"{namespace}.{name}",
        uid="uid-1",
        memory_min_mib=64,
        memory_max_mib=128,
        disks=disk_list,
        namespace=namespace,
        **kw,  # type: ignore[arg-type]
    )


def _image_disk(server: ImageServer, path: Path, **kw: object) -> values.Disk:
    return values.Disk(
        source=values.DiskSource.IMAGE,
        image=values.ImageRef(server.url(path.name), sha256(path)),
        **kw,  # type: ignore[arg-type]
    )


def _info(path: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(qemu_img("info", "--output=json", "-U", path))
    return info


def test_image_overlay_pins_its_base(tmp_path: Path, image_server: ImageServer) -> None:
    base = make_qcow2(image_server.root / "debian.qcow2", "32M")
    storage = _storage(tmp_path)
    disk = _image_disk(image_server, base, name="root", size_bytes=64 << 20)
    prepared = storage.prepare(_spec("team-a", "web", disk))
    (out,) = prepared.spec.disks
    assert out.path == str(tmp_path / "storage/instances/team-a/web/root.qcow2")
    assert out.format is values.DiskFormat.QCOW2
    cached = storage.cache.path_of(sha256(base))
    assert out.backing == (values.BackingFile(cached, values.DiskFormat.QCOW2),)
    info = _info(out.path)
    assert info["virtual-size"] == 64 << 20
    assert info["backing-filename"] == cached
    assert info["backing-filename-format"] == "qcow2"
    assert prepared.created == (out.path,)


def test_fetch_images_reports_progress_once(tmp_path: Path, image_server: ImageServer) -> None:
    base = make_qcow2(image_server.root / "debian.qcow2", "32M")
    storage = _storage(tmp_path)
    spec = _spec("team-a", "web", _image_disk(image_server, base, name="root"))
    seen: list[values.ImageProgress] = []
    storage.fetch_images(spec, seen.append)
    size = base.stat().st_size
    assert seen and seen[-1] == values.ImageProgress(image_server.url(base.name), size, size)
    assert os.path.isfile(storage.cache.path_of(sha256(base)))
    assert not (tmp_path / "storage/instances/team-a").exists()  # images only, no overlay
    count = len(seen)
    storage.fetch_images(spec, seen.append)  # cached: no second download, no progress
    assert len(seen) == count and image_server.requests == [f"/{base.name}"]


def test_overlay_survives_restart_and_delete_removes_it(
    tmp_path: Path, image_server: ImageServer
) -> None:
    base = make_qcow2(image_server.root / "debian.qcow2", "32M")
    storage = _storage(tmp_path)
    spec = _spec("team-a", "web", _image_disk(image_server, base))
    first = storage.prepare(spec).spec.disks[0].path
    with open(first, "r+b") as fh:  # a guest's write lands in the overlay
        fh.seek(0, 2)
        fh.write(b"guest data")
    inode, size = os.stat(first).st_ino, os.stat(first).st_size
    again = storage.prepare(spec)  # stop, then start: the same file, untouched
    assert again.spec.disks[0].path == first and again.created == ()
    assert (os.stat(first).st_ino, os.stat(first).st_size) == (inode, size)
    assert storage.release(spec) == [first]
    assert not (tmp_path / "storage/instances/team-a").exists()


def test_leaving_a_node_keeps_shared_disks(tmp_path: Path) -> None:
    """After a migration the node drops the instance's own files, never a shared disk."""
    storage = _storage(tmp_path)
    shared = values.Disk(
        source=values.DiskSource.BLANK, name="nfs", size_bytes=8 << 20, shared=True
    )
    local = values.Disk(source=values.DiskSource.BLANK, name="scratch", size_bytes=8 << 20)
    spec = _spec("team-a", "db", shared, local, cloud_init=values.CloudInit("i-1", "db"))
    prepared = storage.prepare(spec)
    folder = Path(storage.instance_dir(spec))
    assert sorted(p.name for p in folder.iterdir()) == ["cidata.iso", "nfs.qcow2", "scratch.qcow2"]
    assert storage.shared_paths(spec) == {prepared.spec.disks[0].path}
    storage.drop_local(spec)
    assert sorted(p.name for p in folder.iterdir()) == ["nfs.qcow2"]
    storage.drop_local(dataclasses.replace(spec, disks=(local,)))  # nothing shared: all goes
    assert not folder.exists()


def test_retain_keeps_the_disk(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    keep = values.Disk(
        source=values.DiskSource.BLANK,
        name="data",
        size_bytes=8 << 20,
        delete_policy=values.DeletePolicy.RETAIN,
    )
    scratch = values.Disk(source=values.DiskSource.BLANK, name="scratch", size_bytes=8 << 20)
    spec = _spec("team-a", "db", keep, scratch)
    prepared = storage.prepare(spec)
    assert [_info(d.path)["virtual-size"] for d in prepared.spec.disks] == [8 << 20, 8 << 20]
    removed = storage.release(spec)
    assert [os.path.basename(p) for p in removed] == ["scratch.qcow2"]
    assert os.path.exists(prepared.spec.disks[0].path)


def test_failed_prepare_leaves_nothing(tmp_path: Path, image_server: ImageServer) -> None:
    base = make_qcow2(image_server.root / "debian.qcow2", "32M")
    storage = _storage(tmp_path)
    blank = values.Disk(source=values.DiskSource.BLANK, name="data", size_bytes=8 << 20)
    wrong = values.Disk(
        source=values.DiskSource.IMAGE,
        name="root",
        image=values.ImageRef(image_server.url(base.name), "f" * 64),
    )
    with pytest.raises(errors.ImageChecksumMismatch):
        storage.prepare(_spec("team-a", "web", blank, wrong))
    assert not (tmp_path / "storage/instances").exists() or not any(
        (tmp_path / "storage/instances").rglob("*")
    )


def test_disk_smaller_than_image_is_refused(tmp_path: Path, image_server: ImageServer) -> None:
    base = make_qcow2(image_server.root / "debian.qcow2", "32M")
    storage = _storage(tmp_path)
    disk = _image_disk(image_server, base, size_bytes=16 << 20)
    with pytest.raises(errors.ImageTooLarge, match="larger than the disk size"):
        storage.prepare(_spec("team-a", "web", disk))
    assert not any((tmp_path / "storage/instances").rglob("*.qcow2"))


def test_host_paths_cannot_reach_node_storage_or_agent_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "vnc").mkdir(parents=True)
    storage = _storage(tmp_path, state)
    victim = _spec("team-b", "db", values.Disk(source=values.DiskSource.BLANK, size_bytes=1 << 20))
    other = storage.prepare(victim).spec.disks[0].path
    link = tmp_path / "innocent.img"
    link.symlink_to(other)
    for path in (other, str(state / "vnc/team-b.db.password"), str(link)):
        spec = _spec("team-a", "thief", values.Disk(path=path))
        with pytest.raises(errors.DiskPathForbidden, match="inside storage this node manages"):
            storage.prepare(spec)
    assert os.path.exists(other)


def test_cloud_init_seed(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    seed = values.CloudInit(
        instance_id="uid-1",
        hostname="web",
        user_data="#cloud-config\npackages: [htop]\n",
        network_data="version: 2\nethernets: {eth0: {dhcp4: true}}\n",
        ssh_authorized_keys=(KEY,),
    )
    assert "packages" not in repr(seed)  # user data may be secret: never in a log line
    prepared = storage.prepare(_spec("team-a", "web", cloud_init=seed))
    (cdrom,) = prepared.spec.disks
    assert cdrom.device is values.DiskDevice.CDROM and cdrom.readonly
    assert os.stat(cdrom.path).st_mode & 0o777 == 0o600
    iso = pycdlib.PyCdlib()
    iso.open(cdrom.path)
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        contents = {}
        for name in ("meta-data", "user-data", "network-config"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            contents[name] = buf.getvalue().decode()
    finally:
        iso.close()
    assert json.loads(contents["meta-data"]) == {"instance-id": "uid-1", "local-hostname": "web"}
    assert contents["user-data"].startswith("#cloud-config\n")
    assert "htop" in contents["user-data"] and KEY in contents["user-data"]
    assert contents["network-config"].startswith("version: 2")
    storage.release(_spec("team-a", "web", cloud_init=seed))
    assert not os.path.exists(cdrom.path)


def test_user_data_forms() -> None:
    keys_only = cloudinit.user_data(values.CloudInit("i", "h", ssh_authorized_keys=(KEY,)))
    assert keys_only == f"#cloud-config\nssh_authorized_keys:\n- {KEY}\n"
    script = values.CloudInit("i", "h", "#!/bin/sh\necho hi\n", ssh_authorized_keys=(KEY,))
    multipart = cloudinit.user_data(script)
    assert "text/cloud-config" in multipart and "text/x-shellscript" in multipart
    plain = values.CloudInit("i", "h", user_data="#!/bin/sh\necho hi\n")
    assert cloudinit.user_data(plain) == "#!/bin/sh\necho hi\n"
    with pytest.raises(errors.CloudInitError, match="not valid YAML"):
        cloudinit.user_data(values.CloudInit("i", "h", "#cloud-config\n: [", None, (KEY,)))


def test_namespace_and_disk_names_are_path_safe(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    blank = values.Disk(source=values.DiskSource.BLANK, size_bytes=1 << 20)
    with pytest.raises(errors.DiskPathForbidden, match="DNS label"):
        storage.prepare(_spec("team-a", "web", dataclasses.replace(blank, name="../../etc")))
    bad = dataclasses.replace(_spec("team-a", "web", blank), namespace="..")
    with pytest.raises(errors.DiskPathForbidden, match="namespace"):
        storage.prepare(bad)
