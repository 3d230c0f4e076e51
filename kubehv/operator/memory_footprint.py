"""What the agent keeps of each object it caches: enough to act, not the whole API object.

Why this module exists: the agent holds one VirtualInstance body per instance on its node
(the reconciler's cache, read by the watcher and the balloon loop). As the API server sends
them, about 60% of a body's Python size is ``metadata.managedFields`` (server-side apply
bookkeeping, one entry per writer, nested dicts) and, for kubectl-applied objects, the
``last-applied-configuration`` annotation (the whole spec again, as a string). Neither is
read by kubehv. Measured with bench/rss.py: see docs/ballooning.md ("agent memory").
"""

from __future__ import annotations

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
