"""The fake driver's on-disk state: one small JSON file per instance, written atomically.

Why this module exists: the fake hypervisor must behave like a real one across agent
restarts and across processes (several agents, a test poking at a node), so its "VMs" live
in files, as in Ganeti's fake hypervisor, not in memory. Layout of a state directory::

    <state_dir>/instances/<name>.json   one record per instance (running, paused, ...)
    <state_dir>/migrations/<token>.json the migration jobs started here (see ``job``)
    <state_dir>/foreign/<name>          instances "running" here that kubehv did not create
    <state_dir>/verify_fail             if present, its text is a verify() problem
    <state_dir>/.lock                   flock taken around every read-modify-write

Every write is ``tmp file + rename``, so a reader never sees half a record. A read-modify-
write holds the directory lock (a thread lock plus ``flock``), so two threads, two driver
objects or two processes on the same directory never lose an update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from kubehv.drivers import errors
from kubehv.drivers.fake import job

# Record.status values. Only the first four are visible as instances; "incoming" is a
# target's reservation during a migration, "migrated" a source's copy that has moved away.
RUNNING = "running"
PAUSED = "paused"
SHUTTING_DOWN = "shutting-down"
CRASHED = "crashed"
INCOMING = "incoming"
MIGRATED = "migrated"
ALIVE = (RUNNING, PAUSED, SHUTTING_DOWN)


@dataclasses.dataclass
class MigrationRecord:
    """One migration as one side sees it. Its truth is the job file at ``job_path``
    (:mod:`kubehv.drivers.fake.job`), which exists once the transfer has started; this is
    each side's copy, brought up to date by :meth:`Store.current` on every read."""

    token: str
    role: str  # "source" or "target"
    state: str = "prepared"  # prepared|active|completed|failed|cancelled
    total_bytes: int = 0
    processed_bytes: int = 0
    message: str = ""
    live: bool = True
    prev_status: str = RUNNING
    peer_node: str = ""
    job_path: str = ""
    faulted: bool = False  # a one-shot fault knob (fail_migration_at) has fired


@dataclasses.dataclass
class Record:
    """One fake instance."""

    name: str
    uid: str
    id: str
    status: str
    memory_mib: int
    memory_min_mib: int
    memory_max_mib: int
    vcpus: int
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    boot_count: int = 1
    cpu_time_s: float = 0.0
    running_since: float | None = None
    off_at: float | None = None
    crash_at: float | None = None
    crash_reason: str = ""
    migration: MigrationRecord | None = None

    @property
    def alive(self) -> bool:
        return self.status in ALIVE

    @property
    def holds_memory(self) -> bool:
        return self.status in ALIVE or self.status == INCOMING

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        mig = data.pop("migration", None)
        rec = cls(**data)
        if mig is not None:
            known = {f.name for f in dataclasses.fields(MigrationRecord)}
            rec.migration = MigrationRecord(**{k: v for k, v in mig.items() if k in known})
        return rec


