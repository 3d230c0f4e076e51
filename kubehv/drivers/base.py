"""The hypervisor driver contract: Ganeti's ``BaseHypervisor``, in typed snake_case Python.

Why this module exists: everything kubehv does to a VM goes through one of these methods, so
the operator never knows which hypervisor it is talking to. Each method keeps the meaning of
its Ganeti counterpart (docs/drivers.md maps them one by one); tuples and dicts became the
frozen value objects of :mod:`kubehv.drivers.values`, and failures are the typed errors of
:mod:`kubehv.drivers.errors`.

Drivers never import kopf, kubernetes or kubehv.api: the operator hands them
:class:`~kubehv.drivers.values.InstanceSpec` objects. Methods are blocking; the operator
runs them in threads.
"""

from __future__ import annotations

import abc
import glob
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import psutil

from kubehv.drivers import errors, parameters, values

# Names end up in domain XML, file names and log lines: keep them boring.
INSTANCE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,126}[a-z0-9])?$")


class BaseHypervisor(abc.ABC):
    """Abstract virtualisation technology interface (Ganeti's ``BaseHypervisor``).

    Class attributes (Ganeti's class variables):

    * ``NAME``: the hypervisor name used in manifests and the registry.
    * ``PARAMETERS``: every hypervisor parameter, each a :class:`parameters.Parameter`
      with Ganeti's five parts (required, syntax check + message, node check + message).
    * ``ANCILLARY_FILES`` / ``ANCILLARY_FILES_OPT``: files the hypervisor needs on every node.
    * ``CAN_MIGRATE``: whether this hypervisor can migrate (live or not).
    * ``CAPABILITIES``: the typed superset of ``CAN_MIGRATE``.
    """

    NAME: ClassVar[str] = ""
    PARAMETERS: ClassVar[Mapping[str, parameters.Parameter]] = {}
    ANCILLARY_FILES: ClassVar[tuple[str, ...]] = ()
    ANCILLARY_FILES_OPT: ClassVar[tuple[str, ...]] = ()
    CAN_MIGRATE: ClassVar[bool] = False
    CAPABILITIES: ClassVar[values.Capabilities] = values.Capabilities()

    def __init__(self, config: values.DriverConfig) -> None:
        self.config = config

    # --- lifecycle -----------------------------------------------------------------------

    @abc.abstractmethod
    def start_instance(
        self, instance: values.InstanceSpec, startup_paused: bool = False
    ) -> values.InstanceInfo:
        """Start an instance (Ganeti ``StartInstance``); block devices are ``instance.disks``.

        Starts with :meth:`instance_startup_memory`. With ``startup_paused`` the instance is
        created but its CPUs do not run until :meth:`resume_instance`.
        """

    @abc.abstractmethod
    def stop_instance(
        self,
        instance: values.InstanceSpec | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
    ) -> None:
        """Stop an instance (Ganeti ``StopInstance``).

        ``force`` destroys it at once (hard stop); otherwise a graceful shutdown is
        requested and the call returns without waiting. ``retry`` says this is a repeat of
        an earlier graceful request. With ``name`` the instance object is not used (it may
        be ``None``) and the stop is done by name only. Stopping an instance that is not
        running is not an error. A paused instance cannot answer a graceful request (its
        vCPUs do not run): a graceful stop powers it off.
        """

    def cleanup_instance(self, instance_name: str) -> None:
        """Clean up after a stopped instance (Ganeti ``CleanupInstance``); optional."""

    @abc.abstractmethod
    def reboot_instance(self, instance: values.InstanceSpec) -> None:
        """Reboot an instance (Ganeti ``RebootInstance``)."""

    def pause_instance(self, instance: values.InstanceSpec) -> None:
        """Freeze the instance's CPUs (kubehv's runState Paused); not in Ganeti's base."""
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot pause instances")

    def resume_instance(self, instance: values.InstanceSpec) -> None:
        """Let a paused instance run again."""
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot resume instances")

    def balloon_instance_memory(self, instance: values.InstanceSpec, mem_mib: int) -> None:
        """Balloon an instance's memory to ``mem_mib`` (Ganeti ``BalloonInstanceMemory``)."""
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot balloon memory")

    def get_instance_memory_stats(self, instance_name: str) -> values.MemoryStats | None:
        """The guest's balloon statistics, or ``None`` if it is not running here.

        Drivers without a balloon raise :class:`errors.NotSupported`. Figures the guest has
        not reported yet are ``None`` in the result (only ``actual_mib`` is always known).
        """
        raise errors.NotSupported(f"the {self.NAME} hypervisor reports no guest memory stats")

    # --- inventory -----------------------------------------------------------------------

    @abc.abstractmethod
    def list_instances(self) -> list[str]:
        """Names of the running instances this driver created (Ganeti ``ListInstances``)."""

    @abc.abstractmethod
    def get_instance_info(self, instance_name: str) -> values.InstanceInfo | None:
        """Properties of one instance, or ``None`` if it is not running here."""

    @abc.abstractmethod
    def get_all_instances_info(self) -> list[values.InstanceInfo]:
        """Properties of all running instances this driver created."""

    @abc.abstractmethod
    def get_node_info(self) -> values.NodeInfo:
        """What the node offers (Ganeti ``GetNodeInfo``), memory in MiB."""

    def verify(self) -> values.VerifyResult:
        """Check the hypervisor is usable on this node (Ganeti ``Verify``).

        Never raises for an unhealthy hypervisor: problems are returned, for the node's
        Verified condition. Use :meth:`format_verify_results` for Ganeti's string form.
        """
        return values.VerifyResult()

    def fetch_instance_images(
        self,
        instance: values.InstanceSpec,
        progress: Callable[[values.ImageProgress], None] | None = None,
    ) -> None:
        """Download the images the instance's disks name into the node's cache (verified;
        nothing when cached already), reporting ``progress`` from the calling thread.

        ``start_instance`` and ``accept_instance`` fetch what is missing themselves; callers
        use this first to show the download. Drivers without an image cache do nothing.
        """

    def get_instance_interfaces(self, instance_name: str) -> list[values.GuestInterface]:
        """The guest's NICs with the addresses the hypervisor knows (empty when none)."""
        return []

    def release_instance_storage(self, instance: values.InstanceSpec) -> list[str]:
        """The instance is deleted: remove the disks the node made for it (deletePolicy).

        Returns what was removed. Drivers without node-made disks have nothing to do.
        """
        return []

    def list_foreign_instances(self) -> list[str]:
        """Running instances on this node that this driver did not create (orphans)."""
        return []

    # --- migration (Ganeti's order) ------------------------------------------------------

    def migration_info(self, instance: values.InstanceSpec) -> str:
        """Source side, first step: opaque data the target needs (Ganeti ``MigrationInfo``)."""
        return ""

    def accept_instance(self, instance: values.InstanceSpec, info: str, target: str) -> None:
        """Target side: prepare to receive ``instance`` at address ``target``.

        Memory follows :func:`startup_memory`, the rule the controller schedules with: the
        target accepts when the instance's *minimum* memory fits in its free memory, even if
        its maximum does not (the source balloons the guest down before the transfer).
        Raises :class:`errors.InsufficientMemory` only when the minimum does not fit.
        """

    def migrate_instance(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None = None,
    ) -> None:
        """Source side: move the instance to ``target``; blocks until done or failed.

        Raises :class:`errors.MigrationError` (or ``MigrationAborted``) on failure, in which
        case the instance still runs on the source.

        The transfer belongs to the hypervisor, not to the calling thread: if the caller
        dies (agent killed, driver object dropped, connection closed) the hypervisor's job
        goes on to success or failure on its own, as libvirtd's does. Its outcome is then
        read with :meth:`get_migration_status` from any driver object. For the same reason,
        :class:`errors.HypervisorUnavailable` from this call (this agent lost its own
        connection) means "outcome unknown here", never "failed": read the status.
        """
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot migrate instances")

    def get_migration_status(
        self, instance: values.InstanceSpec, target: values.MigrationTarget | None = None
    ) -> values.MigrationStatus:
        """Source side: where the instance's migration stands (Ganeti ``GetMigrationStatus``).

        Read from the hypervisor, never from this object's memory: a driver object created
        after an agent restart answers exactly like the one whose ``migrate_instance`` call
        started the transfer. States:

        * ``ACTIVE``: the hypervisor's migration job for the instance runs (memory total,
          processed, remaining in bytes), or this process has just called
          ``migrate_instance`` and the job has not shown up yet (figures may be 0).
        * ``COMPLETED``: the instance has left this node because of the migration (libvirt:
          the domain is gone, or shut off with reason *migrated*). A hypervisor cannot
          always tell *why* a domain left (a transient libvirt domain simply vanishes), so
          pass ``target``: the driver then looks on the target too and answers
          ``COMPLETED`` only if the instance is there (running, or arrived paused), and
          ``FAILED`` ("on neither node") if it is not.
        * ``FAILED`` / ``CANCELLED``: the instance still runs here and no migration job does;
          ``message`` says why (the job's error, an abort, or that no job exists).

        Never raises for "no migration known"; raises :class:`errors.HypervisorUnavailable`
        when the hypervisor cannot be asked.
        """
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot migrate instances")

    def abort_migration(self, instance: values.InstanceSpec) -> None:
        """Source side: ask the hypervisor to cancel the instance's migration job.

        Never raises because there is no job (it never started, already completed or
        already failed): an abort can always race the end of the transfer. So the caller
        must NOT assume the abort won: it re-reads :meth:`get_migration_status` afterwards,
        and the outcome may be ``COMPLETED`` (the instance is on the target, exactly once)
        as well as ``CANCELLED`` (it runs on the source only).
        """
        raise errors.NotSupported(f"the {self.NAME} hypervisor cannot abort migrations")

    def finalize_migration_dst(
        self, instance: values.InstanceSpec, info: str, success: bool
    ) -> None:
        """Target side, last step: keep the instance (success) or undo the preparation.

        With ``success=False`` it destroys only a copy that is still *incoming* (paused,
        never resumed: the transfer has not finished, so the source copy still exists).
        A copy that runs here (the migration completed and the hypervisor resumed it) or
        that arrived paused after a completed transfer is the only copy: it is left alone
        and :class:`errors.MigrationCompleted` is raised, so the caller finishes the
        migration as succeeded instead. No copy here: nothing to do.
        """

    def finalize_migration_source(
        self, instance: values.InstanceSpec, success: bool, live: bool
    ) -> None:
        """Source side, last step: clean up after a migration, successful or not."""

    # --- memory --------------------------------------------------------------------------

    def instance_startup_memory(
        self, instance: values.InstanceSpec, free_mib: int | None = None
    ) -> int:
        """Memory to start with (Ganeti ``_InstanceStartupMemory``).

        Between the instance's min and max memory, trying to use no more than the node's
        free memory. Raises :class:`errors.InsufficientMemory` when even min does not fit.
        """
        if free_mib is None:
            free_mib = self.get_node_info().memory_free_mib
        return startup_memory(instance, free_mib)

    # --- consoles and files --------------------------------------------------------------

    def get_instance_console(self, instance: values.InstanceSpec) -> values.ConsoleInfo:
        """How to reach the instance's console (Ganeti ``GetInstanceConsole``)."""
        return values.ConsoleInfo(
            instance=instance.name,
            kind=values.ConsoleKind.MESSAGE,
            message=f"the {self.NAME} hypervisor offers no console",
        )

    @classmethod
    def get_ancillary_files(cls) -> values.AncillaryFiles:
        """Files to copy to all nodes (Ganeti ``GetAncillaryFiles``): (all, optional)."""
        return values.AncillaryFiles(
            all=tuple(cls.ANCILLARY_FILES) + tuple(cls.ANCILLARY_FILES_OPT),
            optional=tuple(cls.ANCILLARY_FILES_OPT),
        )

    # --- parameters ----------------------------------------------------------------------

    @classmethod
    def check_parameter_syntax(
        cls, hvparams: Mapping[str, values.ParamValue]
    ) -> dict[str, values.ParamValue]:
        """Cluster side, no I/O (Ganeti ``CheckParameterSyntax``); returns params + defaults.

        Subclasses extend, not replace, this method (call ``super()``).
        """
        return parameters.check_syntax(cls.PARAMETERS, hvparams)

    @classmethod
    def validate_parameters(cls, hvparams: Mapping[str, values.ParamValue]) -> None:
        """Node side (Ganeti ``ValidateParameters``): syntax, then each node check."""
        checked = cls.check_parameter_syntax(hvparams)
        parameters.check_on_node(cls.PARAMETERS, checked)

    @classmethod
    def check_instance_spec(cls, instance: values.InstanceSpec) -> None:
        """Cluster-side sanity of a whole instance (no I/O): names, memory, vcpus, paths."""
        check_instance_spec(instance)
        cls.check_parameter_syntax(instance.params)

    # --- node ----------------------------------------------------------------------------

    def powercycle_node(self) -> None:
        """Hard powercycle the node (Ganeti ``PowercycleNode``); refused unless allowed."""
        self.linux_powercycle(self.config.allow_powercycle)

    @staticmethod
    def linux_powercycle(allowed: bool = False, sysrq_dir: str = "/proc") -> None:
        """Ganeti ``LinuxPowercycle``: enable sysrq, then sysrq 'b' (immediate reboot).

        Refuses with :class:`errors.PowercycleRefused` unless ``allowed`` is true.
        """
        if not allowed:
            raise errors.PowercycleRefused()
        with open(os.path.join(sysrq_dir, "sys/kernel/sysrq"), "w") as fh:
            fh.write("1\n")
        with open(os.path.join(sysrq_dir, "sysrq-trigger"), "w") as fh:
            fh.write("b\n")

    @staticmethod
    def get_linux_node_info(
        meminfo: str = "/proc/meminfo", cpuinfo: str = "/proc/cpuinfo"
    ) -> values.NodeInfo:
        """Ganeti ``GetLinuxNodeInfo``: memory (MiB) from /proc/meminfo, CPUs from psutil/proc.

        memory_free counts free + buffers + cached, as Ganeti does; memory_dom0 is what the
        node itself uses (total - free).
        """
        fields: dict[str, int] = {}
        with open(meminfo) as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    fields[key.strip()] = int(parts[0])  # kB
        total = fields["MemTotal"] // 1024
        free = fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0)
        free_mib = free // 1024
        sockets: set[str] = set()
        try:
            with open(cpuinfo) as fh:
                for line in fh:
                    if line.startswith("physical id"):
                        sockets.add(line.split(":", 1)[1].strip())
        except OSError:
            pass
        nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
        return values.NodeInfo(
            memory_total_mib=total,
            memory_free_mib=free_mib,
            memory_dom0_mib=max(0, total - free_mib),
            cpu_total=psutil.cpu_count(logical=True) or 1,
            cpu_nodes=nodes,
            cpu_sockets=len(sockets) or 1,
        )

    @staticmethod
    def format_verify_results(msgs: Sequence[str]) -> str | None:
        """Ganeti ``_FormatVerifyResults``: one problem string, or ``None`` if all is well."""
        if not msgs:
            return None
        return "; ".join(msgs)

    # --- helpers built on the contract ---------------------------------------------------

    def shutdown_instance(
        self, instance: values.InstanceSpec, timeout_s: float, poll_s: float = 0.5
    ) -> bool:
        """Graceful stop, retried until ``timeout_s``, then forced. Returns True if forced.

        This is Ganeti backend's shutdown loop over ``stop_instance`` (graceful, retry, force).
        """
        deadline = time.monotonic() + timeout_s
        retry = False
        while time.monotonic() < deadline:
            info = self.get_instance_info(instance.name)
            if info is None or not info.state.is_alive:
                return False
            self.stop_instance(instance, force=False, retry=retry)
            retry = True
            time.sleep(poll_s)
        if self.get_instance_info(instance.name) is None:
            return False
        self.stop_instance(instance, force=True)
        return True


