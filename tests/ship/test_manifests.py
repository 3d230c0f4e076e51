"""The deploy manifests: they build, the real API server accepts them, and they say what
the docs say (replicas, probes, downward API, the agent's few privileges).

Why: ``kubectl apply -k`` is a user's first contact with kubehv on a real cluster; a typo
or an invalid field must fail here, not there. The server-side dry run runs every object
through the real kube-apiserver's validation and admission (CRD schemas, PDB, webhook
configuration, admission policies) without a kubelet.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubehv.devenv import controlplane
from tests.ship.conftest import MANIFESTS, REPO, documents, find, kustomize


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_base_crds_are_the_generated_crds() -> None:
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert generated, "crds/ is empty: run `make crds`"
    copied = sorted(p.name for p in (MANIFESTS / "base" / "crds").glob("*.yaml"))
    assert copied == generated
    for name in generated:
        assert (MANIFESTS / "base" / "crds" / name).read_text() == (
            REPO / "crds" / name
        ).read_text(), f"manifests/base/crds/{name} is stale: run `make crds`"


def test_base_builds_with_what_the_docs_promise(base_docs: list[dict[str, Any]]) -> None:
    kinds = sorted({d["kind"] for d in base_docs})
    for kind in (
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "Service",
        "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
    ):
        assert kind in kinds
    crds = {d["metadata"]["name"] for d in base_docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {
        "virtualinstances.kubehv.io",
        "migrations.kubehv.io",
        "nodehypervisors.kubehv.io",
    }
    # Every namespaced object lands in kubehv-system.
    for doc in base_docs:
        ns = doc["metadata"].get("namespace")
        assert ns in (None, "kubehv-system"), doc["metadata"]

    controller = find(base_docs, "Deployment", "kubehv-controller")
    assert controller["spec"]["replicas"] == 2
    c = container(controller)
    assert c["args"][0] == "controller"
    assert c["livenessProbe"]["httpGet"]["port"] == "health"
    assert c["readinessProbe"]["httpGet"]["port"] == "health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--health-port={ports['health']}" in c["args"]
    assert f"--metrics-port={ports['metrics']}" in c["args"]
    assert f"--webhook-port={ports['webhook']}" in c["args"]
    pod = controller["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "kubehv-controller"
    pdb = find(base_docs, "PodDisruptionBudget", "kubehv-controller")
    assert pdb["spec"]["selector"]["matchLabels"] == controller["spec"]["selector"]["matchLabels"]

    webhook = find(base_docs, "ValidatingWebhookConfiguration", "kubehv")["webhooks"][0]
    service = find(base_docs, "Service", webhook["clientConfig"]["service"]["name"])
    assert service["spec"]["selector"] == controller["spec"]["selector"]["matchLabels"]


def test_agent_holds_only_the_documented_privileges(base_docs: list[dict[str, Any]]) -> None:
    agent = find(base_docs, "DaemonSet", "kubehv-agent")
    pod = agent["spec"]["template"]["spec"]
    c = container(agent)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--node-name=$(NODE_NAME)" in c["args"]
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host_ns)
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    host_paths = sorted(v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v)
    assert host_paths == ["/dev/kvm", "/run/libvirt", "/var/lib/kubehv", "/var/lib/libvirt/images"]
    # What only the driver's node checks look at is mounted read-only.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/dev/kvm"]["readOnly"] and mounts["/var/lib/libvirt/images"]["readOnly"]
    assert pod["serviceAccountName"] == "kubehv-agent"


def test_kind_overlay_runs_the_local_image_with_the_fake_driver() -> None:
    docs = documents(kustomize(MANIFESTS / "overlays" / "kind"))
    for kind, name in (("DaemonSet", "kubehv-agent"), ("Deployment", "kubehv-controller")):
        c = container(find(docs, kind, name))
        assert c["image"] == "kubehv:dev"
        assert c["imagePullPolicy"] == "Never"
    agent = find(docs, "DaemonSet", "kubehv-agent")
    assert "--hypervisor=fake" in container(agent)["args"]
    # The fake driver needs no host access, hence no root.
    assert not any("hostPath" in v for v in agent["spec"]["template"]["spec"]["volumes"])
    assert container(agent)["securityContext"]["runAsNonRoot"] is True


def test_cert_manager_component_hands_the_certificate_to_cert_manager() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    # kustomize wants relative paths to other kustomization roots.
                    "resources": [os.path.relpath(MANIFESTS / "base", tmp)],
                    "components": [os.path.relpath(MANIFESTS / "components/cert-manager", tmp)],
                }
            )
        )
        docs = documents(kustomize(tmp))
    vwc = find(docs, "ValidatingWebhookConfiguration", "kubehv")
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "kubehv-system/kubehv-webhook"
    )
    cert = find(docs, "Certificate", "kubehv-webhook")
    assert cert["spec"]["secretName"] == "kubehv-webhook-tls"
    assert not [d for d in docs if d["kind"] == "Secret"], "cert-manager owns the Secret"
    env = {e["name"]: e.get("value") for e in container(find(docs, "Deployment"))["env"]}
    assert env["KUBEHV_WEBHOOK_CERTS"] == "secret"


@pytest.mark.apiserver
@pytest.mark.parametrize("target", ["base", "overlays/kind"])
def test_server_side_dry_run_apply_is_accepted(
    kubehv_installed: controlplane.ControlPlane, target: str
) -> None:
    # kubehv_installed created the namespace (and CRDs) for real: namespaced objects need it.
    built = kustomize(MANIFESTS / target)
    proc = kubehv_installed.kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-", input=built
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == len(documents(built))
    assert all("serverside-applied (server dry run)" in line for line in lines), proc.stdout
