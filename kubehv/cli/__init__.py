"""The ``kubehv`` command (also ``kubectl kubehv``): one subcommand per module, loaded lazily.

Why this module exists: a single entry point for people (console, vnc, migrate, drain, status,
start/stop/restart/pause/unpause), for the processes kubehv runs (agent, controller) and for
generated artefacts (crds), without importing kopf or libvirt for commands that do not need
them. Each subcommand module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import signal
import sys
from collections.abc import Sequence

from kubehv.operator import lean_imports

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("kubehv.cli.agent", "run the node agent for one node"),
    "controller": ("kubehv.cli.controller", "run the cluster controller"),
    "crds": ("kubehv.cli.crds", "print or write the CustomResourceDefinitions"),
    "console": ("kubehv.cli.console", "attach to an instance's serial console"),
    "migrate": ("kubehv.cli.migrate", "migrate an instance to another node"),
    "drain": ("kubehv.cli.drain", "drain a node: move its instances away"),
    "status": ("kubehv.cli.status", "show nodes and instances"),
    "vnc": ("kubehv.cli.vnc", "show where an instance's VNC console listens"),
    "start": ("kubehv.cli.power", "start an instance (spec.runState=Running)"),
    "stop": ("kubehv.cli.power", "stop an instance (spec.runState=Stopped)"),
    "restart": ("kubehv.cli.power", "reboot an instance (bump spec.rebootGeneration)"),
    "pause": ("kubehv.cli.power", "pause an instance (spec.runState=Paused)"),
    "unpause": ("kubehv.cli.power", "resume a paused instance (spec.runState=Running)"),
    "ssh": ("kubehv.cli.ssh", "ssh to an instance at its published address"),
}

LEAN = ("agent", "controller")
"""The long-running processes: they never import the ``kubernetes`` package."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubehv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if a in SUBCOMMANDS), None)
    if chosen in LEAN:
        lean_imports.refuse_kube_client()  # before kopf is imported (agent RSS)
        # `kill -USR1 <pid>` prints every thread's stack to stderr (the pod's log): a hung
        # agent or controller then shows where it waits, without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = build_parser(only=chosen or "__none__")
    args = parser.parse_args(args_list)
    module = importlib.import_module(args._module)
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
