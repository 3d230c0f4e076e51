"""Kubernetes Events for state changes a person wants to see (``kubectl describe vi``).

Why this module exists: kopf's own event posting only works inside kopf's handler context;
kubehv also posts from its watcher loops and the controller's timers. Events are
best-effort (a failure is logged, never raised) and never carry secrets: callers pass
messages built from names and reasons only.
"""

from __future__ import annotations

import datetime
import logging

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
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.name or 'object'}.", "namespace": namespace},
        "involvedObject": {
            k: v
            for k, v in (
                ("apiVersion", about.api_version),
                ("kind", about.kind),
                ("name", meta.name),
                ("namespace", meta.namespace),
                ("uid", meta.uid),
                ("resourceVersion", meta.resource_version),
            )
            if v is not None
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": component},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "reportingComponent": component,
    }
    try:
        kube.create_event(namespace, event)
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
