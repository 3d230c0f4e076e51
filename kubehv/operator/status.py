"""Status helpers: conditions with stable transition times, and "patch only on change".

Why this module exists: each status field has one writer, and writers share the conditions
list (the controller owns Scheduled, the agent Ready and ParametersValid, the migration
agent Migrating). A merge patch replaces a whole list, so a writer merges its own
conditions into the list it last saw and keeps everyone else's. Comparing before patching
is what keeps API writes per instance low.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubehv import api
from kubehv.api import conditions


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp from a status field (naive means UTC); None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool | None  # None: "Unknown"
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def merge_model_conditions(
    current: Sequence[api.Condition],
    updates: Iterable[Condition],
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """``current`` with ``updates`` applied by :func:`kubehv.api.conditions.set_condition`
    (the one merger: lastTransitionTime moves only when status does), as wire dicts."""
    merged = list(current)
    stamp = now or now_iso()
    for cond in updates:
        status_value: conditions.ConditionStatus | bool = (
            conditions.ConditionStatus.UNKNOWN if cond.status is None else cond.status
        )
        merged = conditions.set_condition(
            merged, cond.type, status_value, cond.reason, cond.message, observed_generation, stamp
        )
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in merged]


def merge_conditions(
    current: Sequence[Mapping[str, Any]],
    updates: Iterable[Condition],
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`merge_model_conditions` for conditions still in wire form."""
    models = [api.Condition.model_validate(c) for c in current]
    return merge_model_conditions(models, updates, observed_generation, now)


def changed_fields(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``desired`` whose value differs from ``current`` (a merge patch body).

    A value of ``None`` in ``desired`` deletes the field (merge-patch semantics) and counts
    as a change only if the field is present.
    """
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if current.get(key) is not None:
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch
