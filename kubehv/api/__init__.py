"""The kubehv API (group kubehv.io, version v1alpha1) as pydantic models.

Why this package exists: one typed source of truth for VirtualInstance, Migration and
NodeHypervisor. The CRDs in crds/, the reference in docs/reference.md and the server-side
defaults are generated from these models, and the agent and controller parse objects with
them. Nothing here does I/O or knows a Kubernetes client.
"""

from __future__ import annotations

from kubehv.api import conditions, constants, quantity
from kubehv.api.conditions import Condition, set_condition
from kubehv.api.migration import Migration, MigrationSpec, MigrationStatus
from kubehv.api.nodehypervisor import NodeHypervisor, NodeHypervisorSpec, NodeHypervisorStatus
from kubehv.api.virtualinstance import (
    VirtualInstance,
    VirtualInstanceSpec,
    VirtualInstanceStatus,
)

__all__ = [
    "Condition",
    "Migration",
    "MigrationSpec",
    "MigrationStatus",
    "NodeHypervisor",
    "NodeHypervisorSpec",
    "NodeHypervisorStatus",
    "VirtualInstance",
    "VirtualInstanceSpec",
    "VirtualInstanceStatus",
    "conditions",
    "constants",
    "quantity",
    "set_condition",
]
