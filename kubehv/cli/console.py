"""``kubehv console NAME``: attach to an instance's serial console, wherever you run it.

Why this path: the console lives on the node that runs the instance, so the command follows
``VirtualInstance.status.nodeName`` to that node's NodeHypervisor, whose
``spec.connectionURI`` says how its hypervisor is reached from other nodes (the agent
advertises e.g. ``qemu+tls://<node address>/system``), and attaches to the hypervisor's name
of the instance (``<namespace>.<name>``, the name the agent gives the domain). Where to run
``virsh``, by ``--via`` (default ``auto``):

- on the node itself (``NODE_NAME`` or the hostname equal to the node): ``virsh`` here, on the
  node's local URI (``qemu:///system``: the advertised one without transport and host);
- ``pod``: ``kubectl exec -it`` into the kubehv agent pod on that node (it mounts the node's
  libvirt socket), ``virsh`` there on the local URI. Needs nothing but ``pods/exec``: no
  libvirt TLS client certificate on the workstation, no route to the node;
- ``direct``: ``virsh`` here on the advertised URI (needs a route to the node and, for
  ``qemu+tls``, a libvirt client certificate);
- ``auto``: on the node, locally; else through the agent pod; else (no agent pod, or no
  right to list pods) directly when the advertised URI names a host.

The command is exec'd so the terminal belongs to virsh (Ctrl-] leaves). A fake node has no
console: the driver's message is printed. No password is ever printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import urllib.parse

from kubehv import api
from kubehv.cli import kube
from kubehv.operator import translate

FAKE_URI_PREFIX = "fake://"
AGENT_NAMESPACE = "kubehv-system"
AGENT_SELECTOR = "app.kubernetes.io/name=kubehv-agent"
AGENT_CONTAINER = "agent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance")
    add_reach_arguments(parser)
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the command, do not run it"
    )


def add_reach_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--via",
        choices=["auto", "direct", "pod"],
        default="auto",
        help="reach the node's hypervisor from here, or through its agent pod",
    )
    parser.add_argument("--agent-namespace", default=AGENT_NAMESPACE)
    parser.add_argument("--agent-selector", default=AGENT_SELECTOR)


def domain_name(vi: api.VirtualInstance) -> str:
    """The hypervisor-level name the agent gives the instance (``<namespace>.<name>``)."""
    return translate.instance_name(vi.to_dict())


def uri_host(uri: str) -> str | None:
    """The host a libvirt URI names; None for a local one (``qemu:///system``)."""
    return urllib.parse.urlsplit(uri).hostname or None


def on_node(node: str) -> bool:
    """Whether this process runs on ``node`` (the agent pod's NODE_NAME, or the hostname)."""
    here = {os.environ.get("NODE_NAME", ""), socket.gethostname(), socket.getfqdn()}
    return node in here


def local_uri(uri: str) -> str:
    """The node-local form of a libvirt URI: ``qemu+tls://10.0.0.5/system`` -> ``qemu:///system``."""
    parts = urllib.parse.urlsplit(uri)
    driver = parts.scheme.split("+", 1)[0]
    return f"{driver}://{parts.path or '/system'}"


def hypervisor_uri(vi: api.VirtualInstance, nhv: api.NodeHypervisor) -> tuple[str, str]:
    """(URI, message): the node's connection URI, or why there is no console to reach."""
    uri = nhv.spec.connection_uri or ""
    node = nhv.spec.node_name
    if nhv.spec.hypervisor == "fake" or uri.startswith(FAKE_URI_PREFIX):
        where = f"; its node's state is under {uri.removeprefix(FAKE_URI_PREFIX)}" if uri else ""
        return "", f"{vi.metadata.name} is a fake instance on node {node}: it has no console{where}"
    if not uri:
        raise LookupError(f"NodeHypervisor {node} has no spec.connectionURI: cannot reach it")
    return uri, ""


def agent_pod(k: kube.Kube, node: str, namespace: str, selector: str) -> str:
    """The running kubehv agent pod on ``node``."""
    pods = k.core.list_namespaced_pod(
        namespace, label_selector=selector, field_selector=f"spec.nodeName={node}"
    ).items
    running = [p for p in pods if p.status is not None and p.status.phase == "Running"]
    if not running:
        raise LookupError(
            f"no running kubehv agent pod on node {node} (namespace {namespace}, "
            f"selector {selector})"
        )
    return str(running[0].metadata.name)


def in_agent_pod(args: argparse.Namespace, pod: str, command: list[str]) -> list[str]:
    """``kubectl exec -it`` of ``command`` in the agent pod, with this command's kubeconfig."""
    argv = [os.environ.get("KUBECTL", "kubectl")]
    if getattr(args, "kubeconfig", None):
        argv.append(f"--kubeconfig={args.kubeconfig}")
    if getattr(args, "context", None):
        argv.append(f"--context={args.context}")
    argv += ["exec", "-it", "-n", args.agent_namespace, pod]
    return [*argv, "-c", AGENT_CONTAINER, "--", *command]


def console_argv(args: argparse.Namespace, k: kube.Kube) -> tuple[list[str], str]:
    """(argv to exec, message): one of the two is empty."""
    vi = k.get_vi(args.name)
    node = vi.status.node_name
    if not node:
        raise LookupError(f"{args.name} is not placed on a node yet (no status.nodeName)")
    uri, message = hypervisor_uri(vi, k.get_nhv(node))
    if message:
        return [], message

    def virsh(at: str) -> list[str]:
        return ["virsh", "-c", at, "console", domain_name(vi)]

    here = on_node(node)
    if args.via == "direct" or (args.via == "auto" and here):
        return virsh(local_uri(uri) if here else uri), ""
    try:
        pod = agent_pod(k, node, args.agent_namespace, args.agent_selector)
    except (LookupError, kube.ApiException) as exc:
        if args.via == "auto" and uri_host(uri):
            return virsh(uri), ""  # no agent pod to go through: the node's address, then
        if isinstance(exc, kube.ApiException):
            raise LookupError(
                f"cannot find the agent pod on {node}: {kube.api_error(exc)}"
            ) from exc
        raise
    return in_agent_pod(args, pod, virsh(local_uri(uri))), ""


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            argv, message = console_argv(args, k)
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc)
    except LookupError as exc:
        return kube.fail(str(exc))
    if message:
        print(message)
        return 0
    if args.print_only:
        print(" ".join(argv))
        return 0
    program = shutil.which(argv[0])
    if program is None:
        return kube.fail(f"{argv[0]} not found; run it yourself: {' '.join(argv)}")
    print(f"connecting to {argv[-1]} (escape with Ctrl-])", flush=True)
    os.execv(program, argv)  # noqa: S606 - argv is a fixed command plus the node's URI
