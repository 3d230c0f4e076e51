"""VirtualInstance -> driver InstanceSpec for the migration steps.

Why this module exists: the migration handlers and drain need the driver's view of an
instance, built exactly as the instance reconciler builds it (same name, same parameters),
so that source and target agents address the same hypervisor-level instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubehv.drivers import values
from kubehv.operator import translate


def instance_spec(vi: Mapping[str, Any]) -> values.InstanceSpec:
    return translate.instance_spec(vi)
