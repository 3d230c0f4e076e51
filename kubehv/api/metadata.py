"""A loose model of Kubernetes ObjectMeta, enough for kubehv's own needs.

Why this module exists: the operator reads names, labels, annotations, generations and
finalizers from every object; a typed view avoids dict digging, while ``extra="allow"`` keeps
every other metadata field (managedFields, ownerReferences, ...) intact on a round trip.
"""

from __future__ import annotations

from typing import Any

import pydantic

from kubehv.api import base


class ObjectMeta(base.ApiModel):
    """Standard object metadata; unknown keys are kept as they came."""

    model_config = pydantic.ConfigDict(extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = pydantic.Field(default_factory=dict)
    annotations: dict[str, str] = pydantic.Field(default_factory=dict)
    finalizers: list[str] = pydantic.Field(default_factory=list)
    owner_references: list[dict[str, Any]] = pydantic.Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in ("labels", "annotations", "finalizers", "ownerReferences"):
            if not data.get(key):
                data.pop(key, None)
        return data
