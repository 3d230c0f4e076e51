"""The one Kubernetes access layer of the agent and the controller.

Why this module exists: kopf delivers events, but kubehv writes status itself (merge patches
to the status subresource, only when something changed) so that every write is deliberate
and countable. Every call goes through :class:`Kube`, with a request timeout (a hung API
server must not hang a reconcile or a migration step), and every hand-off write carries
``metadata.resourceVersion`` so that a concurrent writer gets HTTP 409, surfaced as
:class:`Conflict`: the loser re-reads and decides again. Everything here is synchronous
(the ``kubernetes`` client); async callers use :func:`call` to run it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes

from kubehv import api
from kubehv.api import constants

GROUP = constants.GROUP
VERSION = constants.VERSION
VI_PLURAL = constants.PLURAL_VI
NHV_PLURAL = constants.PLURAL_NHV
MIG_PLURAL = constants.PLURAL_MIG
FINALIZER = constants.INSTANCE_FINALIZER
"""The agent's finalizer on a VirtualInstance: whichever node runs it removes it on delete."""

REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for every API call kubehv makes itself."""

T = TypeVar("T")


class Conflict(Exception):
    """Someone else wrote first (HTTP 409): re-read and decide again."""


class NotFound(Exception):
    """The object is gone (HTTP 404)."""


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking function (a client call, a driver method) in a worker thread."""
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


def load_api_client(kubeconfig: str | None = None) -> Any:
    """An ``ApiClient`` from a kubeconfig path, ``KUBECONFIG``, or the in-cluster config."""
    config: Any = kubernetes.config
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        return config.new_client_from_config()
    except config.ConfigException:
        config.load_incluster_config()
        return kubernetes.client.ApiClient()


def is_status(exc: BaseException, *codes: int) -> bool:
    if isinstance(exc, Conflict):
        return 409 in codes
    if isinstance(exc, NotFound):
        return 404 in codes
    return isinstance(exc, kubernetes.client.ApiException) and exc.status in codes


def _translate(exc: Exception) -> Exception:
    status = getattr(exc, "status", None)
    if status == 409:
        return Conflict(str(exc))
    if status == 404:
        return NotFound(str(exc))
    return exc


class Kube:
    """Every API call kubehv's own code makes (kopf makes the watches)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        # Typed as Any: kubehv passes plain dicts, the generated stubs expect models.
        self.custom: Any = kubernetes.client.CustomObjectsApi(api_client)
        self.core: Any = kubernetes.client.CoreV1Api(api_client)

    # --- generic ------------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One CustomObjectsApi call with the timeout; 409/404 as Conflict/NotFound."""
        try:
            result: dict[str, Any] = getattr(self.custom, method)(
                GROUP, VERSION, *args, _request_timeout=REQUEST_TIMEOUT, **kwargs
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    def _get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            if namespace is None:
                return self._call("get_cluster_custom_object", plural, name)
            return self._call("get_namespaced_custom_object", namespace, plural, name)
        except NotFound:
            return None

    def _list(
        self, plural: str, field_selector: str = "", namespace: str | None = None
    ) -> list[dict[str, Any]]:
        kwargs = {"field_selector": field_selector} if field_selector else {}
        if namespace is None:
            result = self._call("list_cluster_custom_object", plural, **kwargs)
        else:
            result = self._call("list_namespaced_custom_object", namespace, plural, **kwargs)
        return list(result.get("items") or [])

    def _patch_status(
        self, plural: str, name: str, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        if namespace is None:
            return self._call("patch_cluster_custom_object_status", plural, name, dict(body))
        return self._call(
            "patch_namespaced_custom_object_status", namespace, plural, name, dict(body)
        )

    def _patch(
        self, plural: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        return self._call("patch_namespaced_custom_object", namespace, plural, name, dict(body))

    # --- VirtualInstances -------------------------------------------------------------

    def get_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(VI_PLURAL, name, namespace)

    def list_instances(self, field_selector: str = "") -> list[dict[str, Any]]:
        return self._list(VI_PLURAL, field_selector)

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
        return self._patch_status(VI_PLURAL, name, body, namespace)

    def patch_instance_status(
        self, vi: api.VirtualInstance, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``status`` into the instance ``vi`` was read from, guarded by its version."""
        meta = vi.metadata
        return self.patch_vi_status(
            meta.namespace or "", meta.name or "", status, meta.resource_version or None
        )

    def patch_vi(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self._patch(VI_PLURAL, namespace, name, patch)

    # --- Migrations ---------------------------------------------------------------------

    def get_migration(self, namespace: str, name: str) -> dict[str, Any]:
        found = self._get(MIG_PLURAL, name, namespace)
        if found is None:
            raise NotFound(f"Migration {namespace}/{name}")
        return found

    def list_migrations(
        self, field_selector: str = "", namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self._list(MIG_PLURAL, field_selector, namespace)

    def patch_migration_status(self, view: Any, patch: Mapping[str, Any]) -> dict[str, Any]:
        """``patch`` (carrying resourceVersion) on the Migration ``view`` names."""
        return self._patch_status(MIG_PLURAL, view.name, patch, view.namespace)

    def set_migration_finalizers(self, view: Any, finalizers: list[str]) -> dict[str, Any]:
        patch = {"metadata": {"resourceVersion": view.resource_version, "finalizers": finalizers}}
        return self._patch(MIG_PLURAL, view.namespace, view.name, patch)

    def create_migration(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("create_namespaced_custom_object", namespace, MIG_PLURAL, dict(body))

    # --- NodeHypervisors --------------------------------------------------------------

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get(NHV_PLURAL, name)

    def list_nodes(self) -> list[dict[str, Any]]:
        return self._list(NHV_PLURAL)

    def create_node(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("create_cluster_custom_object", NHV_PLURAL, dict(body))

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return self._patch_status(NHV_PLURAL, name, {"status": dict(status)})

    # --- Secrets ----------------------------------------------------------------------

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        """One key of a Secret, decoded; ``None`` if the Secret or the key is missing."""
        try:
            secret = self.core.read_namespaced_secret(
                name, namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}
        if key not in data:
            return None
        return base64.b64decode(data[key])

    # --- the controller's CA (the agent checks the Secret hand-over's server with it) --------

    def read_webhook_ca_bundle(self, name: str) -> bytes | None:
        """The PEM caBundle of the ValidatingWebhookConfiguration ``name``; None if unset."""
        admission: Any = kubernetes.client.AdmissionregistrationV1Api(self.api_client)
        try:
            config = admission.read_validating_webhook_configuration(
                name, _request_timeout=REQUEST_TIMEOUT
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        for hook in config.webhooks or []:
            bundle = hook.client_config.ca_bundle if hook.client_config else None
            if bundle:
                return base64.b64decode(bundle)
        return None
