"""Migration between two fake nodes, in Ganeti's order, through the migration info blob.

Why this module exists: the operator's migration protocol (and its failure, abort and
restart paths) must be testable without QEMU. Each fake node is a state directory; the
target's "connection URI" is ``fake://<target state dir>`` (``MigrationTarget.uri``), so the
source reaches the target the way libvirt reaches a peer libvirtd: by address, not through
a shared Python object. The protocol:

1. ``migration_info`` (source): a JSON blob with the instance's state, memory, boot count
   and a random token; the source record remembers the token.
2. ``accept_instance`` (target): parses the blob and writes an ``incoming`` record that
   reserves the memory.
3. ``migrate_instance`` (source): checks the target holds an ``incoming`` record with the
   same token, then "transfers" memory in steps (``migration_duration_s``, or memory /
   ``MigrationOptions.bandwidth_mib_s``), saving progress in the source record after each
   step, so ``get_migration_status`` -- from any thread or process -- shows it; a flag set
   by ``abort_migration`` is honoured between steps. At the end the target record becomes
   the running instance and the source record turns ``migrated`` (no longer listed).
4. ``finalize_migration_dst(success)``: keeps the target copy, or removes it.
5. ``finalize_migration_source(success)``: removes the source copy only on success; on
   failure the source instance runs again, as before the migration.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import psutil

from kubehv.drivers import errors, values
from kubehv.drivers.fake import params as fparams
from kubehv.drivers.fake import store as fstore

MIB = 1024 * 1024
URI_PREFIX = "fake://"

# Tokens of migrations this process is transferring right now: a persisted "active"
# migration whose token is missing here (and whose owner is this pid) was interrupted.
_ACTIVE_TOKENS: set[str] = set()
_ACTIVE_GUARD = threading.Lock()

_STATUS = {
    "prepared": values.MigrationState.ACTIVE,
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


def _fault(step: str, name: str) -> errors.MigrationError:
    return errors.MigrationError(f"migration of {name!r} failed at {step} (fake fault)")


def _parse_blob(info: str, name: str) -> dict[str, Any]:
    try:
        blob = json.loads(info)
    except ValueError as exc:
        raise errors.MigrationError(f"migration info for {name!r} is not fake JSON") from exc
    if not isinstance(blob, dict) or blob.get("name") != name or not blob.get("token"):
        raise errors.MigrationError(f"migration info does not describe instance {name!r}")
    return blob


class FakeMigration:
    """Migration half of :class:`kubehv.drivers.fake.driver.FakeHypervisor`."""

    TRANSFER_STEPS: ClassVar[int] = 20

    store: fstore.Store
    config: values.DriverConfig
    clock: Callable[[], float]

    def _free_mib(self, now: float) -> int:
        raise NotImplementedError

    def _new_id(self) -> str:
        return "fake-" + secrets.token_hex(4)

    # --- source side ---------------------------------------------------------------------

    def migration_info(self, instance: values.InstanceSpec) -> str:
        if fparams.fails_at(instance.params, "migration_info"):
            raise _fault("migration_info", instance.name)
        with self.store.locked():
            rec = self.store.current(instance.name, self.clock())
            if rec is None or not rec.alive:
                raise errors.InstanceNotFound(instance.name)
            if rec.migration is not None and self._is_transferring(rec.migration):
                raise errors.MigrationError(f"instance {instance.name!r} is already migrating")
            token = secrets.token_hex(16)
            rec.migration = fstore.MigrationRecord(
                token=token,
                role="source",
                total_bytes=rec.memory_mib * MIB,
                prev_status=rec.status,
            )
            self.store.save(rec)
        blob = {
            "version": 1,
            "name": rec.name,
            "uid": rec.uid,
            "token": token,
            "source_node": self.config.node_name,
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
        with self.store.locked():
            rec = self.store.current(name, self.clock())
            if rec is None or not rec.alive:
                raise errors.InstanceNotFound(name)
            mig = rec.migration
            if mig is None or mig.role != "source":
                raise errors.MigrationError(f"call migration_info for {name!r} first")
            if mig.state == "cancelled":
                raise errors.MigrationAborted(f"migration of {name!r} was aborted")
            if mig.state != "prepared":
                raise errors.MigrationError(f"migration of {name!r} is already {mig.state}")
            token = mig.token
            mig.state, mig.owner_pid, mig.live, mig.prev_status = (
                "active",
                os.getpid(),
                live,
                rec.status,
            )
            mig.processed_bytes, mig.total_bytes = 0, rec.memory_mib * MIB
            if not live and rec.status != fstore.PAUSED:
                _freeze(rec, self.clock())
            self.store.save(rec)
        with _ACTIVE_GUARD:
            _ACTIVE_TOKENS.add(token)
        try:
            self._transfer(instance, target, token, options)
        except errors.MigrationAborted as exc:
            self._end_source(name, token, "cancelled", exc.message)
            raise
        except errors.MigrationError as exc:
            self._end_source(name, token, "failed", exc.message)
            raise
        except Exception as exc:
            self._end_source(name, token, "failed", str(exc))
            raise errors.MigrationError(f"migration of {name!r} failed: {exc}") from exc
        finally:
            with _ACTIVE_GUARD:
                _ACTIVE_TOKENS.discard(token)

    def _transfer(
        self,
        instance: values.InstanceSpec,
        target: values.MigrationTarget,
        token: str,
        options: values.MigrationOptions | None,
    ) -> None:
        name = instance.name
        try:
            dst = fstore.Store(state_dir_from_uri(target.uri), create=False)
        except errors.HypervisorUnavailable as exc:
            raise errors.MigrationError(
                f"cannot reach target node {target.node!r}: {exc.message}"
            ) from exc
        with dst.locked():
            _expect_incoming(dst.load(name), token, target.node, name)
        with self.store.locked():
            rec = self.store.load(name)
            memory_mib = rec.memory_mib if rec is not None else instance.memory_max_mib
        duration = fparams.as_float(instance.params, "migration_duration_s") or 0.0
        if options is not None and options.bandwidth_mib_s:
            duration = max(duration, memory_mib / options.bandwidth_mib_s)
        fail_halfway = fparams.fails_at(instance.params, "migrate")
        steps = self.TRANSFER_STEPS
        for step in range(1, steps + 1):
            if duration > 0:
                time.sleep(duration / steps)
            with self.store.locked():
                rec = self.store.load(name)
                if rec is None or rec.migration is None or rec.migration.token != token:
                    raise errors.MigrationError(f"instance {name!r} vanished from the source")
                if rec.migration.abort:
                    raise errors.MigrationAborted(f"migration of {name!r} was aborted")
                if fail_halfway and step > steps // 2:
                    raise _fault("migrate", name)
                rec.migration.processed_bytes = rec.migration.total_bytes * step // steps
                self.store.save(rec)
        # Hand over: the target copy runs, the source copy stops being an instance.
        now = self.clock()
        with self.store.locked():
            src = self.store.load(name)
            if src is None or src.migration is None or src.migration.token != token:
                raise errors.MigrationError(f"instance {name!r} vanished from the source")
            with dst.locked():
                inc = dst.load(name)
                _expect_incoming(inc, token, target.node, name)
                assert inc is not None and inc.migration is not None
                prev = src.migration.prev_status
                inc.status = fstore.PAUSED if prev == fstore.PAUSED else fstore.RUNNING
                inc.memory_mib, inc.boot_count = src.memory_mib, src.boot_count
                inc.cpu_time_s, inc.crash_at = _cpu_time(src, now), src.crash_at
                inc.running_since = now if inc.status == fstore.RUNNING else None
                inc.migration.state = "completed"
                inc.migration.processed_bytes = inc.migration.total_bytes
                dst.save(inc)
            src.status, src.running_since = fstore.MIGRATED, None
            src.migration.state = "completed"
            src.migration.processed_bytes = src.migration.total_bytes
            self.store.save(src)

    def _end_source(self, name: str, token: str, state: str, message: str) -> None:
        with self.store.locked():
            rec = self.store.load(name)
            if rec is None or rec.migration is None or rec.migration.token != token:
                return
            rec.migration.state, rec.migration.message = state, message
            _restore(rec, self.clock())
            self.store.save(rec)

    def _is_transferring(self, mig: fstore.MigrationRecord) -> bool:
        if mig.role != "source" or mig.state != "active":
            return False
        if mig.owner_pid == os.getpid():
            with _ACTIVE_GUARD:
                return mig.token in _ACTIVE_TOKENS
        return psutil.pid_exists(mig.owner_pid)

    def get_migration_status(
        self, instance: values.InstanceSpec, target: values.MigrationTarget | None = None
    ) -> values.MigrationStatus:
        with self.store.locked():
            rec = self.store.current(instance.name, self.clock())
        if rec is None or rec.migration is None or rec.migration.role != "source":
            raise errors.MigrationError(f"no migration of {instance.name!r} from this node")
        mig = rec.migration
        state, message = _STATUS.get(mig.state, values.MigrationState.FAILED), mig.message
        if mig.state == "active" and not self._is_transferring(mig):
            state = values.MigrationState.FAILED
            message = "the migration was interrupted (its source process went away)"
        return values.MigrationStatus(
            state=state,
            memory_total_bytes=mig.total_bytes,
            memory_processed_bytes=mig.processed_bytes,
            memory_remaining_bytes=max(0, mig.total_bytes - mig.processed_bytes),
            message=message,
        )

    def abort_migration(self, instance: values.InstanceSpec) -> None:
        with self.store.locked():
            rec = self.store.current(instance.name, self.clock())
            mig = rec.migration if rec is not None else None
            if rec is None or mig is None or mig.role != "source":
                raise errors.MigrationError(f"no migration of {instance.name!r} to abort")
            if mig.state == "completed":
                raise errors.MigrationError(
                    f"the migration of {instance.name!r} has already completed"
                )
            mig.abort = True
            if mig.state == "prepared":
                mig.state, mig.message = "cancelled", "aborted before the transfer started"
            self.store.save(rec)

    def finalize_migration_source(
        self, instance: values.InstanceSpec, success: bool, live: bool
    ) -> None:
        with self.store.locked():
            rec = self.store.load(instance.name)
            if rec is None or rec.migration is None or rec.migration.role != "source":
                return  # nothing (left) to finalize: idempotent
            if not success:
                _restore(rec, self.clock())
                rec.migration = None
                self.store.save(rec)
                return
            if fparams.fails_at(instance.params, "finalize_source"):
                raise _fault("finalize_source", instance.name)
            if rec.migration.state != "completed":
                raise errors.MigrationError(
                    f"cannot finalize the migration of {instance.name!r}: it is "
                    f"{rec.migration.state}, not completed"
                )
            self.store.remove(instance.name)

    # --- target side ---------------------------------------------------------------------

    def accept_instance(self, instance: values.InstanceSpec, info: str, target: str) -> None:
        if fparams.fails_at(instance.params, "accept"):
            raise _fault("accept", instance.name)
        blob = _parse_blob(info, instance.name)
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
            free = self._free_mib(now)
            if memory > free:
                raise errors.InsufficientMemory(instance.name, memory, free)
            self.store.save(
                fstore.Record(
                    name=instance.name,
                    uid=str(blob.get("uid", instance.uid)),
                    id=self._new_id(),
                    status=fstore.INCOMING,
                    memory_mib=memory,
                    memory_min_mib=int(blob.get("memory_min_mib", instance.memory_min_mib)),
                    memory_max_mib=int(blob.get("memory_max_mib", instance.memory_max_mib)),
                    vcpus=int(blob.get("vcpus", instance.vcpus)),
                    params=dict(blob.get("params", {})),
                    boot_count=int(blob.get("boot_count", 1)),
                    migration=fstore.MigrationRecord(
                        token=str(blob["token"]),
                        role="target",
                        total_bytes=memory * MIB,
                        peer_node=str(blob.get("source_node", "")),
                    ),
                )
            )

    def finalize_migration_dst(
        self, instance: values.InstanceSpec, info: str, success: bool
    ) -> None:
        token = _parse_blob(info, instance.name)["token"]
        with self.store.locked():
            rec = self.store.load(instance.name)
            ours = (
                rec is not None
                and rec.migration is not None
                and rec.migration.role == "target"
                and rec.migration.token == token
            )
            if not ours or rec is None or rec.migration is None:
                if success:
                    raise errors.MigrationError(
                        f"no accepted migration of {instance.name!r} on this node"
                    )
                return
            if not success:
                self.store.remove(instance.name)
                return
            if fparams.fails_at(instance.params, "finalize_dst"):
                self.store.remove(instance.name)
                raise _fault("finalize_dst", instance.name)
            if rec.migration.state != "completed":
                raise errors.MigrationError(
                    f"cannot keep {instance.name!r}: its memory transfer has not completed"
                )
            rec.migration = None
            self.store.save(rec)


def _expect_incoming(rec: fstore.Record | None, token: str, node: str, name: str) -> None:
    if rec is None or rec.migration is None or rec.migration.token != token:
        raise errors.MigrationError(
            f"target node {node!r} has not accepted instance {name!r} (call accept_instance)"
        )


def _cpu_time(rec: fstore.Record, now: float) -> float:
    extra = now - rec.running_since if rec.running_since is not None else 0.0
    return rec.cpu_time_s + max(0.0, extra)


def _freeze(rec: fstore.Record, now: float) -> None:
    rec.cpu_time_s, rec.running_since, rec.status = _cpu_time(rec, now), None, fstore.PAUSED


def _restore(rec: fstore.Record, now: float) -> None:
    """Put a source instance back as it was before its migration started."""
    if rec.migration is None:
        return
    prev = fstore.PAUSED if rec.migration.prev_status == fstore.PAUSED else fstore.RUNNING
    if rec.status in (fstore.MIGRATED, fstore.PAUSED, fstore.RUNNING) and rec.status != prev:
        rec.status = prev
        rec.running_since = now if prev == fstore.RUNNING else None
