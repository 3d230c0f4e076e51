"""Prometheus metrics for the agent and the controller: one registry, one HTTP endpoint.

Why a module of its own: every reconcile handler, the migration code and the driver wrapper
record into the same few metric objects, and both processes expose them the same way. The
metrics live in a module-level ``REGISTRY`` (not prometheus-client's global default) so that
tests and two components in one process never collide with the client's own collectors, and
so that what ``/metrics`` shows is exactly what kubehv defines (plus process/platform
collectors, useful for memory figures).

Usage::

    metrics.serve(9100)                       # once, at start-up; 0 disables
    with metrics.timed_reconcile("VirtualInstance"):
        ...                                   # counts ok/error by whether it raised
    with metrics.timed_driver_call("start_instance"):
        driver.start_instance(...)
    metrics.INSTANCES.labels(phase="Running").set(3)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import prometheus_client
import prometheus_client.exposition

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)
prometheus_client.ProcessCollector(registry=REGISTRY)
prometheus_client.PlatformCollector(registry=REGISTRY)

_PREFIX = "kubehv"

# Reconcile latency spans fake-driver handlers (ms) and real guest starts (seconds).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Migrations take seconds to many minutes.
_MIGRATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

RECONCILES = prometheus_client.Counter(
    f"{_PREFIX}_reconciles",
    "Reconcile handler runs, by resource kind and result (ok, error, retry).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    f"{_PREFIX}_reconcile_seconds",
    "Time spent in one reconcile handler run, by resource kind.",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INSTANCES = prometheus_client.Gauge(
    f"{_PREFIX}_instances",
    "VirtualInstances known to this process, by status phase.",
    ["phase"],
    registry=REGISTRY,
)
MIGRATIONS = prometheus_client.Counter(
    f"{_PREFIX}_migrations",
    "Migrations that reached a terminal phase, by result (Succeeded, Failed, Aborted).",
    ["result"],
    registry=REGISTRY,
)
MIGRATION_SECONDS = prometheus_client.Histogram(
    f"{_PREFIX}_migration_seconds",
    "Duration of a migration from start to its terminal phase.",
    buckets=_MIGRATION_BUCKETS,
    registry=REGISTRY,
)
MIGRATION_BYTES = prometheus_client.Counter(
    f"{_PREFIX}_migration_bytes",
    "Guest memory bytes transferred by migrations.",
    registry=REGISTRY,
)
DRIVER_CALLS = prometheus_client.Counter(
    f"{_PREFIX}_driver_calls",
    "Hypervisor driver calls, by contract method and result (ok, error).",
    ["method", "result"],
    registry=REGISTRY,
)
DRIVER_CALL_SECONDS = prometheus_client.Histogram(
    f"{_PREFIX}_driver_call_seconds",
    "Latency of hypervisor driver calls, by contract method.",
    ["method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

_served: dict[int, object] = {}
_lock = threading.Lock()


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from the pod network
    """Start the ``/metrics`` HTTP server in a daemon thread; ``port == 0`` disables it.

    Idempotent per port, so a component that restarts its operator loop in-process does not
    fail with "address already in use".
    """
    if port <= 0:
        return
    with _lock:
        if port in _served:
            return
        server, _thread = prometheus_client.start_http_server(port, addr=addr, registry=REGISTRY)
        _served[port] = server


def render() -> bytes:
    """The exposition text, for tests and for handlers that serve metrics themselves."""
    return prometheus_client.exposition.generate_latest(REGISTRY)


@contextlib.contextmanager
def _timed(
    counter: prometheus_client.Counter,
    histogram: prometheus_client.Histogram,
    labels: dict[str, str],
) -> Iterator[None]:
    started = time.monotonic()
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        histogram.labels(**labels).observe(time.monotonic() - started)
        counter.labels(**labels, result=result).inc()


def timed_driver_call(method: str) -> contextlib.AbstractContextManager[None]:
    """Count and time one driver call: ``driver_calls_total{method,result}`` and latency."""
    return _timed(DRIVER_CALLS, DRIVER_CALL_SECONDS, {"method": method})


def timed_reconcile(kind: str) -> contextlib.AbstractContextManager[None]:
    """Count and time one reconcile handler run: ``reconciles_total{kind,result}``."""
    return _timed(RECONCILES, RECONCILE_SECONDS, {"kind": kind})


P = ParamSpec("P")
R = TypeVar("R")


def driver_call(method: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form of :func:`timed_driver_call` for synchronous functions."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with timed_driver_call(method):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def record_migration(result: str, seconds: float | None, bytes_transferred: int = 0) -> None:
    """Record one migration that reached a terminal phase."""
    MIGRATIONS.labels(result=result).inc()
    if seconds is not None and seconds >= 0:
        MIGRATION_SECONDS.observe(seconds)
    if bytes_transferred > 0:
        MIGRATION_BYTES.inc(bytes_transferred)


def record_migration_bytes(bytes_transferred: int) -> None:
    """Memory a finished copy moved (counted when the copy completes, once)."""
    if bytes_transferred > 0:
        MIGRATION_BYTES.inc(bytes_transferred)


def set_instance_phases(counts: dict[str, int]) -> None:
    """Replace the per-phase instance gauge with ``counts`` (phases absent drop to zero)."""
    for metric in INSTANCES.collect():
        for sample in metric.samples:
            phase = sample.labels.get("phase")
            if phase is not None and phase not in counts:
                INSTANCES.labels(phase=phase).set(0)
    for phase, n in counts.items():
        INSTANCES.labels(phase=phase).set(n)
