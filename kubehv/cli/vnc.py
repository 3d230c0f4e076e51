"""``kubehv vnc NAME``: where an instance's VNC console listens, and how to reach it.

Why: the agent publishes the endpoint QEMU really listens on (``status.console``, e.g.
``vnc://127.0.0.1:5901``) on the node that runs the instance. From the node (or when the
endpoint is on a routable address) a VNC viewer connects to it directly; from a workstation
a loopback endpoint is reached by forwarding the port through the node (the command is
printed). The password is never printed: it stays in the Secret that
``spec.console.vnc.passwordSecretRef`` names, and the command says which one.
"""

from __future__ import annotations

import argparse
import ipaddress
import urllib.parse

from kubehv.cli import console, kube

VNC_SCHEME = "vnc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance")


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def describe(name: str, node: str, endpoint: str, secret: str | None) -> list[str]:
    """Lines for a person: the endpoint, how to reach it from here, where the password is."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port
    lines = [f"{name}: {endpoint} on node {node}"]
    if port is None:
        return lines
    if loopback(host) and not console.on_node(node):
        lines.append(
            f"it listens on the node's loopback; forward it, then point a viewer at "
            f"localhost:{port}:\n  ssh -N -L {port}:{host}:{port} {node}"
        )
    else:
        lines.append(f"point a VNC viewer at {host}:{port}")
    if secret:
        lines.append(f"password: in Secret {secret} (not shown)")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            vi = k.get_vi(args.name)
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc)
    vnc = vi.spec.console.vnc
    if not vnc.enabled:
        return kube.fail(f"{args.name} has no VNC console (spec.console.vnc.enabled is false)")
    node, endpoint = vi.status.node_name, vi.status.console or ""
    if not node or urllib.parse.urlsplit(endpoint).scheme != VNC_SCHEME:
        return kube.fail(
            f"{args.name} has no VNC endpoint yet (phase {vi.status.phase or 'Pending'}): "
            "the node agent publishes it in status.console once the guest runs"
        )
    ref = vnc.password_secret_ref
    secret = f"{vi.metadata.namespace}/{ref.name} key {ref.key}" if ref else None
    print("\n".join(describe(args.name, node, endpoint, secret)))
    return 0