class _DirLock:
    """Re-entrant within a thread, exclusive across threads and processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    def __enter__(self) -> None:
        self.rlock.acquire()
        if self.depth == 0:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self.rlock.release()
                raise
            self.fd = fd
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        self.rlock.release()


_LOCKS: dict[str, _DirLock] = {}
_LOCKS_GUARD = threading.Lock()


def _dir_lock(path: str) -> _DirLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = _DirLock(path)
        return lock


class Store:
    """The records of one fake node (one state directory)."""

    def __init__(self, state_dir: str, create: bool = True) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.instances_dir = os.path.join(self.state_dir, "instances")
        self.foreign_dir = os.path.join(self.state_dir, "foreign")
        if create:
            os.makedirs(self.instances_dir, exist_ok=True)
        elif not os.path.isdir(self.instances_dir):
            raise errors.HypervisorUnavailable(
                f"no fake node at {self.state_dir}: {self.instances_dir} does not exist"
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with _dir_lock(os.path.join(self.state_dir, ".lock")):
            yield

    def _path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise errors.InvalidInstanceSpec(f"instance name {name!r} cannot be a file name")
        return os.path.join(self.instances_dir, name + ".json")

    def load(self, name: str) -> Record | None:
        try:
            with open(self._path(name)) as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        try:
            return Record.from_json(text)
        except (ValueError, TypeError) as exc:
            raise errors.HypervisorError(
                f"fake state file {self._path(name)} is corrupt ({exc}); fix or delete it"
            ) from exc

    def save(self, record: Record) -> None:
        path = self._path(record.name)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.instances_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(record.to_json())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.instances_dir)
        except FileNotFoundError:
            return []
        return sorted(e[: -len(".json")] for e in entries if e.endswith(".json"))

    def foreign_names(self) -> list[str]:
        try:
            return sorted(e for e in os.listdir(self.foreign_dir) if not e.startswith("."))
        except FileNotFoundError:
            return []

    def verify_fail_message(self) -> str:
        try:
            with open(os.path.join(self.state_dir, "verify_fail")) as fh:
                return fh.read().strip() or "verify_fail file present"
        except FileNotFoundError:
            return ""

    def current(self, name: str, now: float) -> Record | None:
        """Load a record and apply what time did to it; call with :meth:`locked` held.

        A graceful stop whose delay has passed removes the record (the instance is off); an
        instance past its ``crash_at`` time becomes ``crashed``; a migration whose job has
        ended turns the record into what the job came to (:func:`settle`).
        """
        rec = self.load(name)
        if rec is None:
            return None
        off_first = rec.off_at is not None and (rec.crash_at is None or rec.off_at <= rec.crash_at)
        if (
            rec.status == SHUTTING_DOWN
            and off_first
            and rec.off_at is not None
            and rec.off_at <= now
        ):
            source_gone(rec, rec.off_at, "the instance shut down on the source node")
            self.remove(name)
            return None
        if rec.alive and rec.crash_at is not None and rec.crash_at <= now:
            crash(rec, rec.crash_at, "crashed: crash_after_s elapsed")
            self.save(rec)
        return self.settle(rec, now)

    def settle(self, rec: Record, now: float) -> Record | None:
        """Bring ``rec``'s migration up to date with its job; None if the record went away.

        Source: completed -> a ``migrated`` leftover (not an instance); failed or cancelled ->
        the instance as it was before. Target: completed -> the instance runs (or stays
        paused) here since the job's end; failed or cancelled -> the incoming copy is gone,
        as libvirt destroys an incoming domain whose migration did not complete.
        """
        mig = rec.migration
        if mig is None or not mig.job_path or mig.state in job.TERMINAL:
            return rec
        got = job.read(mig.job_path, now)
        if got is None:
            return rec  # the transfer has not started: nothing happened yet
        record, result = got
        if result.state == job.ACTIVE:
            mig.state, mig.processed_bytes = job.ACTIVE, result.processed_bytes
            return rec
        mig.state, mig.message = result.state, result.message
        mig.processed_bytes = result.processed_bytes
        if mig.role == "target":
            if result.state != job.COMPLETED:
                self.remove(rec.name)
                return None
            arrive(rec, record)
        elif result.state == job.COMPLETED:
            rec.status, rec.running_since = MIGRATED, None
        else:
            restore(rec, now)
        self.save(rec)
        return rec


def crash(rec: Record, when: float, reason: str) -> None:
    """Turn a live record into a crashed one (it stops holding memory)."""
    source_gone(rec, when, "the instance crashed on the source node")
    if rec.running_since is not None:
        rec.cpu_time_s += max(0.0, when - rec.running_since)
    rec.status, rec.running_since, rec.off_at, rec.crash_reason = CRASHED, None, None, reason


def source_gone(rec: Record, when: float, why: str) -> None:
    """Tell a running migration job that its source copy stopped (it then fails)."""
    mig = rec.migration
    if mig is not None and mig.role == "source" and mig.job_path and rec.alive:
        job.amend(mig.job_path, when, source_gone_at=when, source_gone_why=why)


def arrive(rec: Record, record: job.Job) -> None:
    """The incoming copy becomes the instance, as it was on the source at the start."""
    rec.status = PAUSED if record.prev_status == PAUSED else RUNNING
    rec.memory_mib, rec.boot_count, rec.crash_at = record.memory_mib, record.boot_count, None
    rec.cpu_time_s = record.cpu_time_s
    rec.running_since = record.end if rec.status == RUNNING else None
    if record.crash_at is not None and record.crash_at > record.end:
        rec.crash_at = record.crash_at


def _cpu_time(rec: Record, now: float) -> float:
    extra = now - rec.running_since if rec.running_since is not None else 0.0
    return rec.cpu_time_s + max(0.0, extra)


def restore(rec: Record, now: float) -> None:
    """Put a source instance back as it was before its migration started.

    Never a ``migrated`` leftover: that copy has left, bringing it back would run the
    instance twice.
    """
    if rec.migration is None or not rec.alive:
        return
    prev = PAUSED if rec.migration.prev_status == PAUSED else RUNNING
    if rec.status != prev:
        if prev == RUNNING:
            rec.status, rec.running_since = RUNNING, now
        else:
            rec.cpu_time_s, rec.running_since, rec.status = _cpu_time(rec, now), None, PAUSED
