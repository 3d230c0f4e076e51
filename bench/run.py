"""``python -m bench.run``: every figure of issue 6 in one run, each next to its floor.

Why one process owns everything: the control plane, libvirtd, the two netns libvirt nodes
and every kubehv process are started here and stopped in ``finally`` blocks, so a bench run
leaves nothing behind. ``--quick`` shrinks every N for a smoke run; ``--only`` picks figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench import balloon, cloud, common, kvm, rss, scale
from kubehv.devenv import cloudimage, controlplane, guest, libvirtd, netns
from tests.fixtures import kube as kubefix

RESULTS = Path(__file__).resolve().parent / "results.json"
SECTIONS = ("start", "migration", "scale", "rss", "balloon", "cloud")
TARGETS: dict[str, tuple[str, float]] = {
    "start_overhead_p50_s": ("<=", 0.5),
    "migration_ratio": ("<=", 1.2),
    "scale_p95_s": ("<=", 3.0),
    "scale_ratio": ("<=", 2.0),
    "api_writes_per_instance": ("<=", 3.0),
    "agent_rss_mb_1000": ("<=", 100.0),
    "balloon_density_ratio": (">=", 1.5),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small N everywhere (a smoke run)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only these (repeat)")
    p.add_argument("--start-runs", type=int, default=None)
    p.add_argument("--migration-runs", type=int, default=None)
    p.add_argument("--scale-n", type=int, default=None)
    p.add_argument("--rss-n", type=int, default=None)
    p.add_argument("--balloon-rounds", type=int, default=None)
    p.add_argument("--cloud-runs", type=int, default=None)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' log folder")
    args = p.parse_args(argv)
    q = args.quick
    args.start_runs = args.start_runs or (2 if q else 10)
    args.migration_runs = args.migration_runs or (1 if q else 5)
    args.scale_n = args.scale_n or (30 if q else 300)
    args.rss_n = args.rss_n or (100 if q else 1000)
    args.balloon_rounds = args.balloon_rounds or (3 if q else 10)
    args.cloud_runs = args.cloud_runs or (1 if q else 3)
    return args


def say(msg: str) -> None:
    print(f"bench [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


def r(x: float, nd: int = 3) -> float:
    return round(x, nd) if not math.isnan(x) else x


def bench_start(cp: Any, image: guest.GuestImage, runs: int, res: dict[str, Any]) -> None:
    daemon = libvirtd.LocalLibvirtd()
    daemon.ensure()
    try:
        out = kvm.run_start(cp, image, runs)
    finally:
        daemon.stop()
    op, direct = out["op"], out["direct"]
    overhead = [a - b for a, b in zip(sorted(op), sorted(direct), strict=True)]
    res["start_overhead_p50_s"] = r(common.median(op) - common.median(direct))
    res["start_overhead_p95_s"] = r(common.pct(op, 95) - common.pct(direct, 95))
    res["start"] = {
        "runs": runs,
        "operator_apply_to_running_p50_s": r(common.median(op)),
        "operator_apply_to_running_p95_s": r(common.pct(op, 95)),
        "operator_apply_to_placed_p50_s": r(common.median(out["op_placed"])),
        "direct_start_p50_s": r(common.median(direct)),
        "direct_start_p95_s": r(common.pct(direct, 95)),
        "operator_apply_to_boot_marker_p50_s": r(common.median(out["op_boot"])),
        "direct_start_to_boot_marker_p50_s": r(common.median(out["direct_boot"])),
        "sorted_pairwise_overhead_s": [r(x) for x in overhead],
        "raw": {k: [r(x) for x in v] for k, v in out.items()},
    }


def bench_migration(cp: Any, image: guest.GuestImage, runs: int, res: dict[str, Any]) -> None:
    nodes = netns.NodeSet(count=2)
    try:
        nodes.start()
        out = kvm.run_migration(cp, image, nodes, runs)
    finally:
        nodes.stop()
    op, direct = common.median(out["op"]), common.median(out["direct"])
    res["migration_ratio"] = r(op / direct)
    res["migration"] = {
        "runs": runs,
        "operator_apply_to_succeeded_median_s": r(op),
        "direct_protocol_median_s": r(direct),
        "direct_migrate_call_median_s": r(common.median(out["direct_migrate_call"])),
        "failed": out["failed"],
        "raw": {k: [r(x) for x in v] for k, v in out.items() if k != "failed"},
    }


def bench_scale(cp: Any, n: int, res: dict[str, Any]) -> None:
    timeout = 120 + n * 0.5
    op = scale.run_operator(cp, n, 0.1, timeout)
    say(f"scale: operator done in {op['total_s']:.1f}s; now the bare-client floor")
    floor = scale.run_floor(cp, n, 0.1, timeout)
    per = scale.per_instance_writes(op["writes"], n)
    res["scale_p50_s"] = r(common.median(op["latencies"]))
    res["scale_p95_s"] = r(common.pct(op["latencies"], 95))
    res["scale_ratio"] = r(op["total_s"] / floor["total_s"])
    res["api_writes_per_instance"] = r(per["vi"], 2)
    res["scale"] = {
        "instances": n,
        "create_interval_s": 0.1,
        "operator_total_s": r(op["total_s"]),
        "floor_total_s": r(floor["total_s"]),
        "floor_p50_s": r(common.median(floor["latencies"])),
        "floor_p95_s": r(common.pct(floor["latencies"], 95)),
        "operator_max_s": r(max(op["latencies"])),
        "writes_per_instance_incl_events": r(per["with_events"], 2),
        "events_per_instance": r(per["events"], 2),
        "write_deltas_create_to_last_running": op["writes"],
        "writes_method": (
            "apiserver_request_total deltas (POST/PUT/PATCH, all codes) from just before the "
            f"first create to the last Running; virtualinstances* minus the bench's own {n} "
            "creates, divided by N. Events are counted apart; per-node writes "
            "(nodehypervisors, leases) are not per instance and are listed in the deltas only."
        ),
    }


def bench_rss(cp: Any, n: int, res: dict[str, Any]) -> None:
    out = rss.run(cp, n, timeout=120 + n * 0.5)
    res["agent_rss_mb_1000"] = r(out["rss_mb"], 1)
    res["agent_1000_running_s"] = r(out["all_running_s"], 1)
    res["rss"] = {
        "instances": n,
        **{k: (r(v, 1) if isinstance(v, float) else v) for k, v in out.items()},
    }


def bench_balloon(cp: Any, image: guest.GuestImage, rounds: int, res: dict[str, Any]) -> None:
    out = balloon.run(cp, image, rounds)
    static, auto = out["static"], out["auto"]
    ratio = auto["guests_per_gib"] / static["guests_per_gib"] if static["guests_per_gib"] else 0
    res["balloon_density_ratio"] = r(ratio, 2)
    res["balloon_reclaim_p50_s"] = r(common.median(auto["reclaim_s"]), 2)
    res["balloon_reclaim_p95_s"] = r(common.pct(auto["reclaim_s"], 95), 2)
    res["balloon"] = {
        "cap_mib": balloon.CAP_MIB,
        "guest_memory_min_max_mib": [balloon.MIN_MIB, balloon.MAX_MIB],
        "alloc_mib": balloon.ALLOC_MIB,
        "guests_per_gib_static": r(static["guests_per_gib"], 2),
        "guests_per_gib_auto": r(auto["guests_per_gib"], 2),
        "static": static,
        "auto": auto,
        "method": balloon.__doc__,
    }


def bench_cloud(cp: Any, image: guest.GuestImage, runs: int, res: dict[str, Any]) -> None:
    cloud_image = cloudimage.ensure_cloud_image()
    nodes = netns.NodeSet(count=2)
    try:
        nodes.start()
        out = cloud.run(cp, image, cloud_image, nodes, runs)
    finally:
        nodes.stop()
    op, direct = common.median(out["op_ssh"]), common.median(out["direct_ssh"])
    res["cloud_ssh_ready_ratio"] = r(op / direct)
    # Against the raw libvirt storage copy (migrateToURI3 + NON_SHARED_INC, nothing else).
    res["storage_migration_ratio"] = r(out["op_migration"] / out["direct_migrate_call"])
    res["storage_migration_vs_driver_protocol_ratio"] = r(
        out["op_migration"] / out["direct_migration"]
    )
    res["cloud"] = {
        "runs": runs,
        "image_bytes": cloud_image.size_bytes,
        "image_cold_build_s": cloud_image.build_seconds,
        "operator_apply_to_ssh_p50_s": r(op),
        "direct_start_to_ssh_p50_s": r(direct),
        "operator_apply_to_address_p50_s": r(common.median(out["op_ip"])),
        "direct_start_to_address_p50_s": r(common.median(out["direct_ip"])),
        "operator_storage_migration_s": r(out["op_migration"]),
        "direct_storage_migration_protocol_s": r(out["direct_migration"]),
        "direct_libvirt_migrate_call_s": r(out["direct_migrate_call"]),
        "raw": {k: v if isinstance(v, float) else [r(x) for x in v] for k, v in out.items()},
    }


def table(res: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", "met")]
    for key in (
        "start_overhead_p50_s", "start_overhead_p95_s", "migration_ratio", "scale_p50_s",
        "scale_p95_s", "scale_ratio", "api_writes_per_instance", "agent_rss_mb_1000",
        "agent_1000_running_s",
        "balloon_density_ratio", "balloon_reclaim_p50_s", "balloon_reclaim_p95_s",
        "cloud_ssh_ready_ratio", "storage_migration_ratio",
    ):  # fmt: skip
        if key not in res:
            continue
        value = res[key]
        if key in TARGETS:
            op, limit = TARGETS[key]
            met = "yes" if (value <= limit if op == "<=" else value >= limit) else "NO"
            rows.append((key, str(value), f"{op} {limit}", met))
        else:
            rows.append((key, str(value), "-", "-"))
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    only = set(args.only or SECTIONS)
    res: dict[str, Any] = {"quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t_all = time.monotonic()
    ok = False
    cp = controlplane.ControlPlane().start()
    try:
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(kubefix.CRD_DIR))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        kubefix.wait_discoverable(cp)
        image = guest.ensure_guest() if only & {"start", "migration", "balloon", "cloud"} else None
        for name in SECTIONS:
            if name not in only:
                continue
            say(f"{name}: starting")
            t0 = time.monotonic()
            if name == "start" and image is not None:
                bench_start(cp, image, args.start_runs, res)
            elif name == "migration" and image is not None:
                bench_migration(cp, image, args.migration_runs, res)
            elif name == "scale":
                bench_scale(cp, args.scale_n, res)
            elif name == "rss":
                bench_rss(cp, args.rss_n, res)
            elif name == "balloon" and image is not None:
                bench_balloon(cp, image, args.balloon_rounds, res)
            elif name == "cloud" and image is not None:
                bench_cloud(cp, image, args.cloud_runs, res)
            res.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
        ok = True
    finally:
        cp.stop()
        if ok and not args.keep_logs:
            common.remove_workdirs()
        elif common.root_dir() is not None:
            say(f"logs kept in {common.root_dir()}")
        res["total_seconds"] = round(time.monotonic() - t_all, 1)
        res["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
        args.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
    print(f"(written to {args.output}; {res['total_seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
