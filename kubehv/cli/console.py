"""``kubehv console NAME``: attach to an instance's serial console, wherever you run it.

Why this path: the console lives on the node that runs the instance, so the command follows
``VirtualInstance.status.nodeName`` to that node's NodeHypervisor, whose
``spec.connectionURI`` says how its hypervisor is reached, and attaches to the hypervisor's
name of the instance (``<namespace>.<name>``, the name the agent gives the domain). Three
ways, picked by ``--via`` (default ``auto``):

- ``direct``: ``virsh -c URI console DOMAIN`` from here. Right when the URI names a host
  (``qemu+tcp://node/system``, ``qemu+tls://...``) or when this machine *is* the node (a
  local URI such as ``qemu:///system``, and ``NODE_NAME`` or the hostname equal to the node);
- ``pod``: ``kubectl exec -it`` into the kubehv agent pod on that node (it mounts the node's
  libvirt socket) running the same ``virsh`` there. Right from a workstation when the URI is
  local to the node: a local URI here would reach the workstation's own libvirtd;
- ``auto``: ``direct`` when it can work, else ``pod``.

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


def choose_via(via: str, uri: str, node: str) -> str:
    if via != "auto":
        return via
    return "direct" if uri_host(uri) or on_node(node) else "pod"


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


def in_agent_pod(args: argparse.Namespace, pod: str, command: list[str], tty: bool) -> list[str]:
    """``kubectl exec`` of ``command`` in the agent pod, with this command's kubeconfig."""
    argv = [os.environ.get("KUBECTL", "kubectl")]
    if getattr(args, "kubeconfig", None):
        argv.append(f"--kubeconfig={args.kubeconfig}")
    if getattr(args, "context", None):
        argv.append(f"--context={args.context}")
    argv += ["exec", "-it" if tty else "-i", "-n", args.agent_namespace, pod]
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
    virsh = ["virsh", "-c", uri, "console", domain_name(vi)]
    if choose_via(args.via, uri, node) == "direct":
        return virsh, ""
    pod = agent_pod(k, node, args.agent_namespace, args.agent_selector)
    return in_agent_pod(args, pod, virsh, tty=True), ""


def run(args: argparse.Namespace) -> int:
    try:
        with kube.Kube(args) as k:
            argv, message = console_argv(args, k)
    except kube.ApiException as exc:
        if exc.status == 404:
            return kube.fail(f"not found: {kube.api_error(exc)}")
        return kube.fail(kube.api_error(exc))
    except (LookupError, kube.BadObject) as exc:
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
