"""Helpers for the Migration and drain tests: create objects, wait for phases, look at nodes.

Kept apart from the tests so that the fault tests (issue 6) can reuse them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import kubernetes

from kubehv.api import constants
from tests.fixtures import operator as operator_fixtures

G, V = constants.GROUP, constants.VERSION


def custom(cluster: Any) -> Any:
    return kubernetes.client.CustomObjectsApi(cluster.api)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def create_instance(
    cluster: Any,
    namespace: str,
    name: str,
    *,
    params: dict[str, Any] | None = None,
    memory: tuple[int, int] = (256, 512),
    policy: str = "LiveMigrate",
    pin: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hypervisor": "fake",
        "memory": {"min": f"{memory[0]}Mi", "max": f"{memory[1]}Mi"},
        "vcpus": 1,
        "evictionPolicy": policy,
        "runState": "Running",
    }
    if params:
        spec["hypervisorParameters"] = params
    if pin:
        spec["nodeName"] = pin
    body = {"apiVersion": f"{G}/{V}", "kind": "VirtualInstance", "metadata": {"name": name}}
    body["spec"] = spec
    result: dict[str, Any] = custom(cluster).create_namespaced_custom_object(
        G, V, namespace, "virtualinstances", body
    )
    return result


def create_migration(
    cluster: Any, namespace: str, instance: str, name: str | None = None, **spec: Any
) -> str:
    name = name or unique("mig")
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "Migration",
        "metadata": {"name": name},
        "spec": {"instance": instance, **spec},
    }
    custom(cluster).create_namespaced_custom_object(G, V, namespace, "migrations", body)
    return name


def get(cluster: Any, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    return operator_fixtures.get_object(custom(cluster), namespace, plural, name)


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def wait_instance_running(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        vi = get(cluster, namespace, "virtualinstances", name)
        status = (vi or {}).get("status") or {}
        return vi if status.get("phase") == "Running" and status.get("nodeName") else None

    result: dict[str, Any] = wait_for(f"VirtualInstance {name} Running", probe, 90)
    return result


class PhaseWatch:
    """Polls a Migration until a terminal phase, remembering every phase and progress seen."""

    def __init__(self, cluster: Any, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.phases: list[str] = []
        self.progress_while_running: list[dict[str, Any]] = []
        self.body: dict[str, Any] = {}

    def until(self, phases: Iterable[str], timeout: float = 120.0) -> dict[str, Any]:
        wanted = set(phases)

        def probe() -> dict[str, Any] | None:
            body = get(self.cluster, self.namespace, "migrations", self.name)
            if body is None:
                return None
            self.body = body
            status = body.get("status") or {}
            phase = status.get("phase") or "Pending"
            if not self.phases or self.phases[-1] != phase:
                self.phases.append(phase)
            if phase == "Running" and status.get("progress"):
                self.progress_while_running.append(status["progress"])
            return body if phase in wanted else None

        result: dict[str, Any] = wait_for(
            f"Migration {self.name} in {sorted(wanted)} (seen {self.phases})",
            probe,
            timeout,
            0.1,
        )
        return result


def fake_instances(state_dir: str | Path, namespace: str) -> dict[str, str]:
    """VI name -> status of ``namespace``'s fake driver records on one node.

    Driver-level names are ``<namespace>.<name>``; other namespaces' records are left out.
    """

    out: dict[str, str] = {}
    folder = Path(state_dir) / "instances"
    if not folder.is_dir():
        return out
    prefix = f"{namespace}."
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        if rec["name"].startswith(prefix):
            out[rec["name"][len(prefix) :]] = rec["status"]
    return out


def alive_on(state_dir: str | Path, namespace: str, name: str) -> bool:
    return fake_instances(state_dir, namespace).get(name) in ("running", "paused", "shutting-down")


def history_until_deleted(
    cluster: Any, namespace: str, name: str, since: str, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Every state of Migration ``name`` after resourceVersion ``since``, up to its deletion.

    A watch replays each change in order (the last one is the DELETED event with the final
    object), so a state that lasts only a moment, such as a phase written just before the
    finalizer is released, is never missed the way polling can miss it.
    """
    api = custom(cluster)
    seen: list[dict[str, Any]] = []
    rv = since
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watch: Any = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        stream = watch.stream(
            api.list_namespaced_custom_object,
            G,
            V,
            namespace,
            "migrations",
            field_selector=f"metadata.name={name}",
            resource_version=rv,
            timeout_seconds=max(1, int(deadline - time.monotonic())),
        )
        for event in stream:
            obj = event["object"]
            rv = obj["metadata"]["resourceVersion"]
            seen.append(obj)
            if event["type"] == "DELETED":
                return seen
    phases = [(o.get("status") or {}).get("phase") for o in seen]
    raise AssertionError(f"timed out waiting for Migration {name} to be deleted; seen {phases}")
