"""The one Kubernetes access layer of the agent and the controller.

Why this module exists: kopf delivers events, but kubehv writes status itself (merge patches
to the status subresource, only when something changed) so that every write is deliberate
and countable. Every call goes through :class:`Kube`, with a request timeout (a hung API
server must not hang a reconcile or a migration step), and every hand-off write carries
``metadata.resourceVersion`` so that a concurrent writer gets HTTP 409, surfaced as
:class:`Conflict`: the loser re-reads and decides again. Everything here is synchronous
(:mod:`rest`, a thin client: the ``kubernetes`` package is never imported by the agent or the
controller); async callers use :func:`call` to run it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from kubehv import api
from kubehv.api import constants
from kubehv.operator import rest

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for every API call kubehv makes itself."""

T = TypeVar("T")

ApiError = rest.ApiError
Conflict = rest.Conflict
"""Someone else wrote first (HTTP 409): re-read and decide again."""
NotFound = rest.NotFound
"""The object is gone (HTTP 404)."""


SLOW_CALL_S = 60.0
"""A blocking call still running after this long is logged once, with where it waits."""


async def call(
    fn: Callable[..., T],
    *args: Any,
    on_slow: Callable[[str], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> T:
    """Run a blocking function (a client call, a driver method) in a worker thread.

    A call that is still running after :data:`SLOW_CALL_S` is logged (once) with its worker
    thread's stack: a hung hypervisor or API call then says where it hangs instead of
    leaving an owner silent. ``on_slow(name)`` then runs too (the owner shows the wait in the
    instance's status); its own failure is logged, never raised into the call.
    """
    worker: list[int] = []

    def run() -> T:
        worker.append(threading.get_ident())
        return fn(*args, **kwargs)

    task = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        done, _ = await asyncio.wait({task}, timeout=SLOW_CALL_S)
        if not done:
            where = _stack(worker)
            log.warning("%s still running after %.0f s:\n%s", _name(fn), SLOW_CALL_S, where)
            if on_slow is not None:
                try:
                    await on_slow(_name(fn))
                except Exception:
                    log.exception("could not report the slow %s", _name(fn))
        return await task
    except asyncio.CancelledError:
        task.cancel()  # the thread runs to its end; nobody waits for its result
        raise


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def _stack(worker: list[int]) -> str:
    frame = sys._current_frames().get(worker[0]) if worker else None
    if frame is None:
        return "  (waiting for a free worker thread)"
    return "".join(traceback.format_stack(frame))


def load_api_client(kubeconfig: str | None = None) -> rest.Client:
    """A client from a kubeconfig path, ``KUBECONFIG``, or the in-cluster service account."""
    return rest.connect(kubeconfig)


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, rest.ApiError) and exc.status in codes


class Kube:
    """Every API call kubehv's own code makes (kopf makes the watches)."""

    def __init__(self, api_client: rest.Client) -> None:
        self.api_client = api_client

    # --- generic ------------------------------------------------------------------------

    def _path(
        self, plural: str, name: str = "", namespace: str | None = None, sub: str = ""
    ) -> str:
        return rest.path(constants.GROUP, constants.VERSION, plural, name, namespace, sub)

    def _get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.api_client.get(self._path(plural, name, namespace), REQUEST_TIMEOUT)
        except NotFound:
            return None

    def _list(
        self, plural: str, field_selector: str = "", namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self.api_client.list(
            self._path(plural, namespace=namespace), REQUEST_TIMEOUT, fieldSelector=field_selector
        )

    def _patch_status(
        self, plural: str, name: str, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        return self.api_client.merge_patch(
            self._path(plural, name, namespace, "status"), body, REQUEST_TIMEOUT
        )

    def _patch(
        self, plural: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        return self.api_client.merge_patch(
            self._path(plural, name, namespace), body, REQUEST_TIMEOUT
        )

    # --- VirtualInstances -------------------------------------------------------------

    def get_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(constants.PLURAL_VI, name, namespace)

    def list_instances(self, field_selector: str = "") -> list[dict[str, Any]]:
        return self._list(constants.PLURAL_VI, field_selector)

    def patch_vi_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge ``status``; with ``resource_version`` the write loses (409) to a newer one."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._patch_status(constants.PLURAL_VI, name, body, namespace)

    def patch_instance_status(
        self, vi: api.VirtualInstance, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``status`` into the instance ``vi`` was read from, guarded by its version."""
        meta = vi.metadata
        return self.patch_vi_status(
            meta.namespace or "", meta.name or "", status, meta.resource_version or None
        )

    def patch_vi(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self._patch(constants.PLURAL_VI, namespace, name, patch)

    # --- Migrations ---------------------------------------------------------------------

    def get_migration(self, namespace: str, name: str) -> dict[str, Any]:
        found = self._get(constants.PLURAL_MIG, name, namespace)
        if found is None:
            raise NotFound(f"Migration {namespace}/{name}")
        return found

    def list_migrations(
        self, field_selector: str = "", namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self._list(constants.PLURAL_MIG, field_selector, namespace)

    def patch_migration_status(self, view: Any, patch: Mapping[str, Any]) -> dict[str, Any]:
        """``patch`` (carrying resourceVersion) on the Migration ``view`` names."""
        return self._patch_status(constants.PLURAL_MIG, view.name, patch, view.namespace)

    def set_migration_finalizers(self, view: Any, finalizers: list[str]) -> dict[str, Any]:
        patch = {"metadata": {"resourceVersion": view.resource_version, "finalizers": finalizers}}
        return self._patch(constants.PLURAL_MIG, view.namespace, view.name, patch)

    def create_migration(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.api_client.create(
            self._path(constants.PLURAL_MIG, namespace=namespace), body, REQUEST_TIMEOUT
        )

    # --- NodeHypervisors --------------------------------------------------------------

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get(constants.PLURAL_NHV, name)

    def list_nodes(self) -> list[dict[str, Any]]:
        return self._list(constants.PLURAL_NHV)

    def create_node(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.api_client.create(self._path(constants.PLURAL_NHV), body, REQUEST_TIMEOUT)

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return self._patch_status(constants.PLURAL_NHV, name, {"status": dict(status)})

    # --- Secrets and Events ------------------------------------------------------------

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        """One key of a Secret, decoded; ``None`` if the Secret or the key is missing."""
        try:
            secret = self.api_client.get(
                rest.path("", "v1", "secrets", name, namespace), REQUEST_TIMEOUT
            )
        except NotFound:
            return None
        data = secret.get("data") or {}
        if key not in data:
            return None
        return base64.b64decode(data[key])

    def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.api_client.create(
            rest.path("", "v1", "events", namespace=namespace), body, REQUEST_TIMEOUT
        )

    # --- for the Secret hand-over (branch ``secrets``): no ``kubernetes`` package needed ----

    def read_webhook_ca_bundle(self, name: str) -> bytes | None:
        """The PEM caBundle of the ValidatingWebhookConfiguration ``name``; None if unset."""
        path = rest.path("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations")
        try:
            config = self.api_client.get(f"{path}/{name}", REQUEST_TIMEOUT)
        except NotFound:
            return None
        for hook in config.get("webhooks") or []:
            bundle = (hook.get("clientConfig") or {}).get("caBundle")
            if bundle:
                return base64.b64decode(bundle)
        return None

    def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """A TokenReview's ``status`` (camelCase keys, as the API returns it)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        path = rest.path("authentication.k8s.io", "v1", "tokenreviews")
        token_review = self.api_client.create(path, body, REQUEST_TIMEOUT)
        return dict(token_review.get("status") or {})
