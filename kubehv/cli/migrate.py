"""``kubehv migrate NAME [--to NODE] [--mode live|non-live] [--wait]``: create a Migration.

Why a command for one small object: a person wants to see the move happen. With ``--wait`` it
follows the Migration's status (a watch, not polling) and draws a progress bar from
``status.progress.percent`` until a terminal phase; the exit code is 0 only on Succeeded, so
scripts can chain on it. Ctrl-C stops watching, not the migration (it says how to abort).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from kubehv.cli import kube

TERMINAL = ("Succeeded", "Failed", "Aborted")
BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance to migrate")
    parser.add_argument("--to", dest="target", metavar="NODE", help="target node (default: any)")
    parser.add_argument("--mode", choices=["live", "non-live"], default="live")
    parser.add_argument("--wait", action="store_true", help="follow progress until it ends")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for --wait")


def migration_body(args: argparse.Namespace, namespace: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"instance": args.name, "mode": args.mode}
    if args.target:
        spec["targetNode"] = args.target
    return {
        "apiVersion": f"{kube.GROUP}/{kube.VERSION}",
        "kind": "Migration",
        "metadata": {"generateName": f"{args.name[:50]}-", "namespace": namespace},
        "spec": spec,
    }


def progress_line(mig: dict[str, Any]) -> str:
    status = kube.status_of(mig)
    phase = str(status.get("phase") or "Pending")
    progress = status.get("progress") or {}
    percent = progress.get("percent")
    pct = max(0, min(100, int(percent))) if isinstance(percent, int | float) else 0
    if phase == "Succeeded":
        pct = 100
    filled = pct * BAR_WIDTH // 100
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    target = status.get("targetNode") or (mig.get("spec") or {}).get("targetNode") or "?"
    return f"[{bar}] {pct:3d}%  {phase:<11} -> {target}"


def instance_moved(mig: dict[str, Any]) -> bool:
    """The controller's InstanceMoved condition: the VirtualInstance's nodeName is the target."""
    conds = kube.status_of(mig).get("conditions") or []
    return any(c.get("type") == "InstanceMoved" and c.get("status") == "True" for c in conds)


def follow(k: kube.Kube, name: str, namespace: str, timeout_s: int, out: TextIO) -> str:
    """Draw progress until a terminal phase; returns the phase ("" if it never ended)."""
    tty = out.isatty()
    last = ""
    phase = ""
    for mig in k.watch_migration(name, namespace, timeout_s):
        if mig.get("_deleted"):
            out.write("\nthe Migration was deleted\n")
            return "Deleted"
        line = progress_line(mig)
        phase = str(kube.status_of(mig).get("phase") or "")
        if line != last:
            out.write(("\r" + line) if tty else (line + "\n"))
            out.flush()
            last = line
        if phase == "Succeeded" and not instance_moved(mig):
            continue  # the controller points the VirtualInstance at the target right after
        if phase in TERMINAL:
            if tty:
                out.write("\n")
            reason = kube.status_of(mig).get("failureReason")
            if phase != "Succeeded" and reason:
                out.write(f"reason: {reason}\n")
            return phase
    return phase if phase in TERMINAL else ""


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            namespace = k.namespace
            k.get_vi(args.name, namespace)  # a clear error before creating anything
            created = k.custom.create_namespaced_custom_object(
                kube.GROUP, kube.VERSION, namespace, kube.MIGRATION, migration_body(args, namespace)
            )
            name = created["metadata"]["name"]
            print(f"migration.kubehv.io/{name} created")
            if not args.wait:
                return 0
            try:
                phase = follow(k, name, namespace, args.timeout, sys.stdout)
            except KeyboardInterrupt:
                print(
                    f"\nstopped watching; the migration goes on. Abort it with:\n"
                    f"  kubectl annotate -n {namespace} migration {name} kubehv.io/abort=true"
                )
                return 130
    except kube.ApiException as exc:
        if exc.status == 404:
            return kube.fail(
                f"no VirtualInstance {args.name} in namespace {args.namespace or 'default'}"
            )
        return kube.fail(kube.api_error(exc))
    if not phase:
        return kube.fail(f"migration {name} did not finish within {args.timeout}s")
    return 0 if phase == "Succeeded" else 1
