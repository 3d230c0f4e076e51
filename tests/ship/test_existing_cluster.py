"""KUBEHV_USE_EXISTING_CLUSTER: the kind path's way into the tests, exercised here for real.

Why: hack/kind/e2e.sh runs tests/e2e/test_portable.py against a deployed kubehv through
``KUBECONFIG`` plus ``KUBEHV_USE_EXISTING_CLUSTER=1``. kind cannot run on this machine, so
this test plays the existing cluster: the session's control plane with the controller and
three fake agents running (``operator_cluster``), and a second pytest, started with only
the kubeconfig and the flag, must find them and pass the portable suite without starting
a control plane of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubehv.devenv import kubeaccess

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parents[2]


def test_portable_suite_runs_against_an_existing_cluster(
    operator_cluster: Any, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env["KUBECONFIG"] = operator_cluster.kubeconfig
    env[kubeaccess.USE_EXISTING_ENV] = "1"
    env["KUBEHV_REQUIRE_REAL"] = "1"
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "tests/e2e/test_portable.py", "-q",
            "-p", "no:cacheprovider", "--junitxml", str(tmp_path / "junit.xml"),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "5 passed" in output, output
    # Nothing skipped or errored: it found this cluster's fake nodes through the kubeconfig
    # (a control plane of its own would have none, and the target fixture would time out).
    junit = (tmp_path / "junit.xml").read_text()
    assert 'errors="0"' in junit and 'skipped="0"' in junit, junit
