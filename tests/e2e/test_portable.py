"""The user's path through kubehv, observed only through the API: runs here and on kind.

Why this module exists: the kind path (hack/kind/e2e.sh, .github/workflows/kind-e2e.yaml)
must run the same end-to-end checks against a deployed kubehv (image, manifests, DaemonSet
agents with the fake driver) as ``make test`` runs against local processes. So these tests
use nothing but kubectl and the API (no state directories, no process handles):

* locally (the default), the cluster is ``operator_cluster``: the controller and three fake
  agents as processes on the session's control plane;
* with ``KUBEHV_USE_EXISTING_CLUSTER=1`` and ``KUBECONFIG``, the cluster is whatever runs
  there; its Ready ``fake`` NodeHypervisors are the nodes (at least two are needed).

tests/ship/test_existing_cluster.py runs this module in existing-cluster mode against a
local cluster, so the flag's path is exercised by ``make test`` too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import kubernetes
import pytest

from kubehv.devenv import kubeaccess
from tests.fixtures.operator import GROUP, NHV, VERSION, VI, fake_vi_body, get_object, wait_for

pytestmark = pytest.mark.apiserver

MIG = "migrations"
SLOW_MIGRATION = {"migration_duration_s": 3}


class Target:
    """The cluster under test, whoever runs it: kubectl, the API, and its fake nodes."""

    def __init__(self, control_plane: Any, nodes: list[str]) -> None:
        self.control_plane = control_plane
        self.nodes = nodes
        self.api: Any = control_plane.api_client()
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.control_plane.kubectl(*args, **kw)

    def apply(self, namespace: str, body: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))

    def get(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        return get_object(self.custom, namespace, plural, name)

    def migrate(self, namespace: str, instance: str, dest: str, **spec: Any) -> str:
        """kubectl apply a Migration of ``instance`` to ``dest``; its name."""
        name = f"mig-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Migration",
            "metadata": {"name": name},
            "spec": {"instance": instance, "targetNode": dest, **spec},
        }
        self.apply(namespace, body)
        return name

    def status(self, namespace: str, plural: str, name: str) -> dict[str, Any]:
        return dict((self.get(namespace, plural, name) or {}).get("status") or {})

    def wait_status(
        self,
        namespace: str,
        plural: str,
        name: str,
        check: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(namespace, plural, name)
            return status if check(status) else None

        result: dict[str, Any] = wait_for(probe, timeout, f"{plural}/{name}: {what}")
        return result


def _fake_nodes(control_plane: Any) -> list[str]:
    api = kubernetes.client.CustomObjectsApi(control_plane.api_client())
    nodes = []
    listed = cast(dict[str, Any], api.list_cluster_custom_object(GROUP, VERSION, NHV))
    for nhv in listed["items"]:
        conds = (nhv.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
        if ready and (nhv.get("spec") or {}).get("hypervisor") == "fake":
            nodes.append(nhv["metadata"]["name"])
    return sorted(nodes)


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest, control_plane: Any) -> Iterator[Target]:
    if kubeaccess.use_existing_cluster():
        nodes = wait_for(
            lambda: [n for n in [_fake_nodes(control_plane)] if len(n) >= 2],
            120,
            "two Ready NodeHypervisors with the fake driver in the existing cluster",
        )[0]
    else:
        cluster = request.getfixturevalue("operator_cluster")
        nodes = list(cluster.nodes)
    target = Target(control_plane, nodes)
    try:
        yield target
    finally:
        target.api.close()


def apply_ready(target: Target, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    """kubectl apply a VirtualInstance and ``kubectl wait`` for its Ready condition."""
    target.apply(namespace, fake_vi_body(name, **spec))
    target.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"virtualinstances/{name}",
        "--timeout=120s", timeout=150,
    )  # fmt: skip
    return target.status(namespace, VI, name)


def test_apply_ready_stop_start_delete(target: Target, namespace: str) -> None:
    status = apply_ready(target, namespace, "tour")
    assert status["phase"] == "Running"
    assert status["nodeName"] in target.nodes
    target.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, VI, "tour", {"spec": {"runState": "Stopped"}}
    )
    target.wait_status(namespace, VI, "tour", lambda s: s.get("phase") == "Stopped", "Stopped")
    target.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, VI, "tour", {"spec": {"runState": "Running"}}
    )
    target.wait_status(namespace, VI, "tour", lambda s: s.get("phase") == "Running", "Running")
    target.kubectl("delete", "-n", namespace, "virtualinstances/tour", "--timeout=60s", timeout=90)
    assert target.get(namespace, VI, "tour") is None  # finalizers cleared, object gone


def test_memory_change_moves_the_balloon(target: Target, namespace: str) -> None:
    apply_ready(target, namespace, "balloon")
    target.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, VI, "balloon", {"spec": {"memory": {"max": "384Mi"}}}
    )
    status = target.wait_status(
        namespace, VI, "balloon", lambda s: s.get("actualMemory") == "384Mi", "actualMemory 384Mi"
    )
    assert status["phase"] == "Running"


def test_live_migration_moves_the_instance_with_progress(target: Target, namespace: str) -> None:
    source = apply_ready(target, namespace, "mover", hypervisorParameters=SLOW_MIGRATION)[
        "nodeName"
    ]
    dest = next(n for n in target.nodes if n != source)
    name = target.migrate(namespace, "mover", dest, mode="live")
    progress: list[dict[str, Any]] = []

    def finished(status: dict[str, Any]) -> bool:
        if status.get("phase") == "Running" and status.get("progress"):
            progress.append(status["progress"])
        return status.get("phase") in ("Succeeded", "Failed", "Aborted")

    status = target.wait_status(namespace, MIG, name, finished, "a final phase", timeout=180)
    assert status["phase"] == "Succeeded", status
    assert progress, "no progress was seen while the Migration was Running"
    target.kubectl(
        "wait", "-n", namespace, "--for=condition=InstanceMoved", f"migrations/{name}",
        "--timeout=60s", timeout=90,
    )  # fmt: skip
    vi = target.status(namespace, VI, "mover")
    assert vi["nodeName"] == dest and vi["phase"] == "Running"


def test_failed_migration_leaves_the_instance_on_its_node(target: Target, namespace: str) -> None:
    params = {"fail_migration_at": "migrate"}
    source = apply_ready(target, namespace, "stayer", hypervisorParameters=params)["nodeName"]
    dest = next(n for n in target.nodes if n != source)
    name = target.migrate(namespace, "stayer", dest)
    status = target.wait_status(
        namespace, MIG, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), "final phase"
    )
    assert status["phase"] == "Failed" and status.get("failureReason"), status
    vi = target.wait_status(
        namespace, VI, "stayer", lambda s: s.get("phase") == "Running", "Running again"
    )
    assert vi["nodeName"] == source


def test_bad_instance_is_rejected_with_a_reason(target: Target, namespace: str) -> None:
    body = fake_vi_body("bad", memory={"min": "1Gi", "max": "512Mi"})
    proc = target.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0
    assert "memory" in proc.stderr and "min" in proc.stderr, proc.stderr
    assert target.get(namespace, VI, "bad") is None
