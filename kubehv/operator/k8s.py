"""Thin, blocking Kubernetes access for the agent and the controller.

Why this module exists: kopf delivers events, but kubehv writes status itself (merge patches
to the status subresource, only when something changed) so that every write is deliberate
and countable: the bench target is at most three API writes per instance from create to
Running. Everything here is synchronous (the ``kubernetes`` client); async callers use
:func:`call` to run it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes

GROUP = "kubehv.io"
VERSION = "v1alpha1"
VI_PLURAL = "virtualinstances"
NHV_PLURAL = "nodehypervisors"
MIG_PLURAL = "migrations"
FINALIZER = "kubehv.io/instance"
"""The agent's finalizer on a VirtualInstance: whichever node runs it removes it on delete."""

T = TypeVar("T")


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
    return isinstance(exc, kubernetes.client.ApiException) and exc.status in codes


class Kube:
    """The handful of calls kubehv's own code makes (kopf makes the watches)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        # Typed as Any: kubehv passes plain dicts, the generated stubs expect models.
        self.custom: Any = kubernetes.client.CustomObjectsApi(api_client)
        self.core: Any = kubernetes.client.CoreV1Api(api_client)

    # --- VirtualInstances -------------------------------------------------------------

    def patch_vi_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Any:
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, VI_PLURAL, name, {"status": dict(status)}
        )

    def patch_vi(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Any:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, VI_PLURAL, name, dict(patch)
        )

    def list_vis(self, field_selector: str = "") -> list[dict[str, Any]]:
        kwargs = {"field_selector": field_selector} if field_selector else {}
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, VI_PLURAL, **kwargs)
        return list(result.get("items") or [])

    # --- NodeHypervisors --------------------------------------------------------------

    def get_nhv(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_cluster_custom_object(
                GROUP, VERSION, NHV_PLURAL, name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list_nhvs(self) -> list[dict[str, Any]]:
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, NHV_PLURAL)
        return list(result.get("items") or [])

    def create_nhv(self, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.create_cluster_custom_object(
            GROUP, VERSION, NHV_PLURAL, dict(body)
        )
        return result

    def patch_nhv_status(self, name: str, status: Mapping[str, Any]) -> Any:
        return self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, NHV_PLURAL, name, {"status": dict(status)}
        )

    # --- Secrets ----------------------------------------------------------------------

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        """One key of a Secret, decoded; ``None`` if the Secret or the key is missing."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}
        if key not in data:
            return None
        return base64.b64decode(data[key])
