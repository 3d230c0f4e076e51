"""On the real node: the agent pod has no Secret access; the controller hands over its keys.

Why: issue 13 §3, "the agent's Secret access limited to what it must read". The shipped agent
holds no RBAC on Secrets (checked by impersonation); a VirtualInstance's VNC password still
reaches the guest, because the agent pod asks the controller pods (``--secrets=controller``)
with its projected, pod-bound token and the controller checks that the instance is on that
pod's node. Requests for an instance on another node, or with another node's token, are
refused — asked with the agent's own client code (:class:`secret_source.ControllerSource`)
from the host against a controller pod, with real bound tokens from the TokenRequest API.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kubehv.operator import k8s, secret_handover, secret_source, settings
from tests.fixtures.operator import wait_for
from tests.kubelet.conftest import SYSTEM_NS, Deployed

pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(1800)]

AGENT_SA = f"system:serviceaccount:{SYSTEM_NS}:kubehv-agent"
SERVER_NAME = f"kubehv-webhook.{SYSTEM_NS}.svc"


def _phase(d: Deployed, ns: str, name: str) -> str:
    return str(((d.vi(ns, name) or {}).get("status") or {}).get("phase") or "")


def _secret(d: Deployed, ns: str, name: str, data: dict[str, str]) -> None:
    body = kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name=name), string_data=data
    )
    d.core.create_namespaced_secret(ns, body)


def _vnc(secret: str, key: str) -> dict[str, Any]:
    return {"vnc": {"enabled": True, "passwordSecretRef": {"name": secret, "key": key}}}


def test_guest_gets_its_vnc_password_through_the_handover(
    deployed: Deployed, vi_namespace: str
) -> None:
    name, home = f"v-{uuid.uuid4().hex[:5]}", deployed.node.node_name
    value = uuid.uuid4().hex[:8]  # VNC passwords are 8 characters at most
    _secret(deployed, vi_namespace, "console", {name: value})
    manifest = deployed.guest_manifest(
        vi_namespace, name, nodeName=home, console=_vnc("console", name)
    )
    deployed.kubectl("apply", "-f", "-", stdin=manifest)
    wait_for(lambda: _phase(deployed, vi_namespace, name) == "Running", 300, f"{name} Running")
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--security-info", f"{vi_namespace}.{name}"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert f"passwd='{value}'" in xml or f'passwd="{value}"' in xml
    # The controller logged the hand-over (who, which key), never the value; nor did the agent.
    logs = deployed.logs()
    assert f"secret hand-over to node {home}: {vi_namespace}/console key {name}" in logs
    assert value not in logs
    assert value not in json.dumps(deployed.vi(vi_namespace, name))


def _is_on(d: Deployed, ns: str, name: str, node: str) -> bool:
    return ((d.vi(ns, name) or {}).get("status") or {}).get("nodeName") == node


def _can(d: Deployed, who: str, *what: str) -> bool:
    out = d.kubectl("auth", "can-i", f"--as={who}", *what, check=False)
    return out.strip().splitlines()[0].strip() == "yes"


def test_agent_serviceaccount_has_no_secret_access(deployed: Deployed, vi_namespace: str) -> None:
    _secret(deployed, vi_namespace, "console", {"x": "y"})
    for verb in ("get", "list", "watch"):
        assert not _can(deployed, AGENT_SA, verb, "secrets", "-n", vi_namespace)
        assert not _can(deployed, AGENT_SA, verb, "secrets", "-n", SYSTEM_NS)
    # The request itself, as the agent: Forbidden (not merely "no" from can-i).
    out = deployed.kubectl(
        "get", "secret", "console", "-n", vi_namespace, f"--as={AGENT_SA}", check=False
    )
    assert "Forbidden" in out, out


class Asker:
    """The agent's hand-over client, run from the host against a controller pod."""

    def __init__(self, d: Deployed, workdir: Path) -> None:
        self.d, self.workdir = d, workdir
        # admin, over the operator's own client: reads the webhook configuration's caBundle
        self.kube = k8s.Kube(k8s.load_api_client(str(d.node.cp.kubeconfig)))
        controllers = wait_for(d.settled_controllers, 240, "two Ready controller pods")
        self.controller_ip = controllers[0].status.pod_ip

    def token(self, pod: Any, audience: str = secret_handover.AUDIENCE) -> str:
        """A token bound to ``pod`` (so carrying its node), as the kubelet projects it."""
        request = kubernetes.client.AuthenticationV1TokenRequest(
            spec=kubernetes.client.V1TokenRequestSpec(
                audiences=[audience],
                expiration_seconds=600,
                bound_object_ref=kubernetes.client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        got: Any = self.d.core.create_namespaced_service_account_token(
            "kubehv-agent", SYSTEM_NS, request
        )
        return str(got.status.token)

    def ask(self, token: str, ns: str, secret: str, key: str) -> bytes | None:
        path = self.workdir / f"token-{uuid.uuid4().hex[:6]}"
        path.write_text(token)
        cfg = settings.SecretSettings(
            source="controller",
            url=f"https://{self.controller_ip}:9443/secrets",
            server_name=SERVER_NAME,
            token_file=str(path),
        )
        source = secret_source.from_settings(self.kube, cfg)
        return asyncio.run(source.read_secret_key(ns, secret, key))


@pytest.fixture
def ghost_agent_pod(deployed: Deployed) -> Iterator[Any]:
    """An agent pod object bound to another node (a Node object no kubelet runs): what a
    second node's agent token would be bound to."""
    node = f"ghost-{uuid.uuid4().hex[:5]}"
    core = deployed.core
    core.create_node(kubernetes.client.V1Node(metadata=kubernetes.client.V1ObjectMeta(name=node)))
    pod = kubernetes.client.V1Pod(
        metadata=kubernetes.client.V1ObjectMeta(name=f"agent-{node}"),
        spec=kubernetes.client.V1PodSpec(
            service_account_name="kubehv-agent",
            node_name=node,
            containers=[kubernetes.client.V1Container(name="agent", image="kubehv:dev")],
        ),
    )
    created = core.create_namespaced_pod(SYSTEM_NS, pod)
    try:
        yield created
    finally:
        core.delete_namespaced_pod(f"agent-{node}", SYSTEM_NS, grace_period_seconds=0)
        core.delete_node(node)


def test_handover_refuses_other_nodes_and_foreign_instances(
    deployed: Deployed, vi_namespace: str, ghost_agent_pod: Any
) -> None:
    home = deployed.node.node_name
    mine, foreign = f"h-{uuid.uuid4().hex[:5]}", f"f-{uuid.uuid4().hex[:5]}"
    _secret(deployed, vi_namespace, "console", {mine: "pw-mine", foreign: "pw-other"})
    # mine: placed on the kubelet node (stopped: no guest needed); foreign: asks for the
    # ghost node, which has no NodeHypervisor, so it stays unplaced until bound here by hand.
    ghost_node = ghost_agent_pod.spec.node_name
    for name, node in ((mine, home), (foreign, ghost_node)):
        manifest = deployed.guest_manifest(
            vi_namespace, name, runState="Stopped", nodeName=node, console=_vnc("console", name)
        )
        deployed.kubectl("apply", "-f", "-", stdin=manifest)
    patch = json.dumps({"status": {"nodeName": ghost_node}})
    deployed.kubectl(
        "patch", "vi", foreign, "-n", vi_namespace, "--subresource=status",
        "--type=merge", "-p", patch,
    )  # fmt: skip
    for name, node in ((mine, home), (foreign, ghost_node)):
        on_node = functools.partial(_is_on, deployed, vi_namespace, name, node)
        wait_for(on_node, 120, f"{name} bound to {node}")
    workdir = Path(tempfile.mkdtemp(prefix="kubehv-handover-"))
    asker = Asker(deployed, workdir)
    own = asker.token(deployed.agent_pod(home))
    ghost = asker.token(ghost_agent_pod)

    # The real agent pod's token: its own instance's key, and nothing else.
    assert asker.ask(own, vi_namespace, "console", mine) == b"pw-mine"
    with pytest.raises(secret_source.SecretRefused, match=f"bound to node {home}"):
        asker.ask(own, vi_namespace, "console", foreign)
    with pytest.raises(secret_source.SecretRefused, match="kubehv-webhook-tls"):
        asker.ask(own, SYSTEM_NS, "kubehv-webhook-tls", "tls.key")
    # Another node's token: that node's instance, never the kubelet node's.
    assert asker.ask(ghost, vi_namespace, "console", foreign) == b"pw-other"
    with pytest.raises(secret_source.SecretRefused, match=f"bound to node {ghost_node}"):
        asker.ask(ghost, vi_namespace, "console", mine)
    # The agent pod's token for the API server's audience (its default mount's kind) is not
    # a hand-over token; nor is garbage.
    api_token = asker.token(deployed.agent_pod(home), "https://kubernetes.default.svc")
    for token in (api_token, "not-a-token"):
        with pytest.raises(secret_source.SecretRefused, match="audience"):
            asker.ask(token, vi_namespace, "console", mine)
