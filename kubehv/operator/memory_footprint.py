"""The agent's memory footprint: keep its C heap from holding on to a burst's peak.

Why this module exists: agent RSS at 1000 instances is a bench figure (bench/rss.py). Part of
it is not Python objects at all but freed memory glibc keeps (see below). The other part,
what the agent caches per instance, is the owner's typed cache (operator/owner.py): the
models carry no ``managedFields``, which were ~60% of a raw body's Python size.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Any

# --- the C heap ------------------------------------------------------------------------
# The agent parses a burst of JSON when many instances arrive at once (a node's first
# listing, a mass create); glibc keeps the freed memory in its heaps (one arena per thread
# that ever allocated: kopf, the API client and asyncio's executors run several) and the
# process's RSS stays at the burst's peak. Two arenas and a periodic malloc_trim give it
# back. Both are no-ops where glibc is absent (musl, macOS).

M_ARENA_MAX = -8


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (call before threads start); True if it took."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_ARENA_MAX, arenas))


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``)."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))


async def trim_forever(interval_s: float = 15.0) -> None:
    """Trim the heap every ``interval_s`` (cheap: one pass over free chunks)."""
    while True:
        await asyncio.sleep(interval_s)
        trim_heap()
