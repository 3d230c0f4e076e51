"""The Migration resource: a request to move one VirtualInstance to another node.

Why this module exists: a migration is a first-class object so that it can be watched,
aborted (delete it, or annotate ``kubehv.io/abort: "true"``), audited and throttled. The spec is
immutable once created (a changed request is a new Migration); the CRD enforces this with
CEL. The CRD schema and docs are generated from these models.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import pydantic
from pydantic import Field

from kubehv.api import base, constants
from kubehv.api import conditions as cond
from kubehv.api import metadata as meta


class Mode(enum.StrEnum):
    LIVE = "live"
    NON_LIVE = "non-live"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    PREPARING = "Preparing"
    TARGET_READY = "TargetReady"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.ABORTED})


class MigrationSpec(base.StrictModel):
    """The request. Immutable once the Migration exists."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "Migration spec is immutable"}
            ]
        }
    )

    instance: str = Field(
        description="Name of the VirtualInstance to move (same namespace).", min_length=1
    )
    target_node: str | None = Field(
        default=None,
        description="Node to move to; the controller picks one when unset.",
        min_length=1,
    )
    mode: Mode = Field(
        default=Mode.LIVE,
        description="live (the guest keeps running) or non-live (stop, move, start).",
    )
    bandwidth: pydantic.StrictInt | None = Field(
        default=None, description="Bandwidth cap for the memory copy, in MiB/s.", ge=1
    )
    max_downtime: pydantic.StrictInt | None = Field(
        default=None,
        description="Longest pause allowed for the final switch-over, in milliseconds.",
        ge=1,
    )
    completion_timeout: pydantic.StrictInt = Field(
        default=600,
        description="Seconds after which an unfinished migration is aborted.",
        ge=1,
    )
    allow_unsafe_version_pair: pydantic.StrictBool = Field(
        default=False,
        description="Allow a source and target whose hypervisor versions are not known to "
        "be compatible.",
    )


class Progress(base.ApiModel):
    """How far the memory (and node-local disk) copy is. Written by the source node's agent."""

    memory_total: int | None = Field(default=None, description="Guest memory in bytes.", ge=0)
    memory_processed: int | None = Field(default=None, description="Bytes copied so far.", ge=0)
    memory_remaining: int | None = Field(default=None, description="Bytes still to copy.", ge=0)
    disk_total: int | None = Field(
        default=None,
        description="Bytes of node-local disks copied with the guest (storage migration).",
        ge=0,
    )
    disk_processed: int | None = Field(default=None, description="Disk bytes copied.", ge=0)
    disk_remaining: int | None = Field(default=None, description="Disk bytes to copy.", ge=0)
    percent: int | None = Field(
        default=None, description="Percent done (memory and disk bytes together).", ge=0, le=100
    )
    rate_bytes_per_second: int | None = Field(
        default=None, description="Current copy rate in bytes per second.", ge=0
    )


class MigrationStatus(base.ApiModel):
    """Where the migration is. One writer per field, named in each description."""

    phase: Phase | None = Field(
        default=None,
        description="Pending and Scheduled are written by the controller; Preparing and "
        "TargetReady by the target node's agent; Running, Finalizing, Succeeded, Failed and "
        "Aborted by the source node's agent (the controller writes Failed or Aborted when an "
        "agent is gone).",
    )
    source_node: str | None = Field(
        default=None, description="Node the instance leaves. Written by the controller."
    )
    target_node: str | None = Field(
        default=None, description="Node the instance moves to. Written by the controller."
    )
    migration_info: str | None = Field(
        default=None,
        description="Opaque data the source agent passes to the target agent. Written by the "
        "source node's agent.",
    )
    progress: Progress | None = Field(
        default=None, description="Memory copy progress. Written by the source node's agent."
    )
    start_time: str | None = Field(
        default=None,
        description="When the copy began (RFC 3339). Written by the source node's agent.",
        json_schema_extra={"format": "date-time"},
    )
    end_time: str | None = Field(
        default=None,
        description="When the migration ended (RFC 3339). Written by whoever writes the "
        "terminal phase.",
        json_schema_extra={"format": "date-time"},
    )
    failure_reason: str | None = Field(
        default=None,
        description="Why the migration failed or was aborted. Written with the terminal phase.",
    )
    conditions: list[cond.Condition] = Field(
        default_factory=list,
        description="Conditions; each is written by the component that owns the phase it "
        "describes.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation last acted on. Written by the controller."
    )


class Migration(base.ApiModel):
    """A request to move a VirtualInstance to another node, and its progress.

    Phases: the controller writes Pending and Scheduled; the target agent writes Preparing and
    TargetReady; the source agent writes Running, Finalizing, Succeeded, Failed and Aborted.
    Succeeded means the guest runs on the target and the source is cleaned up; right after,
    the controller moves the VirtualInstance's status.nodeName and sets the condition
    InstanceMoved=True (wait for that condition to read the new node).
    Abort by deleting the Migration or by annotating it kubehv.io/abort="true".
    """

    KIND: ClassVar[str] = constants.KIND_MIG

    api_version: str = Field(default=constants.API_VERSION)
    kind: str = Field(default=constants.KIND_MIG)
    metadata: meta.ObjectMeta = Field(default_factory=meta.ObjectMeta)
    spec: MigrationSpec
    status: MigrationStatus = Field(default_factory=MigrationStatus)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["metadata"] = self.metadata.to_dict()
        return data
