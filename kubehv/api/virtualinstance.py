"""The VirtualInstance resource: one virtual machine, as the user wants it and as it is.

Why this module exists: this model is the single source of the VirtualInstance API. The CRD
schema (and so ``kubectl explain``), the server-side defaults and the reference docs are
generated from it, and the agent and controller parse objects with it. Field descriptions are
user documentation; status descriptions name the one component that writes each field.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar

import pydantic
from pydantic import Field

from kubehv.api import base, constants, quantity
from kubehv.api import conditions as cond
from kubehv.api import metadata as meta


class RunState(enum.StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    PAUSED = "Paused"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    MIGRATING = "Migrating"
    EVICTED = "Evicted"  # stopped by a node drain (evictionPolicy Stop), waiting to be re-placed
    FAILED = "Failed"
    UNKNOWN = "Unknown"


# Phases the controller writes; the node agent writes all the others.
CONTROLLER_PHASES = frozenset({Phase.PENDING, Phase.SCHEDULED, Phase.UNKNOWN})


class EvictionPolicy(enum.StrEnum):
    LIVE_MIGRATE = "LiveMigrate"
    MIGRATE = "Migrate"
    STOP = "Stop"


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


class NicType(enum.StrEnum):
    USER = "user"
    NETWORK = "network"
    BRIDGE = "bridge"


class NicModel(enum.StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


MEMORY_RULES: list[pydantic.JsonValue] = [
    {
        "rule": "quantity(string(self.min)).isGreaterThan(quantity('0'))",
        "message": "memory.min must be greater than zero",
        "fieldPath": ".min",
    },
    {
        "rule": "quantity(string(self.min)).compareTo(quantity(string(self.max))) <= 0",
        "message": "memory.min must be less than or equal to memory.max",
    },
]


class MemorySpec(base.StrictModel):
    """Guest memory bounds. The instance starts with max; ballooning may lower it to min."""

    model_config = pydantic.ConfigDict(json_schema_extra={"x-kubernetes-validations": MEMORY_RULES})

    min: quantity.Quantity = Field(
        description="Lowest memory the guest may be ballooned down to (quantity, e.g. 64Mi)."
    )
    max: quantity.Quantity = Field(
        description="Memory the guest boots with and never exceeds (quantity, e.g. 128Mi)."
    )

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> MemorySpec:
        low, high = quantity.parse_decimal(self.min), quantity.parse_decimal(self.max)
        if low <= 0:
            raise ValueError("memory.min must be greater than zero")
        if low > high:
            raise ValueError("memory.min must be less than or equal to memory.max")
        return self

    @property
    def min_mib(self) -> int:
        return quantity.to_mib(self.min)

    @property
    def max_mib(self) -> int:
        return quantity.to_mib(self.max)


class BootSpec(base.StrictModel):
    """Direct kernel boot: paths on the node that runs the instance."""

    kernel: str | None = Field(
        default=None, description="Absolute path of the kernel image on the node.", min_length=1
    )
    initrd: str | None = Field(
        default=None, description="Absolute path of the initial ramdisk on the node."
    )
    cmdline: str | None = Field(default=None, description="Kernel command line.")


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


class NicSpec(base.StrictModel):
    """A network interface of the instance, in the order given."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type != 'bridge' || has(self.source)",
                    "message": "nics: source is required for bridge interfaces",
                }
            ]
        }
    )

    type: NicType = Field(
        default=NicType.USER,
        description="user (user-mode NAT), network (a hypervisor network; the node's own NAT "
        "network with DHCP when source is unset) or bridge (a host bridge to the node's LAN).",
    )
    source: str | None = Field(
        default=None,
        description="Network or bridge name; required for bridge, the node's NAT network "
        "when unset for network.",
    )
    model: NicModel = Field(
        default=NicModel.VIRTIO, description="Device model: virtio, e1000 or rtl8139."
    )
    mac: str | None = Field(
        default=None,
        description="MAC address (aa:bb:cc:dd:ee:ff); generated by the hypervisor if unset.",
        pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$",
    )

    @pydantic.model_validator(mode="after")
    def _source(self) -> NicSpec:
        if self.type is NicType.BRIDGE and self.source is None:
            raise ValueError("nics: source is required for bridge interfaces")
        return self


