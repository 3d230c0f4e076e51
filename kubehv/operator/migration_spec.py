"""VirtualInstance -> driver InstanceSpec for the migration steps.

Why this module exists: the migration handlers need the driver's view of an instance. The
real translation (disks, NICs, boot, merged node parameters) belongs to
:mod:`kubehv.operator.translate`; this indirection uses it when present, and otherwise builds
the minimal spec the migration calls need (name, uid, memory, vcpus, parameters).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from kubehv.drivers import values
from kubehv.operator import migration_logic as ml


def instance_spec(vi: Mapping[str, Any]) -> values.InstanceSpec:
    try:
        translate = importlib.import_module("kubehv.operator.translate")
    except ImportError:
        translate = None
    fn = getattr(translate, "instance_spec", None) if translate is not None else None
    if fn is not None:
        spec = fn(vi)
        if isinstance(spec, values.InstanceSpec):
            return spec
    return _minimal(vi)


def _minimal(vi: Mapping[str, Any]) -> values.InstanceSpec:
    meta = vi.get("metadata") or {}
    spec = vi.get("spec") or {}
    memory = spec.get("memory") or {}
    mem_min = ml.parse_mib(memory.get("min")) or 0
    mem_max = ml.parse_mib(memory.get("max")) or mem_min
    raw = spec.get("params") or spec.get("hypervisorParams") or {}
    params = {str(k): v for k, v in raw.items() if isinstance(v, str | int | float | bool)}
    return values.InstanceSpec(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        memory_min_mib=mem_min,
        memory_max_mib=mem_max,
        vcpus=int(spec.get("vcpus") or 1),
        params=params,
    )
