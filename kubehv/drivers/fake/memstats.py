"""Balloon statistics of fake guests: what a virtio balloon would report, from a record.

Why this module exists: the balloon policy and its agent loop are tested at scale on the
fake driver, so a fake guest must answer ``get_instance_memory_stats`` the way a real one
does. A fake guest holds ``guest_used_mib`` (its boot value comes from the instance
parameter of that name; :func:`set_guest_used` changes it from a test, like an application
allocating or freeing memory). As with a real guest: what it holds beyond its balloon size
is not there -- it faults (``major_faults`` grows on every read while it is squeezed), and
``usable`` never goes below zero.
"""

from __future__ import annotations

import time

from kubehv.drivers import errors, values
from kubehv.drivers.fake import params as fparams
from kubehv.drivers.fake import store


def guest_used(rec: store.Record) -> int:
    """What the fake guest holds now, in MiB."""
    if rec.guest_used_mib is not None:
        return rec.guest_used_mib
    configured = fparams.param(rec.params, "guest_used_mib")
    if isinstance(configured, int) and not isinstance(configured, bool):
        return configured
    return rec.memory_min_mib // 4


def read(st: store.Store, name: str, now: float) -> values.MemoryStats | None:
    """The stats of the live instance ``name`` (``None`` if not running); holds the lock."""
    with st.locked():
        rec = st.current(name, now)
        if rec is None or not rec.alive:
            return None
        used = guest_used(rec)
        if used > rec.memory_mib:
            rec.major_faults += 1 + (used - rec.memory_mib) // 4  # squeezed: it pages
            st.save(rec)
    usable = max(0, rec.memory_mib - used)
    return values.MemoryStats(
        actual_mib=rec.memory_mib,
        unused_mib=usable,
        available_mib=rec.memory_mib,
        usable_mib=usable,
        disk_caches_mib=0,
        major_faults=rec.major_faults,
        minor_faults=rec.major_faults * 16,
        swap_in_mib=0,
        swap_out_mib=0,
        last_update_s=int(now),
    )


def set_guest_used(state_dir: str, name: str, used_mib: int) -> None:
    """Make a fake guest hold ``used_mib`` (a test's "allocate" or "free" inside the guest)."""
    if used_mib < 0:
        raise errors.InvalidInstanceSpec("guest memory in use cannot be negative")
    st = store.Store(state_dir)
    with st.locked():
        rec = st.current(name, time.time())
        if rec is None or not rec.alive:
            raise errors.InstanceNotFound(name)
        rec.guest_used_mib = used_mib
        st.save(rec)
