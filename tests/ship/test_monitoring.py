"""The shipped alerts and dashboard: valid, tested by promtool, and about series kubehv emits.

Why: an alert on a metric nobody exports never fires, and a dashboard over a renamed series
shows a flat line that looks healthy. So: ``promtool check rules`` and ``promtool test rules``
(tests/ship/monitoring/alerts.test.yaml: each alert fires on the situation it names and stays
quiet otherwise) run on the PrometheusRule as kustomize builds it; every series named by a
rule, a promtool input or a dashboard panel must be one that kubehv's registry
(kubehv/operator/metrics.py, operator/leader.py) exports, with label names it has; and a
real controller process serves ``kubehv_leader`` from its first second (a standby too).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubehv.devenv import controlplane as cpmod
from kubehv.operator import leader, metrics
from tests.fixtures.operator import Proc, wait_for
from tests.fixtures.real import missing_real_part
from tests.ship.conftest import MANIFESTS, documents, find, kustomize

HERE = Path(__file__).parent
MONITORING = MANIFESTS / "monitoring"
# Labels Prometheus adds at scrape (and the agent PodMonitor's relabelling), not kubehv's.
TARGET_LABELS = {"job", "instance", "node", "le", "pod", "namespace"}
SERIES = re.compile(r"\b((?:kubehv|process)_[a-z_]+)\b(?:\{([^}]*)\})?")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "and", "or", "unless"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_real_part(
            "promtool", "not on PATH; hack/bootstrap-apt.sh installs Debian's prometheus"
        )
    return path


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, for every series kubehv's registry can export."""
    assert leader.LEADER is not None  # registered on import
    out: dict[str, set[str]] = {}
    for name, collector in metrics.REGISTRY._names_to_collectors.items():
        out[name] = set(getattr(collector, "_labelnames", ()))
    return out


def series_in(expr: str) -> list[tuple[str, set[str]]]:
    found = []
    for match in SERIES.finditer(expr):
        labels = {m.split("=")[0].strip().rstrip("!~") for m in (match.group(2) or "").split(",")}
        found.append((match.group(1), {label for label in labels if label}))
    return found


def rules_spec() -> dict[str, Any]:
    rule = find(documents(kustomize(MONITORING)), "PrometheusRule", "kubehv")
    spec: dict[str, Any] = rule["spec"]
    return spec


def test_promtool_checks_and_tests_the_rules(tmp_path: Path) -> None:
    (tmp_path / "kubehv-rules.yaml").write_text(yaml.safe_dump(rules_spec()))
    shutil.copy(HERE / "monitoring" / "alerts.test.yaml", tmp_path)
    check = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "kubehv-rules.yaml")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    alerts = {r["alert"] for g in rules_spec()["groups"] for r in g["rules"]}
    cases = yaml.safe_load((HERE / "monitoring" / "alerts.test.yaml").read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check["exp_alerts"]
    }
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"


def assert_known(where: str, expr: str, known: dict[str, set[str]]) -> None:
    for name, labels in series_in(expr):
        assert name in known, f"{where}: {name} is not a series kubehv exports ({expr})"
        unknown = labels - known[name] - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label(s) {unknown}"


def test_rules_tests_and_dashboard_name_only_exported_series() -> None:
    known = exported()
    assert "kubehv_leader" in known and "kubehv_reconciles_total" in known
    for group in rules_spec()["groups"]:
        for rule in group["rules"]:
            assert_known(f"alert {rule['alert']}", rule["expr"], known)
    cases = yaml.safe_load((HERE / "monitoring" / "alerts.test.yaml").read_text())["tests"]
    for case in cases:
        for series in case["input_series"]:
            assert_known("promtool input", series["series"], known)
    dashboard = json.loads((MONITORING / "kubehv-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert_known("dashboard", expr, known)
        # Grouping labels must exist too (a typo there gives one flat, unlabelled line).
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                names = {n for n, _ in series_in(expr)}
                assert any(label in known[n] or label in TARGET_LABELS for n in names), (
                    f"dashboard groups by {label!r}, which none of {names} has"
                )


def test_dashboard_ships_as_a_grafana_configmap() -> None:
    docs = documents(kustomize(MONITORING))
    cm = find(docs, "ConfigMap", "kubehv-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "kubehv-system"
    shipped = json.loads(cm["data"]["kubehv-dashboard.json"])
    assert shipped == json.loads((MONITORING / "kubehv-dashboard.json").read_text())
    assert {d["kind"] for d in docs} == {"ConfigMap", "PrometheusRule", "PodMonitor"}


@pytest.mark.apiserver
def test_standby_and_leader_export_kubehv_leader(
    control_plane: Any, crds_installed: Any, namespace: str, tmp_path: Path
) -> None:
    """kubehv_leader comes from real processes: 1 on the leader, 0 on the standby."""
    lease = f"kubehv-mon-{uuid.uuid4().hex[:6]}"
    env = control_plane.env()
    procs = []
    ports = []
    for name in ("mon-a", "mon-b"):
        port = cpmod.free_port()
        argv = [
            sys.executable, "-m", "kubehv.cli", "controller", "--kubeconfig",
            str(control_plane.kubeconfig), "--lease-name", lease, "--lease-namespace", namespace,
            "--identity", name, "--metrics-port", str(port), "--lease-duration", "6",
        ]  # fmt: skip
        procs.append(Proc(name, argv, tmp_path / f"{name}.log", env))
        ports.append(port)

    def leader_value(port: int) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        found = re.search(r"^kubehv_leader (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    try:
        procs[0].start()
        wait_for(lambda: leader_value(ports[0]) == 1.0, 60, "mon-a to lead")
        procs[1].start()
        wait_for(lambda: leader_value(ports[1]) is not None, 60, "the standby's /metrics")
        assert leader_value(ports[1]) == 0.0
        assert leader_value(ports[0]) == 1.0
    finally:
        for proc in procs:
            proc.stop()
