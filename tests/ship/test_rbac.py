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


@pytest.fixture
def admin_on_node_a(
    kubehv_installed: controlplane.ControlPlane, user_namespace: str, instance: str
) -> Any:
    """An admin client, after the controller's placement of ``instance`` on node-a (its
    status.nodeName, written here by the admin)."""
    admin = custom(kubehv_installed.api_client())
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, user_namespace, VI, instance, {"status": {"nodeName": "node-a"}}
    )
    return admin


def test_agent_cannot_patch_a_spec_but_can_patch_status_and_finalizers(
    admin_on_node_a: Any,
    impersonate: Impersonate,
    user_namespace: str,
    instance: str,
) -> None:
    ns, name, admin = user_namespace, instance, admin_on_node_a
    agent = custom(impersonate(AGENT, node="node-a"))
    before = agent.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)

    # RBAC allows the patch (kopf needs it); the admission policy refuses a spec change.
    wait_policy_active(
        lambda: agent_spec_patch_refused(impersonate(AGENT, node="node-a"), ns, name),
        "kubehv-components-never-write-spec",
    )
    with pytest.raises(ApiException) as info:
        agent.patch_namespaced_custom_object(GROUP, VERSION, ns, VI, name, spec_change(before))
    assert info.value.status == 403
    assert info.value.body is not None
    assert "never the spec of a VirtualInstance" in info.value.body
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


def refused_by_policy(call: Any, words: str) -> bool:
    """True when ``call()`` is refused (403) with ``words`` in the message; False when allowed
    (the policy not loaded yet)."""
    try:
        call()
    except ApiException as exc:
        if exc.status == 403 and words in (exc.body or ""):
            return True
        raise
    return False


def test_agent_writes_status_only_of_instances_bound_to_its_node(
    admin_on_node_a: Any,
    impersonate: Impersonate,
    user_namespace: str,
    instance: str,
) -> None:
    ns, name, admin = user_namespace, instance, admin_on_node_a
    other = custom(impersonate(AGENT, node="node-b"))

    def steal() -> None:
        other.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, VI, name, {"status": {"phase": "Failed"}}
        )

    wait_policy_active(
        lambda: refused_by_policy(steal, "bound to node-a"), "kubehv-agent-own-instances"
    )
    # Another node's agent: neither status nor its finalizer, nor pulling it to itself.
    forbidden(steal)
    forbidden(
        lambda: other.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, VI, name, {"status": {"nodeName": "node-b"}}
        )
    )
    forbidden(
        lambda: other.patch_namespaced_custom_object(
            GROUP, VERSION, ns, VI, name, {"metadata": {"finalizers": None}}
        )
    )
    # Its own node's agent may write status, but never move the binding.
    own = custom(impersonate(AGENT, node="node-a"))
    own.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, VI, name, {"status": {"phase": "Running"}}
    )
    refusal = forbidden(
        lambda: own.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, VI, name, {"status": {"nodeName": "node-b"}}
        )
    )
    assert "never changes status.nodeName" in (refusal.body or "")
    # A token not bound to a pod on a node (no node-name claim): refused outright.
    unbound = custom(impersonate(AGENT))
    refusal = forbidden(
        lambda: unbound.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, VI, name, {"status": {"phase": "Running"}}
        )
    )
    assert "bound to a pod on a node" in (refusal.body or "")
    got = admin.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)["status"]
    assert (got["nodeName"], got["phase"]) == ("node-a", "Running")


