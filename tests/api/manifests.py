"""Manifest builders shared by the tests of the kubehv API.

Why: the rejection table, the model tests and the server tests all start from the same
known-good objects and change one thing; building them here keeps each case one line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def load_example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def vi(name: str = "vi-ok", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": {"hypervisor": "fake", "memory": {"min": "64Mi", "max": "128Mi"}},
    }
    base["spec"].update(spec)
    return base


def mig(name: str = "mig-ok", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "Migration",
        "metadata": {"name": name},
        "spec": {"instance": "vi-ok", **spec},
    }


def nhv(name: str = "node-ok", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "NodeHypervisor",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "hypervisor": "fake", **spec},
    }


def without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    """A copy of ``doc`` with the key at ``path`` removed."""
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def with_top(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A copy of ``doc`` with extra top-level fields."""
    out = copy.deepcopy(doc)
    out.update(fields)
    return out


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)
