"""Reads and guarded writes of Migrations, VirtualInstances and NodeHypervisors for migrations.

Why this module exists: every hand-off of the Migration protocol is a status write that must
lose cleanly to a concurrent writer. These helpers send merge patches that carry
``metadata.resourceVersion``; the API server then answers 409 to a stale writer, which we
surface as ``Conflict`` so callers re-read instead of overwriting. The Kubernetes client is
blocking, so the async callers run these in threads (:func:`call`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes

from kubehv.operator import migration_logic as ml

GROUP = ml.GROUP
VERSION = ml.VERSION
MIGRATIONS = "migrations"
INSTANCES = "virtualinstances"
NODES = "nodehypervisors"

R = TypeVar("R")


class Conflict(Exception):
    """Someone else wrote first (HTTP 409): re-read and decide again."""


class NotFound(Exception):
    """The object is gone (HTTP 404)."""


async def call(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


def _translate(exc: Exception) -> Exception:
    status = getattr(exc, "status", None)
    if status == 409:
        return Conflict(str(exc))
    if status == 404:
        return NotFound(str(exc))
    return exc


class Store:
    """Blocking API calls for the protocol, over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        # Any: the client's stubs type every answer as object; these are JSON dicts.
        self.custom: Any = kubernetes.client.CustomObjectsApi(api_client)

    # --- Migrations ----------------------------------------------------------------------

    def get_migration(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, MIGRATIONS, name
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    def list_migrations(self, field_selector: str = "") -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, MIGRATIONS, **kwargs)
        return list(result.get("items") or [])

    def patch_migration_status(
        self, view: ml.MigrationView, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, view.namespace, MIGRATIONS, view.name, dict(patch)
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    def set_migration_finalizers(
        self, view: ml.MigrationView, finalizers: list[str]
    ) -> dict[str, Any]:
        patch = {"metadata": {"resourceVersion": view.resource_version, "finalizers": finalizers}}
        try:
            result: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, view.namespace, MIGRATIONS, view.name, patch
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    def create_migration(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, MIGRATIONS, dict(body)
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    # --- VirtualInstances ----------------------------------------------------------------

    def get_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, INSTANCES, name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list_instances(self, field_selector: str = "") -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, INSTANCES, **kwargs)
        return list(result.get("items") or [])

    def patch_instance_status(
        self, body: Mapping[str, Any], status: Mapping[str, Any]
    ) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        patch = {
            "metadata": {"resourceVersion": meta.get("resourceVersion")},
            "status": dict(status),
        }
        try:
            result: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta.get("namespace"), INSTANCES, meta.get("name"), patch
            )
        except kubernetes.client.ApiException as exc:
            raise _translate(exc) from exc
        return result

    # --- NodeHypervisors -----------------------------------------------------------------

    def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_cluster_custom_object(
                GROUP, VERSION, NODES, name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list_nodes(self) -> list[dict[str, Any]]:
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, NODES)
        return list(result.get("items") or [])

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, NODES, name, {"status": dict(status)}
        )
        return result