def test_agent_writes_only_migrations_from_or_to_its_node(
    kubehv_installed: controlplane.ControlPlane,
    impersonate: Impersonate,
    user_namespace: str,
    instance: str,
) -> None:
    ns = user_namespace
    admin = custom(kubehv_installed.api_client())
    admin.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "migrations",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Migration",
            "metadata": {"name": "mig"},
            "spec": {"instance": instance},
        },
    )
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, "migrations", "mig",
        {"status": {"phase": "Scheduled", "sourceNode": "node-a", "targetNode": "node-b"}},
    )  # fmt: skip

    def write_as(node: str, status: dict[str, Any]) -> Any:
        api = custom(impersonate(AGENT, node=node))
        return lambda: api.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, "migrations", "mig", {"status": status}
        )

    wait_policy_active(
        lambda: refused_by_policy(write_as("node-c", {"phase": "Failed"}), "from or to its node"),
        "kubehv-agent-own-migrations",
    )
    forbidden(write_as("node-c", {"targetNode": "node-c"}))
    write_as("node-b", {"phase": "Preparing"})()
    write_as("node-a", {"phase": "Running"})()
    refusal = forbidden(write_as("node-b", {"targetNode": "node-c"}))
    assert "never changes a migration's status.sourceNode or status.targetNode" in (
        refusal.body or ""
    )
    got = admin.get_namespaced_custom_object(GROUP, VERSION, ns, "migrations", "mig")["status"]
    assert (got["phase"], got["sourceNode"], got["targetNode"]) == ("Running", "node-a", "node-b")


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


def test_secrets_agent_gets_none_controller_gets_by_name_only(
    kubehv_installed: controlplane.ControlPlane,
    impersonate: Impersonate,
    user_namespace: str,
) -> None:
    """Agents have no Secret access at all (the controller hands over their instances' keys:
    tests/ship/test_secret_handover.py); the controller gets Secrets by name, never lists."""
    admin = k8s.CoreV1Api(kubehv_installed.api_client())
    for name in ("console", "db-password"):
        admin.create_namespaced_secret(
            user_namespace,
            k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data={"password": "x"}),
        )
    agent = k8s.CoreV1Api(impersonate(AGENT, node="node-a"))
    controller = k8s.CoreV1Api(impersonate(CONTROLLER))

    forbidden(lambda: agent.read_namespaced_secret("console", user_namespace))
    forbidden(lambda: agent.read_namespaced_secret("db-password", user_namespace))
    forbidden(lambda: agent.read_namespaced_secret("kubehv-webhook-tls", "kubehv-system"))
    forbidden(lambda: agent.list_namespaced_secret(user_namespace))
    forbidden(agent.list_secret_for_all_namespaces)

    # Controller: get by name (its webhook certificate; instances' keys for the hand-over),
    # update only its own; never list or watch.
    controller.read_namespaced_secret("kubehv-webhook-tls", "kubehv-system")
    controller.read_namespaced_secret("console", user_namespace)
    forbidden(lambda: controller.list_namespaced_secret("kubehv-system"))
    forbidden(controller.list_secret_for_all_namespaces)
    forbidden(
        lambda: controller.patch_namespaced_secret(
            "console", user_namespace, {"stringData": {"password": "y"}}
        )
    )


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
        (AGENT, "get", "secrets", False),
        (AGENT, "get", "secrets/kubehv-console", False),
        (AGENT, "create", "tokenreviews", False),
        (AGENT, "create", "nodehypervisors", True),
        (CONTROLLER, "create", "migrations", True),
        (CONTROLLER, "create", "nodehypervisors", False),
        (CONTROLLER, "get", "secrets", True),
        (CONTROLLER, "list", "secrets", False),
        (CONTROLLER, "create", "tokenreviews", True),
        (CONTROLLER, "watch", "secrets", False),
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
    if resource_arg in ("secrets", "tokenreviews"):  # core kinds, not kubehv's
        resource_arg, extra = resource, []  # secrets/NAME: a resource name, not a subresource
    else:
        resource_arg += ".kubehv.io"
        extra = ["--subresource", sub] if sub else []
    proc = kubehv_installed.kubectl(
        "auth", "can-i", verb, resource_arg, *extra, "-A", f"--as={user}", check=False
    )
    assert proc.stdout.strip() == ("yes" if allowed else "no"), proc.stdout + proc.stderr
