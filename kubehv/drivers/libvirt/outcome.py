"""What a migration came to, read from libvirt itself (both nodes), never from memory.

Why this module exists: with peer-to-peer migration the job lives in the source libvirtd.
The thread that called ``migrateToURI3`` may be gone (agent killed, driver object dropped)
while libvirtd carries on to success or failure. So an agent that restarts must learn the
outcome from what libvirt shows, and the target must know whether the copy it holds is a
half-arrived one (safe to destroy) or the only one (never destroy):

* source, job running: ``jobStats()`` has a bounded/unbounded job -> ACTIVE, with figures;
* source, domain gone (transient domains vanish when they migrate away) or shut off with
  reason *migrated* -> COMPLETED; given the target, confirmed by looking there;
* source, domain runs and no job -> FAILED (CANCELLED when this driver object asked for
  the abort: libvirt 9.0 keeps no statistics of a failed or cancelled job, so a fresh
  object cannot tell the two apart, only that the instance still runs here);
* target, measured on libvirt 9.0: an incoming copy is paused with reason *starting up*,
  then *migration*, and its job statistics are refused ("operation unsupported"). At the
  end libvirt resumes it (running, reason *migrated*) or, when the source was paused,
  leaves it paused (reason *user*) with a completed incoming job in its statistics -- from
  then on it is the only copy. Only a copy in the incoming states may be destroyed.

Measured as well: killing the process that called ``migrateToURI3`` does not stop the job;
libvirtd finishes it (tests/drivers/test_libvirt_real.py prints how long it took).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
        disk_total_bytes=int(stats.get("disk_total", 0)),
        disk_processed_bytes=int(stats.get("disk_processed", 0)),
        disk_remaining_bytes=int(stats.get("disk_remaining", 0)),
    )


def source_status(
    dom: libvirt.virDomain | None, *, starting: bool, name: str, aborted: bool = False
) -> values.MigrationStatus | None:
    """The migration as the source's libvirtd shows it; None when the domain has left.

    Two in-memory hints only label what libvirt shows, never replace it: ``starting`` (this
    process called ``migrateToURI3``, which has not returned: a domain without a job yet is
    about to get one) and ``aborted`` (this process asked for an abort: a domain that still
    runs with no job was cancelled rather than failed).
    """
    if dom is None:
        return None
    try:
        return _read_source(dom, starting=starting, name=name, aborted=aborted)
    except libvirt.libvirtError as exc:
        if connection.is_connection_error(exc) or exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        # it left between two reads (a completing migration removes the transient
        # domain at any moment, e.g. between jobStats() and info()): it is gone
        return None


def _read_source(
    dom: libvirt.virDomain, *, starting: bool, name: str, aborted: bool
) -> values.MigrationStatus | None:
    state, reason = dom.state()
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
    if completed.get("operation") == _OUT and ended is values.MigrationState.COMPLETED:
        return None  # transferred; libvirt has not removed the paused source copy yet
    if starting:  # nothing sent yet: all of the guest's memory to go
        return dataclasses.replace(
            _active_status(dom, {}),
            message="the migration job is starting (not visible in libvirt yet)",
        )
    if aborted:
        return values.MigrationStatus(
            state=values.MigrationState.CANCELLED,
            message=f"the migration of {name!r} was aborted; it still runs on the source node",
        )
    why = str(completed.get("errmsg", "")) if ended is values.MigrationState.FAILED else ""
    return values.MigrationStatus(
        state=values.MigrationState.FAILED,
        message=(
            f"no migration job runs for {name!r} (it failed, was aborted, or never started)"
            f"{': ' + why if why else ''}; it still runs on the source node"
        ),
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
    return not incoming(dom)


def confirm_on_target(
    spec: values.InstanceSpec, target: values.MigrationTarget
) -> values.MigrationStatus:
    """The domain left the source: COMPLETED if it is on ``target``, FAILED if nowhere."""
    if not target.uri:
        raise errors.MigrationError(
            f"cannot confirm the migration of {spec.name!r}: target {target.node!r} has no URI"
        )
    try:
        conn = connection.open_within(target.uri)
    except errors.HypervisorUnavailable as exc:
        raise errors.HypervisorUnavailable(
            f"cannot reach the target's libvirt to confirm where {spec.name!r} runs: {exc.message}"
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


_INCOMING_REASONS = (libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)


def incoming(dom: libvirt.virDomain) -> bool:
    """Target side: whether ``dom`` is a copy still arriving (destroying it is safe).

    Only a domain paused in libvirt's incoming states (reason *starting up* or *migration*)
    is one: the source copy still exists and libvirt has not resumed this one. A running
    domain, or one paused for any other reason (arrived paused, paused by a person), may
    be the only copy and is never called incoming.
    """
    state, reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason in _INCOMING_REASONS)


def is_active(dom: libvirt.virDomain) -> bool:
    """Whether the domain runs (has a QEMU process), from ``state()``.

    Not ``isActive()``: measured on libvirt 9.0, isActive() and maxMemory() on a domain that
    is migrating out wait until the migration job ends, which would freeze progress polling.
    """
    return bool(dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF)
