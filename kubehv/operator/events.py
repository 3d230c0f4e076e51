"""Kubernetes Events for state changes a person wants to see (``kubectl describe vi``).

Why this module exists: kopf's own event posting only works inside kopf's handler context;
kubehv also posts from its watcher loops and the controller's timers. Events are
best-effort (a failure is logged, never raised) and never carry secrets: callers pass
messages built from names and reasons only.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kubernetes

from kubehv.operator import k8s

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def post(
    kube: k8s.Kube,
    body: Mapping[str, Any],
    reason: str,
    message: str,
    *,
    type_: str = NORMAL,
    component: str = "kubehv",
) -> None:
    """Create one Event about ``body`` (blocking; call through :func:`k8s.call`)."""
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    now = _now()
    event = kubernetes.client.CoreV1Event(
        metadata=kubernetes.client.V1ObjectMeta(
            generate_name=f"{meta.get('name', 'object')}.", namespace=namespace
        ),
        involved_object=kubernetes.client.V1ObjectReference(
            api_version=body.get("apiVersion") or f"{k8s.GROUP}/{k8s.VERSION}",
            kind=body.get("kind"),
            name=meta.get("name"),
            namespace=meta.get("namespace"),
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
        ),
        reason=reason,
        message=message[:1024],
        type=type_,
        source=kubernetes.client.V1EventSource(component=component),
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        reporting_component=component,
    )
    try:
        kube.core.create_namespaced_event(namespace, event, _request_timeout=k8s.REQUEST_TIMEOUT)
    except Exception as exc:  # best effort: an Event must never break a reconcile
        log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)


async def apost(
    kube: k8s.Kube,
    body: Mapping[str, Any],
    reason: str,
    message: str,
    *,
    type_: str = NORMAL,
    component: str = "kubehv",
) -> None:
    await k8s.call(post, kube, body, reason, message, type_=type_, component=component)
