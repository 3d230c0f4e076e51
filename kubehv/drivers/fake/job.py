"""A fake migration job: it lives in the "hypervisor" (a file), not in the agent's process.

Why this module exists: libvirtd runs a migration job on its own; the agent that started it
can die and the job still completes (or fails, or is cancelled) without it. The fake driver
must behave the same, or every fault test over it proves the wrong thing. So a migration is
a durable job file, written once when the transfer starts (start time, duration, the
instance's state) and afterwards only *amended* with dated events (abort requested, the
source copy stopped or crashed, the target copy went away). Its outcome is a pure function
of that file and the clock (:func:`decide`), computed lazily by whoever reads it -- any
driver object, any process, either node -- and recorded the first time it is terminal, so
everyone agrees on it forever.

Rules, all in :func:`decide`: the transfer ends at ``started_at + duration_s``. An event
dated before that end wins, the earliest first (abort -> cancelled; the fault knob, a stop
or crash of the source, the loss of the target copy -> failed); an event at or after the end
is too late: the migration completed. Writers add an event only while the job is still
active, dated now, so a decision once reached never changes.

The file sits in the source node's state directory (``migrations/<token>.json``) and has its
own lock, always taken last (after a node's lock, never around one), so two nodes migrating
to each other can never deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

ACTIVE = "active"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = (COMPLETED, FAILED, CANCELLED)


@dataclasses.dataclass
class Job:
    """The durable record of one migration's transfer (see the module docstring)."""

    token: str
    name: str
    target_node: str
    started_at: float
    duration_s: float
    total_bytes: int
    live: bool = True
    # the instance as it was when the transfer started, for the copy on the target
    prev_status: str = "running"
    memory_mib: int = 0
    boot_count: int = 1
    cpu_time_s: float = 0.0
    crash_at: float | None = None
    # the fault knob: the transfer fails at this time (fail_migration_at=migrate)
    fail_at: float | None = None
    # events, dated; each only ever set once, while the job is active
    abort_at: float | None = None
    source_gone_at: float | None = None
    source_gone_why: str = ""
    target_gone_at: float | None = None
    # the outcome, once terminal: written by the first reader that saw it
    outcome: str = ACTIVE
    ended_at: float | None = None
    message: str = ""

    @property
    def end(self) -> float:
        return self.started_at + self.duration_s


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the job came to at a given moment (``at``: when it ended, or now)."""

    state: str
    at: float
    processed_bytes: int
    message: str


def decide(job: Job, now: float) -> Outcome:
    """The job's state at ``now``: a pure function of the file and the clock."""
    if job.outcome in TERMINAL and job.ended_at is not None:
        return Outcome(job.outcome, job.ended_at, _processed(job, job.ended_at), job.message)
    events: list[tuple[float, str, str]] = []
    if job.abort_at is not None:
        events.append((job.abort_at, CANCELLED, "the migration was aborted"))
    if job.fail_at is not None:
        events.append((job.fail_at, FAILED, "failed at migrate (fake fault)"))
    if job.crash_at is not None:
        events.append((job.crash_at, FAILED, "the instance crashed on the source node"))
    if job.source_gone_at is not None:
        events.append((job.source_gone_at, FAILED, job.source_gone_why or "the source went away"))
    if job.target_gone_at is not None:
        events.append((job.target_gone_at, FAILED, "the incoming copy on the target went away"))
    happened = sorted(e for e in events if e[0] < job.end and e[0] <= now)
    if happened:
        at, state, why = happened[0]
        return Outcome(state, at, _processed(job, at), f"migration of {job.name!r}: {why}")
    if now >= job.end:
        return Outcome(COMPLETED, job.end, job.total_bytes, f"migrated to node {job.target_node}")
    return Outcome(ACTIVE, now, _processed(job, now), "transferring memory")


def _processed(job: Job, at: float) -> int:
    if job.duration_s <= 0:
        return job.total_bytes if at >= job.end else 0
    done = max(0.0, min(1.0, (at - job.started_at) / job.duration_s))
    return int(job.total_bytes * done)


def path_for(state_dir: str, token: str) -> str:
    return os.path.join(state_dir, "migrations", f"{token}.json")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _load(path: str) -> Job | None:
    try:
        with open(path) as fh:
            data: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        return None
    return Job(**data)


def _save(path: str, job: Job) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as fh:
        json.dump(dataclasses.asdict(job), fh, sort_keys=True)
    os.replace(tmp, path)


def create(path: str, job: Job) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path):
        _save(path, job)


def read(path: str, now: float) -> tuple[Job, Outcome] | None:
    """The job and its outcome at ``now``; a terminal outcome is recorded for good."""
    return _update(path, now, {})


def amend(path: str, now: float, **event: float | str) -> Outcome | None:
    """Record dated events (``abort_at=now`` ...) if the job is still active at ``now``.

    Returns the outcome after the amendment (None: no such job). An event for a job that has
    already ended is not recorded: it came too late to change anything.
    """
    got = _update(path, now, event)
    return got[1] if got is not None else None


def _update(path: str, now: float, event: dict[str, float | str]) -> tuple[Job, Outcome] | None:
    if not os.path.exists(path):
        return None
    with _locked(path):
        job = _load(path)
        if job is None:
            return None
        changed = False
        if event and decide(job, now).state == ACTIVE:
            for key, value in event.items():
                if getattr(job, key) in (None, ""):
                    setattr(job, key, value)
                    changed = True
        result = decide(job, now)
        if result.state in TERMINAL and job.outcome not in TERMINAL:
            job.outcome, job.ended_at, job.message = result.state, result.at, result.message
            changed = True
        if changed:
            _save(path, job)
    return job, result
