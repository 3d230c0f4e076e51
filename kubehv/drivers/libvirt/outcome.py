"""What a migration came to, read from libvirt itself (both nodes), never from memory.

Why this module exists: with peer-to-peer migration the job lives in the source libvirtd.
The thread that called ``migrateToURI3`` may be gone (agent killed, driver object dropped)
while libvirtd carries on to success or failure. So an agent that restarts must learn the
outcome from what libvirt shows, and the target must know whether the copy it holds is a
half-arrived one (safe to destroy) or the only one (never destroy):

* source, job running: ``jobStats()`` has a bounded/unbounded job -> ACTIVE, with figures;
* source, domain gone (transient domains vanish when they migrate away) or shut off with
  reason *migrated* -> COMPLETED; given the target, confirmed by looking there;
* source, domain runs and no job: the last job's completed statistics
  (``VIR_DOMAIN_JOB_STATS_COMPLETED``, kept with ``KEEP_COMPLETED``) say failed or
  cancelled, with libvirt's error message -> FAILED / CANCELLED;
* target: an incoming copy is paused (reason *migration*) under a running incoming job;
  once the job completes libvirt resumes it (or leaves it paused if the source was paused,
  and records the completed incoming job) -- from then on it is the only copy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import libvirt

from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import connection, domxml

_RUNNING_JOBS = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
_ENDED_JOBS = {
    libvirt.VIR_DOMAIN_JOB_COMPLETED: values.MigrationState.COMPLETED,
    libvirt.VIR_DOMAIN_JOB_FAILED: values.MigrationState.FAILED,
    libvirt.VIR_DOMAIN_JOB_CANCELLED: values.MigrationState.CANCELLED,
}
_OUT = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
_IN = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN


def _stats(dom: libvirt.virDomain, flags: int) -> dict[str, Any]:
    try:
        return dict(dom.jobStats(flags))
    except libvirt.libvirtError as exc:
        if connection.is_connection_error(exc):
            raise
        return {}  # the domain left meanwhile, or a driver without job statistics


def running_job(dom: libvirt.virDomain) -> dict[str, Any] | None:
    """The statistics of the job running on the domain now, or None."""
    stats = _stats(dom, 0)
    return stats if stats.get("type") in _RUNNING_JOBS else None


def _completed(dom: libvirt.virDomain) -> dict[str, Any]:
    flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    return _stats(dom, flags)


def last_job(dom: libvirt.virDomain, operation: int = _OUT) -> values.MigrationState | None:
    """How the domain's last finished migration job of ``operation`` ended, if libvirt knows."""
    stats = _completed(dom)
    if stats.get("operation") != operation:
        return None
    return _ENDED_JOBS.get(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE))


def _active_status(dom: libvirt.virDomain, stats: dict[str, Any]) -> values.MigrationStatus:
    total = int(stats.get("memory_total", 0))
    remaining = int(stats.get("memory_remaining", 0))
    if total == 0:  # still setting up: nothing sent, all of the guest's memory to go
        # (info(), not maxMemory(): the latter waits for the migration job to end)
        total = remaining = int(dom.info()[1]) * 1024
    return values.MigrationStatus(
        state=values.MigrationState.ACTIVE,
        memory_total_bytes=total,
        memory_processed_bytes=int(stats.get("memory_processed", 0)),
        memory_remaining_bytes=remaining,
        message=f"elapsed {int(stats.get('time_elapsed', 0))} ms",
    )