class VncSpec(base.StrictModel):
    """A VNC graphical console."""

    enabled: pydantic.StrictBool = Field(default=False, description="Expose a VNC console.")
    listen: str = Field(default="127.0.0.1", description="Address the VNC server listens on.")
    port: pydantic.StrictInt | None = Field(
        default=None,
        description="TCP port; chosen by the hypervisor when unset.",
        ge=1,
        le=65535,
    )
    password_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the VNC password."
    )


class ConsoleSpec(base.StrictModel):
    """Consoles of the instance."""

    serial: pydantic.StrictBool = Field(
        default=True, description="Give the guest a serial console."
    )
    vnc: VncSpec = Field(
        default_factory=VncSpec,
        description="VNC graphical console.",
        json_schema_extra={"default": {}},
    )


class AutoBalloonSpec(base.StrictModel):
    """Automatic ballooning between memory.min and memory.max."""

    enabled: pydantic.StrictBool = Field(
        default=False, description="Let the agent balloon the guest."
    )
    target: quantity.Quantity | None = Field(
        default=None,
        description="Memory to balloon to (between memory.min and memory.max); "
        "the agent picks one from node pressure when unset.",
    )


# A structural schema cannot say "string, integer or boolean" and CEL cannot see values kept
# by x-kubernetes-preserve-unknown-fields, so the server's check is done with value
# validations that only bite on the wrong types: no entries (objects), no items (lists), a
# multiple of 1 (no fractions). Strings, integers and booleans pass untouched.
PARAM_VALUE_SCHEMA: dict[str, object] = {
    "x-kubernetes-preserve-unknown-fields": True,
    "maxProperties": 0,
    "maxItems": 0,
    "multipleOf": 1,
}

ParamValue = Annotated[
    pydantic.StrictBool | pydantic.StrictInt | pydantic.StrictStr,
    pydantic.WithJsonSchema(PARAM_VALUE_SCHEMA),
]
"""A hypervisor parameter's value: a string, an integer or a boolean."""

MAX_PARAMETERS = 128


SPEC_RULES: list[pydantic.JsonValue] = [
    {
        "rule": "!has(self.autoBalloon.target) || ("
        "quantity(string(self.autoBalloon.target)).compareTo(quantity(string(self.memory.min)))"
        " >= 0 && "
        "quantity(string(self.autoBalloon.target)).compareTo(quantity(string(self.memory.max)))"
        " <= 0)",
        "message": "autoBalloon.target must lie between memory.min and memory.max",
        "fieldPath": ".autoBalloon.target",
    }
]


