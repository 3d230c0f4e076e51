"""Shared Kubernetes access for the people-facing commands (console, migrate, drain, status).

Why this module exists: the four commands resolve the kubeconfig and namespace the same way
kubectl does (``--kubeconfig``, then ``KUBECONFIG``, then ``~/.kube/config``, then in-cluster;
namespace from ``-n`` or the context), and read kubehv objects through the generic
custom-objects API, parsed at once into the :mod:`kubehv.api` models (the commands never
index an API object by string key: a renamed field fails here, loudly). As
``kubectl kubehv ...`` the plugin inherits ``KUBECONFIG`` from kubectl's environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import pydantic
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client import exceptions as k8s_exceptions

from kubehv import api
from kubehv.api import constants

ApiException = k8s_exceptions.ApiException


def add_arguments(parser: argparse.ArgumentParser, *, namespaced: bool = True) -> None:
    parser.add_argument("--kubeconfig", help="path to a kubeconfig (default: $KUBECONFIG)")
    parser.add_argument("--context", help="kubeconfig context to use")
    if namespaced:
        parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")


class Kube:
    """A configured client plus the namespace the command works in."""

    def __init__(self, args: argparse.Namespace) -> None:
        kubeconfig = getattr(args, "kubeconfig", None) or os.environ.get("KUBECONFIG")
        config_file = kubeconfig.split(os.pathsep)[0] if kubeconfig else None
        context: str | None = getattr(args, "context", None)
        namespace: str | None = getattr(args, "namespace", None)
        self.api: k8s_client.ApiClient
        try:
            configuration = k8s_client.Configuration()
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=config_file, context=context, client_configuration=configuration
            )
            self.api = k8s_client.ApiClient(configuration)
            if namespace is None:
                contexts, active = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                    config_file=config_file
                )
                namespace = context_namespace(contexts, active, context)
        except (k8s_config.ConfigException, FileNotFoundError):
            # No kubeconfig: running in a pod (e.g. kubectl exec into the controller).
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
            self.api = k8s_client.ApiClient()
        self.namespace: str = namespace or "default"
        # Typed as Any: the generated client's methods return loosely typed JSON.
        self.custom: Any = k8s_client.CustomObjectsApi(self.api)
        self.core: Any = k8s_client.CoreV1Api(self.api)

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads, parsed into the kubehv.api models at this edge ------------------------------
    def get_vi(self, name: str, namespace: str | None = None) -> api.VirtualInstance:
        obj = self.custom.get_namespaced_custom_object(
            constants.GROUP,
            constants.VERSION,
            namespace or self.namespace,
            constants.PLURAL_VI,
            name,
        )
        return parse(api.VirtualInstance, obj)

    def get_nhv(self, name: str) -> api.NodeHypervisor:
        obj = self.custom.get_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.PLURAL_NHV, name
        )
        return parse(api.NodeHypervisor, obj)

    def list_nhvs(self) -> list[api.NodeHypervisor]:
        result = self.custom.list_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.PLURAL_NHV
        )
        return parse_list(api.NodeHypervisor, result)

    def list_vis(
        self, namespace: str | None = None, field_selector: str | None = None
    ) -> list[api.VirtualInstance]:
        kwargs: dict[str, Any] = {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        if namespace is None:
            result = self.custom.list_cluster_custom_object(
                constants.GROUP, constants.VERSION, constants.PLURAL_VI, **kwargs
            )
        else:
            result = self.custom.list_namespaced_custom_object(
                constants.GROUP, constants.VERSION, namespace, constants.PLURAL_VI, **kwargs
            )
        return parse_list(api.VirtualInstance, result)

    def vis_on_node(self, node: str) -> list[api.VirtualInstance]:
        """Instances whose status.nodeName is ``node`` (server-side when the CRD allows)."""
        try:
            return self.list_vis(field_selector=f"{constants.FIELD_VI_NODE}={node}")
        except ApiException as exc:
            if exc.status != 400:
                raise
        return [v for v in self.list_vis() if v.status.node_name == node]

    def create_migration(self, body: api.Migration) -> api.Migration:
        namespace = body.metadata.namespace or self.namespace
        created = self.custom.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, constants.PLURAL_MIG, body.to_dict()
        )
        return parse(api.Migration, created)

    def patch_vi(
        self, name: str, patch: dict[str, Any], namespace: str | None = None
    ) -> api.VirtualInstance:
        obj = self.custom.patch_namespaced_custom_object(
            constants.GROUP,
            constants.VERSION,
            namespace or self.namespace,
            constants.PLURAL_VI,
            name,
            patch,
        )
        return parse(api.VirtualInstance, obj)

    def patch_nhv(self, name: str, patch: dict[str, Any]) -> api.NodeHypervisor:
        obj = self.custom.patch_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.PLURAL_NHV, name, patch
        )
        return parse(api.NodeHypervisor, obj)

    def watch_migration(
        self, name: str, namespace: str, timeout_s: int
    ) -> Iterator[api.Migration | None]:
        """The Migration now, then each change, until ``timeout_s`` passes without a change;
        ``None`` when it is deleted (and the end)."""
        obj = self.custom.get_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, constants.PLURAL_MIG, name
        )
        first = parse(api.Migration, obj)
        yield first
        w = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(  # type: ignore[no-untyped-call]
            self.custom.list_namespaced_custom_object,
            constants.GROUP,
            constants.VERSION,
            namespace,
            constants.PLURAL_MIG,
            field_selector=f"metadata.name={name}",
            resource_version=first.metadata.resource_version,
            timeout_seconds=timeout_s,
        ):
            change = WatchEvent.model_validate(event)
            if change.type in ("ADDED", "MODIFIED"):
                yield parse(api.Migration, change.object)
            elif change.type == "DELETED":
                yield None
                return


class KubeconfigContext(pydantic.BaseModel):
    """One ``contexts`` entry of a kubeconfig (name, and the namespace it defaults to)."""

    class Body(pydantic.BaseModel):
        namespace: str | None = None

    name: str = ""
    context: Body = pydantic.Field(default_factory=Body)


def context_namespace(contexts: Any, active: Any, name: str | None) -> str | None:
    """The namespace of the kubeconfig context ``name`` (the active one when None)."""
    parsed = [KubeconfigContext.model_validate(c) for c in contexts or []]
    chosen = next((c for c in parsed if c.name == name), None) if name else None
    if chosen is None and active:
        chosen = KubeconfigContext.model_validate(active)
    return chosen.context.namespace if chosen else None


class WatchEvent(pydantic.BaseModel):
    type: str
    object: dict[str, Any] = pydantic.Field(default_factory=dict)


class Status(pydantic.BaseModel):
    """The API server's Status body of an error."""

    message: str = ""


