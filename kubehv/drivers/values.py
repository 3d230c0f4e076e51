"""Typed, frozen value objects that cross the driver boundary.

Why this module exists: Ganeti's hypervisor API passes tuples and dicts (``(name, id, memory,
vcpus, state, times)``); kubehv passes these immutable dataclasses instead, so that every
driver, the operator and the tests agree on names, units and types. Units are in the field
names: ``_mib`` is mebibytes, ``_bytes`` bytes, ``_s`` seconds, ``_ms`` milliseconds.
Nothing here does I/O, and nothing here knows Kubernetes: the operator translates a
VirtualInstance into an :class:`InstanceSpec`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

ParamValue = str | int | bool | float
"""A hypervisor parameter's value, as it arrives from a manifest."""


def _frozen_mapping(value: Mapping[str, ParamValue]) -> Mapping[str, ParamValue]:
    return MappingProxyType(dict(value))


class InstanceState(enum.StrEnum):
    """What the hypervisor says an instance is doing."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    UNKNOWN = "unknown"

    @property
    def is_alive(self) -> bool:
        """True while the instance holds its memory (running, paused or shutting down)."""
        return self in (InstanceState.RUNNING, InstanceState.PAUSED, InstanceState.SHUTTING_DOWN)


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DiskBus(enum.StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"
    IDE = "ide"


class DiskKind(enum.StrEnum):
    FILE = "file"
    BLOCK = "block"


class DiskSource(enum.StrEnum):
    """Where a disk's data comes from: a node path, a cloud image (overlay), or nothing."""

    HOST_PATH = "hostPath"
    IMAGE = "image"
    BLANK = "blank"


