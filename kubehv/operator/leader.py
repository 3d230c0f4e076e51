"""Leader election with a coordination.k8s.io Lease (what the manifests' RBAC expects).

Why this module exists: the controller Deployment runs two replicas; only one may place
instances and run migrations. The standby blocks in :meth:`Elector.acquire` until the
Lease is free or expired; the leader renews it in a thread and, if it ever fails to renew
in time, exits the process (crash-only: its replacement starts as a standby).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Elector:
    def __init__(  # noqa: PLR0917
        self,
        api_client: Any,
        name: str,
        namespace: str,
        identity: str,
        duration_s: float = 15.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api: Any = kubernetes.client.CoordinationV1Api(api_client)
        self.name, self.namespace, self.identity = name, namespace, identity
        self.duration_s = duration_s
        self.on_lost = on_lost or (lambda: os._exit(3))
        self._stop = threading.Event()

    def _spec(self, transitions: int, acquire: bool, old: Any = None) -> Any:
        now = _now()
        return kubernetes.client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, int(self.duration_s)),
            acquire_time=now if acquire else (old.acquire_time if old else now),
            renew_time=now,
            lease_transitions=transitions,
        )

    def try_acquire(self) -> bool:
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(0, True),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except kubernetes.client.ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        holder = spec.holder_identity
        renew = spec.renew_time
        expired = renew is None or (_now() - renew).total_seconds() > (
            spec.lease_duration_seconds or self.duration_s
        )
        if holder not in (None, "", self.identity) and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        lease.spec = self._spec(transitions, holder != self.identity, spec)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def acquire(self, poll_s: float = 1.0) -> None:
        """Block until this process leads, then keep renewing in a daemon thread."""
        while not self.try_acquire():
            time.sleep(poll_s)
        log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
        threading.Thread(target=self._renew_forever, name="lease-renew", daemon=True).start()

    def _renew_forever(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.duration_s / 3):
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
                log.error("lost the lease %s to another controller", self.name)
                self.on_lost()
                return
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)
            if time.monotonic() - last_ok > self.duration_s:
                log.error("could not renew the lease in time; stopping")
                self.on_lost()
                return

    def release(self) -> None:
        """Give the lease up on a clean stop so a standby takes over at once."""
        self._stop.set()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except Exception as exc:
            log.debug("lease release: %s", exc)
