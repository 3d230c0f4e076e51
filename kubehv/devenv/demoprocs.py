"""The demo's processes across two commands: records that survive pid reuse, and waits.

Why this module exists: ``make demo`` starts processes in one command (``up``) and a later
``make demo-down`` must find and stop exactly those, not whatever reused their pids; and a
zombie must count as gone when the demo runs under a parent that reaps it late.
"""

from __future__ import annotations

import time
from typing import Any

import psutil


def process_record(pid: int) -> dict[str, Any]:
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def same_process(record: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs (guards against pid reuse)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) < 1.0:
            return proc
    except (psutil.Error, KeyError, ValueError):
        pass
    return None


def wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait until ``proc`` has exited; a zombie counts as exited.

    ``psutil.Process.wait`` on a process that is not our child polls for the pid, and a
    zombie keeps its pid until its parent reaps it: when ``up`` runs under a parent that
    waits for it only after ``down`` returns (a test, a supervisor), waiting for the pid
    would always take the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False
