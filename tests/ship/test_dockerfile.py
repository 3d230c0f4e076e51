"""The Dockerfile cannot be built here (no Docker engine): check that it says what it must.

Why: the image is what a real cluster runs; these checks pin the properties the manifests and
docs rely on — two stages, the pinned lock file as the only source of dependencies, the
libvirt client library in a slim runtime without a compiler, a non-root default user matching
the manifests' uid, and ``kubehv`` as the entrypoint — so a careless edit fails here.
"""

from __future__ import annotations

import json
import re

from tests.ship.conftest import MANIFESTS, REPO, documents, find, kustomize


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, rest in instructions():
        if op == "FROM":
            result.append([])
        assert result, "an instruction before the first FROM"
        result[-1].append((op, rest))
    return result


def test_two_stages_slim_python_base() -> None:
    builder, runtime = stages()
    assert builder[0][1].startswith("python:3.11-slim-bookworm AS builder")
    assert runtime[0][1] == "python:3.11-slim-bookworm"
    assert any("libvirt-dev" in rest for op, rest in builder if op == "RUN")
    runtime_runs = " ".join(rest for op, rest in runtime if op == "RUN")
    assert "libvirt0" in runtime_runs
    assert "libvirt-dev" not in runtime_runs and "build-essential" not in runtime_runs


def test_dependencies_come_only_from_the_pinned_lock_file() -> None:
    builder, runtime = stages()
    assert ("COPY", "requirements.lock ./") in builder
    assert any("-r requirements.lock" in rest for op, rest in builder if op == "RUN")
    installs = [rest for op, rest in runtime if op == "RUN" and "pip install" in rest]
    assert installs and all("--no-index" in rest for rest in installs)
    assert "-r /tmp/requirements.lock" in installs[0]
    lock = (REPO / "requirements.lock").read_text().splitlines()
    assert all("==" in line for line in lock if line and not line.startswith("#"))
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "!requirements.lock" in ignored and "!kubehv/" in ignored


def test_non_root_user_matches_the_manifests_and_entrypoint_is_kubehv() -> None:
    _, runtime = stages()
    users = [rest for op, rest in runtime if op == "USER"]
    assert users == ["65532:65532"]
    entry = [json.loads(rest) for op, rest in runtime if op == "ENTRYPOINT"]
    assert entry == [["kubehv"]]
    docs = documents(kustomize(MANIFESTS / "base"))
    controller = find(docs, "Deployment", "kubehv-controller")["spec"]["template"]["spec"]
    assert controller["securityContext"]["runAsUser"] == 65532
