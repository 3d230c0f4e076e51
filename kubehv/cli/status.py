"""``kubehv status``: one readable table of nodes and one of instances.

Why: ``kubectl get nhv,vi`` shows each kind alone; a person deciding where to move VMs wants
the nodes (ready, draining, room, heartbeat) next to what runs on them. Read-only.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from kubehv.cli import kube


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument(
        "-A", "--all-namespaces", action="store_true", help="instances of every namespace"
    )


def _age(timestamp: str | None, now: datetime.datetime) -> str:
    if not timestamp:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value not in (None, ""):
            return value
    return None


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value}Mi" if isinstance(value, int) else str(value)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def node_rows(
    nodes: list[dict[str, Any]], counts: dict[str, int], now: datetime.datetime
) -> list[list[str]]:
    rows = [["NODE", "HYPERVISOR", "READY", "DRAIN", "INSTANCES", "MEM FREE", "HEARTBEAT"]]
    for nhv in sorted(nodes, key=lambda o: o["metadata"]["name"]):
        name = nhv["metadata"]["name"]
        spec = nhv.get("spec") or {}
        status = kube.status_of(nhv)
        ready = kube.condition(nhv, "Ready")
        node_info = status.get("nodeInfo") or {}
        rows.append(
            [
                name,
                str(_first(spec, "hypervisor") or _first(status, "hypervisor") or "-"),
                str((ready or {}).get("status", "Unknown")),
                "yes" if spec.get("drain") else "no",
                str(counts.get(name, 0)),
                _mib(_first(node_info, "memoryFreeMiB", "memoryFreeMib", "memoryFree")),
                _age(_first(status, "heartbeatTime", "lastHeartbeatTime", "heartbeat"), now),
            ]
        )
    return rows


def instance_rows(instances: list[dict[str, Any]], now: datetime.datetime) -> list[list[str]]:
    rows = [["NAMESPACE", "INSTANCE", "PHASE", "NODE", "MEMORY", "VCPUS", "AGE"]]
    for vi in sorted(
        instances, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
    ):
        spec = vi.get("spec") or {}
        status = kube.status_of(vi)
        memory = spec.get("memory")
        if isinstance(memory, dict):
            memory = memory.get("max") or memory.get("min")
        rows.append(
            [
                vi["metadata"].get("namespace", ""),
                vi["metadata"]["name"],
                str(status.get("phase") or "Pending"),
                str(status.get("nodeName") or "-"),
                str(memory or "-"),
                str(spec.get("vcpus") or "-"),
                _age(vi["metadata"].get("creationTimestamp"), now),
            ]
        )
    return rows


def run(args: argparse.Namespace) -> int:
    now = datetime.datetime.now(datetime.UTC)
    try:
        with kube.Kube(args) as k:
            nodes = k.list_nhvs()
            everywhere = k.list_vis()
            shown = everywhere if args.all_namespaces else k.list_vis(k.namespace)
    except kube.ApiException as exc:
        return kube.fail(kube.api_error(exc))
    counts: dict[str, int] = {}
    for vi in everywhere:
        node = kube.status_of(vi).get("nodeName")
        if node:
            counts[node] = counts.get(node, 0) + 1
    if nodes:
        print(table(node_rows(nodes, counts, now)))
    else:
        print("no NodeHypervisors: is a kubehv agent running on any node?")
    print()
    if shown:
        print(table(instance_rows(shown, now)))
    else:
        where = "any namespace" if args.all_namespaces else f"namespace {k.namespace}"
        print(f"no VirtualInstances in {where}")
    return 0
