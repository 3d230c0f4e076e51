"""RBAC and admission policy, checked by real requests as kubehv's own identities.

Why: "least privilege" is a claim about what the API server refuses. Each test impersonates
the agent's or the controller's ServiceAccount against the real kube-apiserver, with
manifests/base's ClusterRoles, bindings and ValidatingAdmissionPolicies applied for real, and
makes the request itself (``kubectl auth can-i`` is only a cross-check: it knows nothing of
admission policies). The central one: the agent holds ``patch`` on VirtualInstances (kopf's
finalizers need it) yet cannot change a VirtualInstance's spec.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubehv.devenv import controlplane
from tests.ship.conftest import (
    AGENT,
    CONTROLLER,
    GROUP,
    VERSION,
    Impersonate,
    custom,
    example_instance,
    forbidden,
    wait_policy_active,
)

pytestmark = pytest.mark.apiserver
VI = "virtualinstances"


@pytest.fixture
def instance(kubehv_installed: controlplane.ControlPlane, user_namespace: str) -> Iterator[str]:
    """A VirtualInstance created by the admin (a user) in a fresh namespace."""
    api = kubehv_installed.api_client()
    try:
        custom(api).create_namespaced_custom_object(
            GROUP, VERSION, user_namespace, VI, example_instance("vm1", user_namespace)
        )
        yield "vm1"
    finally:
        api.close()  # type: ignore[no-untyped-call]


def spec_change(vi: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that changes the spec (vcpus, else a label-free field every spec has)."""
    spec = vi.get("spec") or {}
    vcpus = spec.get("vcpus")
    if isinstance(vcpus, int):
        return {"spec": {"vcpus": vcpus + 1}}
    return {"spec": {"runState": "Stopped" if spec.get("runState") != "Stopped" else "Running"}}


def agent_spec_patch_refused(api: Any, ns: str, name: str) -> bool:
    admin_view = custom(api).get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)
    try:
        custom(api).patch_namespaced_custom_object(
            GROUP, VERSION, ns, VI, name, spec_change(admin_view)
        )
    except ApiException as exc:
        if exc.status in (403, 422) and "never the spec" in (exc.body or ""):
            return True
        raise
    return False


def test_agent_cannot_patch_a_spec_but_can_patch_status_and_finalizers(
    kubehv_installed: controlplane.ControlPlane,
    impersonate: Impersonate,
    user_namespace: str,
    instance: str,
) -> None:
    ns, name = user_namespace, instance
    agent = custom(impersonate(AGENT))
    before = agent.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)

    # RBAC allows the patch (kopf needs it); the admission policy refuses a spec change.
    wait_policy_active(
        lambda: agent_spec_patch_refused(impersonate(AGENT), ns, name),
        "kubehv-components-never-write-spec",
    )
    with pytest.raises(ApiException) as info:
        agent.patch_namespaced_custom_object(GROUP, VERSION, ns, VI, name, spec_change(before))
    assert info.value.status == 403
    assert info.value.body is not None
    assert "never the spec of a VirtualInstance" in info.value.body
    admin = custom(kubehv_installed.api_client())
    after = admin.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)
    assert after["spec"] == before["spec"]

    # Status through the /status subresource: allowed.
    agent.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, VI, name, {"status": {"phase": "Running"}}
    )
    assert (
        admin.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)["status"]["phase"]
        == "Running"
    )

    # Its finalizer on the main object (metadata only): allowed, and removable again.
    agent.patch_namespaced_custom_object(
        GROUP, VERSION, ns, VI, name, {"metadata": {"finalizers": ["agent.kubehv.io/node-a"]}}
    )
    agent.patch_namespaced_custom_object(
        GROUP, VERSION, ns, VI, name, {"metadata": {"finalizers": None}}
    )

    # A full replace (update), create and delete are not granted at all.
    current = admin.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)
    forbidden(lambda: agent.replace_namespaced_custom_object(GROUP, VERSION, ns, VI, name, current))
    forbidden(
        lambda: agent.create_namespaced_custom_object(
            GROUP, VERSION, ns, VI, example_instance("vm2", ns)
        )
    )
    forbidden(lambda: agent.delete_namespaced_custom_object(GROUP, VERSION, ns, VI, name))


def test_controller_cannot_patch_a_spec_either(
    kubehv_installed: controlplane.ControlPlane,
    impersonate: Impersonate,
    user_namespace: str,
    instance: str,
) -> None:
    ns, name = user_namespace, instance
    controller = custom(impersonate(CONTROLLER))
    wait_policy_active(
        lambda: agent_spec_patch_refused(impersonate(CONTROLLER), ns, name),
        "kubehv-components-never-write-spec (controller)",
    )
    # It places instances: status.nodeName through the status subresource.
    controller.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, VI, name, {"status": {"nodeName": "node-a"}}
    )
    forbidden(lambda: controller.delete_namespaced_custom_object(GROUP, VERSION, ns, VI, name))


