"""Node-side storage for instances: the image cache, per-instance disks and cloud-init seeds.

Why this package exists: turning a manifest's ``image``/``blank`` disk and ``cloudInit`` into
files QEMU can open is the node's hypervisor-side job, shared by every driver that runs
QEMU-style disk files. Nothing here knows Kubernetes; the driver calls
:class:`kubehv.drivers.storage.disks.NodeStorage`.
"""
