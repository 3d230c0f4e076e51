"""The shipped manifests on a real kubelet node: pods, webhook, metrics, a real guest, RBAC.

Why: issue 13 — ``manifests/base`` had never run. These tests deploy it as a user does
(``kubectl apply --server-side -k manifests/overlays/local``) on kubehv.devenv.kubenode's real
node and check what only a real node shows: the DaemonSet's agent drives the host's libvirtd
through its hostPath socket and boots the test guest, the webhook answers from a controller
pod behind its Service, the pods' metrics ports answer, and the ServiceAccounts hold only
what the RBAC files say (checked by impersonation against the real API server).
"""

from __future__ import annotations

import subprocess
import urllib.request
import uuid
from typing import Any

import pytest

from kubehv.devenv import kubenode
from tests.fixtures.operator import wait_for
from tests.kubelet.conftest import SYSTEM_NS, Deployed

pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(1800)]

AGENT_SA = f"system:serviceaccount:{SYSTEM_NS}:kubehv-agent"
CONTROLLER_SA = f"system:serviceaccount:{SYSTEM_NS}:kubehv-controller"


def _phase(d: Deployed, ns: str, name: str) -> str:
    return str(((d.vi(ns, name) or {}).get("status") or {}).get("phase") or "")


def test_every_pod_ready_and_the_agent_pod_registers_its_node(deployed: Deployed) -> None:
    controllers = wait_for(deployed.settled_controllers, 240, "two Ready controller pods")
    # One agent per kubelet node (a second node joins for the migration tests).
    agent = deployed.agent_pod(deployed.node.node_name)
    nodes = {n.metadata.name for n in deployed.core.list_node().items}
    for pod in [agent, *controllers]:
        assert pod.spec.node_name in nodes
        assert all(c.ready for c in pod.status.container_statuses)
    nhv = deployed.nhv(deployed.node.node_name) or {}
    # The migration address comes from the downward API's status.hostIP (the node's IP).
    assert (nhv.get("spec") or {}).get("migrationAddress") == kubenode.NODE_IP, nhv


def test_guest_runs_through_the_daemonset_agent(deployed: Deployed, vi_namespace: str) -> None:
    name, home = f"g-{uuid.uuid4().hex[:5]}", deployed.node.node_name
    manifest = deployed.guest_manifest(vi_namespace, name, nodeName=home)
    deployed.kubectl("apply", "-f", "-", stdin=manifest)
    wait_for(lambda: _phase(deployed, vi_namespace, name) == "Running", 300, f"{name} Running")
    vi = deployed.vi(vi_namespace, name) or {}
    assert vi["status"]["nodeName"] == home
    # The domain is the host's: the pod only reached libvirtd through /run/libvirt.
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert f"{vi_namespace}.{name}" in domains


def test_webhook_answers_from_a_controller_pod(deployed: Deployed, vi_namespace: str) -> None:
    bad = deployed.guest_manifest(
        vi_namespace, "bad", hypervisorParameters={"accelerator": "warp-drive"}
    )
    out = deployed.kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert 'admission webhook "validate.kubehv.io" denied' in out, out
    assert "accelerator" in out


def _metrics(ip: str, port: int) -> str:
    url = f"http://{ip}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_metrics_are_scraped_from_the_pods(deployed: Deployed) -> None:
    for app, port in (("kubehv-agent", 9101), ("kubehv-controller", 9100)):
        for pod in deployed.pods(app):
            text = _metrics(pod.status.pod_ip, port)
            assert "kubehv_" in text, f"{pod.metadata.name}: no kubehv metrics"


def _can(d: Deployed, who: str, *what: str) -> bool:
    out = d.kubectl("auth", "can-i", f"--as={who}", *what, check=False)
    return out.strip().splitlines()[0].strip() == "yes"


@pytest.mark.parametrize(
    ("who", "verb_resource", "allowed"),
    [
        (AGENT_SA, ("list", "secrets", "-A"), False),
        (AGENT_SA, ("watch", "secrets", "-A"), False),
        (AGENT_SA, ("get", "secrets", "-A"), False),
        (AGENT_SA, ("delete", "virtualinstances.kubehv.io", "-A"), False),
        (AGENT_SA, ("create", "pods", "-A"), False),
        (AGENT_SA, ("patch", "nodehypervisors.kubehv.io"), True),
        (AGENT_SA, ("patch", "virtualinstances.kubehv.io", "--subresource=status", "-A"), True),
        (CONTROLLER_SA, ("list", "secrets", "-A"), False),
        (CONTROLLER_SA, ("create", "pods", "-A"), False),
        (CONTROLLER_SA, ("patch", "migrations.kubehv.io", "--subresource=status", "-A"), True),
        # get by name: its webhook certificate, and the Secret hand-over to agents
        (CONTROLLER_SA, ("get", "secrets", "-n", SYSTEM_NS), True),
        (CONTROLLER_SA, ("watch", "secrets", "-A"), False),
    ],
)
def test_rbac_limits_by_impersonation(
    deployed: Deployed, who: str, verb_resource: tuple[str, ...], allowed: bool
) -> None:
    assert _can(deployed, who, *verb_resource) is allowed


def test_agent_pod_cannot_change_a_spec(deployed: Deployed, vi_namespace: str) -> None:
    """The admission policy as the agent pod's own token meets it (node claim included)."""
    name = f"p-{uuid.uuid4().hex[:5]}"
    deployed.kubectl("apply", "-f", "-", stdin=deployed.guest_manifest(vi_namespace, name))
    pod = deployed.agent_pod(deployed.node.node_name).metadata.name
    script = (
        "import json,ssl,urllib.request as u;"
        "t=open('/var/run/secrets/kubernetes.io/serviceaccount/token').read();"
        "c=ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt');"
        "import os;h=os.environ['KUBERNETES_SERVICE_HOST'];"
        f"r=u.Request('https://'+h+'/apis/kubehv.io/v1alpha1/namespaces/{vi_namespace}"
        f"/virtualinstances/{name}',method='PATCH',"
        "data=json.dumps({'spec':{'vcpus':2}}).encode(),"
        "headers={'Authorization':'Bearer '+t,'Content-Type':'application/merge-patch+json'});"
        "\ntry:\n u.urlopen(r,context=c); print('ALLOWED')\n"
        "except u.HTTPError as e:\n print('REFUSED', e.code, e.read().decode()[:300])"
    )
    out = deployed.kubectl("exec", "-n", SYSTEM_NS, pod, "--", "python3", "-c", script, check=False)
    assert "REFUSED" in out, out
    spec: dict[str, Any] = (deployed.vi(vi_namespace, name) or {}).get("spec") or {}
    assert spec.get("vcpus") == 1
