"""``kubehv status``: one readable table of nodes and one of instances.

Why: ``kubectl get nhv,vi`` shows each kind alone; a person deciding where to move VMs wants
the nodes (ready, draining, room, heartbeat) next to what runs on them. Read-only. Every
column comes from a field of the :mod:`kubehv.api` models (MEM FREE is the agent's
``status.memoryFree``, HEARTBEAT the age of its ``status.lastHeartbeat``).
"""

from __future__ import annotations

import argparse
import datetime

from kubehv import api
from kubehv.api import constants
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


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value}Mi"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def node_rows(
    nodes: list[api.NodeHypervisor], counts: dict[str, int], now: datetime.datetime
) -> list[list[str]]:
    rows = [["NODE", "HYPERVISOR", "READY", "DRAIN", "INSTANCES", "MEM FREE", "HEARTBEAT"]]
    for nhv in sorted(nodes, key=lambda o: o.metadata.name or ""):
        name = nhv.metadata.name or nhv.spec.node_name
        ready = kube.condition(nhv.status.conditions, constants.COND_READY)
        rows.append(
            [
                name,
                nhv.spec.hypervisor,
                str(ready.status) if ready else "Unknown",
                "yes" if nhv.spec.drain else "no",
                str(counts.get(name, 0)),
                _mib(nhv.status.memory_free),
                _age(nhv.status.last_heartbeat, now),
            ]
        )
    return rows


def instance_rows(instances: list[api.VirtualInstance], now: datetime.datetime) -> list[list[str]]:
    rows = [["NAMESPACE", "INSTANCE", "PHASE", "NODE", "MEMORY", "VCPUS", "AGE"]]
    for vi in sorted(instances, key=lambda o: (o.metadata.namespace or "", o.metadata.name or "")):
        rows.append(
            [
                vi.metadata.namespace or "",
                vi.metadata.name or "",
                str(vi.status.phase or "Pending"),
                vi.status.node_name or "-",
                str(vi.status.actual_memory or vi.spec.memory.max),
                str(vi.status.vcpus or vi.spec.vcpus),
                _age(vi.metadata.creation_timestamp, now),
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
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc)
    counts: dict[str, int] = {}
    for vi in everywhere:
        node = vi.status.node_name
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
