"""A kvm cluster set up for ballooning, shared by the balloon e2e test and ``make bench``.

Why: both need the same things -- the e2e cluster (controller + kvm agents on netns libvirt
nodes) with a fast balloon loop, a node whose guest memory is capped, guests pinned to it
with a balloon stats period, and a witness that samples ``virsh dommemstat`` all along.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from tests.e2e.conftest import KvmCluster
from tests.fixtures.operator import GROUP, NHV, VERSION

BALLOON_INTERVAL_S = 2
MIB = 1024


def make_cluster(control_plane: Any, nodes: Any, image: Any, workdir: Any) -> KvmCluster:
    """The e2e cluster with the agents' balloon loop every ``BALLOON_INTERVAL_S``."""
    cluster = KvmCluster(control_plane, nodes, image, workdir)
    for agent in cluster.agents.values():
        agent.argv += ["--balloon-interval", str(BALLOON_INTERVAL_S)]
    return cluster


def set_cap(cluster: KvmCluster, node: str, cap_mib: int, ratio: float) -> None:
    """Cap the node's guest memory and allow maxima up to ``ratio`` times it."""
    cluster.custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        NHV,
        node,
        {"spec": {"guestMemoryCap": f"{cap_mib}Mi", "memoryOvercommitRatio": ratio}},
    )


def manifest(
    cluster: KvmCluster, ns: str, name: str, node: str, auto: bool, lo_mib: int, hi_mib: int
) -> str:
    """The test guest pinned to ``node``, auto-ballooned or not, stats every second."""
    body = json.loads(cluster.guest_manifest(ns, name))
    spec = body["spec"]
    spec["memory"] = {"min": f"{lo_mib}Mi", "max": f"{hi_mib}Mi"}
    spec["nodeName"] = node
    spec["autoBalloon"] = {"enabled": auto}
    spec["hypervisorParameters"]["balloon_stats_period_s"] = 1
    return json.dumps(body)


def domain(ns: str, name: str) -> str:
    """The hypervisor-level name of VirtualInstance ``ns/name``."""
    return f"{ns}.{name}"


def phase(cluster: KvmCluster, ns: str, name: str) -> tuple[str, str]:
    """(phase, Scheduled condition's reason) of a VirtualInstance."""
    vi = cluster.get("virtualinstances", ns, name) or {}
    st = vi.get("status") or {}
    reason = ""
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Scheduled":
            reason = str(cond.get("reason") or "")
    return str(st.get("phase") or ""), reason


class Sampler(threading.Thread):
    """``virsh dommemstat`` actual (MiB) of every guest, once a second, while it runs."""

    def __init__(self, cluster: KvmCluster, node: str, domains: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.node, self.domains = cluster, node, domains
        self.samples: dict[str, list[tuple[float, int]]] = {n: [] for n in domains}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, dom in self.domains.items():
                kib = self.cluster.balloon_actual_kib(self.node, dom)
                if kib is not None:
                    self.samples[name].append((time.monotonic(), kib // MIB))
            self.stopped.wait(1.0)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def last(self, name: str) -> int | None:
        s = self.samples[name]
        return s[-1][1] if s else None

    def lowest(self) -> dict[str, int]:
        return {n: min(v for _, v in s) for n, s in self.samples.items() if s}

    def under(self, cap_mib: int, below_mib: int) -> dict[str, int] | None:
        """The latest figures if every guest is below ``below_mib`` and all sum to the cap."""
        now = {n: self.last(n) for n in self.domains}
        figures = {n: v for n, v in now.items() if v is not None}
        if len(figures) < len(now) or any(v >= below_mib for v in figures.values()):
            return None
        return figures if sum(figures.values()) <= cap_mib else None
