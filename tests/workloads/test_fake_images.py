"""The fake driver's image and blank disks behave like the libvirt driver's.

Why: operator tests run on the fake driver; if the fake started an instance whose image does
not verify (or never downloaded it), a test of ImagesReady, of a checksum refusal or of disk
cleanup would pass on the fake and fail on a real node. The fake runs the libvirt driver's
storage code on a real loopback HTTP server; these tests check what that gives through the
driver contract: the download with its progress, the refusals before anything runs, the
overlay's lifetime over stop/start/release, and the move of node-local files in a migration.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from kubehv.drivers import errors, fake, values
from kubehv.drivers.storage import errors as storage_errors
from tests.fixtures.operator import OperatorCluster, condition
from tests.workloads.conftest import ImageServer, make_qcow2, sha256


def _node(path: Path, name: str, **params: values.ParamValue) -> fake.FakeHypervisor:
    config = values.DriverConfig(node_name=name, state_dir=str(path), params=params)
    return fake.FakeHypervisor(config)


def _spec(*disk_list: values.Disk) -> values.InstanceSpec:
    name = f"vm-{uuid.uuid4().hex[:6]}"
    return values.InstanceSpec(
        name=f"team-a.{name}",
        uid=str(uuid.uuid4()),
        memory_min_mib=64,
        memory_max_mib=128,
        disks=disk_list,
        namespace="team-a",
    )


def _image_disk(server: ImageServer, path: Path, checksum: str | None = None) -> values.Disk:
    ref = values.ImageRef(server.url(path.name), checksum or sha256(path))
    return values.Disk(source=values.DiskSource.IMAGE, image=ref, name="root")


def _overlay(node_dir: Path, spec: values.InstanceSpec) -> Path:
    return node_dir / "storage/instances/team-a" / spec.name.split(".", 1)[1] / "root.qcow2"


def test_start_downloads_verifies_and_keeps_the_overlay(
    tmp_path: Path, image_server: ImageServer
) -> None:
    image = make_qcow2(image_server.root / "debian.qcow2", "32M")
    node = _node(tmp_path / "a", "a")
    spec = _spec(_image_disk(image_server, image))
    seen: list[values.ImageProgress] = []
    node.fetch_instance_images(spec, seen.append)
    size = image.stat().st_size
    assert seen[-1] == values.ImageProgress(image_server.url(image.name), size, size)

    info = node.start_instance(spec)
    assert info.state is values.InstanceState.RUNNING
    overlay = _overlay(tmp_path / "a", spec)
    assert overlay.is_file()
    node.stop_instance(spec, force=True)
    node.start_instance(spec)  # the overlay of the last run is reused, the image cached
    assert image_server.requests == [f"/{image.name}"]
    node.stop_instance(spec, force=True)
    assert node.release_instance_storage(spec) == [str(overlay)]
    assert not overlay.exists()


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("checksum", storage_errors.ImageChecksumMismatch),
        ("too-large", storage_errors.ImageTooLarge),
        ("unreachable", storage_errors.ImageDownloadFailed),
    ],
)
def test_a_bad_image_starts_nothing_and_leaves_no_file(
    tmp_path: Path, image_server: ImageServer, case: str, error: type[errors.HypervisorError]
) -> None:
    image = image_server.root / "big.raw"
    image.write_bytes(b"\0" * (3 << 20))  # 3 MiB raw image
    node = _node(tmp_path / "a", "a", image_max_size_mib=1 if case == "too-large" else 64)
    disk = _image_disk(image_server, image, "f" * 64 if case == "checksum" else None)
    if case == "unreachable":
        ref = values.ImageRef(image_server.url("missing.raw"), sha256(image))
        disk = values.Disk(source=values.DiskSource.IMAGE, image=ref, name="root")
    spec = _spec(disk)
    with pytest.raises(error) as caught:
        node.start_instance(spec)
    assert caught.value.message  # a reason a person can read, as on libvirt
    assert node.get_instance_info(spec.name) is None
    assert not _overlay(tmp_path / "a", spec).exists()
    assert not list((tmp_path / "a/storage/images").glob("*.img"))


def _accepted(
    tmp_path: Path, server: ImageServer
) -> tuple[fake.FakeHypervisor, fake.FakeHypervisor, values.InstanceSpec, str]:
    """An image-disk instance running on node a, accepted by node b: (a, b, spec, info)."""
    image = make_qcow2(server.root / "debian.qcow2", "32M")
    source, target = _node(tmp_path / "a", "a"), _node(tmp_path / "b", "b")
    spec = _spec(_image_disk(server, image))
    source.start_instance(spec)
    info = source.migration_info(spec)
    target.accept_instance(spec, info, "b")
    return source, target, spec, info


def test_migration_makes_the_disk_on_the_target_and_drops_it_on_the_source(
    tmp_path: Path, image_server: ImageServer
) -> None:
    source, target, spec, info = _accepted(tmp_path, image_server)
    assert _overlay(tmp_path / "b", spec).is_file()  # made before the copy, as libvirt does
    source.migrate_instance(spec, target.migration_target(), live=True)
    status = source.get_migration_status(spec)
    while status.state is values.MigrationState.ACTIVE:
        status = source.get_migration_status(spec)
    assert status.state is values.MigrationState.COMPLETED
    target.finalize_migration_dst(spec, info, success=True)
    source.finalize_migration_source(spec, success=True, live=True)
    assert not _overlay(tmp_path / "a", spec).exists()
    assert _overlay(tmp_path / "b", spec).is_file()
    assert target.get_instance_info(spec.name) is not None


def test_a_migration_undone_on_the_target_drops_what_accept_made(
    tmp_path: Path, image_server: ImageServer
) -> None:
    _, target, spec, info = _accepted(tmp_path, image_server)
    target.finalize_migration_dst(spec, info, success=False)
    assert not _overlay(tmp_path / "b", spec).exists()
    assert _overlay(tmp_path / "a", spec).is_file()  # the source copy keeps its disk


@pytest.mark.apiserver
def test_the_agent_shows_image_problems_on_the_fake_as_on_libvirt(
    operator_cluster: OperatorCluster, namespace: str, image_server: ImageServer
) -> None:
    """Through the agent: ImagesReady Cached and a Running instance for a good image; the same
    ImageChecksumMismatch refusal the kvm e2e sees for a bad checksum, with no record."""
    c = operator_cluster
    image = make_qcow2(image_server.root / "debian.qcow2", "32M")
    url = image_server.url(image.name)
    c.create_vi(namespace, "good", disks=[{"image": {"url": url, "sha256": sha256(image)}}])
    c.create_vi(namespace, "badsum", disks=[{"image": {"url": url, "sha256": "0" * 64}}])

    def images(vi: dict[str, Any]) -> dict[str, Any]:
        return condition(vi, "ImagesReady")

    good = c.wait_vi(namespace, "good", lambda vi: vi["status"].get("phase") == "Running")
    assert images(good)["status"] == "True" and images(good)["reason"] == "Cached"
    node = good["status"]["nodeName"]
    assert c.fake_instances(node, namespace).get("good") == "running"
    overlay = c.agents[node].state_dir / f"storage/instances/{namespace}/good/disk0.qcow2"
    assert overlay.is_file()

    bad = c.wait_vi(
        namespace, "badsum", lambda vi: images(vi).get("reason") == "ImageChecksumMismatch"
    )
    assert images(bad)["status"] == "False"
    assert "not the 0000" in images(bad)["message"] and "was not used" in images(bad)["message"]
    assert condition(bad, "Ready")["status"] == "False"
    assert "badsum" not in c.fake_instances(bad["status"]["nodeName"], namespace)
