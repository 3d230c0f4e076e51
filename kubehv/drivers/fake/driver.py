"""The fake hypervisor: instances are JSON records in a state directory, nothing runs.

Why this module exists: the operator's tests (hundreds of instances, three nodes, injected
failures, agents killed and restarted) need a driver that honours the whole contract,
persists like a real hypervisor and fails on command, without QEMU. Lifecycle and inventory
live here; migration lives in :mod:`kubehv.drivers.fake.migration` (source, transfer)
and :mod:`kubehv.drivers.fake.migration_target` (target); the files in
:mod:`kubehv.drivers.fake.store`. See docs/drivers.md ("The fake driver") for the knobs.

The node: ``DriverConfig.state_dir`` (or ``uri = fake:///<dir>``) is its state directory;
``DriverConfig.params`` size it (``memory_total_mib`` / ``memory_mib``, ``cpu_total``...).
Free memory is total - dom0 - the memory of every live or incoming instance.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import ClassVar

from kubehv.drivers import base, errors, parameters, values
from kubehv.drivers.fake import disks, memstats, migration, migration_target, store
from kubehv.drivers.fake import params as fparams

_STATES = {
    store.RUNNING: values.InstanceState.RUNNING,
    store.PAUSED: values.InstanceState.PAUSED,
    store.SHUTTING_DOWN: values.InstanceState.SHUTTING_DOWN,
    store.CRASHED: values.InstanceState.CRASHED,
}


class FakeHypervisor(
    migration.FakeMigration, migration_target.FakeMigrationTarget, base.BaseHypervisor
):
    """Ganeti's fake hypervisor, with persistence, migration and fault injection."""

    NAME: ClassVar[str] = "fake"
    PARAMETERS: ClassVar = fparams.PARAMETERS
    NODE_PARAMETERS: ClassVar = fparams.NODE_PARAMETERS
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
        kernel_boot=True,
    )

    def __init__(self, config: values.DriverConfig) -> None:
        super().__init__(config)
        self.node_params = parameters.check_syntax(fparams.NODE_PARAMETERS, config.params)
        state_dir = config.state_dir
        if state_dir is None and config.uri is not None:
            state_dir = migration.state_dir_from_uri(config.uri)
        if state_dir is None:
            # No persistence asked for: a private directory (lost with the process's tmp).
            state_dir = tempfile.mkdtemp(prefix="kubehv-fake-")
        self.store = store.Store(state_dir)
        self.storage = disks.node_storage(state_dir, self._int_param("image_max_size_mib"))
        self.clock: Callable[[], float] = time.time
        # Names whose migrate_instance call is starting in this object: only to say "not
        # started yet" instead of "no job"; outcomes are read from the job files.
        self._starting: set[str] = set()

    @property
    def uri(self) -> str:
        """This node's fake connection URI: what a source puts in ``MigrationTarget.uri``."""
        return migration.URI_PREFIX + self.store.state_dir

    def migration_target(self, address: str | None = None) -> values.MigrationTarget:
        """The :class:`values.MigrationTarget` that reaches this fake node."""
        node = self.config.node_name
        return values.MigrationTarget(node=node, address=address or node, uri=self.uri)

    # --- helpers -------------------------------------------------------------------------

    def _int_param(self, name: str) -> int:
        value = self.node_params.get(name)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    def _total_mib(self) -> int:
        return self._int_param("memory_mib") or self._int_param("memory_total_mib")

    def _used_mib(self, now: float) -> int:
        used = 0
        for name in self.store.names():
            rec = self.store.current(name, now)
            if rec is not None and rec.holds_memory:
                used += rec.memory_mib
        return used

    def _free_mib(self, now: float) -> int:
        with self.store.locked():
            used = self._used_mib(now)
        return max(0, self._total_mib() - self._int_param("memory_dom0_mib") - used)

    def _info(self, rec: store.Record, now: float) -> values.InstanceInfo:
        return values.InstanceInfo(
            name=rec.name,
            id=rec.id,
            memory_mib=rec.memory_mib,
            vcpus=rec.vcpus,
            state=_STATES.get(rec.status, values.InstanceState.UNKNOWN),
            cpu_time_s=migration._cpu_time(rec, now),
            uid=rec.uid,
        )

    def _live(self, name: str, now: float) -> store.Record:
        rec = self.store.current(name, now)
        if rec is None or not rec.alive:
            raise errors.InstanceNotFound(name)
        return rec

    def _crash_at(self, params: dict[str, values.ParamValue], now: float) -> float | None:
        after = fparams.as_float(params, "crash_after_s")
        return now + after if after else None

    # --- lifecycle -----------------------------------------------------------------------

    def start_instance(
        self, instance: values.InstanceSpec, startup_paused: bool = False
    ) -> values.InstanceInfo:
        self.check_instance_spec(instance)
        with self.store.locked():
            _refuse_running(instance.name, self.store.current(instance.name, self.clock()))
        # Outside the lock, like libvirt: a download never holds up the node's other calls.
        prepared = disks.prepare(self.storage, instance)
        time.sleep(fparams.as_float(instance.params, "start_delay_s") or 0.0)
        try:
            return self._start(instance, startup_paused)
        except BaseException:
            if prepared is not None:
                prepared.discard()
            raise

    def _start(self, instance: values.InstanceSpec, startup_paused: bool) -> values.InstanceInfo:
        with self.store.locked():
            now = self.clock()
            old = self.store.current(instance.name, now)
            _refuse_running(instance.name, old)
            if fparams.as_bool(instance.params, "fail_start"):
                raise errors.InstanceStartError(
                    f"instance {instance.name!r} failed to start (fake fault fail_start)"
                )
            memory = self.instance_startup_memory(instance, self._free_mib(now))
            params = dict(instance.params)
            rec = store.Record(
                name=instance.name,
                uid=instance.uid,
                id=self._new_id(),
                status=store.PAUSED if startup_paused else store.RUNNING,
                memory_mib=memory,
                memory_min_mib=instance.memory_min_mib,
                memory_max_mib=instance.memory_max_mib,
                vcpus=instance.vcpus,
                params=params,
                boot_count=old.boot_count + 1 if old is not None else 1,
                running_since=None if startup_paused else now,
                crash_at=self._crash_at(params, now),
            )
            self.store.save(rec)
            return self._info(rec, now)

    def stop_instance(
        self,
        instance: values.InstanceSpec | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
    ) -> None:
        target = name if name is not None else instance.name if instance is not None else None
        if target is None:
            raise errors.InvalidInstanceSpec("stop_instance needs an instance or a name")
        with self.store.locked():
            now = self.clock()
            rec = self.store.current(target, now)
            if rec is None or rec.status in (store.INCOMING, store.MIGRATED):
                return  # not running here: not an error
            if force or not rec.alive:
                store.source_gone(rec, now, "the instance was stopped on the source node")
                self.store.remove(target)
                return
            if fparams.as_bool(rec.params, "ignore_shutdown"):
                return  # the guest ignores the request; shutdown_instance will force
            delay = fparams.as_float(rec.params, "shutdown_delay_s") or 0.0
            if delay <= 0:
                store.source_gone(rec, now, "the instance shut down on the source node")
                self.store.remove(target)
            elif rec.status != store.SHUTTING_DOWN:
                rec.status, rec.off_at = store.SHUTTING_DOWN, now + delay
                self.store.save(rec)

    def cleanup_instance(self, instance_name: str) -> None:
        """Remove what a stopped, crashed or migrated-away instance left behind."""
        with self.store.locked():
            rec = self.store.current(instance_name, self.clock())
            if rec is not None and rec.status in (store.CRASHED, store.MIGRATED):
                self.store.remove(instance_name)

    def reboot_instance(self, instance: values.InstanceSpec) -> None:
        with self.store.locked():
            now = self.clock()
            rec = self._live(instance.name, now)
            rec.cpu_time_s = migration._cpu_time(rec, now)
            rec.status, rec.running_since, rec.off_at = store.RUNNING, now, None
            rec.boot_count += 1
            rec.crash_at = self._crash_at(rec.params, now)
            self.store.save(rec)

    def pause_instance(self, instance: values.InstanceSpec) -> None:
        with self.store.locked():
            now = self.clock()
            rec = self._live(instance.name, now)
            if rec.status == store.RUNNING:
                migration._freeze(rec, now)
                self.store.save(rec)

    def resume_instance(self, instance: values.InstanceSpec) -> None:
        with self.store.locked():
            now = self.clock()
            rec = self._live(instance.name, now)
            if rec.status == store.PAUSED:
                rec.status, rec.running_since = store.RUNNING, now
                self.store.save(rec)

    def balloon_instance_memory(self, instance: values.InstanceSpec, mem_mib: int) -> None:
        base.check_balloon_memory(instance, mem_mib)
        with self.store.locked():
            now = self.clock()
            rec = self._live(instance.name, now)
            grow = mem_mib - rec.memory_mib
            free = self._free_mib(now)
            if grow > free:
                raise errors.InsufficientMemory(instance.name, grow, free)
            rec.memory_mib = mem_mib
            rec.memory_min_mib, rec.memory_max_mib = (
                instance.memory_min_mib,
                instance.memory_max_mib,
            )
            self.store.save(rec)

    def get_instance_memory_stats(self, instance_name: str) -> values.MemoryStats | None:
        return memstats.read(self.store, instance_name, self.clock())

    def crash_instance(self, instance_name: str, reason: str = "crashed on request") -> None:
        """Make a live instance crash now (tests, chaos). Same as :func:`crash_instance`."""
        with self.store.locked():
            now = self.clock()
            rec = self._live(instance_name, now)
            store.crash(rec, now, reason)
            self.store.save(rec)

    def boot_count(self, instance_name: str) -> int:
        """How many times the instance booted (start, reboots, restarts after a crash)."""
        with self.store.locked():
            rec = self.store.load(instance_name)
        if rec is None:
            raise errors.InstanceNotFound(instance_name)
        return rec.boot_count

    # --- inventory -----------------------------------------------------------------------

    def _records(self, now: float) -> list[store.Record]:
        with self.store.locked():
            recs = [self.store.current(name, now) for name in self.store.names()]
        return [r for r in recs if r is not None]

    def list_instances(self) -> list[str]:
        return [r.name for r in self._records(self.clock()) if r.alive]

    def get_instance_info(self, instance_name: str) -> values.InstanceInfo | None:
        """Live instances, and crashed ones (state ``crashed``) until stopped or cleaned up."""
        now = self.clock()
        with self.store.locked():
            rec = self.store.current(instance_name, now)
        if rec is None or not (rec.alive or rec.status == store.CRASHED):
            return None
        return self._info(rec, now)

    def get_all_instances_info(self) -> list[values.InstanceInfo]:
        now = self.clock()
        return [self._info(r, now) for r in self._records(now) if r.alive]

    def list_foreign_instances(self) -> list[str]:
        return self.store.foreign_names()

    def fetch_instance_images(
        self,
        instance: values.InstanceSpec,
        progress: Callable[[values.ImageProgress], None] | None = None,
    ) -> None:
        disks.fetch(self.storage, instance, progress)

    def release_instance_storage(self, instance: values.InstanceSpec) -> list[str]:
        return self.storage.release(instance)

    def get_node_info(self) -> values.NodeInfo:
        now = self.clock()
        with self.store.locked():
            used = self._used_mib(now)
        total, dom0 = self._total_mib(), self._int_param("memory_dom0_mib")
        return values.NodeInfo(
            memory_total_mib=total,
            memory_free_mib=max(0, total - dom0 - used),
            memory_dom0_mib=dom0,
            cpu_total=self._int_param("cpu_total") or 1,
            cpu_nodes=1,
            cpu_sockets=1,
            hypervisor_version=str(self.node_params.get("hypervisor_version", "")),
            instances_memory_mib=used,
        )

    def verify(self) -> values.VerifyResult:
        problems: list[str] = []
        state_dir = self.store.state_dir
        try:
            fd, probe = tempfile.mkstemp(prefix=".verify-", dir=self.store.instances_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problems.append(f"fake state directory {state_dir} is not writable: {exc.strerror}")
        configured = self.node_params.get("verify_fail")
        if configured:
            problems.append(str(configured))
        from_file = self.store.verify_fail_message()
        if from_file:
            problems.append(from_file)
        return values.VerifyResult(problems=tuple(problems))

    def get_instance_console(self, instance: values.InstanceSpec) -> values.ConsoleInfo:
        return values.ConsoleInfo(
            instance=instance.name,
            kind=values.ConsoleKind.MESSAGE,
            message=(
                f"{instance.name} is a fake instance on node {self.config.node_name}: it has no "
                f"console; its state is {self.store.instances_dir}/{instance.name}.json"
            ),
        )


def crash_instance(state_dir: str, name: str, reason: str = "crashed on request") -> None:
    """Crash a fake instance from outside its agent (another process, a test)."""
    FakeHypervisor(values.DriverConfig(node_name="", state_dir=state_dir)).crash_instance(
        name, reason
    )


def add_foreign_instance(state_dir: str, name: str) -> None:
    """Pretend something kubehv did not create runs on this fake node (an orphan)."""
    foreign = store.Store(state_dir).foreign_dir
    os.makedirs(foreign, exist_ok=True)
    with open(os.path.join(foreign, name), "w") as fh:
        fh.write("foreign\n")


def _refuse_running(name: str, old: store.Record | None) -> None:
    """A live or incoming copy is here already: starting another would run it twice."""
    if old is not None and (old.alive or old.status == store.INCOMING):
        raise errors.InstanceAlreadyRunning(name)
