"""No module of the operator (or the CLI) reads an API object by string key.

Issue "One owner per instance" point 1: objects are parsed once, into the ``kubehv.api``
models, where they arrive (watch event, GET, LIST); everything after works on typed
fields, so a renamed field fails at type-check time instead of silently reading nothing.
This test walks the syntax tree of every module and fails on a *read* of a known API field
by string key (``obj["spec"]``, ``obj.get("status")``, ``meta.get("name")``...). Building a
patch (``patch["phase"] = ...``) is a write and allowed; so are the few receivers that are
not API objects, listed below with why.
"""

from __future__ import annotations

import ast
import typing
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from kubehv import api

ROOT = Path(__file__).resolve().parents[2] / "kubehv"

# Receivers that hold something else than an API object, by name.
NOT_API_OBJECTS = {
    "event": "kopf's raw watch event (its 'type' is ADDED/MODIFIED/DELETED)",
    "data": "the agent's own journal file format (operator/journal.py)",
    "labels": "a Prometheus sample's labels (operator/metrics.py)",
    "review": "an AdmissionReview (operator/webhook.py); its object is parsed into the model",
    "request": "an AdmissionReview's request (operator/webhook.py)",
    "lease": "a coordination.k8s.io Lease (operator/leader.py)",
    "status_doc": "the API server's Status answer to a failed call (operator/rest.py)",
    "kubeconfig_entry": "a kubeconfig's named entry (operator/kubeconfig.py)",
    "kube_context": "a kubeconfig's context (operator/kubeconfig.py)",
    "token_review": "an authentication.k8s.io TokenReview (operator/k8s.py)",
}
# Modules another helper owns and converts on their own schedule (named in the report).
NOT_YET: dict[str, str] = {}
PACKAGES = ["operator", "cli"]


def api_keys() -> set[str]:
    """Every wire name of every field of the three kinds (recursively), plus the envelope."""
    keys: set[str] = set()
    seen: set[type[pydantic.BaseModel]] = set()

    def walk(model: type[pydantic.BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            keys.add(field.alias or name)
            annotations = [field.annotation]
            while annotations:
                ann = annotations.pop()
                if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
                    walk(ann)
                annotations.extend(typing.get_args(ann))

    for kind in (api.VirtualInstance, api.Migration, api.NodeHypervisor):
        walk(kind)
    return keys


def _receiver_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def string_key_reads(path: Path, keys: set[str], root: Path = ROOT.parent) -> Iterator[str]:
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        key, receiver = None, None
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            key, receiver = node.slice.value, node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"get", "pop"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            key, receiver = node.args[0].value, node.func.value
        if key not in keys or receiver is None or not isinstance(node, ast.expr):
            continue
        if _receiver_name(receiver) in NOT_API_OBJECTS:
            continue
        yield f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}"


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).glob("*.py") if p.name not in NOT_YET)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_api_object_is_read_by_string_key(package: str) -> None:
    keys = api_keys()
    assert {"spec", "status", "metadata", "nodeName", "phase", "memoryFree"} <= keys
    found = [hit for path in modules(package) for hit in string_key_reads(path, keys)]
    assert not found, "read these through the kubehv.api models:\n" + "\n".join(found)


def test_the_scan_sees_a_string_key_read(tmp_path: Path) -> None:
    """The scanner is not blind: dict reads of API fields are reported, writes are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(vi, patch):\n"
        '    patch["phase"] = "Running"\n'
        '    return vi.get("status") or vi["spec"]["memory"]\n'
    )
    hits = list(string_key_reads(sample, api_keys(), tmp_path))
    assert [h.split(":")[1] for h in hits] == ["3", "3", "3"]
