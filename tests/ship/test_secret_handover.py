"""The controller's Secret hand-over against a real API server, with real bound tokens.

Why: agents hold no RBAC on Secrets; the hand-over (kubehv.operator.secret_handover) is what
decides. These tests give it what an agent pod really has — a ServiceAccount token from the
TokenRequest API, bound to a pod on a node, for the hand-over's audience — and run it as the
controller's ServiceAccount (impersonated, with manifests/base's RBAC applied for real), so
the TokenReview, the node claim, the fresh reads and the Secret read are the API server's.
The full path (HTTPS from the agent pod to a controller pod) runs on the real node
(tests/kubelet/test_secret_handover.py).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from kubehv.devenv import controlplane
from kubehv.operator import k8s as kube_mod
from kubehv.operator import kubeconfig, rest
from kubehv.operator import secret_handover as sh
from tests.ship.conftest import (
    AGENT,
    CONTROLLER,
    GROUP,
    VERSION,
    custom,
    example_instance,
)

pytestmark = pytest.mark.apiserver
SYSTEM = "kubehv-system"
VALUE = "pw-" + uuid.uuid4().hex


class Nodes:
    """Two Node objects and an agent pod object bound to each (no kubelet runs them)."""

    def __init__(self, cp: controlplane.ControlPlane) -> None:
        self.api = cp.api_client()
        self.core = k8s.CoreV1Api(self.api)
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"ho-{tag}-a", f"ho-{tag}-b"
        self.pods: dict[str, k8s.V1Pod] = {}
        for node in (self.a, self.b):
            self.core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name=node)))
            pod = k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(name=f"agent-{node}"),
                spec=k8s.V1PodSpec(
                    service_account_name="kubehv-agent",
                    node_name=node,
                    containers=[k8s.V1Container(name="agent", image="kubehv:never-runs")],
                ),
            )
            self.pods[node] = self.core.create_namespaced_pod(SYSTEM, pod)

    def token(self, node: str, audience: str = sh.AUDIENCE, account: str = "kubehv-agent") -> str:
        """A token as the kubelet projects it: bound to the node's agent pod."""
        pod = self.pods[node]
        assert pod.metadata is not None
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(
                audiences=[audience],
                expiration_seconds=600,
                bound_object_ref=k8s.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        got: Any = self.core.create_namespaced_service_account_token(account, SYSTEM, request)
        return str(got.status.token)

    def close(self) -> None:
        for node, pod in self.pods.items():
            assert pod.metadata is not None
            self.core.delete_namespaced_pod(f"agent-{node}", SYSTEM, grace_period_seconds=0)
            self.core.delete_node(node)
        self.api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def nodes(kubehv_installed: controlplane.ControlPlane) -> Iterator[Nodes]:
    n = Nodes(kubehv_installed)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def handover(kubehv_installed: controlplane.ControlPlane) -> sh.Handover:
    """The hand-over as the controller runs it: the controller's identity and RBAC, over the
    operator's own API client."""
    creds = kubeconfig.from_kubeconfig(str(kubehv_installed.kubeconfig))
    kube = kube_mod.Kube(rest.Client(creds, headers={"Impersonate-User": CONTROLLER}))
    return sh.Handover(kube, sh.token_reviewer(kube), AGENT)


@pytest.fixture
def on_node_a(
    kubehv_installed: controlplane.ControlPlane, user_namespace: str, nodes: Nodes
) -> str:
    """vm1 with a VNC password in Secret console (key vm1), bound to node a; the Secret also
    holds vm2's password, and a Secret db the cluster's users keep."""
    api = kubehv_installed.api_client()
    core = k8s.CoreV1Api(api)
    for name, data in (("console", {"vm1": VALUE, "vm2": "other"}), ("db", {"password": "x"})):
        body = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
        core.create_namespaced_secret(user_namespace, body)
    vi = example_instance("vm1", user_namespace)
    vi["spec"]["console"] = {
        "vnc": {"enabled": True, "passwordSecretRef": {"name": "console", "key": "vm1"}}
    }
    admin = custom(api)
    admin.create_namespaced_custom_object(GROUP, VERSION, user_namespace, "virtualinstances", vi)
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, user_namespace, "virtualinstances", "vm1",
        {"status": {"nodeName": nodes.a}},
    )  # fmt: skip
    return user_namespace


def ask(h: sh.Handover, token: str | None, ns: str, name: str, key: str) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = json.dumps({"namespace": ns, "name": name, "key": key}).encode()
    return h.handle(headers, body)


