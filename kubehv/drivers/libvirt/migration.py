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
* abort is ``abortJob()``; what a migration came to is read from libvirt, not from the
  thread that called ``migrateToURI3`` (see :mod:`kubehv.drivers.libvirt.outcome`).
"""

from __future__ import annotations

import contextlib
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
    extra_flags: int = 0,
    extra_params: dict[str, object] | None = None,
) -> None:
    """Run the migration; blocks until done. Raises MigrationError / MigrationAborted.

    The job runs in the source libvirtd (peer to peer): if this thread or its process goes
    away, libvirtd carries on; the outcome is read by :mod:`kubehv.drivers.libvirt.outcome`.
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
        if connection.is_connection_error(exc) and not _alive(dom):
            raise  # OUR connection died: the job may go on; the caller reads the outcome
        text = connection.error_text(exc)
        aborted = exc.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED
        cls = errors.MigrationAborted if aborted else errors.MigrationError
        raise cls(
            f"migration of {dom.name()!r} to {target.node} ({target.uri}) "
            f"{'was aborted' if aborted else 'failed'}: {text}; the instance "
            "stays on the source node"
        ) from exc
    finally:
        done.set()
        if helper is not None:
            helper.join(timeout=5)


def _alive(dom: libvirt.virDomain) -> bool:
    """Whether the connection ``dom`` was looked up on still works."""
    try:
        return bool(dom.connect().isAlive())
    except libvirt.libvirtError:
        return False


def abort(dom: libvirt.virDomain) -> None:
    """Ask libvirtd to cancel the domain's job; "no job" (finished, never began) is fine."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if connection.is_connection_error(exc):
            raise
        if exc.get_error_code() in (
            libvirt.VIR_ERR_OPERATION_INVALID,  # no job (finished, failed, never began)
            libvirt.VIR_ERR_NO_DOMAIN,  # the domain left (migrated away)
            libvirt.VIR_ERR_NO_SUPPORT,  # a driver without jobs (test:///) has none to abort
        ):
            return  # get_migration_status tells what happened
        raise errors.MigrationError(
            f"cannot abort the migration of {dom.name()!r}: {connection.error_text(exc)}"
        ) from exc