class DiskDevice(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


class DeletePolicy(enum.StrEnum):
    """What happens to a disk the node made (image overlay, blank) when its instance is deleted."""

    DELETE = "Delete"
    RETAIN = "Retain"


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class NicKind(enum.StrEnum):
    USER = "user"
    NETWORK = "network"
    BRIDGE = "bridge"


class NicModel(enum.StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


@dataclasses.dataclass(frozen=True, slots=True)
class KernelBoot:
    """Direct kernel boot: absolute paths on the node, and the kernel command line."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    """A cloud image to download: an HTTP(S) URL and the SHA-256 its bytes must have."""

    url: str
    sha256: str


@dataclasses.dataclass(frozen=True, slots=True)
class BackingFile:
    """One layer under a disk (what the domain XML pins as ``<backingStore>``)."""

    path: str
    format: DiskFormat


@dataclasses.dataclass(frozen=True, slots=True)
class Disk:
    """A block device given to the instance (Ganeti's ``block_devices``).

    ``source`` hostPath disks name their ``path``. Image and blank disks are made by the
    node (:mod:`kubehv.drivers.storage`): ``path`` is empty until the driver prepares them,
    then it is the instance's own qcow2 file and ``backing`` its chain (the cached image).
    ``size_bytes`` is the virtual size to create (blank) or grow to (image overlay).
    """

    path: str = ""
    kind: DiskKind = DiskKind.FILE
    format: DiskFormat = DiskFormat.RAW
    bus: DiskBus = DiskBus.VIRTIO
    readonly: bool = False
    source: DiskSource = DiskSource.HOST_PATH
    name: str = ""
    image: ImageRef | None = None
    size_bytes: int | None = None
    delete_policy: DeletePolicy = DeletePolicy.DELETE
    device: DiskDevice = DiskDevice.DISK
    backing: tuple[BackingFile, ...] = ()
    boot_order: int | None = None
    shared: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CloudInit:
    """cloud-init NoCloud seed data. ``user_data`` may come from a Secret: never logged."""

    instance_id: str
    hostname: str
    user_data: str | None = dataclasses.field(default=None, repr=False)
    network_data: str | None = dataclasses.field(default=None, repr=False)
    ssh_authorized_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ssh_authorized_keys", tuple(self.ssh_authorized_keys))


@dataclasses.dataclass(frozen=True, slots=True)
class ImageProgress:
    """How far the download of one image into the node's cache is."""

    url: str
    done_bytes: int
    total_bytes: int | None = None  # when the server said


@dataclasses.dataclass(frozen=True, slots=True)
class GuestInterface:
    """A guest network interface as the hypervisor knows it (DHCP lease, guest agent, ARP)."""

    name: str
    mac: str
    ip_addresses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Nic:
    """A network interface. ``source`` names the libvirt network or host bridge."""

    kind: NicKind = NicKind.USER
    source: str | None = None
    model: NicModel = NicModel.VIRTIO
    mac: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ConsoleSpec:
    """Which consoles the instance gets. The VNC password is read from a file, never inline."""

    serial: bool = True
    vnc: bool = False
    vnc_listen: str = "127.0.0.1"
    vnc_port: int | None = None  # None: let the hypervisor pick
    vnc_password_file: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What to run: the driver-side view of a VirtualInstance (Ganeti's ``objects.Instance``).

    ``name`` is the hypervisor-level name (unique per node); ``uid`` is a stable identity
    (the Kubernetes object's uid) that drivers record so they only ever touch their own
    instances. ``params`` are the merged hypervisor parameters (node defaults under instance
    values), already through :meth:`BaseHypervisor.check_parameter_syntax`.
    """

    name: str
    uid: str
    memory_min_mib: int
    memory_max_mib: int
    vcpus: int = 1
    boot: KernelBoot | None = None
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    console: ConsoleSpec = dataclasses.field(default_factory=ConsoleSpec)
    params: Mapping[str, ParamValue] = dataclasses.field(default_factory=dict)
    free_page_reporting: bool = False  # the guest returns freed pages to the host itself
    namespace: str = ""
    firmware: Firmware = Firmware.BIOS
    cloud_init: CloudInit | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen_mapping(self.params))
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "nics", tuple(self.nics))


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceInfo:
    """Ganeti's ``(name, id, memory, vcpus, state, times)`` tuple, typed."""

    name: str
    id: str
    memory_mib: int
    vcpus: int
    state: InstanceState
    cpu_time_s: float
    uid: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryStats:
    """What a guest's virtio balloon reports (libvirt ``memoryStats()``), memory in MiB.

    ``actual_mib`` is the balloon's current size (what the guest has); the others are the
    guest's own view and are ``None`` until its balloon driver first reports (or when the
    stats period is 0): ``unused`` is MemFree, ``available`` MemTotal as the guest sees it,
    ``usable`` MemAvailable (free plus what it can reclaim without swapping). Faults and swap
    are counters since boot; ``last_update_s`` is the guest's report time (Unix seconds).
    """

    actual_mib: int
    unused_mib: int | None = None
    available_mib: int | None = None
    usable_mib: int | None = None
    disk_caches_mib: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    swap_in_mib: int | None = None
    swap_out_mib: int | None = None
    rss_mib: int | None = None
    last_update_s: int | None = None

    @property
    def reported(self) -> bool:
        """True once the guest's balloon driver has sent statistics."""
        return self.usable_mib is not None or self.unused_mib is not None

    @property
    def used_mib(self) -> int | None:
        """What the guest holds and cannot give back without swapping: actual - usable.

        Counted from ``actual`` (not the guest's MemTotal), so it includes the memory the
        guest kernel reserves for itself: a balloon target of ``used_mib`` leaves the guest
        with no spare memory at all, so a policy adds headroom on top.
        """
        spare = self.usable_mib if self.usable_mib is not None else self.unused_mib
        if spare is None:
            return None
        return max(0, self.actual_mib - spare)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node offers. Memory in MiB, as Ganeti's ``GetNodeInfo``/``GetLinuxNodeInfo``."""

    memory_total_mib: int
    memory_free_mib: int
    memory_dom0_mib: int
    cpu_total: int
    cpu_nodes: int
    cpu_sockets: int
    hypervisor_version: str = ""
    instances_memory_mib: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :meth:`BaseHypervisor.verify`: a list of problems, empty when healthy."""

    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


class MigrationState(enum.StrEnum):
    """Ganeti's ``HV_MIGRATION_VALID_STATUSES``."""

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationStatus:
    """Progress of a migration as seen from the source node. Memory figures in bytes."""

    state: MigrationState
    memory_total_bytes: int = 0
    memory_processed_bytes: int = 0
    memory_remaining_bytes: int = 0
    message: str = ""
    disk_total_bytes: int = 0  # storage copy of node-local disks (0: none copied)
    disk_processed_bytes: int = 0
    disk_remaining_bytes: int = 0

    @property
    def percent(self) -> float:
        """Memory and disk bytes together: a storage migration is mostly disk."""
        if self.state is MigrationState.COMPLETED:
            return 100.0
        total = self.memory_total_bytes + self.disk_total_bytes
        if total <= 0:
            return 0.0
        done = total - self.memory_remaining_bytes - self.disk_remaining_bytes
        return max(0.0, min(100.0, 100.0 * done / total))


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where to migrate to: the target node's name, its address, and its driver connection."""

    node: str
    address: str
    uri: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationOptions:
    """Knobs for :meth:`BaseHypervisor.migrate_instance`. ``None`` means the driver's default."""

    bandwidth_mib_s: int | None = None
    max_downtime_ms: int | None = None


class ConsoleKind(enum.StrEnum):
    SERIAL = "serial"
    VNC = "vnc"
    SPICE = "spice"
    SSH = "ssh"
    MESSAGE = "message"


@dataclasses.dataclass(frozen=True, slots=True)
class ConsoleInfo:
    """How a person connects to an instance's console (Ganeti's ``objects.InstanceConsole``).

    Never carries a password: a VNC password stays in the file or Secret it came from.
    """

    instance: str
    kind: ConsoleKind
    host: str | None = None
    port: int | None = None
    command: tuple[str, ...] = ()
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AncillaryFiles:
    """Ganeti's ``GetAncillaryFiles``: files to copy to all nodes (all, and the optional ones)."""

    all: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver can do, so the operator never has to guess from the driver's name."""

    live_migration: bool = False
    non_live_migration: bool = False
    migration_abort: bool = False
    migration_progress: bool = False
    ballooning: bool = False
    pause: bool = False
    reboot: bool = True
    startup_paused: bool = False
    serial_console: bool = False
    vnc_console: bool = False
    kernel_boot: bool = False

    @property
    def can_migrate(self) -> bool:
        return self.live_migration or self.non_live_migration

    def as_dict(self) -> dict[str, bool]:
        return {f.name: bool(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class DriverConfig:
    """How an agent sets a driver up on its node."""

    node_name: str
    uri: str | None = None
    state_dir: str | None = None
    params: Mapping[str, ParamValue] = dataclasses.field(default_factory=dict)
    allow_powercycle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen_mapping(self.params))
