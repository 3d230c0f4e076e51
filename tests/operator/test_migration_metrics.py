"""The migration metrics that docs/operations.md alerts on move after real migrations.

Why: ``kubehv_migrations_total{result="Failed"}`` is the documented alert; a metric nobody
increments would keep that alert silent for ever. Two fake-driver agents and the controller
run as processes against the real API server, one migration succeeds and one fails, and the
source agent's ``/metrics`` shows both, with the duration and the bytes moved.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import migration_helpers as h
import pytest
from prometheus_client import parser

from kubehv.devenv import controlplane as cpmod
from tests.fixtures import operator as operator_fixtures

pytestmark = pytest.mark.apiserver

NODES = ["metrics-a", "metrics-b"]


@pytest.fixture(scope="module")
def metrics_cluster(
    control_plane: Any, crds_installed: Any
) -> Iterator[tuple[operator_fixtures.OperatorCluster, dict[str, int]]]:
    workdir = Path(tempfile.mkdtemp(prefix="kubehv-metrics-"))
    cluster = operator_fixtures.OperatorCluster(control_plane, workdir, NODES, webhook=False)
    ports = {node: cpmod.free_port() for node in NODES}
    for node, agent in cluster.agents.items():
        agent.argv += ["--metrics-port", str(ports[node])]
    try:
        cluster.start()
        yield cluster, ports
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def scrape(port: int) -> dict[str, float]:
    """Sample name{labels} -> value, summed over equal keys."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


def test_migration_metrics_after_real_migrations(
    metrics_cluster: tuple[operator_fixtures.OperatorCluster, dict[str, int]], namespace: str
) -> None:
    cluster, ports = metrics_cluster
    h.create_instance(cluster, namespace, "vm-ok")
    source = h.wait_instance_running(cluster, namespace, "vm-ok")["status"]["nodeName"]
    target = next(n for n in NODES if n != source)
    ok = h.create_migration(cluster, namespace, "vm-ok", targetNode=target)
    assert (
        h.PhaseWatch(cluster, namespace, ok).until({"Succeeded", "Failed"})["status"]["phase"]
        == "Succeeded"
    )

    h.create_instance(cluster, namespace, "vm-bad", params={"fail_migration_at": "migrate"})
    bad_source = h.wait_instance_running(cluster, namespace, "vm-bad")["status"]["nodeName"]
    bad_target = next(n for n in NODES if n != bad_source)
    bad = h.create_migration(cluster, namespace, "vm-bad", targetNode=bad_target)
    assert (
        h.PhaseWatch(cluster, namespace, bad).until({"Succeeded", "Failed"})["status"]["phase"]
        == "Failed"
    )

    def totals() -> dict[str, float]:
        merged: dict[str, float] = {}
        for port in ports.values():
            for key, value in scrape(port).items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    def recorded() -> dict[str, float] | None:
        found = totals()
        done = found.get("kubehv_migrations_total{result=Succeeded}", 0) >= 1
        failed = found.get("kubehv_migrations_total{result=Failed}", 0) >= 1
        return found if done and failed else None

    found = h.wait_for("both migrations counted", recorded)
    assert found["kubehv_migration_seconds_count{}"] >= 1
    assert found["kubehv_migration_bytes_total{}"] > 0
    assert found.get("kubehv_driver_calls_total{method=get_instance_info,result=ok}", 0) > 0
