"""What the agent keeps of each object it caches: enough to act, not the whole API object.

Why this module exists: the agent holds one VirtualInstance body per instance on its node
(the reconciler's cache, read by the watcher and the balloon loop). As the API server sends
them, about 60% of a body's Python size is ``metadata.managedFields`` (server-side apply
bookkeeping, one entry per writer, nested dicts) and, for kubectl-applied objects, the
``last-applied-configuration`` annotation (the whole spec again, as a string). Neither is
read by kubehv. Measured with bench/rss.py: see docs/ballooning.md ("Agent memory"). The
C heap part is below.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Mapping
from typing import Any

DROPPED_METADATA = ("managedFields",)
DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``body`` without the fields kubehv never reads."""
    out = dict(body)
    meta = body.get("metadata")
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in DROPPED_METADATA}
        notes = meta.get("annotations")
        if isinstance(notes, Mapping) and any(k in notes for k in DROPPED_ANNOTATIONS):
            kept = {k: v for k, v in notes.items() if k not in DROPPED_ANNOTATIONS}
            if kept:
                meta["annotations"] = kept
            else:
                meta.pop("annotations")
        out["metadata"] = meta
    return out


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