M = TypeVar("M", bound=pydantic.BaseModel)


class BadObject(Exception):
    """An object the server returned that does not parse into the kubehv.api model."""


def parse(model: type[M], obj: Any) -> M:
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise BadObject(f"the server's {model.__name__} does not parse: {exc}") from exc


class _List(pydantic.BaseModel):
    items: list[dict[str, Any]] = pydantic.Field(default_factory=list)


def parse_list(model: type[M], result: Any) -> list[M]:
    return [parse(model, item) for item in _List.model_validate(result).items]


def condition(conditions: list[api.Condition], kind: str) -> api.Condition | None:
    return api.conditions.get_condition(conditions, kind)


def failure(exc: ApiException | BadObject, not_found: str | None = None) -> int:
    """Say why a command failed (the API server's message; ``not_found`` for a 404)."""
    if isinstance(exc, BadObject):
        return fail(str(exc))
    if exc.status == 404:
        return fail(not_found or f"not found: {api_error(exc)}")
    return fail(api_error(exc))


def fail(message: str, code: int = 1) -> int:
    print(f"kubehv: {message}", file=sys.stderr)
    return code


def api_error(exc: ApiException) -> str:
    """The API server's message, not the client's multi-line dump."""
    try:
        return Status.model_validate_json(exc.body or "{}").message or str(exc.reason)
    except pydantic.ValidationError:
        return str(exc.reason)
