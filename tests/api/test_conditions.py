"""set_condition keeps lastTransitionTime unless the status really changes."""

from __future__ import annotations

import datetime

from kubehv.api import conditions as cond

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = datetime.datetime(2025, 1, 1, 12, 5, 0, tzinfo=datetime.UTC)


def test_new_condition_is_appended_with_now() -> None:
    result = cond.set_condition([], "Ready", True, "Running", "guest up", 3, now=T0)
    assert [c.type for c in result] == ["Ready"]
    assert result[0].status is cond.ConditionStatus.TRUE
    assert result[0].last_transition_time == "2025-01-01T12:00:00Z"
    assert result[0].observed_generation == 3


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    first = cond.set_condition([], "Ready", "True", "Running", "up", 1, now=T0)
    second = cond.set_condition(first, "Ready", "True", "StillRunning", "still up", 2, now=T1)
    assert second[0].last_transition_time == "2025-01-01T12:00:00Z"
    assert (second[0].reason, second[0].message, second[0].observed_generation) == (
        "StillRunning",
        "still up",
        2,
    )


def test_status_change_moves_transition_time() -> None:
    first = cond.set_condition([], "Ready", True, "Running", "", 1, now=T0)
    second = cond.set_condition(first, "Ready", False, "Crashed", "guest died", 1, now=T1)
    assert second[0].status is cond.ConditionStatus.FALSE
    assert second[0].last_transition_time == "2025-01-01T12:05:00Z"


def test_other_conditions_keep_order_and_input_is_not_modified() -> None:
    start = cond.set_condition([], "Scheduled", True, "NodeChosen", "", 1, now=T0)
    start = cond.set_condition(start, "Ready", False, "Starting", "", 1, now=T0)
    snapshot = [c.model_copy() for c in start]
    result = cond.set_condition(start, "Scheduled", False, "NodeLost", "", 2, now=T1)
    assert [c.type for c in result] == ["Scheduled", "Ready"]
    assert start == snapshot
    assert cond.is_true(result, "Scheduled") is False
    assert cond.get_condition(result, "Missing") is None


def test_wire_form_is_camel_case() -> None:
    (c,) = cond.set_condition([], "Verified", "Unknown", "NotYet", "", None, now=T0)
    assert c.to_dict() == {
        "type": "Verified",
        "status": "Unknown",
        "reason": "NotYet",
        "message": "",
        "lastTransitionTime": "2025-01-01T12:00:00Z",
    }
