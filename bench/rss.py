"""Agent memory: one fake-driver agent's resident set while it holds N instances.

Why psutil on the process (and its children): that is what a node pays for the agent; the
figure is taken once every instance has been Running for ``SETTLE_S``, as the max of a few
samples (``rss_mb``); ``rss_mb_at_last_running`` is the same right at the last Running.
The same run gives the time to 1000 Running (``all_running_s``; the bench's own creates take
``creates_s`` of it) and the API reads made meanwhile (apiserver_request_total GET/LIST
deltas, all clients: the fence's fresh reads, heartbeats, the watcher), per instance.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psutil

from bench import common, scale
from tests.fixtures import operator as opfix

NODE = "bench-rss"
# The figure is the agent holding N instances, not the agent in the middle of receiving them:
# sampled once every instance has been Running this long (kopf's per-object workers have
# exited, the agent's heap trim has run). The burst figure is reported too.
SETTLE_S = 20.0
READ_VERBS = ("GET", "LIST")


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        total += child.memory_info().rss
    return total / 2**20


def _samples(pid: int) -> list[float]:
    out = []
    for _ in range(5):
        out.append(rss_mb(pid))
        time.sleep(0.5)
    return out


def run(cp: Any, n: int, timeout: float) -> dict[str, Any]:
    workdir = common.workdir("rss")
    ns = f"bench-rss-{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    cluster = opfix.OperatorCluster(
        cp, workdir, [NODE], memory_mib=10_000_000, heartbeat_s=5.0, webhook=False,
        lease_name=f"bench-{uuid.uuid4().hex[:5]}",
    )  # fmt: skip
    try:
        cluster.start()
        pid = cluster.agents[NODE].pid
        assert pid is not None
        idle = rss_mb(pid)
        names = [f"r-{i:04d}" for i in range(n)]
        before = common.request_counts(cp.metrics_text(), READ_VERBS)
        t0 = time.time()
        with common.Watcher(cluster.api, ns, "virtualinstances", common.phase_is("Running")) as w:
            for name in names:
                cluster.custom.create_namespaced_custom_object(
                    common.GROUP, common.VERSION, ns, "virtualinstances",
                    scale.vi_body(name, node=NODE),
                )  # fmt: skip
            creates_s = time.time() - t0
            w.wait(names, timeout)
        all_running_s = time.time() - t0
        reads = common.delta(before, common.request_counts(cp.metrics_text(), READ_VERBS))
        burst = max(_samples(pid))
        time.sleep(SETTLE_S)
        return {
            "rss_mb": max(_samples(pid)),
            "rss_mb_at_last_running": burst,
            "idle_rss_mb": idle,
            "all_running_s": all_running_s,
            "creates_s": creates_s,
            "settle_s": SETTLE_S,
            "reads_create_to_last_running": reads,
            "reads_per_instance": {
                kind: round(sum(v for k, v in reads.items() if k.startswith(kind)) / n, 2)
                for kind in ("virtualinstances", "migrations", "nodehypervisors")
            },
        }
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        cluster.stop()
