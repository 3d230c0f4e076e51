"""The node's migration journal: in-flight migration steps, durable across agent restarts.

Why this module exists: a migration step that touches the hypervisor (accept an incoming
domain, start the copy) must be remembered by the node even if the agent dies the next
instant and the API server is unreachable when it comes back. One small JSON file per
instance in the agent's state directory, written atomically (temp file, fsync, rename,
fsync of the directory), says which Migration this node was acting in and how far it got.
A returning agent reads it before it starts anything (Ganeti's cleanup mode): an instance
with an unresolved outgoing migration is never started from its journal alone.

:class:`Entry` is a plain value that the pure owner decision (:mod:`owner_logic`) reads;
:func:`load`, :func:`store` and :func:`clear` are the only I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
from typing import Any

DIRECTORY = "journal"


class Role(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


class Stage(enum.StrEnum):
    """How far this node got in its role (each stage is written *before* the act)."""

    PREPARING = "Preparing"  # source: migration_info / balloon about to run
    ACCEPTING = "Accepting"  # target: accept_instance about to run (an incoming domain may exist)
    COPYING = "Copying"  # source: migrate_instance about to run (the hypervisor job may exist)
    FINALIZING = "Finalizing"  # either side: finalize about to run


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """This node's record of one migration of one instance (hypervisor-level name)."""

    instance: str
    migration_uid: str
    migration: str  # namespace/name, for people
    role: Role
    stage: Stage
    peer: str  # the other node
    vi: str = ""  # namespace/name of the VirtualInstance
    migration_info: str = ""  # target only: the source's blob, to undo an incoming copy
    memory_before_mib: int | None = None
    """Source only: the guest's memory before the migration ballooned it down (restored
    if the migration fails)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            instance=str(data["instance"]),
            migration_uid=str(data["migration_uid"]),
            migration=str(data.get("migration") or ""),
            role=Role(data["role"]),
            stage=Stage(data["stage"]),
            peer=str(data.get("peer") or ""),
            vi=str(data.get("vi") or ""),
            migration_info=str(data.get("migration_info") or ""),
            memory_before_mib=(
                int(data["memory_before_mib"])
                if data.get("memory_before_mib") is not None
                else None
            ),
        )


def _path(state_dir: str, instance: str) -> str:
    return os.path.join(state_dir, DIRECTORY, f"{instance}.json")


def load(state_dir: str, instance: str) -> Entry | None:
    """The journal entry of ``instance``, or None (a corrupt file counts as none)."""
    try:
        with open(_path(state_dir, instance), encoding="utf-8") as fh:
            return Entry.from_json(json.load(fh))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def load_all(state_dir: str) -> list[Entry]:
    folder = os.path.join(state_dir, DIRECTORY)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".json"):
            entry = load(state_dir, name[: -len(".json")])
            if entry is not None:
                out.append(entry)
    return out


def store(state_dir: str, entry: Entry) -> None:
    """Write ``entry`` durably: after this returns, a crash cannot lose it."""
    folder = os.path.join(state_dir, DIRECTORY)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry.to_json(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, _path(state_dir, entry.instance))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def clear(state_dir: str, instance: str, migration_uid: str | None = None) -> None:
    """Forget the entry of ``instance`` (only if it is for ``migration_uid``, when given)."""
    if migration_uid is not None:
        current = load(state_dir, instance)
        if current is None or current.migration_uid != migration_uid:
            return
    try:
        os.unlink(_path(state_dir, instance))
    except FileNotFoundError:
        return
    _fsync_dir(os.path.join(state_dir, DIRECTORY))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
