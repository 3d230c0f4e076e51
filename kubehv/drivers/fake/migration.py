"""Migration between two fake nodes, in Ganeti's order, through the migration info blob.

Why this module exists: the operator's migration protocol (and its failure, abort and
restart paths) must be testable without QEMU, against a fake that fails the way libvirt
does. Each fake node is a state directory; the target's "connection URI" is
``fake://<target state dir>`` (``MigrationTarget.uri``), so the source reaches the target
the way libvirt reaches a peer libvirtd: by address, not through a shared Python object.

The transfer belongs to the "hypervisor", not to the agent: ``migrate_instance`` writes a
durable job (:mod:`kubehv.drivers.fake.job`: start time, duration, the instance's state) and
then only waits for it. Every read, from any process on either node, computes the job's
progress and outcome from the file and the clock, so an agent killed mid-transfer changes
nothing: the migration completes (or fails, per the fault knobs) on its own, exactly like
libvirtd's job. The protocol:

1. ``migration_info`` (source): a JSON blob with the instance's state, memory, boot count,
   a random token and where the job will live; the source record remembers the token.
2. ``accept_instance`` (target): an ``incoming`` record that reserves memory (the minimum
   must fit, as :func:`kubehv.drivers.base.startup_memory` says).
3. ``migrate_instance`` (source): checks the target's ``incoming`` record, writes the job
   (``migration_duration_s``, or memory / ``MigrationOptions.bandwidth_mib_s``), and waits
   for its outcome. ``abort_migration`` dates an abort in the job: it wins only if the
   transfer has not ended by then. At the end the target record becomes the instance and
   the source record a ``migrated`` leftover (no longer listed); on failure the incoming
   copy disappears and the source instance runs on as before.
4. ``finalize_migration_dst(success)``: keeps the target copy; undoing removes only a copy
   still incoming, never one that arrived (``MigrationCompleted``).
5. ``finalize_migration_source(success)``: removes the ``migrated`` leftover; refuses to
   remove an instance that still runs here.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any, ClassVar

from kubehv.drivers import errors, values
from kubehv.drivers.fake import job as fjob
from kubehv.drivers.fake import params as fparams
from kubehv.drivers.fake import store as fstore
from kubehv.drivers.storage import disks as storage_disks

MIB = 1024 * 1024
URI_PREFIX = "fake://"

_STATUS = {
    "active": values.MigrationState.ACTIVE,
    "completed": values.MigrationState.COMPLETED,
    "failed": values.MigrationState.FAILED,
    "cancelled": values.MigrationState.CANCELLED,
}


def state_dir_from_uri(uri: str | None) -> str:
    """``fake:///var/lib/node-b`` -> ``/var/lib/node-b``; anything else is a MigrationError."""
    if uri is None or not uri.startswith(URI_PREFIX) or not uri[len(URI_PREFIX) :].startswith("/"):
        raise errors.MigrationError(
            f"the fake hypervisor migrates to MigrationTarget.uri = 'fake:///<target state "
            f"dir>', got {uri!r}"
        )
    return uri[len(URI_PREFIX) :]


def fault(step: str, name: str) -> errors.MigrationError:
    return errors.MigrationError(f"migration of {name!r} failed at {step} (fake fault)")


def parse_blob(info: str, name: str) -> dict[str, Any]:
    try:
        blob = json.loads(info)
    except ValueError as exc:
        raise errors.MigrationError(f"migration info for {name!r} is not fake JSON") from exc
    if not isinstance(blob, dict) or blob.get("name") != name or not blob.get("token"):
        raise errors.MigrationError(f"migration info does not describe instance {name!r}")
    return blob


