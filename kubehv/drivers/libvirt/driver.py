"""``LibvirtHypervisor`` (hypervisor name ``kvm``): the Ganeti contract on libvirt + QEMU.

Why this module exists: it maps each :class:`~kubehv.drivers.base.BaseHypervisor` method to
libvirt calls on the node's connection, and nothing else -- the XML lives in ``domxml``,
parameters in ``params``, migration in ``migration_steps`` (the contract's methods),
``migration`` (the transfer) and ``outcome`` (what it came to), the connection in
``connection``.

Transient domains, on purpose. Instances are started with ``createXML`` and never defined:
when a guest stops (shutdown, destroy, crash) its domain disappears, a node reboot leaves no
domain to autostart behind the operator's back, and after a migration the source domain is
gone by construction -- an instance cannot be defined, let alone running, on two nodes.
The VirtualInstance in Kubernetes is the persistent definition; the agent starts it again.
``cleanup_instance`` still undefines a persistent leftover carrying our tag (from a manual
``virsh define`` or an interrupted migration with other flags), so nothing lingers.

Graceful stop and reboot use libvirt's default method for QEMU, the ACPI power button (no
guest agent is configured); a reboot the guest ignores for ``reboot_acpi_timeout_s`` turns
into a hard reset.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import ClassVar

import libvirt

from kubehv.drivers import base, errors, values
from kubehv.drivers.libvirt import (
    connection,
    domxml,
    memstats,
    migration_steps,
    outcome,
    workloads,
)
from kubehv.drivers.libvirt import params as hvparams

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: values.InstanceState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: values.InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: values.InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: values.InstanceState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: values.InstanceState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: values.InstanceState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: values.InstanceState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: values.InstanceState.PAUSED,
}


class LibvirtHypervisor(migration_steps.MigrationSteps, base.BaseHypervisor):
    """QEMU guests through libvirt, one connection per node (``DriverConfig.uri``)."""

    NAME: ClassVar[str] = "kvm"
    PARAMETERS = hvparams.PARAMETERS
    CAN_MIGRATE: ClassVar[bool] = True
    CAPABILITIES: ClassVar[values.Capabilities] = values.Capabilities(
        live_migration=True,
        non_live_migration=True,
        migration_abort=True,
        migration_progress=True,
        ballooning=True,
        pause=True,
        reboot=True,
        startup_paused=True,
        serial_console=True,
        vnc_console=True,
        kernel_boot=True,
    )

    def __init__(self, config: values.DriverConfig) -> None:
        super().__init__(config)
        self.settings = hvparams.node_settings(config.params)
        hvparams.set_allowed_dirs(self.settings.allowed_dirs)
        self.storage = workloads.node_storage(self.settings, config)
        self.conn = connection.Connection(config.uri)
        # Hints that only label what libvirt shows (see ``outcome.source_status``): names
        # whose migrateToURI3 runs in this object, and names this object asked to abort.
        self._starting: set[str] = set()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self.conn.uri

    @classmethod
    def check_instance_spec(cls, instance: values.InstanceSpec) -> None:
        super().check_instance_spec(instance)
        hvparams.check_spec_strings(instance)

    # --- helpers -------------------------------------------------------------------------

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.get().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _tag(dom: libvirt.virDomain) -> domxml.Tag | None:
        try:
            return domxml.read_tag(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _own(self, name: str) -> libvirt.virDomain:
        """The running kubehv domain called ``name``; InstanceNotFound otherwise."""
        dom = self._lookup(name)
        if dom is None or not _active(dom) or self._tag(dom) is None:
            raise errors.InstanceNotFound(name)
        return dom

    def _info(self, dom: libvirt.virDomain, tag: domxml.Tag) -> values.InstanceInfo:
        state, _max_kib, mem_kib, vcpus, cpu_ns = dom.info()
        return values.InstanceInfo(
            name=dom.name(),
            id=dom.UUIDString(),
            memory_mib=int(mem_kib) // 1024,
            vcpus=int(vcpus),
            state=_STATES.get(state, values.InstanceState.UNKNOWN),
            cpu_time_s=int(cpu_ns) / 1e9,
            uid=tag.uid,
        )

    def _running_domains(self) -> list[tuple[libvirt.virDomain, domxml.Tag | None]]:
        out = []
        for dom in self.conn.get().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # vanished while we looked
                out.append((dom, self._tag(dom)))
        return out

    def _domain_type(self, accelerator: str) -> str:
        if accelerator == "auto":
            accelerator = "kvm" if self.conn.kvm_usable() else "tcg"
        return domxml.DOMAIN_TYPES[accelerator]

    @staticmethod
    def _read_password(path: str | None) -> str | None:
        if not path:
            return None
        try:
            with open(path) as fh:
                secret = fh.read().strip("\r\n")
        except OSError as exc:
            raise errors.NodeParameterError(
                [f"cannot read the VNC password file {path!r}: {exc.strerror}"]
            ) from exc
        if not secret:
            raise errors.NodeParameterError([f"the VNC password file {path!r} is empty"])
        return secret

    def domain_xml(self, spec: values.InstanceSpec, startup_memory_mib: int) -> str:
        """The XML :meth:`start_instance` would use (the VNC password read from its file)."""
        params = hvparams.instance_params(spec)
        password_file = spec.console.vnc_password_file or str(params["vnc_password_file"])
        settings = domxml.DomainSettings(
            domain_type=self._domain_type(str(params["accelerator"])),
            serial_log_dir=self.settings.serial_log_dir,
            startup_memory_mib=startup_memory_mib,
            vnc_password=self._read_password(password_file) if spec.console.vnc else None,
            uefi_loader=self.settings.uefi_loader,
            uefi_vars_template=self.settings.uefi_vars_template,
        )
        return domxml.build(spec, params, settings)

    # --- lifecycle -----------------------------------------------------------------------

    def start_instance(
        self, instance: values.InstanceSpec, startup_paused: bool = False
    ) -> values.InstanceInfo:
        self.check_instance_spec(instance)
        hvparams.check_instance_on_node(instance)
        with self.conn.translated(f"start {instance.name}"):
            existing = self._lookup(instance.name)
            if existing is not None:
                tag = self._tag(existing)
                if tag is None:
                    raise errors.InstanceStartError(
                        f"a libvirt domain named {instance.name!r} exists on this node but "
                        "was not created by kubehv; rename the instance or remove that domain"
                    )
                if _active(existing):
                    raise errors.InstanceAlreadyRunning(instance.name)
                existing.undefine()  # a persistent, stopped leftover of ours
            memory = self.instance_startup_memory(instance)
            prepared = workloads.prepare(self.storage, self.conn.get(), self.settings, instance)
            instance = prepared.spec
            xml = self.domain_xml(instance, memory)
            flags = libvirt.VIR_DOMAIN_START_PAUSED if startup_paused else 0
            if self.conn.is_test_driver():
                flags = 0  # test:/// lacks START_PAUSED; it has no real CPUs to hold back
            try:
                dom = self.conn.get().createXML(xml, flags)
                if startup_paused and not flags:
                    dom.suspend()
            except libvirt.libvirtError as exc:
                prepared.discard()
                if connection.is_connection_error(exc):
                    raise
                raise errors.InstanceStartError(
                    f"libvirt could not start {instance.name!r}: "
                    f"{_scrub(connection.error_text(exc), xml)}"
                ) from None
            period = hvparams.instance_params(instance)["balloon_stats_period_s"]
            memstats.start_period(dom, int(period))
            tag = self._tag(dom)
            assert tag is not None
            return self._info(dom, tag)

    def stop_instance(
        self,
        instance: values.InstanceSpec | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
    ) -> None:
        target = name or (instance.name if instance is not None else None)
        if not target:
            raise errors.InvalidInstanceSpec("stop_instance needs an instance or a name")
        with self.conn.translated(f"stop {target}"):
            dom = self._lookup(target)
            if dom is None or not _active(dom):
                return
            if self._tag(dom) is None:
                raise errors.InstanceStopError(
                    f"refusing to stop {target!r}: that domain was not created by kubehv"
                )
            # A paused guest cannot hear the power button (libvirt refuses with "domain is
            # not running"): its graceful stop is a power-off, as the fake driver's is.
            paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            try:
                if force or paused:
                    dom.destroy()
                else:
                    dom.shutdown()  # ACPI power button (no guest agent configured)
            except libvirt.libvirtError as exc:
                if connection.is_connection_error(exc):
                    raise
                if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN,) or not _alive(dom):
                    return  # it stopped meanwhile
                if not force and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    # "domain is not running": it is on its way down already (a retried
                    # request racing the guest's own power-off); shutdown_instance forces
                    # it if it never gets there.
                    return
                raise errors.InstanceStopError(
                    f"cannot {'destroy' if force else 'shut down'} {target!r}: "
                    f"{connection.error_text(exc)}"
                ) from exc

    def cleanup_instance(self, instance_name: str) -> None:
        with self.conn.translated(f"clean up {instance_name}"):
            dom = self._lookup(instance_name)
            if dom is None or _active(dom) or self._tag(dom) is None:
                return
            if dom.isPersistent():
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()

    def fetch_instance_images(
        self,
        instance: values.InstanceSpec,
        progress: Callable[[values.ImageProgress], None] | None = None,
    ) -> None:
        self.storage.fetch_images(instance, progress)

    def release_instance_storage(self, instance: values.InstanceSpec) -> list[str]:
        return self.storage.release(instance)

    def get_instance_interfaces(self, instance_name: str) -> list[values.GuestInterface]:
        with self.conn.translated(f"read the addresses of {instance_name}"):
            dom = self._lookup(instance_name)
            try:
                if dom is None or not _active(dom) or self._tag(dom) is None:
                    return []
                return workloads.guest_interfaces(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return []  # it left meanwhile (migrated away, deleted)
                raise

    def reboot_instance(self, instance: values.InstanceSpec) -> None:
        params = hvparams.instance_params(instance)
        timeout = int(params["reboot_acpi_timeout_s"])
        with self.conn.translated(f"reboot {instance.name}"):
            dom = self._own(instance.name)
            conn = self.conn.get()
            rebooted = threading.Event()
            cb_id = connection.register_event(
                conn, dom, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, lambda *_: rebooted.set()
            )
            try:
                if timeout > 0:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.reboot(0)  # ACPI: the guest powers off, libvirt restarts it
                if not rebooted.wait(timeout):
                    dom.reset(0)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb_id)

    def pause_instance(self, instance: values.InstanceSpec) -> None:
        with self.conn.translated(f"pause {instance.name}"):
            dom = self._own(instance.name)
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()

    def resume_instance(self, instance: values.InstanceSpec) -> None:
        with self.conn.translated(f"resume {instance.name}"):
            dom = self._own(instance.name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

    def balloon_instance_memory(self, instance: values.InstanceSpec, mem_mib: int) -> None:
        base.check_balloon_memory(instance, mem_mib)
        with self.conn.translated(f"balloon {instance.name}"):
            dom = self._own(instance.name)
            dom.setMemoryFlags(mem_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def get_instance_memory_stats(self, instance_name: str) -> values.MemoryStats | None:
        with self.conn.translated(f"read the memory statistics of {instance_name}"):
            dom = self._lookup(instance_name)
            if dom is None or not _active(dom) or self._tag(dom) is None:
                return None
            return memstats.read(dom)

    # --- inventory -----------------------------------------------------------------------

    def list_instances(self) -> list[str]:
        with self.conn.translated("list instances"):
            return sorted(dom.name() for dom, tag in self._running_domains() if tag is not None)

    def get_instance_info(self, instance_name: str) -> values.InstanceInfo | None:
        with self.conn.translated(f"inspect {instance_name}"):
            dom = self._lookup(instance_name)
            if dom is None:
                return None
            try:
                tag = self._tag(dom)
                if tag is None or not _active(dom):
                    return None
                return self._info(dom, tag)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None  # it went away while we looked
                raise

    def get_all_instances_info(self) -> list[values.InstanceInfo]:
        with self.conn.translated("list instances"):
            out = []
            for dom, tag in self._running_domains():
                if tag is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        out.append(self._info(dom, tag))
            return sorted(out, key=lambda i: i.name)

    def list_foreign_instances(self) -> list[str]:
        with self.conn.translated("list foreign domains"):
            return sorted(dom.name() for dom, tag in self._running_domains() if tag is None)

    def get_node_info(self) -> values.NodeInfo:
        """From the connection's host (libvirt, so remote URIs report the remote node).

        Free memory counts free + buffers + cached, as :meth:`get_linux_node_info` does.
        """
        with self.conn.translated("read node information"):
            conn = self.conn.get()
            _model, mem_mib, cpus, _mhz, nodes, sockets, _cores, _threads = conn.getInfo()
            try:
                stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
                total_mib = int(stats["total"]) // 1024
                free_kib = stats["free"] + stats.get("buffers", 0) + stats.get("cached", 0)
                free_mib = int(free_kib) // 1024
            except libvirt.libvirtError:  # drivers without node memory statistics (test:///)
                total_mib = int(mem_mib)
                free = int(conn.getFreeMemory())
                # libvirt documents bytes; the test driver's fake host answers in KiB.
                free_mib = free // 1024 if self.conn.is_test_driver() else free // (1024 * 1024)
            version = int(conn.getVersion())
            instances_kib = 0
            for dom, tag in self._running_domains():
                if tag is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        instances_kib += int(dom.info()[2])
            return values.NodeInfo(
                memory_total_mib=total_mib,
                memory_free_mib=free_mib,
                memory_dom0_mib=max(0, total_mib - free_mib - instances_kib // 1024),
                cpu_total=int(cpus),
                cpu_nodes=int(nodes),
                cpu_sockets=int(nodes) * int(sockets),
                hypervisor_version=(
                    f"{conn.getType()} {version // 1_000_000}.{version // 1000 % 1000}."
                    f"{version % 1000}"
                ),
                instances_memory_mib=instances_kib // 1024,
            )

    def verify(self) -> values.VerifyResult:
        problems: list[str] = []
        try:
            with self.conn.translated("verify the hypervisor"):
                self.conn.get().getVersion()
                problem = self.conn.qemu_capabilities_problem()
                if problem:
                    problems.append(problem)
        except errors.HypervisorUnavailable as exc:
            problems.append(exc.message)
        except libvirt.libvirtError as exc:
            problems.append(f"libvirt at {self.uri} misbehaves: {connection.error_text(exc)}")
        return values.VerifyResult(tuple(problems))

    # --- consoles ------------------------------------------------------------------------

    def get_instance_console(self, instance: values.InstanceSpec) -> values.ConsoleInfo:
        if instance.console.vnc:
            with self.conn.translated(f"find the console of {instance.name}"):
                dom = self._own(instance.name)
                listen, port = domxml.graphics_port(dom.XMLDesc(0))
            return values.ConsoleInfo(
                instance=instance.name, kind=values.ConsoleKind.VNC, host=listen, port=port
            )
        if instance.console.serial:
            return values.ConsoleInfo(
                instance=instance.name,
                kind=values.ConsoleKind.SERIAL,
                command=("virsh", "-c", self.uri, "console", instance.name),
            )
        return super().get_instance_console(instance)


_active = outcome.is_active


def _alive(dom: libvirt.virDomain) -> bool:
    try:
        return _active(dom)
    except libvirt.libvirtError:
        return False


def _scrub(message: str, xml: str) -> str:
    """Never let a VNC password reach an error message (libvirt may quote XML attributes)."""
    password = domxml.graphics_password(xml)
    if password:
        message = message.replace(password, "***")
    return message
