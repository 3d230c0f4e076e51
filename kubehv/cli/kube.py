"""Shared Kubernetes access for the people-facing commands (console, migrate, drain, status).

Why this module exists: the four commands resolve the kubeconfig and namespace the same way
kubectl does (``--kubeconfig``, then ``KUBECONFIG``, then ``~/.kube/config``, then in-cluster;
namespace from ``-n`` or the context), and read kubehv objects as plain dicts through the
generic custom-objects API, so a CLI works against any server version of the CRDs it can
read. As ``kubectl kubehv ...`` the plugin inherits ``KUBECONFIG`` from kubectl's environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client import exceptions as k8s_exceptions

GROUP = "kubehv.io"
VERSION = "v1alpha1"
VI = "virtualinstances"
MIGRATION = "migrations"
NHV = "nodehypervisors"

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
                chosen = next((c for c in contexts if c["name"] == context), active)
                namespace = ((chosen or {}).get("context") or {}).get("namespace")
        except (k8s_config.ConfigException, FileNotFoundError):
            # No kubeconfig: running in a pod (e.g. kubectl exec into the controller).
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
            self.api = k8s_client.ApiClient()
        self.namespace: str = namespace or "default"
        # Typed as Any: the generated client's methods return loosely typed JSON.
        self.custom: Any = k8s_client.CustomObjectsApi(self.api)

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads and writes as dicts ----------------------------------------------------------
    def get_vi(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace or self.namespace, VI, name
        )
        return obj

    def get_nhv(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, NHV, name)
        return obj

    def list_nhvs(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_cluster_custom_object(GROUP, VERSION, NHV)[
            "items"
        ]
        return items

    def list_vis(
        self, namespace: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        if namespace is None:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, VI, **kwargs)
        else:
            result = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, VI, **kwargs
            )
        items: list[dict[str, Any]] = result["items"]
        return items

    def vis_on_node(self, node: str) -> list[dict[str, Any]]:
        """Instances whose status.nodeName is ``node`` (server-side when the CRD allows)."""
        try:
            return self.list_vis(field_selector=f"status.nodeName={node}")
        except ApiException as exc:
            if exc.status != 400:
                raise
        return [v for v in self.list_vis() if status_of(v).get("nodeName") == node]

    def watch_migration(
        self, name: str, namespace: str, timeout_s: int
    ) -> Iterator[dict[str, Any]]:
        """The Migration now, then each change, until ``timeout_s`` passes without a change."""
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, MIGRATION, name
        )
        yield obj
        w = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(  # type: ignore[no-untyped-call]
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            MIGRATION,
            field_selector=f"metadata.name={name}",
            resource_version=obj["metadata"].get("resourceVersion"),
            timeout_seconds=timeout_s,
        ):
            if event["type"] in ("ADDED", "MODIFIED"):
                yield event["object"]
            elif event["type"] == "DELETED":
                yield {**event["object"], "_deleted": True}
                return


def status_of(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status_of(obj).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def fail(message: str, code: int = 1) -> int:
    print(f"kubehv: {message}", file=sys.stderr)
    return code


def api_error(exc: ApiException) -> str:
    """The API server's message, not the client's multi-line dump."""
    import json  # noqa: PLC0415 - only on the error path

    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
