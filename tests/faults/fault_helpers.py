"""Helpers for the fault tests: a private operator cluster per module, and phase-triggered kills.

Why a private cluster: these tests kill -9 and stop agents and restart the API server; doing
that to the session-wide ``operator_cluster`` would break whichever test shares it. Node
names are unique per module so two pytest sessions on one machine never meet. The folder has
no ``__init__.py`` (like tests/operator) and this module's name is unique in the whole tree,
so pytest's rootdir import puts it on ``sys.path`` without shadowing anything.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from tests.fixtures.operator import GROUP, VERSION, OperatorCluster, running_cluster

ALIVE = ("running", "paused", "shutting-down")


def node_names(prefix: str, count: int = 3) -> list[str]:
    tag = uuid.uuid4().hex[:5]
    return [f"{prefix}-{tag}-{chr(ord('a') + i)}" for i in range(count)]


def cluster_fixture(prefix: str, **kw: Any) -> Any:
    """A module-scoped fixture: controller + 3 fake agents private to one test module."""

    @pytest.fixture(scope="module")
    def fault_cluster(control_plane: Any, crds_installed: Any) -> Iterator[OperatorCluster]:
        with running_cluster(control_plane, node_names(prefix), **kw) as cluster:
            yield cluster

    return fault_cluster


def alive_nodes(cluster: OperatorCluster, namespace: str, name: str) -> list[str]:
    """Nodes whose fake state directory holds a live copy of VirtualInstance ``name``."""
    return [n for n in cluster.nodes if cluster.fake_instances(n, namespace).get(name) in ALIVE]


def copies(cluster: OperatorCluster, namespace: str, name: str) -> dict[str, str]:
    """node -> fake record status, for every node that has any record of ``name``."""
    out = {}
    for n in cluster.nodes:
        status = cluster.fake_instances(n, namespace).get(name)
        if status is not None:
            out[n] = status
    return out


def create_migration(
    cluster: OperatorCluster, namespace: str, instance: str, name: str = "", **spec: Any
) -> str:
    name = name or f"mig-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Migration",
        "metadata": {"name": name},
        "spec": {"instance": instance, **spec},
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "migrations", body)
    return name


def get_migration(cluster: OperatorCluster, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "migrations", name
    )
    return result


class PhaseTrigger:
    """Watches one Migration and runs ``action`` the moment a status with ``phase`` is written.

    A watch, not polling: Preparing and TargetReady last only as long as one driver call, so
    only a watch sees every phase the agents write. Every phase seen is recorded.
    """

    def __init__(
        self, cluster: OperatorCluster, namespace: str, name: str, phase: str,
        action: Callable[[], None],
    ) -> None:  # fmt: skip
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.phase, self.action = phase, action
        self.seen: list[str] = []
        self.fired = threading.Event()
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PhaseTrigger:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop and not self.fired.is_set():
                watch: Any = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
                for event in watch.stream(
                    self.cluster.custom.list_namespaced_custom_object,
                    GROUP, VERSION, self.namespace, "migrations",
                    field_selector=f"metadata.name={self.name}", timeout_seconds=5,
                ):  # fmt: skip
                    phase = ((event["object"].get("status") or {}).get("phase")) or "Pending"
                    if not self.seen or self.seen[-1] != phase:
                        self.seen.append(phase)
                    if phase == self.phase:
                        self.action()
                        self.fired.set()
                        watch.stop()
                        return
                    if phase in ("Succeeded", "Failed", "Aborted"):
                        watch.stop()
                        self._stop = True
                        return
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        self._stop = True
        if self.error is not None:
            raise self.error
        return self.fired.is_set()


_SHARED: dict[tuple[int, str], str] = {}


def shared_namespace(cluster: OperatorCluster, prefix: str) -> str:
    """One namespace per cluster and prefix, for hypothesis examples (made once, kept)."""
    key = (id(cluster), prefix)
    if key not in _SHARED:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", name)
        _SHARED[key] = name
    return _SHARED[key]
