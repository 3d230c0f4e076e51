"""The generated CRDs served by a real kube-apiserver: install, examples, kubectl views,
server-side defaults, field managers and field selectors.

Why: the API is only as good as what the server does with it. These tests go through the
real kubectl and the real Python client against the session's control plane.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client as k8s

from kubehv import api
from kubehv.api import constants as c
from tests.api import manifests as m

pytestmark = pytest.mark.apiserver

MODELS: dict[str, type[api.VirtualInstance | api.Migration | api.NodeHypervisor]] = {
    "VirtualInstance": api.VirtualInstance,
    "Migration": api.Migration,
    "NodeHypervisor": api.NodeHypervisor,
}
PLURALS = {
    "VirtualInstance": c.PLURAL_VI,
    "Migration": c.PLURAL_MIG,
    "NodeHypervisor": c.PLURAL_NHV,
}


def _unique_cluster_name(doc: dict[str, Any]) -> dict[str, Any]:
    """Cluster-scoped examples get a unique name so concurrent sessions never collide."""
    out = copy.deepcopy(doc)
    if out["kind"] == "NodeHypervisor":
        name = f"{out['metadata']['name']}-{uuid.uuid4().hex[:6]}"
        out["metadata"]["name"] = name
        out["spec"]["nodeName"] = name
    return out


def _get(cp: Any, kind: str, name: str, namespace: str | None) -> dict[str, Any]:
    args = ["get", f"{PLURALS[kind]}.{c.GROUP}", name, "-o", "json", "--show-managed-fields"]
    if namespace and kind != "NodeHypervisor":
        args += ["-n", namespace]
    result: dict[str, Any] = json.loads(cp.kubectl(*args).stdout)
    return result


def _patch_status(
    api_client: Any, plural: str, name: str, namespace: str | None, status: dict[str, Any]
) -> dict[str, Any]:
    objects = k8s.CustomObjectsApi(api_client)
    body = {"status": status}
    if namespace is None:
        out = objects.patch_cluster_custom_object_status(
            c.GROUP, c.VERSION, plural, name, body, field_manager="kubehv-agent"
        )
    else:
        out = objects.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, namespace, plural, name, body, field_manager="kubehv-agent"
        )
    return cast(dict[str, Any], out)


def test_crds_are_established(control_plane: Any, crds_installed: list[str]) -> None:
    out = json.loads(control_plane.kubectl("get", "crd", *crds_installed, "-o", "json").stdout)
    for item in out["items"]:
        conditions = {cond["type"]: cond["status"] for cond in item["status"]["conditions"]}
        assert conditions["Established"] == "True", item["metadata"]["name"]
        assert conditions["NamesAccepted"] == "True", item["metadata"]["name"]
    resources = control_plane.kubectl("api-resources", f"--api-group={c.GROUP}", "-o", "wide")
    for short in (c.SHORT_VI, c.SHORT_MIG, c.SHORT_NHV):
        assert f" {short} " in resources.stdout


@pytest.mark.parametrize("path", m.example_files(), ids=lambda p: p.name)
def test_every_example_applies_and_shows_no_drift(
    control_plane: Any, crds_installed: list[str], namespace: str, path: Path
) -> None:
    doc = _unique_cluster_name(m.load_example(path.name))
    text = m.dump(doc)
    control_plane.kubectl("apply", "--validate=strict", "-n", namespace, "-f", "-", input=text)
    try:
        live = _get(control_plane, doc["kind"], doc["metadata"]["name"], namespace)
        model = MODELS[doc["kind"]]
        # The server's defaults are the models' defaults: reading the live object or the
        # manifest gives the same spec, so an agent writing back causes no drift.
        assert model.model_validate(live).spec == model.model_validate(doc).spec
        # GitOps view: re-applying the same manifest changes nothing.
        diff = control_plane.kubectl("diff", "-n", namespace, "-f", "-", input=text, check=False)
        assert diff.returncode == 0, diff.stdout + diff.stderr
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=text)
        again = _get(control_plane, doc["kind"], doc["metadata"]["name"], namespace)
        assert again["metadata"]["generation"] == live["metadata"]["generation"] == 1
    finally:
        if doc["kind"] == "NodeHypervisor":
            control_plane.kubectl("delete", "-f", "-", "--wait=false", input=text, check=False)


def test_server_fills_in_defaults(
    control_plane: Any, crds_installed: list[str], namespace: str
) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=m.dump(m.vi("defaults")))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=m.dump(m.mig("defaults")))
    spec = _get(control_plane, "VirtualInstance", "defaults", namespace)["spec"]
    assert spec["runState"] == "Running"
    assert spec["vcpus"] == 1
    assert spec["evictionPolicy"] == "LiveMigrate"
    assert spec["rebootGeneration"] == 0
    assert spec["console"] == {"serial": True, "vnc": {"enabled": False, "listen": "127.0.0.1"}}
    assert spec["autoBalloon"] == {"enabled": False}
    mspec = _get(control_plane, "Migration", "defaults", namespace)["spec"]
    assert (mspec["mode"], mspec["completionTimeout"], mspec["allowUnsafeVersionPair"]) == (
        "live",
        600,
        False,
    )


def test_get_shows_printer_columns(
    control_plane: Any, crds_installed: list[str], namespace: str, k8s_api: Any
) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=m.dump(m.vi("cols", vcpus=2)))
    control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=m.dump(m.mig("cols", instance="cols"))
    )
    node = f"node-cols-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("apply", "-f", "-", input=m.dump(m.nhv(node)))
    try:
        _patch_status(
            k8s_api, c.PLURAL_VI, "cols", namespace, {"phase": "Running", "nodeName": "node-x"}
        )
        _patch_status(
            k8s_api,
            c.PLURAL_MIG,
            "cols",
            namespace,
            {
                "phase": "Running",
                "sourceNode": "node-x",
                "targetNode": "node-y",
                "progress": {"percent": 42},
            },
        )
        _patch_status(
            k8s_api,
            c.PLURAL_NHV,
            node,
            None,
            {
                "memoryFree": 2048,
                "instanceCount": 3,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Up",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ],
            },
        )
        out = control_plane.kubectl("get", "vi,mig", "-n", namespace).stdout
        lines = [line.split() for line in out.splitlines() if line.strip()]
        assert lines[0] == ["NAME", "PHASE", "NODE", "MEMORY", "VCPUS", "AGE"]
        assert lines[1][:5] == ["virtualinstance.kubehv.io/cols", "Running", "node-x", "128Mi", "2"]
        assert lines[2] == ["NAME", "INSTANCE", "PHASE", "SOURCE", "TARGET", "PROGRESS", "AGE"]
        assert lines[3][:6] == [
            "migration.kubehv.io/cols",
            "cols",
            "Running",
            "node-x",
            "node-y",
            "42",
        ]
        nhv_out = control_plane.kubectl("get", "nhv", node).stdout.splitlines()
        assert nhv_out[0].split() == [
            "NAME",
            "NODE",
            "HYPERVISOR",
            "READY",
            "FREE",
            "MEMORY",
            "INSTANCES",
            "AGE",
        ]
        assert nhv_out[1].split()[:6] == [node, node, "fake", "True", "2048", "3"]
        # The kubehv category lists every kind.
        category = control_plane.kubectl("get", c.CATEGORY, "-n", namespace, "-o", "name").stdout
        assert "virtualinstance.kubehv.io/cols" in category
        assert "migration.kubehv.io/cols" in category
    finally:
        control_plane.kubectl("delete", "nhv", node, "--wait=false", check=False)


def test_explain_shows_field_docs(control_plane: Any, crds_installed: list[str]) -> None:
    # The OpenAPI document the server publishes lags CRD establishment by a moment.
    deadline = time.monotonic() + 60
    while True:
        proc = control_plane.kubectl("explain", "virtualinstance.spec.memory", check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stderr
    assert "Guest memory bounds" in proc.stdout
    assert "Lowest memory the guest may be ballooned down to" in proc.stdout
    assert "<Object> -required-" in proc.stdout or "-required-" in proc.stdout
    status = control_plane.kubectl("explain", "virtualinstance.status.nodeName").stdout
    assert "Written by the controller only" in status
    mig_spec = control_plane.kubectl("explain", "mig.spec.mode").stdout
    assert "non-live" in mig_spec
    assert (
        "Immutable once the Migration exists" in control_plane.kubectl("explain", "mig.spec").stdout
    )


def test_second_field_manager_does_not_conflict_with_status(
    control_plane: Any, crds_installed: list[str], namespace: str, k8s_api: Any
) -> None:
    manifest = m.vi("ssa", vcpus=1)
    apply = ("apply", "--server-side", "--field-manager=gitops", "-n", namespace, "-f", "-")
    control_plane.kubectl(*apply, input=m.dump(manifest))
    status = {
        "phase": "Running",
        "nodeName": "node-a",
        "actualMemory": "128Mi",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "GuestUp",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            }
        ],
    }
    patched = _patch_status(k8s_api, c.PLURAL_VI, "ssa", namespace, status)
    assert patched["metadata"]["generation"] == 1  # status writes do not bump the generation
    # The GitOps tool changes the spec: no conflict, and the status stays as the agent wrote it.
    manifest["spec"]["vcpus"] = 2
    proc = control_plane.kubectl(*apply, input=m.dump(manifest), check=False)
    assert proc.returncode == 0, proc.stderr
    live = _get(control_plane, "VirtualInstance", "ssa", namespace)
    assert live["spec"]["vcpus"] == 2
    assert live["metadata"]["generation"] == 2
    assert live["status"]["phase"] == "Running"
    assert live["status"]["nodeName"] == "node-a"
    managers = {f["manager"]: f.get("subresource", "") for f in live["metadata"]["managedFields"]}
    assert managers["gitops"] == ""
    assert managers["kubehv-agent"] == "status"
    # A status in the applied manifest is ignored on the main resource: one writer for status.
    manifest["status"] = {"phase": "Failed"}
    control_plane.kubectl(*apply, input=m.dump(manifest))
    assert _get(control_plane, "VirtualInstance", "ssa", namespace)["status"]["phase"] == "Running"
    parsed = api.VirtualInstance.model_validate(live)
    assert api.conditions.is_true(parsed.status.conditions, c.COND_READY)


def test_field_selectors(
    control_plane: Any, crds_installed: list[str], namespace: str, k8s_api: Any
) -> None:
    # Node names unique to this test: other tests of the session may use node-x or node-y.
    x, y = (f"sel-{n}-{uuid.uuid4().hex[:6]}" for n in "xy")
    for name, node in (("on-x", x), ("on-y", y), ("nowhere", None)):
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=m.dump(m.vi(name)))
        if node:
            _patch_status(k8s_api, c.PLURAL_VI, name, namespace, {"nodeName": node})
    objects = k8s.CustomObjectsApi(k8s_api)
    listed = cast(
        dict[str, Any],
        objects.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL_VI, field_selector=f"{c.FIELD_VI_NODE}={x}"
        ),
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == ["on-x"]
    # The same across all namespaces, as an agent watches it.
    everywhere = cast(
        dict[str, Any],
        objects.list_cluster_custom_object(
            c.GROUP, c.VERSION, c.PLURAL_VI, field_selector=f"{c.FIELD_VI_NODE}={y}"
        ),
    )
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        (namespace, "on-y")
    ]
    by_hv = control_plane.kubectl(
        "get", "vi", "-n", namespace, f"--field-selector={c.FIELD_VI_HYPERVISOR}=fake", "-o", "name"
    ).stdout.split()
    assert len(by_hv) == 3
    control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=m.dump(m.mig("sel", instance="on-x"))
    )
    _patch_status(
        k8s_api, c.PLURAL_MIG, "sel", namespace, {"sourceNode": "node-x", "targetNode": "node-y"}
    )
    for selector in (
        f"{c.FIELD_MIG_SOURCE}=node-x",
        f"{c.FIELD_MIG_TARGET}=node-y",
        f"{c.FIELD_MIG_INSTANCE}=on-x",
    ):
        got = cast(
            dict[str, Any],
            objects.list_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL_MIG, field_selector=selector
            ),
        )
        assert [i["metadata"]["name"] for i in got["items"]] == ["sel"], selector
    unknown = control_plane.kubectl(
        "get", "vi", "-n", namespace, "--field-selector=spec.vcpus=1", check=False
    )
    assert unknown.returncode != 0
    assert "field label not supported" in unknown.stderr
