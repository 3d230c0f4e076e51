"""``kubehv migrate NAME [--to NODE] [--mode live|non-live] [--wait]``: create a Migration.

Why a command for one small object: a person wants to see the move happen. With ``--wait`` it
follows the Migration's status (a watch, not polling) and draws a progress bar from
``status.progress.percent`` until a terminal phase; the exit code is 0 only on Succeeded, so
scripts can chain on it. Ctrl-C stops watching, not the migration (it says how to abort).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from kubehv import api
from kubehv.api import constants, migration
from kubehv.api import metadata as meta
from kubehv.cli import kube

BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance to migrate")
    parser.add_argument("--to", dest="target", metavar="NODE", help="target node (default: any)")
    parser.add_argument("--mode", choices=["live", "non-live"], default="live")
    parser.add_argument("--wait", action="store_true", help="follow progress until it ends")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for --wait")


def migration_body(args: argparse.Namespace, namespace: str) -> api.Migration:
    return api.Migration(
        metadata=meta.ObjectMeta(generate_name=f"{args.name[:50]}-", namespace=namespace),
        spec=api.MigrationSpec(
            instance=args.name, mode=migration.Mode(args.mode), target_node=args.target
        ),
    )


def progress_line(mig: api.Migration) -> str:
    phase = mig.status.phase or migration.Phase.PENDING
    percent = mig.status.progress.percent if mig.status.progress else None
    pct = max(0, min(100, percent)) if percent is not None else 0
    if phase == migration.Phase.SUCCEEDED:
        pct = 100
    filled = pct * BAR_WIDTH // 100
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    target = mig.status.target_node or mig.spec.target_node or "?"
    return f"[{bar}] {pct:3d}%  {phase:<11} -> {target}"


def instance_moved(mig: api.Migration) -> bool:
    """The controller's InstanceMoved condition: the VirtualInstance's nodeName is the target."""
    return api.conditions.is_true(mig.status.conditions, "InstanceMoved")


def follow(k: kube.Kube, name: str, namespace: str, timeout_s: int, out: TextIO) -> str:
    """Draw progress until a terminal phase; returns the phase ("" if it never ended)."""
    tty = out.isatty()
    last = ""
    phase: migration.Phase | None = None
    for mig in k.watch_migration(name, namespace, timeout_s):
        if mig is None:
            out.write("\nthe Migration was deleted\n")
            return "Deleted"
        line = progress_line(mig)
        phase = mig.status.phase
        if line != last:
            out.write(("\r" + line) if tty else (line + "\n"))
            out.flush()
            last = line
        if phase == migration.Phase.SUCCEEDED and not instance_moved(mig):
            continue  # the controller points the VirtualInstance at the target right after
        if phase in migration.TERMINAL_PHASES:
            if tty:
                out.write("\n")
            reason = mig.status.failure_reason
            if phase != migration.Phase.SUCCEEDED and reason:
                out.write(f"reason: {reason}\n")
            return str(phase)
    return str(phase) if phase in migration.TERMINAL_PHASES else ""


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            namespace = k.namespace
            k.get_vi(args.name, namespace)  # a clear error before creating anything
            created = k.create_migration(migration_body(args, namespace))
            name = created.metadata.name
            print(f"migration.kubehv.io/{name} created")
            if not args.wait or name is None:
                return 0
            try:
                phase = follow(k, name, namespace, args.timeout, sys.stdout)
            except KeyboardInterrupt:
                abort = f"{constants.ABORT_ANNOTATION}=true"
                print(
                    f"\nstopped watching; the migration goes on. Abort it with:\n"
                    f"  kubectl annotate -n {namespace} migration {name} {abort}"
                )
                return 130
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc, f"no VirtualInstance {args.name} in namespace {k.namespace}")
    if not phase:
        return kube.fail(f"migration {name} did not finish within {args.timeout}s")
    return 0 if phase == "Succeeded" else 1
