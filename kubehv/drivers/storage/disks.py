"""Per-instance disks on a node: made from the image cache or empty, confined per namespace.

Why this module exists: a VirtualInstance names an ``image`` or ``blank`` disk; the node
turns it into a qcow2 file that belongs to that instance alone, under
``<storage>/instances/<namespace>/<instance>/``. The instance's overlay survives stop and
start (the same file is opened again) and is removed on deletion unless its deletePolicy is
Retain. ``hostPath`` disks keep today's rule (inside the node's allowed directories) and may
never point into this storage -- another namespace's overlays, the image cache -- nor into the
agent's own state directory (VNC password files).

Two views of one folder: ``qemu_root`` is the path QEMU/libvirtd opens (it goes into the
domain XML and the overlay's backing-file field), ``local_root`` where this process reaches
the same folder (the same path on a normal node; a bind-mounted view in a test node).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Callable

from kubehv.drivers import parameters, values
from kubehv.drivers.storage import cloudinit, errors, imagecache, qcow2

CIDATA = "cidata.iso"
_DISK_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder + "/")


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What :meth:`NodeStorage.prepare` produced: the resolved spec and the files it made."""

    spec: values.InstanceSpec
    created: tuple[str, ...]

    def discard(self) -> None:
        """The instance did not start: remove the files this preparation made (no data yet)."""
        for path in self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class NodeStorage:
    def __init__(
        self,
        qemu_root: str,
        local_root: str | None = None,
        image_max_bytes: int = 20 << 30,
        forbidden: tuple[str, ...] = (),
        qemu_img: str = "qemu-img",
    ) -> None:
        self.qemu_root = os.path.normpath(qemu_root)
        self.local_root = os.path.normpath(local_root or qemu_root)
        self.cache = imagecache.ImageCache(os.path.join(self.local_root, "images"), image_max_bytes)
        self.forbidden = tuple(os.path.normpath(f) for f in forbidden if f)
        self.qemu_img = qemu_img

    # --- paths -----------------------------------------------------------------------------

    def to_qemu(self, local_path: str) -> str:
        return self.qemu_root + local_path[len(self.local_root) :]

    def instance_dir(self, spec: values.InstanceSpec, local: bool = True) -> str:
        namespace, name = split_name(spec)
        root = self.local_root if local else self.qemu_root
        return os.path.join(root, "instances", namespace, name)

    @staticmethod
    def disk_file(disk: values.Disk, index: int) -> str:
        return f"{disk.name or f'disk{index}'}.qcow2"

    # --- checks (no I/O) -------------------------------------------------------------------

    def check_spec(self, spec: values.InstanceSpec) -> None:
        """Refuse what can never work, before anything is downloaded or created."""
        problems: list[str] = []
        names: set[str] = set()
        namespace, name = split_name(spec)
        if not (_DISK_NAME.fullmatch(namespace) and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name)):
            problems.append(f"instance namespace {namespace!r} or name {name!r} is not path-safe")
        for index, disk in enumerate(spec.disks):
            if disk.source is values.DiskSource.HOST_PATH:
                problems += self._host_path_problems(disk.path)
                continue
            if disk.name and not _DISK_NAME.fullmatch(disk.name):
                problems.append(f"disk name {disk.name!r} must be a DNS label (a-z, 0-9, '-')")
            file = self.disk_file(disk, index)
            if file in names:
                problems.append(f"two disks of the instance would both be {file!r}; name them")
            names.add(file)
            if disk.source is values.DiskSource.IMAGE:
                if disk.image is None:
                    problems.append(f"disk {index} is an image disk without an image")
                else:
                    try:
                        imagecache.check_ref(disk.image)
                    except errors.StorageError as exc:
                        problems.append(exc.message)
            elif not disk.size_bytes or disk.size_bytes <= 0:
                problems.append(f"blank disk {disk.name or index} needs a size")
        if problems:
            raise errors.DiskPathForbidden("; ".join(problems))

    def _host_path_problems(self, path: str) -> list[str]:
        if not parameters.is_absolute_path(path):
            return [f"disk path {path!r} must be an absolute, normalised path"]
        real = os.path.realpath(path)
        for folder in (self.local_root, self.qemu_root, *self.forbidden):
            if _under(path, folder) or _under(real, folder):
                return [
                    f"disk path {path!r} lies inside storage this node manages for instances "
                    "or for itself; use an image or blank disk, or a path in the allowed "
                    "directories"
                ]
        return []

    # --- prepare / release -----------------------------------------------------------------

    def fetch_images(
        self,
        spec: values.InstanceSpec,
        progress: Callable[[values.ImageProgress], None] | None = None,
    ) -> None:
        """Every image the instance's disks name, in the cache (downloaded and verified)."""
        self.check_spec(spec)
        for disk in spec.disks:
            if disk.source is not values.DiskSource.IMAGE or disk.image is None:
                continue
            report = _reporter(disk.image.url, progress) if progress is not None else None
            self.cache.ensure(disk.image, report)

    def prepare(
        self, spec: values.InstanceSpec, progress: imagecache.Progress | None = None
    ) -> Prepared:
        """Download images, create missing overlays/blank disks and the cloud-init seed.

        Returns the spec with every disk resolved to the QEMU path. Files that exist already
        (the overlay of an earlier run) are reused as they are. On failure every file this
        call created is removed again, and the instance folder too if it became empty.
        """
        self.check_spec(spec)
        local_dir = self.instance_dir(spec)
        made_dir = not os.path.isdir(local_dir)
        created: list[str] = []
        disks: list[values.Disk] = []
        try:
            for index, disk in enumerate(spec.disks):
                if disk.source is values.DiskSource.HOST_PATH:
                    disks.append(disk)
                    continue
                os.makedirs(local_dir, mode=0o750, exist_ok=True)
                disks.append(self._disk(local_dir, disk, index, created, progress))
            if spec.cloud_init is not None:
                os.makedirs(local_dir, mode=0o750, exist_ok=True)
                iso = os.path.join(local_dir, CIDATA)
                cloudinit.write_iso(spec.cloud_init, iso)
                created.append(iso)
                disks.append(
                    values.Disk(
                        path=self.to_qemu(iso),
                        format=values.DiskFormat.RAW,
                        bus=values.DiskBus.SATA,
                        readonly=True,
                        device=values.DiskDevice.CDROM,
                        name="cidata",
                    )
                )
        except BaseException:
            for path in reversed(created):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if made_dir:
                self._prune(local_dir)
            raise
        return Prepared(dataclasses.replace(spec, disks=tuple(disks)), tuple(created))

    def _disk(
        self,
        local_dir: str,
        disk: values.Disk,
        index: int,
        created: list[str],
        progress: imagecache.Progress | None,
    ) -> values.Disk:
        local = os.path.join(local_dir, self.disk_file(disk, index))
        backing: tuple[values.BackingFile, ...] = ()
        base: imagecache.CachedImage | None = None
        if disk.source is values.DiskSource.IMAGE:
            assert disk.image is not None
            base = self.cache.ensure(disk.image, progress)
            backing = (values.BackingFile(self.to_qemu(base.path), base.format),)
            if disk.size_bytes is not None and disk.size_bytes < base.virtual_size_bytes:
                raise errors.ImageTooLarge(
                    f"the image {disk.image.url} is {base.virtual_size_bytes} bytes (virtual), "
                    f"larger than the disk size asked for ({disk.size_bytes} bytes)"
                )
        if not os.path.exists(local):
            size = disk.size_bytes or (base.virtual_size_bytes if base else 0)
            self._create(local, size, base)
            created.append(local)
        else:
            header = qcow2.read_header(local)
            if base is not None and header.backing_file != backing[0].path:
                raise errors.DiskCreateFailed(
                    f"the instance's existing disk {os.path.basename(local)} is not an overlay of "
                    f"{disk.image.url if disk.image else 'its image'} (kept from an earlier "
                    "instance of the same name?); delete it or name the disk differently"
                )
        return dataclasses.replace(
            disk,
            path=self.to_qemu(local),
            kind=values.DiskKind.FILE,
            format=values.DiskFormat.QCOW2,
            backing=backing,
        )

    def _create(self, local: str, size: int, base: imagecache.CachedImage | None) -> None:
        tmp = f"{local}.tmp"
        argv = [self.qemu_img, "create", "-q", "-f", "qcow2"]
        if base is not None:
            # -u: do not open the backing file here; its QEMU-side path may differ from ours.
            argv += ["-u", "-b", self.to_qemu(base.path), "-F", base.format.value]
        argv += [tmp, str(size)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise errors.DiskCreateFailed(f"cannot run qemu-img to create a disk: {exc}") from None
        if proc.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise errors.DiskCreateFailed(
                f"qemu-img could not create {os.path.basename(local)}: {proc.stderr.strip()}"
            )
        os.chmod(tmp, 0o600)
        os.rename(tmp, local)

    def release(self, spec: values.InstanceSpec) -> list[str]:
        """The instance is deleted: remove its seed and every disk whose policy is Delete.

        Returns the files removed. Retained disks stay in the instance folder (a new instance
        of the same name in the same namespace gets them back).
        """
        local_dir = self.instance_dir(spec)
        removed: list[str] = []
        victims = [CIDATA]
        for index, disk in enumerate(spec.disks):
            if disk.source is values.DiskSource.HOST_PATH:
                continue
            if disk.delete_policy is values.DeletePolicy.DELETE:
                victims.append(self.disk_file(disk, index))
        for file in victims:
            path = os.path.join(local_dir, file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        self._prune(local_dir)
        return removed

    def _prune(self, local_dir: str) -> None:
        """Remove the instance folder (and an empty namespace folder) when empty."""
        for folder in (local_dir, os.path.dirname(local_dir)):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def shared_paths(self, spec: values.InstanceSpec) -> set[str]:
        """QEMU paths of the instance's node-made disks declared ``shared``."""
        return {
            os.path.join(self.instance_dir(spec, local=False), self.disk_file(disk, index))
            for index, disk in enumerate(spec.disks)
            if disk.shared and disk.source is not values.DiskSource.HOST_PATH
        }

    def drop_local(self, spec: values.InstanceSpec) -> None:
        """The instance left this node (or never arrived): remove its node-local files.

        Disks declared ``shared`` are the same files on every node and stay; without any,
        the whole instance folder goes (a bare spec of a deleted instance names no disks).
        """
        keep = {
            self.disk_file(disk, index)
            for index, disk in enumerate(spec.disks)
            if disk.shared and disk.source is not values.DiskSource.HOST_PATH
        }
        if not keep:
            self.wipe_instance_dir(spec)
            return
        local_dir = self.instance_dir(spec)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(local_dir):
                if entry not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(local_dir, entry))
        self._prune(local_dir)

    def wipe_instance_dir(self, spec: values.InstanceSpec) -> None:
        """Remove the instance folder and everything in it (tests, failed migrations)."""
        shutil.rmtree(self.instance_dir(spec), ignore_errors=True)
        self._prune(self.instance_dir(spec))


def _reporter(url: str, progress: Callable[[values.ImageProgress], None]) -> imagecache.Progress:
    def report(done: int, total: int | None) -> None:
        progress(values.ImageProgress(url, done, total))

    return report


def split_name(spec: values.InstanceSpec) -> tuple[str, str]:
    """(namespace, object name) of an instance; from its ``<namespace>.<name>`` when unset."""
    if spec.namespace:
        prefix = f"{spec.namespace}."
        name = spec.name[len(prefix) :] if spec.name.startswith(prefix) else spec.name
        return spec.namespace, name
    namespace, _, name = spec.name.partition(".")
    return (namespace, name) if name else ("default", namespace)
