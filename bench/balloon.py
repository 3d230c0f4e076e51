"""Auto-balloon density and reclaim latency, on real guests (issue 14).

Why these two figures: ballooning is worth having only if a node really runs more guests
(density) and a guest that needs memory gets it back quickly (reclaim latency).

Density: one netns libvirt node whose guest memory is capped (``CAP_MIB``; scaled down
from a real node because guests are emulated on 2 shared cores). Each mode asks for
``TRY`` identical guests (memory.min ``MIN_MIB``, memory.max ``MAX_MIB``) pinned there and
lets placement decide how many run: static guests commit their max, auto-ballooned ones
their min. Then the same mix runs in both modes -- one guest in four (at least one)
allocates ``ALLOC_MIB`` with the test guest's ``mem-alloc`` -- and the mode's figure counts
only if every allocation is granted, no guest is OOM-killed and the guests' balloons stay
under the cap once settled. Guests per GiB = running guests / cap in GiB.

Reclaim latency: in auto mode, ``rounds`` times, the busy guest frees its memory and the
next guest (round robin) allocates; the latency is the wait of ``mem-alloc`` as the guest
itself measures it (asked -> all memory granted), which includes other guests giving way.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from typing import Any

from bench import common
from kubehv.devenv import netns, serial
from kubehv.devenv.guest import GuestImage
from tests.balloon import cluster as bc
from tests.balloon import guestmem
from tests.fixtures.kube import fresh_namespace
from tests.fixtures.operator import wait_for

CAP_MIB = 512
MIN_MIB, MAX_MIB = 112, 256
ALLOC_MIB = 64
TRY = 6
RATIO = 2.0
ALLOC = f"mem-alloc {ALLOC_MIB}"


def _say(msg: str) -> None:
    print(f"bench balloon [{time.strftime('%H:%M:%S')}]: {msg}", flush=True)


def _settled(cluster: Any, ns: str, names: list[str]) -> bool:
    return all(bc.phase(cluster, ns, n)[0] in ("Running", "Pending") for n in names) and all(
        bc.phase(cluster, ns, n)[0] == "Running" or bc.phase(cluster, ns, n)[1] == "NoNodeFits"
        for n in names
    )


def _wait(ok: Any, what: str, timeout: float = 300.0) -> None:
    wait_for(ok, timeout, what, 1.0)


def _alloc(cluster: Any, node: str, ns: str, name: str, *, log: str, line: str) -> float:
    """Type a memory command; the guest's own wait for ``mem-alloc``, 0.0 for the others."""
    pty = guestmem.pty_path(cluster.nodes[node].virsh("dumpxml", bc.domain(ns, name)).stdout)
    kind = "allocated" if line.startswith("mem-alloc") else "freed"
    guestmem.command(pty, log, line, kind, functools.partial(_wait, what=f"{name}: {line}"))
    took = guestmem.alloc_seconds(log)
    return took[-1] if kind == "allocated" and took else 0.0


def run_mode(cluster: Any, node: str, auto: bool, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"auto_balloon": auto}
    with fresh_namespace(cluster.control_plane, f"bench-bal-{uuid.uuid4().hex[:5]}") as ns:
        names = [f"g{i}" for i in range(TRY)]
        for name in names:
            body = bc.manifest(cluster, ns, name, node, auto, MIN_MIB, MAX_MIB)
            cluster.kubectl("apply", "-f", "-", stdin=body)
        _wait(functools.partial(_settled, cluster, ns, names), "placement and starts", 600)
        running = [n for n in names if bc.phase(cluster, ns, n)[0] == "Running"]
        out["running"] = len(running)
        out["pending_no_fit"] = len(names) - len(running)
        domains = {n: bc.domain(ns, n) for n in running}
        logs = {n: cluster.serial_log(node, domains[n]) for n in running}
        for name in running:
            serial.wait_for_marker(logs[name], serial.BOOT_MARKER, timeout=300)
        sampler = bc.Sampler(cluster, node, domains)
        sampler.start()
        try:
            if auto:
                _wait(functools.partial(sampler.under, CAP_MIB, MAX_MIB), "idle guests settled")
            busy = running[: max(1, len(running) // 4)]
            for name in busy:
                took = _alloc(
                    cluster, node, ns, name, log=logs[name], line=f"mem-alloc {ALLOC_MIB}"
                )
                _say(f"{'auto' if auto else 'static'}: {name} got {ALLOC_MIB} MiB in {took}s")
            time.sleep(3 * bc.BALLOON_INTERVAL_S)
            held = {n: sampler.last(n) or 0 for n in running}
            out["actual_mib_after_mix"] = held
            out["under_cap"] = sum(held.values()) <= CAP_MIB
            latencies: list[float] = []
            if auto:
                current = busy[0]
                for i in range(rounds):
                    nxt = running[(running.index(current) + 1) % len(running)]
                    _alloc(cluster, node, ns, current, log=logs[current], line="mem-free")
                    took = _alloc(
                        cluster, node, ns, nxt, log=logs[nxt], line=f"mem-alloc {ALLOC_MIB}"
                    )
                    _say(f"reclaim round {i + 1}: {nxt} granted {ALLOC_MIB} MiB in {took}s")
                    latencies.append(took)
                    current = nxt
            out["reclaim_s"] = latencies
            out["oom_lines"] = sum(len(guestmem.oom_lines(logs[n])) for n in running)
            out["lowest_actual_mib"] = min(sampler.lowest().values())
        finally:
            sampler.stop()
    out["mix_ok"] = bool(out["oom_lines"] == 0 and out["under_cap"])
    out["guests_per_gib"] = out["running"] / (CAP_MIB / 1024) if out["mix_ok"] else 0.0
    return out


def run(cp: Any, image: GuestImage, rounds: int) -> dict[str, Any]:
    workdir = common.workdir("balloon")
    nodes = netns.NodeSet(count=1)
    cluster = None
    try:
        nodes.start()
        cluster = bc.make_cluster(cp, nodes, image, workdir)
        cluster.start()
        node = sorted(cluster.nodes)[0]
        bc.set_cap(cluster, node, CAP_MIB, RATIO)
        static = run_mode(cluster, node, auto=False, rounds=0)
        auto = run_mode(cluster, node, auto=True, rounds=rounds)
        return {"static": static, "auto": auto}
    except BaseException:
        if cluster is not None:
            print(cluster.logs(40))
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        with contextlib.suppress(Exception):
            nodes.stop()
