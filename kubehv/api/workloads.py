"""Workload parts of a VirtualInstance: disks and their sources, cloud-init, guest interfaces.

Why this module exists: the disk sources (hostPath ``path``, ``image``, ``blank``), the
cloud-init NoCloud data and the guest addresses in status are one feature (issue 12) with
their own rules; keeping them here keeps :mod:`kubehv.api.virtualinstance` readable. Like
every API model, these generate the CRD schema and the reference docs, and do no I/O.
"""

from __future__ import annotations

import enum
from typing import Annotated

import pydantic
from pydantic import Field

from kubehv.api import base, quantity


class DiskType(enum.StrEnum):
    FILE = "file"
    BLOCK = "block"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DeletePolicy(enum.StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class DiskBus(enum.StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"
    IDE = "ide"


class SecretKeyRef(base.StrictModel):
    """A key of a Secret in the instance's namespace."""

    name: str = Field(description="Secret name.", min_length=1)
    key: str = Field(description="Key within the Secret.", min_length=1)


class ImageSource(base.StrictModel):
    """A cloud image the node downloads once into its cache; the disk is a qcow2 overlay on it."""

    url: str = Field(
        description="HTTP(S) URL of the image (qcow2 or raw).",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
    )
    sha256: str = Field(
        description="SHA-256 of the image file (64 lowercase hex digits); a download whose "
        "bytes differ is never used.",
        pattern=r"^[0-9a-f]{64}$",
    )
    size: quantity.Quantity | None = Field(
        default=None,
        description="Size the instance's disk grows to (quantity, at least the image's own "
        "virtual size); the image's size when unset.",
    )


class BlankSource(base.StrictModel):
    """An empty qcow2 disk the node creates for the instance."""

    size: quantity.Quantity = Field(description="Size of the disk (quantity, e.g. 1Gi).")


DISK_RULES: list[pydantic.JsonValue] = [
    {
        "rule": "(has(self.path) ? 1 : 0) + (has(self.image) ? 1 : 0) + (has(self.blank) ? 1 : 0)"
        " == 1",
        "message": "a disk needs exactly one source: path (a node path), image or blank",
    }
]


class DiskSpec(base.StrictModel):
    """A disk attached to the instance, in the order given. Exactly one source: ``path``
    (hostPath: a file or block device already on the node), ``image`` or ``blank``."""

    model_config = pydantic.ConfigDict(json_schema_extra={"x-kubernetes-validations": DISK_RULES})

    name: str | None = Field(
        default=None,
        description="Name of the disk (a DNS label); names the node's file for image and "
        "blank disks (disk<index> when unset).",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    )
    path: str | None = Field(
        default=None,
        description="hostPath source: path of the image file or block device on the node "
        "(inside the node's allowed directories, never in its instance storage).",
        min_length=1,
    )
    image: ImageSource | None = Field(
        default=None, description="Image source: a copy-on-write overlay on a cloud image."
    )
    blank: BlankSource | None = Field(default=None, description="Blank source: an empty disk.")
    type: DiskType = Field(default=DiskType.FILE, description="file or block (hostPath only).")
    format: DiskFormat = Field(
        default=DiskFormat.RAW,
        description="Image format of a hostPath disk: raw or qcow2 (image and blank disks "
        "are always qcow2).",
    )
    bus: DiskBus = Field(
        default=DiskBus.VIRTIO, description="Bus the guest sees: virtio, sata, scsi or ide."
    )
    read_only: pydantic.StrictBool = Field(default=False, description="Attach the disk read-only.")
    boot_order: pydantic.StrictInt | None = Field(
        default=None, description="Boot from this disk in this order (1 first).", ge=1, le=64
    )
    delete_policy: DeletePolicy = Field(
        default=DeletePolicy.DELETE,
        description="Delete (default) or Retain the node's disk file (image and blank disks) "
        "when the instance is deleted. A retained disk is reused by a new instance of the same "
        "name in the same namespace.",
    )

    shared: pydantic.StrictBool = Field(
        default=False,
        description="The disk's file lies on storage every node sees at the same path (the "
        "node storage directory on a shared filesystem): a migration does not copy it and "
        "neither node removes it when the instance moves. hostPath disks are always treated "
        "as shared (the administrator's storage).",
    )

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> DiskSpec:
        if sum(x is not None for x in (self.path, self.image, self.blank)) != 1:
            raise ValueError("a disk needs exactly one source: path (a node path), image or blank")
        return self


CLOUD_INIT_RULES: list[pydantic.JsonValue] = [
    {
        "rule": "!(has(self.userData) && has(self.userDataSecretRef))",
        "message": "cloudInit: give userData or userDataSecretRef, not both",
    }
]


class CloudInitSpec(base.StrictModel):
    """cloud-init NoCloud seed, attached to the guest as a CD-ROM labelled cidata."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={"x-kubernetes-validations": CLOUD_INIT_RULES}
    )

    user_data: str | None = Field(
        default=None,
        description="cloud-init user data (e.g. #cloud-config YAML).",
        max_length=65536,
    )
    user_data_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the user data (never copied into status or Events).",
    )
    network_data: str | None = Field(
        default=None,
        description="cloud-init network configuration (version 1 or 2 YAML).",
        max_length=65536,
    )
    ssh_authorized_keys: list[Annotated[str, Field(max_length=16384)]] = Field(
        default_factory=list,
        description="SSH public keys for the guest's default user (merged into the user data).",
        max_length=64,
    )

    @pydantic.model_validator(mode="after")
    def _one_user_data(self) -> CloudInitSpec:
        if self.user_data is not None and self.user_data_secret_ref is not None:
            raise ValueError("cloudInit: give userData or userDataSecretRef, not both")
        return self


class InterfaceStatus(base.ApiModel):
    """A guest network interface and the addresses the hypervisor knows for it."""

    name: str = Field(description="Interface name (the guest's when its agent says so).")
    mac: str = Field(description="MAC address.")
    ip_addresses: list[str] | None = Field(
        default=None,
        description="IP addresses, from DHCP leases, qemu-guest-agent or ARP; absent until "
        "one is known.",
    )