def startup_memory(instance: values.InstanceSpec, free_mib: int) -> int:
    """The startup-memory rule: clamp free memory into [min, max]; fail if min does not fit."""
    if instance.memory_min_mib > free_mib:
        raise errors.InsufficientMemory(instance.name, instance.memory_min_mib, free_mib)
    return max(instance.memory_min_mib, min(instance.memory_max_mib, free_mib))


def check_balloon_memory(instance: values.InstanceSpec, mem_mib: int) -> None:
    """Refuse a balloon target outside [min, max] memory with :class:`errors.InvalidInstanceSpec`.

    Shared by drivers so every one refuses the same way, before touching the instance.
    """
    if not instance.memory_min_mib <= mem_mib <= instance.memory_max_mib:
        raise errors.InvalidInstanceSpec(
            f"cannot balloon instance {instance.name!r} to {mem_mib} MiB: it must stay between "
            f"its minimum ({instance.memory_min_mib} MiB) and maximum "
            f"({instance.memory_max_mib} MiB) memory"
        )


def check_instance_spec(instance: values.InstanceSpec) -> None:
    """Reject malformed instances before any hypervisor sees them (no I/O)."""
    problems: list[str] = []
    if not INSTANCE_NAME_RE.match(instance.name):
        problems.append(
            f"instance name {instance.name!r} must be 1-128 lowercase letters, digits, '.' "
            "or '-', starting and ending with a letter or digit"
        )
    if instance.memory_min_mib <= 0 or instance.memory_max_mib <= 0:
        problems.append("memory must be positive")
    elif instance.memory_min_mib > instance.memory_max_mib:
        problems.append(
            f"minimum memory ({instance.memory_min_mib} MiB) is above maximum memory "
            f"({instance.memory_max_mib} MiB)"
        )
    if instance.vcpus < 1:
        problems.append("vcpus must be at least 1")
    if instance.boot is not None:
        for label, path in (("kernel", instance.boot.kernel), ("initrd", instance.boot.initrd)):
            if path is not None and not parameters.is_absolute_path(path):
                problems.append(f"{label} path {path!r} must be an absolute, normalised path")
    for disk in instance.disks:
        if disk.source is values.DiskSource.HOST_PATH and not parameters.is_absolute_path(
            disk.path
        ):
            problems.append(f"disk path {disk.path!r} must be an absolute, normalised path")
    for nic in instance.nics:
        if nic.mac is not None and not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", nic.mac):
            problems.append(f"MAC address {nic.mac!r} must look like 52:54:00:12:34:56")
        if nic.source is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", nic.source):
            problems.append(f"NIC source {nic.source!r} must be a network or bridge name")
    if problems:
        raise errors.InvalidInstanceSpec("; ".join(problems))