def source_status(
    dom: libvirt.virDomain | None, *, starting: bool, name: str
) -> values.MigrationStatus | None:
    """The migration as the source's libvirtd shows it; None when the domain has left.

    ``starting``: this process called ``migrateToURI3`` and it has not returned, so a
    domain without a job yet is about to get one (the only in-memory fact used, and only
    to say "not started yet" instead of "no job").
    """
    if dom is None:
        return None
    try:
        state, reason = dom.state()
    except libvirt.libvirtError as exc:
        if connection.is_connection_error(exc) or exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED:
            return None  # a persistent leftover of a completed migration: it left
        return values.MigrationStatus(
            state=values.MigrationState.FAILED,
            message=f"{name!r} is shut off on the source node (not migrated); it runs nowhere",
        )
    stats = running_job(dom)
    if stats is not None:
        return _active_status(dom, stats)
    completed = _completed(dom)
    ended = _ENDED_JOBS.get(completed.get("type", libvirt.VIR_DOMAIN_JOB_NONE))
    operation = completed.get("operation")
    if operation == _OUT and ended is values.MigrationState.COMPLETED:
        return None  # transferred; libvirt has not removed the paused source copy yet
    if operation in (None, _OUT) and ended in (
        values.MigrationState.FAILED,
        values.MigrationState.CANCELLED,
    ):
        assert ended is not None
        why = str(completed.get("errmsg", "")) or (
            "aborted" if ended is values.MigrationState.CANCELLED else "failed"
        )
        return values.MigrationStatus(
            state=ended,
            memory_total_bytes=int(completed.get("memory_total", 0)),
            memory_processed_bytes=int(completed.get("memory_processed", 0)),
            memory_remaining_bytes=int(completed.get("memory_remaining", 0)),
            message=f"the migration job ended {ended.value}: {why}; {name!r} runs on the source",
        )
    if starting:
        return values.MigrationStatus(
            state=values.MigrationState.ACTIVE,
            message="the migration job is starting (not visible in libvirt yet)",
        )
    return values.MigrationStatus(
        state=values.MigrationState.FAILED,
        message=f"no migration job runs for {name!r}; it still runs on the source node",
    )


def arrived(conn: libvirt.virConnect, spec: values.InstanceSpec) -> bool:
    """Whether ``spec``'s copy is on this (target) node and alive: its migration got there."""
    try:
        dom = conn.lookupByName(spec.name)
        tag = domxml.read_tag(dom.XMLDesc(0))
        state = dom.state()[0]
    except libvirt.libvirtError as exc:
        if connection.is_connection_error(exc) or exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return False
    if tag is None or tag.uid != spec.uid or state == libvirt.VIR_DOMAIN_SHUTOFF:
        return False
    # paused under a running job: still incoming, the source has not let go
    return not (state == libvirt.VIR_DOMAIN_PAUSED and running_job(dom) is not None)


def confirm_on_target(
    spec: values.InstanceSpec, target: values.MigrationTarget
) -> values.MigrationStatus:
    """The domain left the source: COMPLETED if it is on ``target``, FAILED if nowhere."""
    if not target.uri:
        raise errors.MigrationError(
            f"cannot confirm the migration of {spec.name!r}: target {target.node!r} has no URI"
        )
    try:
        conn = libvirt.open(target.uri)
    except libvirt.libvirtError as exc:
        raise errors.HypervisorUnavailable(
            f"cannot reach the target's libvirt at {target.uri} to confirm where "
            f"{spec.name!r} runs: {connection.error_text(exc)}"
        ) from exc
    try:
        if arrived(conn, spec):
            return left(spec.name, f"it runs on the target node {target.node}")
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    return values.MigrationStatus(
        state=values.MigrationState.FAILED,
        message=(
            f"{spec.name!r} left the source node but is not on the target node "
            f"{target.node}: it runs on neither node"
        ),
    )


def left(name: str, where: str = "") -> values.MigrationStatus:
    return values.MigrationStatus(
        state=values.MigrationState.COMPLETED,
        message=f"{name!r} has left the source node" + (f": {where}" if where else ""),
    )


def incoming(dom: libvirt.virDomain) -> bool:
    """Target side: whether ``dom`` is a copy still arriving (destroying it is safe).

    True while an incoming job runs, or for a paused domain that never completed an
    incoming migration (a leftover that never ran). False for a running domain, and for
    one that arrived paused after its incoming migration completed: the only copy.
    """
    state = dom.state()[0]
    if state != libvirt.VIR_DOMAIN_PAUSED:
        return bool(state == libvirt.VIR_DOMAIN_SHUTOFF)
    if running_job(dom) is not None:
        return True
    return last_job(dom, _IN) is not values.MigrationState.COMPLETED


def is_active(dom: libvirt.virDomain) -> bool:
    """Whether the domain runs (has a QEMU process), from ``state()``.

    Not ``isActive()``: measured on libvirt 9.0, isActive() and maxMemory() on a domain that
    is migrating out wait until the migration job ends, which would freeze progress polling.
    """
    return bool(dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF)
