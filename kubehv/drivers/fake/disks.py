"""The fake node's disks: the same image cache and overlays as the libvirt driver's.

Why this module exists: a fake that ignored image and blank disks would start an instance
whose image never verifies, and every operator test of ``ImagesReady``, of a checksum
refusal or of disk cleanup would pass on the fake and fail on libvirt. The fake node keeps
its storage under its state directory and runs the libvirt driver's storage code
(:mod:`kubehv.drivers.storage`): real HTTP downloads, sha256, the size limit, qcow2 overlays
made with qemu-img, release on delete, node-local files dropped when the instance migrates
away. Only the guest that would read them is missing. Instances with only hostPath disks (the
operator's bulk tests) touch none of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kubehv.drivers import values
from kubehv.drivers.storage import disks

STORAGE_DIR = "storage"
"""Below the fake node's state directory: ``images/`` (the cache) and ``instances/``."""


def node_storage(state_dir: str, image_max_mib: int) -> disks.NodeStorage:
    return disks.NodeStorage(
        qemu_root=os.path.join(state_dir, STORAGE_DIR), image_max_bytes=image_max_mib << 20
    )


def node_made(spec: values.InstanceSpec) -> bool:
    """The instance has disks the node makes (image overlays, blank disks)."""
    return any(d.source is not values.DiskSource.HOST_PATH for d in spec.disks)


def fetch(
    storage: disks.NodeStorage,
    spec: values.InstanceSpec,
    progress: Callable[[values.ImageProgress], None] | None,
) -> None:
    if node_made(spec):
        storage.fetch_images(spec, progress)


def prepare(storage: disks.NodeStorage, spec: values.InstanceSpec) -> disks.Prepared | None:
    """Download, verify and create what the instance's node-made disks need (None: none)."""
    return storage.prepare(spec) if node_made(spec) else None
