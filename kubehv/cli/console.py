"""``kubehv console NAME``: attach to an instance's serial console through its node.

Why this path: the console lives on the node that runs the instance, so the command follows
``VirtualInstance.status.nodeName`` to that node's NodeHypervisor, whose
``spec.connectionURI`` says how to reach its hypervisor, and asks the node's driver for the
console (Ganeti's GetInstanceConsole). For libvirt that is ``virsh -c URI console DOMAIN``,
exec'd so the terminal belongs to virsh (Ctrl-] leaves). A fake node has no console: the
driver's message is printed. No password is ever printed: a VNC console's password stays in
its Secret.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from kubehv.cli import kube

FAKE_URI_PREFIX = "fake://"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance")
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the command, do not run it"
    )


def domain_name(vi: dict[str, Any]) -> str:
    """The hypervisor-level name: the agent's own record if it published one, else the name."""
    status = kube.status_of(vi)
    return str(status.get("domainName") or status.get("domain") or vi["metadata"]["name"])


def console_command(vi: dict[str, Any], nhv: dict[str, Any]) -> tuple[list[str], str]:
    """(argv to exec, message): one of the two is empty."""
    spec = nhv.get("spec") or {}
    uri = str(spec.get("connectionURI") or "")
    hypervisor = str(spec.get("hypervisor") or kube.status_of(nhv).get("hypervisor") or "")
    node = nhv["metadata"]["name"]
    name = domain_name(vi)
    if hypervisor == "fake" or uri.startswith(FAKE_URI_PREFIX):
        return [], (
            f"{name} is a fake instance on node {node}: it has no console"
            + (f"; its node's state is under {uri.removeprefix(FAKE_URI_PREFIX)}" if uri else "")
        )
    if not uri:
        raise LookupError(f"NodeHypervisor {node} has no spec.connectionURI: cannot reach it")
    return ["virsh", "-c", uri, "console", name], ""


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            vi = k.get_vi(args.name)
            node = kube.status_of(vi).get("nodeName")
            if not node:
                return kube.fail(f"{args.name} is not placed on a node yet (no status.nodeName)")
            nhv = k.get_nhv(str(node))
    except kube.ApiException as exc:
        if exc.status == 404:
            return kube.fail(f"not found: {kube.api_error(exc)}")
        return kube.fail(kube.api_error(exc))
    try:
        argv, message = console_command(vi, nhv)
    except LookupError as exc:
        return kube.fail(str(exc))
    if message:
        print(message)
        return 0
    if args.print_only:
        print(" ".join(argv))
        return 0
    virsh = shutil.which(argv[0])
    if virsh is None:
        return kube.fail(f"virsh not found; run it yourself: {' '.join(argv)}")
    print(f"connecting to {argv[-1]} on {node} (escape with Ctrl-])", flush=True)
    os.execv(virsh, argv)  # noqa: S606 - argv is a fixed command plus the node's URI
