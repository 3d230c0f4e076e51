"""Fixtures for the shipping tests: built manifests, kubehv installed for real, identities.

Why: the manifests are only worth something if the real API server accepts them and the
RBAC they grant behaves as documented; these fixtures apply them to the session's real
kube-apiserver (CRDs, namespace, RBAC and admission policies for real; the workloads only by
server-side dry run, since no kubelet runs here) and give tests clients that impersonate
kubehv's ServiceAccounts.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubehv.devenv import controlplane, kubeaccess

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
AGENT = "system:serviceaccount:kubehv-system:kubehv-agent"
CONTROLLER = "system:serviceaccount:kubehv-system:kubehv-controller"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
GROUP, VERSION = "kubehv.io", "v1alpha1"
# Kinds applied for real: identities, permissions and the admission policies that bound them.
REAL_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def kustomize(path: Path | str) -> str:
    proc = subprocess.run(
        [kubeaccess.KUBECTL, "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in the build")


def example_instance(name: str, namespace: str) -> dict[str, Any]:
    """A valid VirtualInstance: the first one in examples/, renamed (else a minimal fake one)."""
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in documents(path.read_text()):
            if doc.get("kind") == "VirtualInstance":
                doc["metadata"] = {"name": name, "namespace": namespace}
                doc.pop("status", None)
                return doc
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hypervisor": "fake", "memory": {"min": "128Mi", "max": "256Mi"}, "vcpus": 1},
    }


@pytest.fixture(scope="session")
def base_docs() -> list[dict[str, Any]]:
    return documents(kustomize(MANIFESTS / "base"))


@pytest.fixture(scope="session")
def kubehv_installed(
    control_plane: controlplane.ControlPlane, base_docs: list[dict[str, Any]]
) -> controlplane.ControlPlane:
    """Namespace, CRDs, RBAC and admission policies of manifests/base applied for real."""
    cp = control_plane
    real = [d for d in base_docs if d["kind"] in {"Namespace", "CustomResourceDefinition"}]
    cp.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(real)
    )
    cp.wait_established(
        [d["metadata"]["name"] for d in real if d["kind"] == "CustomResourceDefinition"]
    )
    rbac = [d for d in base_docs if d["kind"] in REAL_KINDS]
    # The webhook's Secret is applied too: the controller may read that one Secret only.
    rbac.append(find(base_docs, "Secret", "kubehv-webhook-tls"))
    cp.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(rbac)
    )
    return cp


@pytest.fixture
def user_namespace(kubehv_installed: controlplane.ControlPlane) -> Iterator[str]:
    name = f"ship-{uuid.uuid4().hex[:8]}"
    kubehv_installed.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubehv_installed.kubectl("delete", "namespace", name, "--wait=false", check=False)


Impersonate = Callable[..., Any]


@pytest.fixture
def impersonate(kubehv_installed: controlplane.ControlPlane) -> Iterator[Impersonate]:
    """``impersonate(user, node=None)`` -> a CustomObjectsApi-bearing ApiClient acting as
    ``user`` (with the pod-bound token's node-name claim when ``node`` is given)."""
    clients: list[Any] = []

    def make(user: str, node: str | None = None) -> Any:
        api = kubehv_installed.api_client()
        api.set_default_header("Impersonate-User", user)  # type: ignore[no-untyped-call]
        # No Impersonate-Group: for a ServiceAccount user the API server adds its groups
        # (system:serviceaccounts[:<ns>], system:authenticated) itself, as for a real token.
        if node is not None:
            api.set_default_header(  # type: ignore[no-untyped-call]
                f"Impersonate-Extra-{NODE_NAME_EXTRA.replace('/', '%2F')}", node
            )
        clients.append(api)
        return api

    yield make
    for api in clients:
        api.close()


def forbidden(call: Callable[[], Any]) -> ApiException:
    """Run ``call`` and return the 403 it must raise."""
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 403, info.value.body
    return info.value


def wait_policy_active(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Admission policies load asynchronously after their creation: wait until ``check()``
    (a real request that the policy must refuse) says it is refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"admission policy never became active: {what}")


def custom(api: Any) -> Any:
    return k8s.CustomObjectsApi(api)