class VirtualInstanceSpec(base.StrictModel):
    """What the user wants: the machine and whether it runs."""

    model_config = pydantic.ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    hypervisor: str = Field(
        default="kvm",
        description="Name of the hypervisor driver that runs the instance (kvm, fake, ...).",
        min_length=1,
    )
    run_state: RunState = Field(
        default=RunState.RUNNING, description="Desired state: Running, Stopped or Paused."
    )
    memory: MemorySpec = Field(description="Guest memory bounds (quantities, min <= max).")
    vcpus: pydantic.StrictInt = Field(
        default=1, description="Number of virtual CPUs.", ge=1, le=512
    )
    node_name: str | None = Field(
        default=None,
        description="Pin the instance to this node; the scheduler picks one when unset.",
        min_length=1,
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Only nodes whose NodeHypervisor carries all these labels are eligible.",
    )
    boot: BootSpec | None = Field(
        default=None, description="Direct kernel boot (otherwise the firmware boots a disk)."
    )
    firmware: Firmware = Field(
        default=Firmware.BIOS, description="bios (SeaBIOS, default) or uefi (OVMF)."
    )
    disks: list[DiskSpec] = Field(default_factory=list, description="Disks, in bus order.")
    cloud_init: CloudInitSpec | None = Field(
        default=None, description="cloud-init NoCloud data for the guest."
    )
    nics: list[NicSpec] = Field(default_factory=list, description="Network interfaces.")
    console: ConsoleSpec = Field(
        default_factory=ConsoleSpec,
        description="Serial and VNC consoles.",
        json_schema_extra={"default": {}},
    )
    hypervisor_parameters: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="Driver-specific parameters (name -> string, integer or boolean). The "
        "driver's syntax check validates them; the ParametersValid condition reports the result.",
        max_length=MAX_PARAMETERS,
    )
    eviction_policy: EvictionPolicy = Field(
        default=EvictionPolicy.LIVE_MIGRATE,
        description="What a node drain does to the instance: LiveMigrate, Migrate "
        "(stop, move, start) or Stop.",
    )
    auto_balloon: AutoBalloonSpec = Field(
        default_factory=AutoBalloonSpec,
        description="Automatic ballooning between memory.min and memory.max.",
        json_schema_extra={"default": {}},
    )
    reboot_generation: pydantic.StrictInt = Field(
        default=0,
        description="Bump to request a reboot; the agent copies it into "
        "status.rebootGeneration once the reboot is done.",
        ge=0,
    )

    @pydantic.model_validator(mode="after")
    def _balloon_target(self) -> VirtualInstanceSpec:
        target = self.auto_balloon.target
        if target is not None:
            low = quantity.parse_decimal(self.memory.min)
            high = quantity.parse_decimal(self.memory.max)
            if not low <= quantity.parse_decimal(target) <= high:
                raise ValueError("autoBalloon.target must lie between memory.min and memory.max")
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


class VirtualInstanceStatus(base.ApiModel):
    """What the instance is. One writer per field, named in each description."""

    phase: Phase | None = Field(
        default=None,
        description="Lifecycle phase. Written by the controller for Pending, Scheduled and "
        "Unknown, and by the node agent for every other phase.",
    )
    node_name: str | None = Field(
        default=None,
        description="Node that runs the instance. Written by the controller only.",
    )
    hypervisor_id: str | None = Field(
        default=None, description="The hypervisor's id of the instance. Written by the node agent."
    )
    actual_memory: quantity.Quantity | None = Field(
        default=None, description="Memory the guest has now. Written by the node agent."
    )
    vcpus: int | None = Field(
        default=None, description="Virtual CPUs the guest has now. Written by the node agent."
    )
    console: str | None = Field(
        default=None,
        description="Console endpoint (for example a VNC address or a PTY). "
        "Written by the node agent.",
    )
    reboot_generation: int | None = Field(
        default=None,
        description="Last spec.rebootGeneration the agent acted on. Written by the node agent.",
    )
    restart_count: int | None = Field(
        default=None,
        description="How often the agent restarted a crashed guest. Written by the node agent.",
    )
    conditions: list[cond.Condition] = Field(
        default_factory=list,
        description="Ready, ParametersValid and Migrating are written by the node agent; "
        "Scheduled by the controller.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(
        default=None,
        description="metadata.generation the node agent last acted on. Written by the node agent.",
    )
    interfaces: list[InterfaceStatus] | None = Field(
        default=None,
        description="Guest network interfaces with their addresses, in NIC order; absent "
        "while the instance does not run. Written by the node agent.",
    )
    message: str | None = Field(
        default=None, description="Last notable event, for people. Written by the node agent."
    )


class VirtualInstance(base.ApiModel):
    """A virtual machine run by a kubehv node agent through a hypervisor driver.

    Phases: the controller writes Pending (no node yet), Scheduled (node chosen) and Unknown
    (node lost); the node agent writes Starting, Running, Paused, Stopping, Stopped, Migrating
    and Failed.
    """

    KIND: ClassVar[str] = constants.KIND_VI

    api_version: str = Field(default=constants.API_VERSION)
    kind: str = Field(default=constants.KIND_VI)
    metadata: meta.ObjectMeta = Field(default_factory=meta.ObjectMeta)
    spec: VirtualInstanceSpec
    status: VirtualInstanceStatus = Field(default_factory=VirtualInstanceStatus)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["metadata"] = self.metadata.to_dict()
        return data