def test_the_node_of_the_instance_gets_its_password_and_nothing_else(
    handover: sh.Handover, nodes: Nodes, on_node_a: str
) -> None:
    ns, token_a = on_node_a, nodes.token(nodes.a)
    code, doc = ask(handover, token_a, ns, "console", "vm1")
    assert code == 200, doc
    assert base64.b64decode(doc["data"]).decode() == VALUE

    # Another key of the same Secret (no instance on node a names it), another Secret of
    # the namespace, the controller's own TLS Secret: refused, saying why.
    for ns_, name, key in ((ns, "console", "vm2"), (ns, "db", "password"),
                           (SYSTEM, "kubehv-webhook-tls", "tls.key")):  # fmt: skip
        code, doc = ask(handover, token_a, ns_, name, key)
        assert code == 403, doc
        assert f"no VirtualInstance bound to node {nodes.a}" in doc["reason"]
        assert "data" not in doc


def test_another_nodes_token_is_refused(
    handover: sh.Handover, nodes: Nodes, on_node_a: str
) -> None:
    code, doc = ask(handover, nodes.token(nodes.b), on_node_a, "console", "vm1")
    assert code == 403, doc
    assert f"node {nodes.b}" in doc["reason"]


def test_the_target_of_an_open_migration_gets_it(
    kubehv_installed: controlplane.ControlPlane,
    handover: sh.Handover,
    nodes: Nodes,
    on_node_a: str,
) -> None:
    admin = custom(kubehv_installed.api_client())
    mig = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Migration",
        "metadata": {"name": "move-vm1"},
        "spec": {"instance": "vm1", "targetNode": nodes.b},
    }
    admin.create_namespaced_custom_object(GROUP, VERSION, on_node_a, "migrations", mig)
    status = {"phase": "Preparing", "sourceNode": nodes.a, "targetNode": nodes.b}
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, on_node_a, "migrations", "move-vm1", {"status": status}
    )
    code, doc = ask(handover, nodes.token(nodes.b), on_node_a, "console", "vm1")
    assert code == 200, doc
    assert base64.b64decode(doc["data"]).decode() == VALUE

    # Once it ended (Aborted), the target's access ends with it.
    status = {"phase": "Aborted"}
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, on_node_a, "migrations", "move-vm1", {"status": status}
    )
    code, doc = ask(handover, nodes.token(nodes.b), on_node_a, "console", "vm1")
    assert code == 403, doc


def test_tokens_that_are_not_the_agents_hand_over_token_are_refused(
    handover: sh.Handover, nodes: Nodes, on_node_a: str
) -> None:
    ns = on_node_a
    # No token; garbage.
    assert ask(handover, None, ns, "console", "vm1")[0] == 401
    assert ask(handover, "not-a-token", ns, "console", "vm1")[0] == 401
    # The agent pod's token for the API server's audience (what a token stolen from the
    # agent's default mount would be): not for the hand-over.
    api_audience = nodes.token(nodes.a, audience="https://kubernetes.default.svc")
    code, doc = ask(handover, api_audience, ns, "console", "vm1")
    assert code == 401, doc
    assert sh.AUDIENCE in doc["reason"]
    # Another ServiceAccount's token, for the right audience.
    nodes.core.create_namespaced_service_account(
        SYSTEM, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="not-the-agent"))
    )
    try:
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[sh.AUDIENCE], expiration_seconds=600)
        )
        got: Any = nodes.core.create_namespaced_service_account_token(
            "not-the-agent", SYSTEM, request
        )
        other = str(got.status.token)
        code, doc = ask(handover, other, ns, "console", "vm1")
        assert code == 403, doc
        assert "is not " + AGENT in doc["reason"]
    finally:
        nodes.core.delete_namespaced_service_account("not-the-agent", SYSTEM)


def test_a_missing_key_is_not_found_and_bad_requests_are_refused(
    kubehv_installed: controlplane.ControlPlane,
    handover: sh.Handover,
    nodes: Nodes,
    on_node_a: str,
) -> None:
    core = k8s.CoreV1Api(kubehv_installed.api_client())
    core.delete_namespaced_secret("console", on_node_a)
    code, doc = ask(handover, nodes.token(nodes.a), on_node_a, "console", "vm1")
    assert code == 404, doc
    headers = {"authorization": f"Bearer {nodes.token(nodes.a)}"}
    assert handover.handle(headers, b"{not json")[0] == 400
    assert handover.handle(headers, b'{"namespace": "x"}')[0] == 400
