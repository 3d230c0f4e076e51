"""The target half of a fake migration: accepting an incoming copy, keeping or undoing it.

Why this module exists: the target's rules are the exactly-once ones -- it reserves memory
by the instance's minimum (:func:`kubehv.drivers.base.startup_memory`), and undoing removes
only a copy still incoming, never one that arrived (``MigrationCompleted``) -- and read best
apart from the source's transfer (:mod:`kubehv.drivers.fake.migration`, whose module
docstring describes the whole protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kubehv.drivers import base, errors, values
from kubehv.drivers.fake import disks as fdisks
from kubehv.drivers.fake import job as fjob
from kubehv.drivers.fake import params as fparams
from kubehv.drivers.fake import store as fstore
from kubehv.drivers.fake.migration import MIB, fault, parse_blob
from kubehv.drivers.storage import disks as storage_disks


class FakeMigrationTarget:
    """Target half of :class:`kubehv.drivers.fake.driver.FakeHypervisor`'s migration."""

    store: fstore.Store
    storage: storage_disks.NodeStorage
    config: values.DriverConfig
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by FakeHypervisor and FakeMigration

        def _free_mib(self, now: float) -> int: ...

        def _new_id(self) -> str: ...

    def accept_instance(self, instance: values.InstanceSpec, info: str, target: str) -> None:
        if fparams.fails_at(instance.params, "accept"):
            raise fault("accept", instance.name)
        blob = parse_blob(info, instance.name)
        # The node-made disks, as libvirt's target makes them before the copy (outside the
        # lock: a download never holds up the node's other calls).
        fdisks.prepare(self.storage, instance)
        with self.store.locked():
            now = self.clock()
            old = self.store.current(instance.name, now)
            if old is not None:
                if old.migration is not None and old.migration.token == blob["token"]:
                    return  # accepted already
                if old.alive or old.status == fstore.INCOMING:
                    raise errors.InstanceAlreadyRunning(instance.name)
                self.store.remove(instance.name)
            memory = int(blob["memory_mib"])
            low, high = instance.memory_min_mib, instance.memory_max_mib
            # The startup-memory rule: the minimum must fit; reserve what fits, up to what
            # the guest has now (the source balloons it down before the transfer).
            fits = base.startup_memory(instance, self._free_mib(now))
            reserve = max(low, min(memory, fits))
            self.store.save(
                fstore.Record(
                    name=instance.name,
                    uid=str(blob.get("uid", instance.uid)),
                    id=self._new_id(),
                    status=fstore.INCOMING,
                    memory_mib=reserve,
                    memory_min_mib=low,
                    memory_max_mib=high,
                    vcpus=int(blob.get("vcpus", instance.vcpus)),
                    params=dict(blob.get("params", {})),
                    boot_count=int(blob.get("boot_count", 1)),
                    migration=fstore.MigrationRecord(
                        token=str(blob["token"]),
                        role="target",
                        total_bytes=memory * MIB,
                        peer_node=str(blob.get("source_node", "")),
                        job_path=str(blob.get("job_path", "")),
                    ),
                )
            )

    def finalize_migration_dst(
        self, instance: values.InstanceSpec, info: str, success: bool
    ) -> None:
        token = parse_blob(info, instance.name)["token"]
        with self.store.locked():
            now = self.clock()
            rec = self.store.current(instance.name, now)
            mig = rec.migration if rec is not None else None
            ours = mig is not None and mig.role == "target" and mig.token == token
            if rec is None or mig is None or not ours:
                if success:
                    raise errors.MigrationError(
                        f"{instance.name!r} did not arrive on this node after a migration "
                        "reported as successful"
                    )
                if rec is None:  # nothing of that name here: drop what accept_instance made
                    self.storage.drop_local(instance)
                return
            if not success:
                if rec.status != fstore.INCOMING and mig.state == fjob.COMPLETED:
                    raise errors.MigrationCompleted(instance.name, self.config.node_name)
                if mig.state == fjob.ACTIVE:  # the source copy stays: the transfer fails
                    fjob.amend(mig.job_path, now, target_gone_at=now)
                    if self.store.current(instance.name, self.clock()) is not None:
                        raise errors.MigrationCompleted(instance.name, self.config.node_name)
                self.store.remove(instance.name)
                self.storage.drop_local(instance)  # what accept_instance made
                return
            if mig.state != fjob.COMPLETED:
                raise errors.MigrationError(
                    f"cannot keep {instance.name!r}: its memory transfer has not completed"
                )
            if fparams.fails_at(instance.params, "finalize_dst") and not mig.faulted:
                mig.faulted = True  # the resume failed once; the copy stays, a retry works
                self.store.save(rec)
                raise fault("finalize_dst", instance.name)
            rec.migration = None
            self.store.save(rec)
