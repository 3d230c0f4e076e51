"""Agent memory: one fake-driver agent's resident set while it holds N instances.

Why psutil on the process (and its children): that is what a node pays for the agent; the
figure is taken after every instance reached Running, as the max of a few samples.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psutil

from bench import common, scale
from tests.fixtures import operator as opfix

NODE = "bench-rss"


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        total += child.memory_info().rss
    return total / 2**20


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
        t0 = time.time()
        with common.Watcher(cluster.api, ns, "virtualinstances", common.phase_is("Running")) as w:
            for name in names:
                cluster.custom.create_namespaced_custom_object(
                    common.GROUP, common.VERSION, ns, "virtualinstances",
                    scale.vi_body(name, node=NODE),
                )  # fmt: skip
            w.wait(names, timeout)
        all_running_s = time.time() - t0
        samples = []
        for _ in range(5):
            samples.append(rss_mb(pid))
            time.sleep(0.5)
        return {"rss_mb": max(samples), "idle_rss_mb": idle, "all_running_s": all_running_s}
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        cluster.stop()
