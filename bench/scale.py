"""Scale: N VirtualInstances on 3 fake-driver agents, created 100 ms apart, apply -> Running.

Why a fake driver: it starts an "instance" in microseconds, so what is measured is kubehv
itself (controller placement, agent reconcile, status writes) against the API server.
The floor is a bare client that does the same creates at the same pace plus one status write
per instance (phase Running) itself, seen by the same watch: what the API server alone costs.
The same run counts the API server's writes (``apiserver_request_total``) from the first
create to the last Running; the bench's own N creates are subtracted exactly (it knows how
many it made), per-node writes (NodeHypervisor heartbeats, leases) are reported apart.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import kubernetes

from bench import common
from tests.fixtures import operator as opfix

NODES = ["bench-a", "bench-b", "bench-c"]
PER_INSTANCE = ("virtualinstances", "events")


def vi_body(name: str, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hypervisor": "fake",
        "runState": "Running",
        "memory": {"min": "64Mi", "max": "64Mi"},
        "vcpus": 1,
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": f"{common.GROUP}/{common.VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": spec,
    }


def paced_creates(
    custom: Any, ns: str, names: list[str], interval: float, after: Any = None
) -> dict[str, float]:
    """Create each VI at t0 + i*interval; returns name -> time the create was sent."""
    sent: dict[str, float] = {}
    t0 = time.time()
    for i, name in enumerate(names):
        pause = t0 + i * interval - time.time()
        if pause > 0:
            time.sleep(pause)
        sent[name] = time.time()
        custom.create_namespaced_custom_object(
            common.GROUP, common.VERSION, ns, "virtualinstances", vi_body(name)
        )
        if after is not None:
            after(i, name)
    return sent


def _latencies(sent: dict[str, float], seen: dict[str, float]) -> list[float]:
    return [seen[n] - sent[n] for n in sent]


def run_operator(cp: Any, n: int, interval: float, timeout: float) -> dict[str, Any]:
    workdir = common.workdir("scale")
    ns = f"bench-scale-{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    cluster = opfix.OperatorCluster(
        cp, workdir, NODES, memory_mib=1_000_000, heartbeat_s=2.0,
        lease_name=f"bench-{uuid.uuid4().hex[:5]}",
    )  # fmt: skip
    try:
        cluster.start()
        names = [f"vi-{i:04d}" for i in range(n)]
        with common.Watcher(cluster.api, ns, "virtualinstances", common.phase_is("Running")) as w:
            before = common.write_counts(cp.metrics_text())
            sent = paced_creates(cluster.custom, ns, names, interval)
            seen = w.wait(names, timeout)
            after = common.write_counts(cp.metrics_text())
        lat = _latencies(sent, seen)
        total = max(seen.values()) - min(sent.values())
        writes = common.delta(before, after)
        return {
            "latencies": lat,
            "total_s": total,
            "writes": writes,
            "window_s": total,
            "logs": str(workdir),
        }
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        cluster.stop()


def run_floor(cp: Any, n: int, interval: float, timeout: float) -> dict[str, Any]:
    """The bare client: same creates at the same pace, then its own status write each."""
    ns = f"bench-floor-{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    api = cp.api_client()
    custom = kubernetes.client.CustomObjectsApi(api)
    names = [f"vi-{i:04d}" for i in range(n)]

    def running(i: int, name: str) -> None:
        status = {"status": {"phase": "Running", "nodeName": NODES[i % len(NODES)]}}
        custom.patch_namespaced_custom_object_status(
            common.GROUP, common.VERSION, ns, "virtualinstances", name, status
        )

    try:
        with common.Watcher(api, ns, "virtualinstances", common.phase_is("Running")) as w:
            sent = paced_creates(custom, ns, names, interval, after=running)
            seen = w.wait(names, timeout)
        return {
            "latencies": _latencies(sent, seen),
            "total_s": max(seen.values()) - min(sent.values()),
        }
    finally:
        api.close()


def per_instance_writes(writes: dict[str, int], n: int) -> dict[str, float]:
    """Writes on per-instance resources per instance, minus the bench's own n creates."""
    vi = sum(v for k, v in writes.items() if k.startswith("virtualinstances"))
    events = sum(v for k, v in writes.items() if k.startswith("events"))
    vi -= n  # the bench's own creates: exactly n POSTs on virtualinstances
    return {"vi": vi / n, "events": events / n, "with_events": (vi + events) / n}
