"""The kvm driver's migration methods, in Ganeti's order (a mixin of ``LibvirtHypervisor``).

Why this module exists: the contract's migration half -- what the source offers, what the
target checks, the transfer, its status and abort, and both finalize steps -- reads best in
one place, apart from the lifecycle methods. The transfer itself is in
:mod:`kubehv.drivers.libvirt.migration`, and what a migration came to (read from libvirt on
both nodes, never from this process's memory) in :mod:`kubehv.drivers.libvirt.outcome`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import libvirt

from kubehv.drivers import base, errors, values
from kubehv.drivers.libvirt import connection, domxml, migration, outcome, workloads
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.storage import disks


class MigrationSteps:
    """Source and target sides of a migration between two libvirt nodes (peer to peer)."""

    config: values.DriverConfig
    conn: connection.Connection
    settings: hvparams.NodeSettings
    storage: disks.NodeStorage
    _starting: set[str]
    _aborted: set[str]
    _lock: threading.Lock

    if TYPE_CHECKING:  # provided by LibvirtHypervisor (and BaseHypervisor)

        def _lookup(self, name: str) -> libvirt.virDomain | None: ...

        def _own(self, name: str) -> libvirt.virDomain: ...

        @staticmethod
        def _tag(dom: libvirt.virDomain) -> domxml.Tag | None: ...

        @classmethod
        def check_instance_spec(cls, instance: values.InstanceSpec) -> None: ...

        def get_node_info(self) -> values.NodeInfo: ...

    def migration_info(self, instance: values.InstanceSpec) -> str:
        with self.conn.translated(f"prepare the migration of {instance.name}"):
            return migration.migration_info(self._own(instance.name), instance, self.conn.uri)

    def accept_instance(self, instance: values.InstanceSpec, info: str, target: str) -> None:
        """Target side: libvirt receives the guest itself (peer to peer); we check room.

        Room by :func:`base.startup_memory`: the minimum must fit (the source balloons the
        guest down to what fits before the transfer, as the controller planned).
        """
        data = migration.parse_info(info)
        if data.get("uid") not in (None, instance.uid):
            raise errors.MigrationError(
                f"migration info is for instance uid {data.get('uid')!r}, not {instance.uid!r}"
            )
        self.check_instance_spec(instance)
        hvparams.check_instance_on_node(instance)
        with self.conn.translated(f"accept {instance.name}"):
            if self._lookup(instance.name) is not None:
                raise errors.InstanceAlreadyRunning(instance.name)
            base.startup_memory(instance, self.get_node_info().memory_free_mib)
            workloads.accept(self.storage, self.conn.get(), self.settings, instance)

    def migrate_instance(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None = None,
    ) -> None:
        with self._lock:
            self._starting.add(instance.name)
            self._aborted.discard(instance.name)
        try:
            self._migrate(instance, target, live, options)
        except errors.MigrationAborted:
            raise
        except errors.MigrationError as exc:
            # After our abort the job can end with the target's error instead ("load of
            # migration failed": the source cut the stream) -- seen on non-live jobs. It
            # ended because we aborted it: say so.
            if instance.name not in self._aborted:
                raise
            raise errors.MigrationAborted(
                f"the migration of {instance.name!r} was aborted ({exc.message})"
            ) from exc
        finally:
            with self._lock:
                self._starting.discard(instance.name)

    def _migrate(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None,
    ) -> None:
        params = hvparams.instance_params(instance)
        options = options or values.MigrationOptions()
        bandwidth = options.bandwidth_mib_s
        if bandwidth is None:
            bandwidth = int(params["migration_bandwidth_mib_s"])
        downtime = options.max_downtime_ms
        if downtime is None:
            downtime = int(params["migration_downtime_ms"])
        with self.conn.translated(f"migrate {instance.name}"):
            dom = self._own(instance.name)
            uuid = dom.UUIDString()
            flags, extra = workloads.storage_migration(self.storage, dom.XMLDesc(0), instance)
            with self.conn.dedicated() as private:
                migration.migrate(
                    private.lookupByUUIDString(uuid),
                    target,
                    live=live,
                    bandwidth_mib_s=bandwidth,
                    downtime_ms=downtime,
                    extra_flags=flags,
                    extra_params=extra,
                )

    def get_migration_status(
        self, instance: values.InstanceSpec, target: values.MigrationTarget | None = None
    ) -> values.MigrationStatus:
        with self.conn.translated(f"read the migration status of {instance.name}"):
            dom = self._lookup(instance.name)
            if dom is not None and self._tag(dom) is None:
                dom = None  # not ours (or it left while we looked)
            status = outcome.source_status(
                dom,
                starting=instance.name in self._starting,
                aborted=instance.name in self._aborted,
                name=instance.name,
            )
        if status is not None:
            return status
        if target is None:
            return outcome.left(instance.name)
        return outcome.confirm_on_target(instance, target)

    def abort_migration(self, instance: values.InstanceSpec) -> None:
        with self.conn.translated(f"abort the migration of {instance.name}"):
            dom = self._lookup(instance.name)
            if dom is not None:
                with self._lock:
                    self._aborted.add(instance.name)
                migration.abort(dom)

    def finalize_migration_dst(
        self, instance: values.InstanceSpec, info: str, success: bool
    ) -> None:
        with self.conn.translated(f"finish receiving {instance.name}"):
            dom = self._lookup(instance.name)
            tag = self._tag(dom) if dom is not None else None
            if dom is None or tag is None or tag.uid != instance.uid:
                if success:
                    raise errors.MigrationError(
                        f"{instance.name!r} did not arrive on this node after a migration "
                        "reported as successful"
                    )
                if dom is None:  # nothing of that name here: drop what accept_instance made
                    self.storage.drop_local(instance)
                return
            if success:
                # libvirt resumed the copy itself (or left it paused because the source
                # was paused: the instance keeps its state). Still incoming: too early.
                if outcome.incoming(dom):
                    raise errors.MigrationError(
                        f"{instance.name!r} is still arriving on this node: its migration "
                        "has not completed, so it cannot be kept yet"
                    )
                return
            if not outcome.incoming(dom):
                raise errors.MigrationCompleted(instance.name, self.config.node_name)
            _remove(dom)  # still incoming: the source copy exists, this one must not run
            self.storage.drop_local(instance)  # what accept_instance made

    def finalize_migration_source(
        self, instance: values.InstanceSpec, success: bool, live: bool
    ) -> None:
        """On success, remove what is left here -- but never a copy libvirt still runs here.

        A source domain that runs (or waits) with no completed outgoing migration is the
        instance, not a leftover: ``success=True`` is then refused with MigrationError, so
        a wrong caller can never lose the guest.
        """
        with self.conn.translated(f"finish sending {instance.name}"):
            dom = self._lookup(instance.name)
            tag = self._tag(dom) if dom is not None else None
            ours = dom is not None and tag is not None and tag.uid == instance.uid
            if success:
                if dom is None:  # it left: its node-made disks live on the target now
                    self.storage.drop_local(instance)
                if not ours or dom is None:
                    return
                still = outcome.source_status(dom, starting=False, name=instance.name)
                if still is not None:
                    raise errors.MigrationError(
                        f"refusing to remove {instance.name!r} from the source node: its "
                        f"migration has not completed ({still.state.value}: {still.message})"
                    )
                _remove(dom)
                self.storage.drop_local(instance)  # the disks live on the target now
                return
            if not ours or dom is None or not outcome.is_active(dom):
                raise errors.MigrationError(
                    f"after a failed migration {instance.name!r} no longer runs on the source "
                    "node; it must be started again"
                )
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()  # a non-live attempt paused it


def _remove(dom: libvirt.virDomain) -> None:
    """Destroy (and undefine, if persistent) a domain that must not run here."""
    with contextlib.suppress(libvirt.libvirtError):
        if outcome.is_active(dom):
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isPersistent():
            dom.undefine()
