"""The committed CRDs and reference are what the models generate, and the schemas are
structural (what the API server demands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubehv.api import crdgen, reference
from kubehv.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_models() -> None:
    expected = crdgen.render_all()
    committed = {p.name: p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    assert set(committed) == set(expected), "crds/ has stray or missing files: run `make crds`"
    for name, text in expected.items():
        assert committed[name] == text, f"crds/{name} is stale: run `make crds`"


def test_committed_reference_matches_the_models() -> None:
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == reference.render(), (
        "docs/reference.md is stale: run `kubehv crds --reference --output docs/reference.md`"
    )


def test_cli_prints_all_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == [
        "migrations.kubehv.io",
        "nodehypervisors.kubehv.io",
        "virtualinstances.kubehv.io",
    ]


def test_cli_writes_output_dir(tmp_path: Path) -> None:
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(crdgen.render_all())


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_walk(value, f"{path}[{i}]"))
    return found


@pytest.mark.parametrize("res", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_schema_is_structural_and_documented(res: crdgen.Resource) -> None:
    schema = crdgen.root_schema(res)
    for path, node in _walk(schema):
        assert "$ref" not in node and "title" not in node and "$defs" not in node, path
        assert node.get("default", 0) is not None, f"null default at {path}"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, (
                f"anyOf outside int-or-string {path}"
            )
        if path.endswith(".properties"):
            for name, sub in node.items():
                if path == ".properties" and name == "metadata":
                    continue  # the server forbids anything but the type on metadata
                assert sub.get("description"), f"undocumented field {path}.{name}"
                typed = (
                    "type" in sub
                    or sub.get("x-kubernetes-int-or-string")
                    or sub.get("x-kubernetes-preserve-unknown-fields")
                )
                assert typed, f"untyped field {path}.{name}"


def test_crd_shape() -> None:
    crds = {res.kind: crdgen.crd(res) for res in crdgen.RESOURCES}
    columns = {
        kind: [
            c["name"]
            for c in doc["spec"]["versions"][0]["additionalPrinterColumns"]
            if "priority" not in c
        ]
        for kind, doc in crds.items()
    }
    assert columns == {
        "VirtualInstance": ["Phase", "Node", "Memory", "VCPUs", "Age"],
        "Migration": ["Instance", "Phase", "Source", "Target", "Progress", "Age"],
        "NodeHypervisor": ["Node", "Hypervisor", "Ready", "Free Memory", "Instances", "Age"],
    }
    for doc in crds.values():
        version = doc["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert doc["spec"]["names"]["categories"] == ["kubehv"]
    assert crds["NodeHypervisor"]["spec"]["scope"] == "Cluster"
    selectable = crds["VirtualInstance"]["spec"]["versions"][0]["selectableFields"]
    assert {"jsonPath": ".status.nodeName"} in selectable
    mig_spec = crds["Migration"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = mig_spec["properties"]["spec"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf", "message": "Migration spec is immutable"} in rules
