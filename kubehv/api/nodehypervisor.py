"""The NodeHypervisor resource: one node's hypervisor, its settings and its health.

Why this module exists: the controller schedules and drains through these objects (one per
node, named after the node), and the node agent reports there what it found: memory, CPUs,
the driver's verify result, capabilities and a heartbeat. The CRD schema and docs are
generated from these models.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
from pydantic import Field

from kubehv.api import base, constants, quantity
from kubehv.api import conditions as cond
from kubehv.api import metadata as meta
from kubehv.api import virtualinstance as vi

NAME_RULES: list[dict[str, str]] = [
    {
        "rule": "self.metadata.name == self.spec.nodeName",
        "message": "a NodeHypervisor must be named after its node (metadata.name == spec.nodeName)",
    }
]


class NodeHypervisorSpec(base.StrictModel):
    """How the node's hypervisor is reached and whether it takes instances."""

    node_name: str = Field(
        description="The Kubernetes node this describes; equal to the object's name.",
        min_length=1,
    )
    hypervisor: str = Field(
        default="kvm", description="Hypervisor driver on this node (kvm, fake, ...).", min_length=1
    )
    connection_uri: str | None = Field(
        default=None,
        alias="connectionURI",
        description="Driver connection URI (for kvm a libvirt URI such as qemu:///system).",
    )
    migration_address: str | None = Field(
        default=None, description="Address other nodes use to send migrations to this node."
    )
    default_parameters: dict[str, vi.ParamValue] = Field(
        default_factory=dict,
        description="Hypervisor parameters applied to every instance on this node unless the "
        "instance sets them.",
        max_length=vi.MAX_PARAMETERS,
    )
    schedulable: pydantic.StrictBool = Field(
        default=True, description="Whether the controller may place new instances here."
    )
    drain: pydantic.StrictBool = Field(
        default=False,
        description="Move every instance away, following each instance's evictionPolicy.",
    )
    guest_memory_cap: quantity.Quantity | None = Field(
        default=None,
        description="The most memory all guests on this node may hold at once (quantity). "
        "The agent balloons auto-ballooned guests to stay under it; placement counts against "
        "it. Unset: the node's memory minus what the host uses.",
    )
    memory_overcommit_ratio: float = Field(
        default=1.0,
        description="How far the sum of the guests' memory.max may exceed the guest memory "
        "(the cap, or the node's memory): 2.0 lets maxima add up to twice it. Committed memory "
        "(memory.min of auto-ballooned guests, memory.max of the others) never exceeds it.",
        ge=1.0,
        le=16.0,
    )


class VerifyResult(base.ApiModel):
    """The driver's self-check of the node. Written by the node agent."""

    ok: bool | None = Field(default=None, description="True when no problem was found.")
    problems: list[str] = Field(default_factory=list, description="Problems found, for people.")


class NodeHypervisorStatus(base.ApiModel):
    """What the node agent found on its node. Every field is written by that node's agent."""

    memory_total: int | None = Field(
        default=None, description="Node memory in MiB. Written by the node agent.", ge=0
    )
    memory_free: int | None = Field(
        default=None,
        description="Memory free for instances in MiB. Written by the node agent.",
        ge=0,
    )
    memory_dom0: int | None = Field(
        default=None,
        description="Memory used by the host itself in MiB. Written by the node agent.",
        ge=0,
    )
    cpu_total: int | None = Field(
        default=None, description="Logical CPUs. Written by the node agent.", ge=0
    )
    cpu_nodes: int | None = Field(
        default=None, description="NUMA nodes. Written by the node agent.", ge=0
    )
    cpu_sockets: int | None = Field(
        default=None, description="CPU sockets. Written by the node agent.", ge=0
    )
    instance_count: int | None = Field(
        default=None, description="Instances running on the node. Written by the node agent.", ge=0
    )
    orphans: list[str] = Field(
        default_factory=list,
        description="Hypervisor instances with no VirtualInstance. Written by the node agent.",
    )
    verify: VerifyResult | None = Field(
        default=None, description="The driver's verify result. Written by the node agent."
    )
    can_migrate: bool | None = Field(
        default=None,
        description="Whether the node can send and receive live migrations. Written by the "
        "node agent.",
    )
    capabilities: dict[str, bool] = Field(
        default_factory=dict,
        description="Driver capabilities (name -> supported). Written by the node agent.",
    )
    driver_version: str | None = Field(
        default=None, description="kubehv driver version. Written by the node agent."
    )
    hypervisor_version: str | None = Field(
        default=None, description="Hypervisor version. Written by the node agent."
    )
    last_heartbeat: str | None = Field(
        default=None,
        description="Last time the agent reported (RFC 3339). Written by the node agent.",
        json_schema_extra={"format": "date-time"},
    )
    conditions: list[cond.Condition] = Field(
        default_factory=list,
        description="Ready and Verified. Written by the node agent.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(
        default=None,
        description="metadata.generation last acted on. Written by the node agent.",
    )


class NodeHypervisor(base.ApiModel):
    """A node's hypervisor as kubehv sees it: one per node, named after the node.

    The spec is written by people or tooling; the status by the agent on that node.
    """

    KIND: ClassVar[str] = constants.KIND_NHV

    api_version: str = Field(default=constants.API_VERSION)
    kind: str = Field(default=constants.KIND_NHV)
    metadata: meta.ObjectMeta = Field(default_factory=meta.ObjectMeta)
    spec: NodeHypervisorSpec
    status: NodeHypervisorStatus = Field(default_factory=NodeHypervisorStatus)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["metadata"] = self.metadata.to_dict()
        return data
