"""Bad manifests are refused by the real API server with a message that names the problem.

Why: users meet the API through kubectl and GitOps tools; a mistake must be stopped at the
door (schema, enums, CEL rules, strict field validation) rather than reach an agent. Each
case is also fed to the pydantic models, which must refuse it too (where the mistake is in
the spec), so Python and the server enforce the same rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from kubehv import api
from tests.api import manifests as m

Case = tuple[str, dict[str, Any], str, bool]
# (id, manifest, expected text in the server's error, pydantic must refuse it too)
CASES: list[Case] = [
    (
        "memory-zero",
        m.vi("bad-zero", memory={"min": "0", "max": "128Mi"}),
        "memory.min must be greater than zero",
        True,
    ),
    (
        "memory-negative",
        m.vi("bad-neg", memory={"min": "-64Mi", "max": "128Mi"}),
        "memory.min must be greater than zero",
        True,
    ),
    (
        "memory-negative-integer",
        m.vi("bad-negint", memory={"min": -5, "max": "128Mi"}),
        "memory.min must be greater than zero",
        True,
    ),
    (
        "memory-min-above-max",
        m.vi("bad-minmax", memory={"min": "1Gi", "max": "128Mi"}),
        "memory.min must be less than or equal to memory.max",
        True,
    ),
    (
        "memory-bad-quantity",
        m.vi("bad-qty", memory={"min": "lots", "max": "128Mi"}),
        "spec.memory.min in body should match",
        True,
    ),
    (
        "memory-missing",
        m.without(m.vi("bad-nomem"), "spec", "memory"),
        "spec.memory: Required",
        True,
    ),
    ("spec-missing", m.without(m.vi("bad-nospec"), "spec"), "spec: Required value", True),
    (
        "runstate-unknown",
        m.vi("bad-run", runState="Sleeping"),
        'spec.runState: Unsupported value: "Sleeping"',
        True,
    ),
    ("vcpus-zero", m.vi("bad-vcpu", vcpus=0), "spec.vcpus in body should be greater than", True),
    (
        "vcpus-wrong-type",
        m.vi("bad-vcput", vcpus="two"),
        "spec.vcpus in body must be of type",
        True,
    ),
    (
        "eviction-unknown",
        m.vi("bad-evict", evictionPolicy="Explode"),
        'spec.evictionPolicy: Unsupported value: "Explode"',
        True,
    ),
    (
        "disk-format-unknown",
        m.vi("bad-disk", disks=[{"path": "/d.img", "format": "vmdk"}]),
        'spec.disks[0].format: Unsupported value: "vmdk"',
        True,
    ),
    (
        "disk-readonly-wrong-type",
        m.vi("bad-ro", disks=[{"path": "/d.img", "readOnly": "yes"}]),
        "spec.disks[0].readOnly in body must be of type boolean",
        True,
    ),
    (
        "nic-bridge-without-source",
        m.vi("bad-nic", nics=[{"type": "bridge"}]),
        "source is required for bridge interfaces",
        True,
    ),
    (
        "nic-bad-mac",
        m.vi("bad-mac", nics=[{"type": "user", "mac": "not-a-mac"}]),
        "spec.nics[0].mac in body should match",
        True,
    ),
    (
        "parameter-object-value",
        m.vi("bad-param", hypervisorParameters={"accel": {"name": "tcg"}}),
        "spec.hypervisorParameters.accel: Too many",
        True,
    ),
    (
        "parameter-fraction-value",
        m.vi("bad-paramf", hypervisorParameters={"shares": 0.5}),
        "spec.hypervisorParameters.shares in body should be a multiple of 1",
        True,
    ),
    (
        "reboot-generation-negative",
        m.vi("bad-reboot", rebootGeneration=-1),
        "spec.rebootGeneration in body should be greater than or equal to 0",
        True,
    ),
    (
        "balloon-target-above-max",
        m.vi("bad-balloon", autoBalloon={"enabled": True, "target": "1Gi"}),
        "autoBalloon.target must lie between memory.min and memory.max",
        True,
    ),
    ("unknown-spec-field", m.vi("bad-field", colour="blue"), 'unknown field "spec.colour"', True),
    (
        "unknown-top-level-field",
        m.with_top(m.vi("bad-top"), extra={"a": 1}),
        'unknown field "extra"',
        False,
    ),
    (
        "migration-without-instance",
        m.without(m.mig("bad-mig-noinst"), "spec", "instance"),
        "spec.instance: Required value",
        True,
    ),
    (
        "migration-mode-unknown",
        m.mig("bad-mig-mode", mode="teleport"),
        'spec.mode: Unsupported value: "teleport"',
        True,
    ),
    (
        "migration-bandwidth-zero",
        m.mig("bad-mig-bw", bandwidth=0),
        "spec.bandwidth in body should be greater than or equal to 1",
        True,
    ),
    (
        "migration-timeout-wrong-type",
        m.mig("bad-mig-to", completionTimeout="soon"),
        "spec.completionTimeout in body must be of type integer",
        True,
    ),
    (
        "nodehypervisor-name-mismatch",
        m.nhv("bad-node", nodeName="other-node"),
        "a NodeHypervisor must be named after its node",
        False,
    ),
]

MODELS: dict[str, type[api.VirtualInstance | api.Migration | api.NodeHypervisor]] = {
    "VirtualInstance": api.VirtualInstance,
    "Migration": api.Migration,
    "NodeHypervisor": api.NodeHypervisor,
}


@pytest.fixture(scope="module")
def shared_namespace(control_plane: Any, crds_installed: list[str]) -> Iterator[str]:
    """One namespace for the whole table: every case is refused, so nothing lands in it."""
    name = f"t-rejections-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 15
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("manifest", "python_refuses"), [(c[1], c[3]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_models_refuse_bad_spec(manifest: dict[str, Any], python_refuses: bool) -> None:
    model = MODELS[manifest["kind"]]
    if python_refuses:
        with pytest.raises(pydantic.ValidationError):
            model.model_validate(manifest)
    else:
        # Not a spec mistake (metadata or top level): the loose models read it.
        assert model.model_validate(manifest).kind == manifest["kind"]


@pytest.mark.apiserver
@pytest.mark.parametrize(
    ("manifest", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_server_refuses_bad_manifest(
    control_plane: Any, shared_namespace: str, manifest: dict[str, Any], expected: str
) -> None:
    proc = control_plane.kubectl(
        "apply",
        "--validate=strict",
        "-n",
        shared_namespace,
        "-f",
        "-",
        input=m.dump(manifest),
        check=False,
    )
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert expected in proc.stderr, proc.stderr
    got = control_plane.kubectl(
        "get",
        manifest["kind"].lower() + ".kubehv.io",
        manifest["metadata"]["name"],
        "-n",
        shared_namespace,
        "--ignore-not-found",
        "-o",
        "name",
    )
    assert got.stdout.strip() == ""


@pytest.mark.apiserver
def test_migration_spec_is_immutable(
    control_plane: Any, namespace: str, crds_installed: list[str]
) -> None:
    original = m.mig("immutable", targetNode="node-a")
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=m.dump(original))
    edited = m.mig("immutable", targetNode="node-b")
    proc = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=m.dump(edited), check=False
    )
    assert proc.returncode != 0
    assert "Migration spec is immutable" in proc.stderr
    live = control_plane.kubectl(
        "get", "migration", "immutable", "-n", namespace, "-o", "jsonpath={.spec.targetNode}"
    )
    assert live.stdout == "node-a"
    # Metadata stays editable: the abort annotation is how a user stops a migration.
    control_plane.kubectl(
        "annotate",
        "-n",
        namespace,
        "migration",
        "immutable",
        f"{api.constants.ABORT_ANNOTATION}=true",
    )
