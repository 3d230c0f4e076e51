"""Kubernetes Events for state changes a person wants to see (``kubectl describe vi``).

Why this module exists: kopf's own event posting only works inside kopf's handler context;
kubehv also posts from its watcher loops and the controller's timers. Events are
best-effort (a failure is logged, never raised) and never carry secrets: callers pass
messages built from names and reasons only.
"""

from __future__ import annotations

import datetime
import logging

import kubernetes

from kubehv import api
from kubehv.operator import k8s

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


About = api.VirtualInstance | api.Migration | api.NodeHypervisor


def post(
    kube: k8s.Kube,
    about: About,
    reason: str,
    message: str,
    *,
    type_: str = NORMAL,
    component: str = "kubehv",
) -> None:
    """Create one Event about ``about`` (blocking; call through :func:`k8s.call`)."""
    meta = about.metadata
    namespace = meta.namespace or "default"
    now = _now()
    event = kubernetes.client.CoreV1Event(
        metadata=kubernetes.client.V1ObjectMeta(
            generate_name=f"{meta.name or 'object'}.", namespace=namespace
        ),
        involved_object=kubernetes.client.V1ObjectReference(
            api_version=about.api_version,
            kind=about.kind,
            name=meta.name,
            namespace=meta.namespace,
            uid=meta.uid,
            resource_version=meta.resource_version,
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
        log.warning("could not post event %s on %s: %s", reason, meta.name, exc)


async def apost(
    kube: k8s.Kube,
    about: About,
    reason: str,
    message: str,
    *,
    type_: str = NORMAL,
    component: str = "kubehv",
) -> None:
    await k8s.call(post, kube, about, reason, message, type_=type_, component=component)
