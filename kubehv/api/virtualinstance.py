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
from kubehv.api.workloads import (
    CloudInitSpec,
    DiskSpec,
    Firmware,
    InterfaceStatus,
    SecretKeyRef,
)


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
    free_page_reporting: pydantic.StrictBool = Field(
        default=False,
        description="Let the guest hand pages it frees back to the host at once (virtio "
        "balloon free page reporting). Off by default.",
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
    guest_used_memory: quantity.Quantity | None = Field(
        default=None,
        description="Memory the guest uses (actual minus what its balloon driver reports as "
        "usable), when auto-ballooned. Written by the node agent's balloon loop.",
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
        description="Ready, ParametersValid, Migrating and ImagesReady (the download of "
        "image disks into the node's cache: progress, then Cached or the failure's reason) are "
        "written by the node agent; Scheduled by the controller.",
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
