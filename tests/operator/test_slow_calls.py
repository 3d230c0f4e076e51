"""A blocking call that hangs must say where it hangs (a silent owner, seen on the kubelet node)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from kubehv.operator import k8s


def _stuck_in_the_hypervisor(seconds: float) -> str:
    time.sleep(seconds)
    return "started"


def test_a_slow_call_is_logged_with_its_stack_and_still_returns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(k8s, "SLOW_CALL_S", 0.1)
    with caplog.at_level(logging.WARNING, logger="kubehv.operator.k8s"):
        result = asyncio.run(k8s.call(_stuck_in_the_hypervisor, 0.5))
    assert result == "started"
    [record] = [r for r in caplog.records if "still running" in r.getMessage()]
    text = record.getMessage()
    assert "_stuck_in_the_hypervisor still running after" in text
    assert "time.sleep(seconds)" in text  # the worker thread's own frame


def test_a_quick_call_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(k8s, "SLOW_CALL_S", 5.0)
    with caplog.at_level(logging.WARNING, logger="kubehv.operator.k8s"):
        assert asyncio.run(k8s.call(_stuck_in_the_hypervisor, 0.0)) == "started"
    assert not [r for r in caplog.records if "still running" in r.getMessage()]


def test_an_error_of_the_call_reaches_the_caller() -> None:
    def boom() -> None:
        raise k8s.Conflict("409", 409)

    with pytest.raises(k8s.Conflict):
        asyncio.run(k8s.call(boom))


def test_on_slow_is_told_once_and_its_failure_never_reaches_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(k8s, "SLOW_CALL_S", 0.1)
    told: list[str] = []

    async def report(what: str) -> None:
        told.append(what)
        raise RuntimeError("the status write failed")

    result = asyncio.run(k8s.call(_stuck_in_the_hypervisor, 0.5, on_slow=report))
    assert result == "started"
    assert told == ["_stuck_in_the_hypervisor"]
    quick: list[str] = []

    async def never(what: str) -> None:
        quick.append(what)

    assert asyncio.run(k8s.call(_stuck_in_the_hypervisor, 0.0, on_slow=never)) == "started"
    assert quick == []