def test_secrets_agent_gets_one_controller_only_its_own(
    kubehv_installed: controlplane.ControlPlane,
    impersonate: Impersonate,
    user_namespace: str,
) -> None:
    admin = k8s.CoreV1Api(kubehv_installed.api_client())
    admin.create_namespaced_secret(
        user_namespace,
        k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="vnc"), string_data={"password": "x"}),
    )
    agent = k8s.CoreV1Api(impersonate(AGENT))
    controller = k8s.CoreV1Api(impersonate(CONTROLLER))

    # Agent: get a named Secret (a console password the VI references), never list/watch.
    secret = agent.read_namespaced_secret("vnc", user_namespace)
    assert secret.data is not None and secret.data["password"]
    forbidden(lambda: agent.list_namespaced_secret(user_namespace))
    forbidden(agent.list_secret_for_all_namespaces)

    # Controller: its webhook certificate Secret and nothing else.
    controller.read_namespaced_secret("kubehv-webhook-tls", "kubehv-system")
    forbidden(lambda: controller.read_namespaced_secret("vnc", user_namespace))
    forbidden(lambda: controller.list_namespaced_secret("kubehv-system"))


def test_agent_writes_only_its_own_nodehypervisor(
    kubehv_installed: controlplane.ControlPlane, impersonate: Impersonate
) -> None:
    own, other = "ship-node-a", "ship-node-b"
    agent = custom(impersonate(AGENT, node=own))
    admin = custom(kubehv_installed.api_client())

    def body(name: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NodeHypervisor",
            "metadata": {"name": name},
            "spec": {
                "nodeName": name,
                "hypervisor": "fake",
                "connectionURI": f"fake:///tmp/{name}",
            },
        }

    def other_refused() -> bool:
        try:
            agent.create_cluster_custom_object(GROUP, VERSION, "nodehypervisors", body(other))
        except ApiException as exc:
            if exc.status == 403 and "its own node" in (exc.body or ""):
                return True
            raise
        admin.delete_cluster_custom_object(GROUP, VERSION, "nodehypervisors", other)
        return False

    try:
        wait_policy_active(other_refused, "kubehv-agent-own-nodehypervisor")
        agent.create_cluster_custom_object(GROUP, VERSION, "nodehypervisors", body(own))
        agent.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            "nodehypervisors",
            own,
            {"status": {"conditions": []}},
        )
        # The agent may not delete NodeHypervisors (an admin decommissions a node).
        forbidden(
            lambda: agent.delete_cluster_custom_object(GROUP, VERSION, "nodehypervisors", own)
        )
        # The controller reads them but never creates one.
        controller = custom(impersonate(CONTROLLER))
        assert controller.get_cluster_custom_object(GROUP, VERSION, "nodehypervisors", own)
        forbidden(
            lambda: controller.create_cluster_custom_object(
                GROUP, VERSION, "nodehypervisors", body("ship-node-c")
            )
        )
    finally:
        for name in (own, other):
            try:
                admin.delete_cluster_custom_object(GROUP, VERSION, "nodehypervisors", name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def test_controller_leader_election_lease(
    kubehv_installed: controlplane.ControlPlane, impersonate: Impersonate
) -> None:
    coordination = k8s.CoordinationV1Api(impersonate(CONTROLLER))
    lease = k8s.V1Lease(
        metadata=k8s.V1ObjectMeta(name="kubehv-controller"),
        spec=k8s.V1LeaseSpec(holder_identity="ship-test", lease_duration_seconds=15),
    )
    try:
        coordination.create_namespaced_lease("kubehv-system", lease)
    except ApiException as exc:
        if exc.status != 409:
            raise
    got = coordination.read_namespaced_lease("kubehv-controller", "kubehv-system")
    assert got.spec is not None
    got.spec.holder_identity = "ship-test-2"
    coordination.replace_namespaced_lease("kubehv-controller", "kubehv-system", got)
    forbidden(lambda: coordination.read_namespaced_lease("someone-else", "kubehv-system"))
    forbidden(lambda: coordination.list_namespaced_lease("default"))


@pytest.mark.parametrize(
    ("user", "verb", "resource", "allowed"),
    [
        (AGENT, "patch", "virtualinstances/status", True),
        (AGENT, "update", "virtualinstances", False),
        (AGENT, "delete", "virtualinstances", False),
        (AGENT, "list", "secrets", False),
        (AGENT, "create", "nodehypervisors", True),
        (CONTROLLER, "create", "migrations", True),
        (CONTROLLER, "create", "nodehypervisors", False),
        (CONTROLLER, "get", "secrets", False),
        (CONTROLLER, "delete", "virtualinstances", False),
    ],
)
def test_can_i_cross_check(
    kubehv_installed: controlplane.ControlPlane,
    user: str,
    verb: str,
    resource: str,
    allowed: bool,
) -> None:
    resource_arg, _, sub = resource.partition("/")
    extra = ["--subresource", sub] if sub else []
    if resource not in ("secrets",):
        resource_arg += ".kubehv.io"
    proc = kubehv_installed.kubectl(
        "auth", "can-i", verb, resource_arg, *extra, "-A", f"--as={user}", check=False
    )
    assert proc.stdout.strip() == ("yes" if allowed else "no"), proc.stdout + proc.stderr
