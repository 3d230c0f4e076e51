"""Peer-to-peer migration between two libvirt nodes: flags, knobs, progress, abort.

Why this module exists: migration is the riskiest thing the driver does, and its rules are
easy to get subtly wrong, so they live in one place:

* domains are transient (see :mod:`kubehv.drivers.libvirt.driver`), so no PERSIST_DEST and no
  UNDEFINE_SOURCE: on success the source domain simply ceases to exist, and an instance can
  never be defined on two nodes at once;
* the source libvirtd drives the migration (PEER2PEER) and connects to the target's
  libvirtd itself (``target.uri``); guest memory travels on ``tcp://<target.address>``;
* live = ``VIR_MIGRATE_LIVE``; non-live pauses the guest for the transfer and the target
  resumes it; ``ABORT_ON_ERROR`` stops on I/O errors instead of hanging;
* bandwidth goes in the migrateToURI3 parameters; max downtime can only be set while the
  job runs, so a helper thread sets it once the job appears;
* progress comes from ``jobStats()`` on the source; abort is ``abortJob()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading

import libvirt

from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import connection

INFO_VERSION = 1


def migration_info(dom: libvirt.virDomain, spec: values.InstanceSpec, source_uri: str) -> str:
    """The opaque blob the target receives (Ganeti ``MigrationInfo``), as JSON."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    return json.dumps(
        {
            "version": INFO_VERSION,
            "name": spec.name,
            "uid": spec.uid,
            "source_uri": source_uri,
            "domain_uuid": dom.UUIDString(),
            "domain_xml_sha256": hashlib.sha256(xml.encode()).hexdigest(),
            "memory_max_mib": spec.memory_max_mib,
        },
        sort_keys=True,
    )


def parse_info(info: str) -> dict[str, object]:
    try:
        data = json.loads(info) if info else {}
    except json.JSONDecodeError as exc:
        raise errors.MigrationError(f"migration info is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise errors.MigrationError("migration info must be a JSON object")
    return data


@dataclasses.dataclass
class Tracker:
    """What the driver remembers about the last migration of one instance (source side)."""

    state: values.MigrationState = values.MigrationState.ACTIVE
    aborted: bool = False
    message: str = ""
    last: values.MigrationStatus | None = None


def flags_for(live: bool) -> int:
    flags: int = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    if live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    return flags


def params_for(target: values.MigrationTarget, bandwidth_mib_s: int) -> dict[str, int | str]:
    params: dict[str, int | str] = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{target.address}"}
    if bandwidth_mib_s > 0:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
    return params


def _set_downtime_when_running(
    dom: libvirt.virDomain, downtime_ms: int, done: threading.Event
) -> None:
    """Wait for the migration job to start, then set its maximum downtime."""
    while not done.is_set():
        with contextlib.suppress(libvirt.libvirtError):
            if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                dom.migrateSetMaxDowntime(downtime_ms, 0)
                return
        done.wait(0.05)


def migrate(
    dom: libvirt.virDomain,
    target: values.MigrationTarget,
    *,
    live: bool,
    bandwidth_mib_s: int,
    downtime_ms: int,
    tracker: Tracker,
    extra_flags: int = 0,
    extra_params: dict[str, object] | None = None,
) -> None:
    """Run the migration; blocks until done. Raises MigrationError / MigrationAborted.

    ``extra_flags``/``extra_params``: the storage copy of node-local disks, if any
    (:func:`kubehv.drivers.libvirt.workloads.storage_migration`).
    """
    if not target.uri:
        raise errors.MigrationError(
            f"migration target {target.node!r} has no libvirt URI; the kvm driver migrates "
            "peer to peer and needs the target node's connection URI"
        )
    done = threading.Event()
    helper = None
    if live and downtime_ms > 0:
        helper = threading.Thread(
            target=_set_downtime_when_running,
            args=(dom, downtime_ms, done),
            name="migration-downtime",
            daemon=True,
        )
        helper.start()
    try:
        params: dict[str, object] = {**params_for(target, bandwidth_mib_s), **(extra_params or {})}
        dom.migrateToURI3(target.uri, params, flags_for(live) | extra_flags)
    except libvirt.libvirtError as exc:
        aborted = tracker.aborted or exc.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED
        tracker.state = values.MigrationState.CANCELLED if aborted else values.MigrationState.FAILED
        tracker.message = connection.error_text(exc)
        cls = errors.MigrationAborted if aborted else errors.MigrationError
        raise cls(
            f"migration of {dom.name()!r} to {target.node} ({target.uri}) "
            f"{'was aborted' if aborted else 'failed'}: {tracker.message}; the instance "
            "stays on the source node"
        ) from exc
    finally:
        done.set()
        if helper is not None:
            helper.join(timeout=5)
    tracker.state = values.MigrationState.COMPLETED
    tracker.message = f"migrated to {target.node}"


def status(dom: libvirt.virDomain | None, tracker: Tracker | None) -> values.MigrationStatus:
    """Progress as the source sees it: the live job if there is one, else what we recorded.

    Raises :class:`errors.MigrationError` when there is nothing to report (no migration
    known, or the job has not shown up in libvirt yet).
    """
    if dom is not None and (tracker is None or tracker.state is values.MigrationState.ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):  # e.g. the domain just left
            current = _live_status(dom)
            if current is not None:
                if tracker is not None:
                    tracker.last = current
                return current
    if tracker is None:
        raise errors.MigrationError("no migration of this instance is known on this node")
    last = tracker.last
    if tracker.state is values.MigrationState.ACTIVE and last is None:
        raise errors.MigrationError("the migration job is not visible yet")
    if tracker.state is values.MigrationState.COMPLETED and last is not None:
        return dataclasses.replace(
            last,
            state=values.MigrationState.COMPLETED,
            memory_remaining_bytes=0,
            memory_processed_bytes=max(last.memory_processed_bytes, last.memory_total_bytes),
            disk_remaining_bytes=0,
            disk_processed_bytes=max(last.disk_processed_bytes, last.disk_total_bytes),
            message=tracker.message,
        )
    if last is not None:
        return dataclasses.replace(last, state=tracker.state, message=tracker.message)
    return values.MigrationStatus(state=tracker.state, message=tracker.message)


def abort(dom: libvirt.virDomain, tracker: Tracker | None) -> None:
    if tracker is not None:
        tracker.aborted = True
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job: nothing to do
            raise errors.MigrationError(
                f"cannot abort the migration of {dom.name()!r}: {connection.error_text(exc)}"
            ) from exc


def _live_status(dom: libvirt.virDomain) -> values.MigrationStatus | None:
    """The running job's figures from ``jobStats()``, or None when no job runs."""
    stats = dom.jobStats(0)
    job_type = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
    if job_type not in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
        return None
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
