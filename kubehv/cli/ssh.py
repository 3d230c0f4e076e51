"""``kubehv ssh NAME``: SSH to an instance at the address its node agent published.

Why this path: the guest's address is in ``status.interfaces`` (from the node's DHCP leases,
qemu-guest-agent or ARP), so the command reads it there and execs ``ssh`` with the user's own
key -- the one cloud-init put into the guest from ``spec.cloudInit.sshAuthorizedKeys``. On the
default node-local NAT network that address is reachable from the node only: pass
``--jump USER@NODE`` (ssh's ProxyJump) from elsewhere, or give the instance a bridge NIC.
"""

from __future__ import annotations

import argparse
import os
import shutil

from kubehv import api
from kubehv.api.virtualinstance import Phase
from kubehv.cli import kube


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance")
    parser.add_argument(
        "-l", "--user", default="debian", help="guest user (default: debian, cloud-init's)"
    )
    parser.add_argument("-i", "--identity", help="private key file (ssh -i)")
    parser.add_argument("-J", "--jump", help="reach the guest through this host (ssh -J)")
    parser.add_argument(
        "--interface", type=int, default=0, help="which guest interface (default: the first)"
    )
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the command, do not run it"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest")


def address(vi: api.VirtualInstance, interface: int = 0) -> str:
    """The first IP address of interface ``interface``; LookupError with the reason if none."""
    name = vi.metadata.name
    status = vi.status
    interfaces = status.interfaces or []
    if status.phase not in (Phase.RUNNING, Phase.PAUSED):
        phase = status.phase.value if status.phase else "unknown"
        raise LookupError(f"{name} is not running (phase {phase})")
    if len(interfaces) <= interface:
        raise LookupError(f"{name} has no network interface {interface} in its status")
    addresses = interfaces[interface].ip_addresses or []
    if not addresses:
        raise LookupError(
            f"{name}'s interface {interfaces[interface].name} has no address yet "
            "(the guest may still be booting; kubectl wait --for=jsonpath="
            "'{.status.interfaces[0].ipAddresses[0]}' waits for it)"
        )
    return str(addresses[0])


def ssh_command(args: argparse.Namespace, ip: str) -> list[str]:
    argv = ["ssh"]
    if args.identity:
        argv += ["-i", args.identity]
    if args.jump:
        argv += ["-J", args.jump]
    argv += [f"{args.user}@{ip}"]
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    return argv + command


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            vi = k.get_vi(args.name)
    except kube.ApiException as exc:
        if exc.status == 404:
            return kube.fail(f"not found: {kube.api_error(exc)}")
        return kube.fail(kube.api_error(exc))
    try:
        ip = address(vi, args.interface)
    except LookupError as exc:
        return kube.fail(str(exc))
    argv = ssh_command(args, ip)
    if args.print_only:
        print(" ".join(argv))
        return 0
    ssh = shutil.which("ssh")
    if ssh is None:
        return kube.fail(f"ssh not found; run it yourself: {' '.join(argv)}")
    os.execv(ssh, argv)  # noqa: S606 - ssh with the user's arguments and the guest's address