class FakeMigration:
    """Migration half of :class:`kubehv.drivers.fake.driver.FakeHypervisor`."""

    POLL_S: ClassVar[float] = 0.02

    store: fstore.Store
    storage: storage_disks.NodeStorage
    config: values.DriverConfig
    clock: Callable[[], float]
    _starting: set[str]

    def _free_mib(self, now: float) -> int:
        raise NotImplementedError

    def _new_id(self) -> str:
        return "fake-" + secrets.token_hex(4)

    # --- source side ---------------------------------------------------------------------

    def migration_info(self, instance: values.InstanceSpec) -> str:
        if fparams.fails_at(instance.params, "migration_info"):
            raise fault("migration_info", instance.name)
        with self.store.locked():
            rec = self.store.current(instance.name, self.clock())
            if rec is None or not rec.alive:
                raise errors.InstanceNotFound(instance.name)
            if rec.migration is not None and rec.migration.state == fjob.ACTIVE:
                raise errors.MigrationError(f"instance {instance.name!r} is already migrating")
            token = secrets.token_hex(16)
            rec.migration = fstore.MigrationRecord(
                token=token,
                role="source",
                total_bytes=rec.memory_mib * MIB,
                prev_status=rec.status,
                job_path=fjob.path_for(self.store.state_dir, token),
            )
            self.store.save(rec)
        blob = {
            "version": 1,
            "name": rec.name,
            "uid": rec.uid,
            "token": token,
            "source_node": self.config.node_name,
            "job_path": rec.migration.job_path,
            "status": rec.status,
            "memory_mib": rec.memory_mib,
            "memory_min_mib": rec.memory_min_mib,
            "memory_max_mib": rec.memory_max_mib,
            "vcpus": rec.vcpus,
            "boot_count": rec.boot_count,
            "params": rec.params,
        }
        return json.dumps(blob, sort_keys=True)

    def migrate_instance(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None = None,
    ) -> None:
        name = instance.name
        self._starting.add(name)
        try:
            path = self._start_job(instance, target, live, options)
        finally:
            self._starting.discard(name)
        # The job runs in the "hypervisor": this call only waits for its outcome.
        while True:
            got = fjob.read(path, self.clock())
            if got is None:
                raise errors.MigrationError(f"the migration job of {name!r} disappeared")
            record, result = got
            if result.state != fjob.ACTIVE:
                break
            time.sleep(min(self.POLL_S, max(0.0, record.end - self.clock())) or self.POLL_S)
        with self.store.locked():
            rec = self.store.current(name, self.clock())  # apply the outcome to the record
        self._settle_target(target, name)
        if result.state == fjob.COMPLETED:
            return
        stays = rec is not None and rec.alive
        where = "stays on the source node" if stays else "no longer runs on the source node"
        cls = errors.MigrationAborted if result.state == fjob.CANCELLED else errors.MigrationError
        raise cls(f"{result.message}; the instance {where}")

    def _start_job(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None,
    ) -> str:
        """Check both sides and write the job; from then on the transfer runs by itself."""
        name = instance.name
        try:
            dst = fstore.Store(state_dir_from_uri(target.uri), create=False)
        except errors.HypervisorUnavailable as exc:
            self._fail_prepared(name, f"cannot reach target node {target.node!r}: {exc.message}")
            raise errors.MigrationError(
                f"cannot reach target node {target.node!r}: {exc.message}"
            ) from exc
        with self.store.locked():
            rec = self.store.current(name, self.clock())
            if rec is None or not rec.alive:
                raise errors.InstanceNotFound(name)
            mig = rec.migration
            if mig is None or mig.role != "source":
                raise errors.MigrationError(f"call migration_info for {name!r} first")
            if mig.state == fjob.CANCELLED:
                raise errors.MigrationAborted(f"migration of {name!r} was aborted")
            if mig.state != "prepared":
                raise errors.MigrationError(f"migration of {name!r} is already {mig.state}")
            token = mig.token
            duration = fparams.as_float(instance.params, "migration_duration_s") or 0.0
            if options is not None and options.bandwidth_mib_s:
                duration = max(duration, rec.memory_mib / options.bandwidth_mib_s)
            fails = fparams.fails_at(instance.params, "migrate")
            if fails:
                duration = max(duration, 0.02)  # it fails halfway: it must have a halfway
            now = self.clock()
            job = fjob.Job(
                token=token,
                name=name,
                target_node=target.node,
                started_at=now,
                duration_s=duration,
                total_bytes=rec.memory_mib * MIB,
                live=live,
                prev_status=rec.status,
                memory_mib=rec.memory_mib,
                boot_count=rec.boot_count,
                cpu_time_s=_cpu_time(rec, now),
                crash_at=rec.crash_at,
                fail_at=now + duration / 2 if fails else None,
            )
            path = mig.job_path
        # The job starts under the target's lock, so the target can never drop a copy
        # that a job is about to fill (it sees the job, or the job sees no copy).
        with dst.locked():
            inc = dst.load(name)
            accepted = inc is not None and inc.migration is not None
            if accepted and inc is not None and inc.migration is not None:
                accepted = inc.migration.token == token
            if accepted:
                fjob.create(path, job)
        if not accepted:
            message = f"target node {target.node!r} has not accepted instance {name!r}"
            self._fail_prepared(name, message)
            raise errors.MigrationError(f"{message} (call accept_instance)")
        with self.store.locked():
            now = self.clock()
            rec = self.store.current(name, now)
            mig = rec.migration if rec is not None else None
            # (reading it just now saw the job: "active"; anything else ended it meanwhile)
            if rec is None or mig is None or mig.token != token or mig.state != fjob.ACTIVE:
                fjob.amend(path, now, abort_at=now)  # aborted or gone meanwhile
                return path
            mig.state, mig.live, mig.prev_status = fjob.ACTIVE, live, job.prev_status
            mig.processed_bytes, mig.total_bytes = 0, job.total_bytes
            if not live and rec.status != fstore.PAUSED:
                _freeze(rec, now)
            self.store.save(rec)
        return path

    def _fail_prepared(self, name: str, message: str) -> None:
        with self.store.locked():
            rec = self.store.current(name, self.clock())
            mig = rec.migration if rec is not None else None
            if rec is not None and mig is not None and mig.state == "prepared":
                mig.state, mig.message = fjob.FAILED, message
                self.store.save(rec)

    def _settle_target(self, target: values.MigrationTarget, name: str) -> None:
        """Let the target's record follow the job now (its own reads would do it too)."""
        try:
            dst = fstore.Store(state_dir_from_uri(target.uri), create=False)
        except errors.HypervisorError:
            return
        with dst.locked():
            dst.current(name, self.clock())

    def get_migration_status(
        self, instance: values.InstanceSpec, target: values.MigrationTarget | None = None
    ) -> values.MigrationStatus:
        name = instance.name
        with self.store.locked():
            rec = self.store.current(name, self.clock())
        mig = rec.migration if rec is not None else None
        if rec is None or rec.status == fstore.MIGRATED:
            return self._left(instance, target, mig)
        if not rec.alive:
            return values.MigrationStatus(
                state=values.MigrationState.FAILED,
                message=f"{name!r} is {rec.status} on the source node (not migrated)",
            )
        if mig is None or mig.role != "source" or mig.state == "prepared":
            if name in self._starting:
                return values.MigrationStatus(
                    state=values.MigrationState.ACTIVE,
                    memory_total_bytes=rec.memory_mib * MIB,
                    memory_remaining_bytes=rec.memory_mib * MIB,
                    message="the migration job is starting",
                )
            return values.MigrationStatus(
                state=values.MigrationState.FAILED,
                message=f"no migration job runs for {name!r}; it still runs on the source node",
            )
        return _status(mig)

    def _left(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget | None,
        mig: fstore.MigrationRecord | None,
    ) -> values.MigrationStatus:
        """The instance is no longer here: COMPLETED, confirmed on ``target`` if given."""
        done = mig is not None and mig.state == fjob.COMPLETED
        left = values.MigrationStatus(
            state=values.MigrationState.COMPLETED,
            memory_total_bytes=mig.total_bytes if done and mig else 0,
            memory_processed_bytes=mig.total_bytes if done and mig else 0,
            message=mig.message if done and mig else f"{instance.name!r} has left the source node",
        )
        if target is None:
            return left
        dst = fstore.Store(state_dir_from_uri(target.uri), create=False)
        with dst.locked():
            there = dst.current(instance.name, self.clock())
        if there is not None and there.alive and there.uid == instance.uid:
            return left
        return values.MigrationStatus(
            state=values.MigrationState.FAILED,
            message=(
                f"{instance.name!r} left the source node but is not on the target node "
                f"{target.node}: it runs on neither node"
            ),
        )

    def abort_migration(self, instance: values.InstanceSpec) -> None:
        with self.store.locked():
            now = self.clock()
            rec = self.store.current(instance.name, now)
            mig = rec.migration if rec is not None else None
            if rec is None or mig is None or mig.role != "source":
                return  # no job: nothing to abort (get_migration_status tells the outcome)
            if mig.state == "prepared":
                mig.state, mig.message = fjob.CANCELLED, "aborted before the transfer started"
                self.store.save(rec)
            elif mig.state == fjob.ACTIVE:
                fjob.amend(mig.job_path, now, abort_at=now)  # too late if it has ended
                self.store.current(instance.name, self.clock())

    def finalize_migration_source(
        self, instance: values.InstanceSpec, success: bool, live: bool
    ) -> None:
        name = instance.name
        with self.store.locked():
            rec = self.store.current(name, self.clock())
            if rec is None:
                if success:  # it left: its node-made disks live on the target now
                    self.storage.drop_local(instance)
                    return  # nothing (left) to finalize: idempotent
                raise _gone_from_source(name)
            mig = rec.migration
            moved = rec.status == fstore.MIGRATED
            if not success:
                if moved or not rec.alive:
                    raise _gone_from_source(name)
                if mig is not None and mig.role == "source" and mig.state == fjob.ACTIVE:
                    raise errors.MigrationError(
                        f"the migration of {name!r} is still running: abort it first"
                    )
                fstore.restore(rec, self.clock())
                self.store.save(rec)
                return
            if not moved:
                state = mig.state if mig is not None else "not started"
                raise errors.MigrationError(
                    f"refusing to remove {name!r} from the source node: its migration has not "
                    f"completed ({state}) and the instance still runs here"
                )
            if fparams.fails_at(instance.params, "finalize_source"):
                raise fault("finalize_source", name)
            self.store.remove(name)
            self.storage.drop_local(instance)  # the disks live on the target now


def _status(mig: fstore.MigrationRecord) -> values.MigrationStatus:
    state = _STATUS.get(mig.state, values.MigrationState.FAILED)
    processed = mig.total_bytes if state is values.MigrationState.COMPLETED else mig.processed_bytes
    return values.MigrationStatus(
        state=state,
        memory_total_bytes=mig.total_bytes,
        memory_processed_bytes=processed,
        memory_remaining_bytes=max(0, mig.total_bytes - processed),
        message=mig.message,
    )


def _gone_from_source(name: str) -> errors.MigrationError:
    return errors.MigrationError(
        f"after the migration {name!r} no longer runs on the source node; it must not be "
        "started here again unless it runs nowhere"
    )


def _cpu_time(rec: fstore.Record, now: float) -> float:
    extra = now - rec.running_since if rec.running_since is not None else 0.0
    return rec.cpu_time_s + max(0.0, extra)


def _freeze(rec: fstore.Record, now: float) -> None:
    rec.cpu_time_s, rec.running_since, rec.status = _cpu_time(rec, now), None, fstore.PAUSED
