"""Status conditions in the Kubernetes convention (metav1.Condition), and how to update them.

Why this module exists: every kubehv status carries conditions (Ready, Scheduled,
ParametersValid, Migrating, Verified). Writers must keep ``lastTransitionTime`` when a
condition's status did not change, or every heartbeat looks like a transition to watchers and
GitOps tools; :func:`set_condition` does that in one place.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence

import pydantic

from kubehv.api import base


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


def now_rfc3339(now: datetime.datetime | None = None) -> str:
    """A timestamp in the form Kubernetes writes (``2025-01-31T12:00:00Z``), UTC, seconds."""
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Condition(base.ApiModel):
    """One aspect of an object's current state, in the metav1.Condition convention."""

    type: str = pydantic.Field(
        description="Condition type, in CamelCase (for example Ready, Scheduled, Verified).",
        min_length=1,
        max_length=316,
    )
    status: ConditionStatus = pydantic.Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str = pydantic.Field(
        default="",
        description="A CamelCase word saying why the condition has its status.",
        max_length=1024,
    )
    message: str = pydantic.Field(
        default="",
        description="Human-readable details about the last transition.",
        max_length=32768,
    )
    last_transition_time: str | None = pydantic.Field(
        default=None,
        description="When the status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = pydantic.Field(
        default=None,
        description="The metadata.generation the writer had seen when it set this condition.",
        ge=0,
    )


def _status(value: ConditionStatus | str | bool) -> ConditionStatus:
    if isinstance(value, bool):
        return ConditionStatus.TRUE if value else ConditionStatus.FALSE
    return ConditionStatus(value)


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of that type, or None."""
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    """True when the condition of that type exists and its status is True."""
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status is ConditionStatus.TRUE


def set_condition(  # noqa: PLR0917 - the signature other components code against
    conditions: Sequence[Condition],
    type: str,
    status: ConditionStatus | str | bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime.datetime | str | None = None,
) -> list[Condition]:
    """A new list with the condition of ``type`` set; the input is not modified.

    ``lastTransitionTime`` is kept when the status is unchanged (only reason, message and
    observedGeneration move), and set to ``now`` (default: the current time) otherwise.
    Other conditions keep their order; a new type is appended.
    """
    new_status = _status(status)
    stamp = now if isinstance(now, str) else now_rfc3339(now)
    result: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type:
            result.append(cond)
            continue
        found = True
        keep = cond.status is new_status and cond.last_transition_time is not None
        result.append(
            Condition(
                type=type,
                status=new_status,
                reason=reason,
                message=message,
                last_transition_time=cond.last_transition_time if keep else stamp,
                observed_generation=generation,
            )
        )
    if not found:
        result.append(
            Condition(
                type=type,
                status=new_status,
                reason=reason,
                message=message,
                last_transition_time=stamp,
                observed_generation=generation,
            )
        )
    return result
