"""Leader election with a coordination.k8s.io Lease (what the manifests' RBAC expects).

Why this module exists: the controller Deployment runs two replicas; only one may place
instances and run migrations. The rules are client-go's (``leaderelection``):

- a standby judges expiry on **its own clock**: it remembers when it last saw the Lease's
  record (holder, renewTime, transitions) change, and takes the Lease only when the record
  has not changed for a whole ``lease_duration`` measured from that moment. The holder's
  ``renewTime`` is never compared with the standby's wall clock, so clock skew between
  nodes cannot hand the Lease over early;
- the leader renews every ``retry_period`` and gives up (exits: crash-only, its replacement
  starts as a standby) when no renewal has succeeded for ``renew_deadline``, which is
  shorter than ``lease_duration``: it stops before any standby can possibly take over;
- every API call has a request timeout shorter than the renew deadline, so a hung
  connection cannot keep a leader that lost its Lease acting;
- writes carry the read's resourceVersion (``replace``): two standbys racing for an expired
  Lease get one success and one 409.

The standby does not block anything but the controller's work: the health endpoint and the
webhook are served by every replica before and during the election (see
:mod:`kubehv.operator.health`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import prometheus_client

from kubehv.operator import metrics, rest

log = logging.getLogger(__name__)

LEADER = prometheus_client.Gauge(
    "kubehv_leader",
    "1 while this controller process holds the leader Lease, else 0 (a standby).",
    registry=metrics.REGISTRY,
)

LOST_EXIT_CODE = 3


def _now() -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Timing:
    """client-go's defaults: 15 s lease, 10 s renew deadline, 2 s between tries."""

    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration, got "
                f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s}"
            )

    @classmethod
    def for_lease(cls, lease_duration_s: float) -> Timing:
        """client-go's proportions (15:10:2) for another lease duration."""
        return cls(lease_duration_s, lease_duration_s * 2 / 3, lease_duration_s * 2 / 15)

    @property
    def request_timeout_s(self) -> float:
        return max(1.0, self.renew_deadline_s / 2)


@dataclasses.dataclass(frozen=True)
class Record:
    """What a standby compares between reads: any change means the holder is alive."""

    holder: str
    renew_time: str | None
    transitions: int
    duration_s: float | None


def _record(spec: dict[str, Any]) -> Record:
    return Record(
        holder=spec.get("holderIdentity") or "",
        renew_time=spec.get("renewTime"),
        transitions=spec.get("leaseTransitions") or 0,
        duration_s=spec.get("leaseDurationSeconds"),
    )


class Elector:
    def __init__(  # noqa: PLR0917
        self,
        api_client: rest.Client,
        name: str,
        namespace: str,
        identity: str,
        timing: Timing | None = None,
        on_lost: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api_client
        self.name, self.namespace, self.identity = name, namespace, identity
        self.timing = timing or Timing()
        self.on_lost = on_lost or (lambda: os._exit(LOST_EXIT_CODE))
        self.clock = clock
        self._stop = threading.Event()
        self._observed: Record | None = None
        self._observed_at = 0.0
        self.leading = threading.Event()

    # --- one attempt -------------------------------------------------------------------------

    def _spec(
        self, transitions: int, acquire: bool, old: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        now = _now()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_duration_s)),
            "acquireTime": now if acquire else ((old or {}).get("acquireTime") or now),
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _path(self, name: str = "") -> str:
        return rest.path("coordination.k8s.io", "v1", "leases", name, self.namespace)

    def _observe(self, record: Record) -> float:
        """Seconds since this process last saw the record change (its own clock)."""
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        return now - self._observed_at

    def try_acquire(self) -> bool:
        """One read-and-write: True if this process holds the Lease afterwards."""
        timeout = self.timing.request_timeout_s
        try:
            lease = self.api.get(self._path(self.name), timeout)
        except rest.NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(0, True),
            }
            try:
                self.api.create(self._path(), body, timeout)
            except rest.Conflict:
                return False
            return True
        spec = lease.get("spec") or {}
        record = _record(spec)
        unchanged_for = self._observe(record)
        mine = record.holder == self.identity
        duration = record.duration_s or self.timing.lease_duration_s
        if record.holder and not mine and unchanged_for < duration:
            return False
        transitions = record.transitions + (0 if mine else 1)
        lease["spec"] = self._spec(transitions, not mine, spec)
        try:  # the read's resourceVersion rides along: a racing writer makes this a 409
            lease = self.api.replace(self._path(self.name), lease, timeout)
        except rest.Conflict:
            return False
        self._observe(_record(lease.get("spec") or {}))
        return True

    # --- the loops ---------------------------------------------------------------------------

    def acquire(self) -> None:
        """Block until this process leads, then keep renewing in a daemon thread."""
        while not self._stop.is_set():
            try:
                if self.try_acquire():
                    break
            except Exception as exc:
                log.warning("leader election: %s", exc)
            self._stop.wait(self.timing.retry_period_s)
        log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
        self.leading.set()
        LEADER.set(1)
        threading.Thread(target=self._renew_forever, name="lease-renew", daemon=True).start()

    def _renew_forever(self) -> None:
        last_ok = self.clock()
        while not self._stop.wait(self.timing.retry_period_s):
            try:
                if self.try_acquire():
                    last_ok = self.clock()
                    continue
                log.error("lost the lease %s to another controller", self.name)
                self._lost()
                return
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)
            if self.clock() - last_ok > self.timing.renew_deadline_s:
                log.error("could not renew the lease in time; stopping")
                self._lost()
                return

    def _lost(self) -> None:
        self.leading.clear()
        LEADER.set(0)
        self.on_lost()

    def release(self) -> None:
        """Give the lease up on a clean stop so a standby takes over at once."""
        self._stop.set()
        if not self.leading.is_set():
            return
        self.leading.clear()
        LEADER.set(0)
        timeout = self.timing.request_timeout_s
        try:
            lease = self.api.get(self._path(self.name), timeout)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                spec["holderIdentity"] = ""
                spec["leaseDurationSeconds"] = 1
                lease["spec"] = spec
                self.api.replace(self._path(self.name), lease, timeout)
        except Exception as exc:
            log.debug("lease release: %s", exc)
