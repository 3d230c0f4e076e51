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
* bandwidth goes in the migrateToURI3 parameters; max downtime is a parameter of the QEMU
  process, set (and read back) just before the job starts, which then uses it throughout;
* abort is ``abortJob()``; what a migration came to is read from libvirt, not from the
  thread that called ``migrateToURI3`` (see :mod:`kubehv.drivers.libvirt.outcome`).
"""

from __future__ import annotations

import hashlib
import json

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


def _set_max_downtime(dom: libvirt.virDomain, downtime_ms: int) -> None:
    """Set the guest's maximum switch-over downtime *before* the job starts.

    QEMU keeps ``downtime-limit`` as a parameter of its process; libvirt (9.x) reads the
    current parameters when a migration job begins, migrates with them and puts them back
    at the end, so a value set before ``migrateToURI3`` is the one the whole job uses. A
    helper thread setting it once the job appeared (the earlier way) raced the job's start:
    on a loaded machine every sample of the running job read QEMU's 300 ms default. Read
    back, so a hypervisor that ignores it fails here, loudly, not silently mid-job.
    """
    try:
        dom.migrateSetMaxDowntime(downtime_ms, 0)
        applied = dom.migrateGetMaxDowntime(0)
    except libvirt.libvirtError as exc:
        raise errors.MigrationError(
            f"could not set the maximum downtime of {dom.name()!r} to {downtime_ms} ms: "
            f"{connection.error_text(exc)}; the instance stays on the source node"
        ) from exc
    if applied != downtime_ms:
        raise errors.MigrationError(
            f"libvirt kept the maximum downtime of {dom.name()!r} at {applied} ms instead of "
            f"{downtime_ms} ms; the instance stays on the source node"
        )


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
    if live and downtime_ms > 0:
        _set_max_downtime(dom, downtime_ms)
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
