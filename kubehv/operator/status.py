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


def merge_conditions(
    current: Sequence[Mapping[str, Any]],
    updates: Iterable[Condition],
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """``current`` with ``updates`` applied; lastTransitionTime moves only when status does."""
    out = [dict(c) for c in current]
    index = {c.get("type"): i for i, c in enumerate(out)}
    stamp = now or now_iso()
    for cond in updates:
        new: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message,
        }
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        i = index.get(cond.type)
        if i is None:
            new["lastTransitionTime"] = stamp
            index[cond.type] = len(out)
            out.append(new)
            continue
        old = out[i]
        new["lastTransitionTime"] = (
            old.get("lastTransitionTime") or stamp if old.get("status") == new["status"] else stamp
        )
        out[i] = new
    return out


def condition(status: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def condition_true(status: Mapping[str, Any] | None, type_: str) -> bool:
    c = condition(status, type_)
    return c is not None and c.get("status") == "True"


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
