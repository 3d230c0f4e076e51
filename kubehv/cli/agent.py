"""``kubehv agent``: run the node agent for one node (a DaemonSet pod, or a test process).

Why this module exists: it turns flags and environment (``NODE_NAME`` and ``HOST_IP`` from the
downward API) into :class:`kubehv.operator.settings.AgentSettings` and hands over to the
operator.

Two libvirt URIs, not one: the agent drives its own node's libvirtd through the local socket
(``--connection-uri``, e.g. ``qemu:///system``), but other nodes' libvirtd must reach this one
over the network for a peer-to-peer migration — so the agent *advertises* a different URI in
its NodeHypervisor's ``spec.connectionURI``: ``--advertise-uri``, by default the local URI
with the node's address (``status.hostIP``) and the ``--peer-transport`` (``tls``:
``qemu+tls://<hostIP>/system``). The migration data stream goes to ``--migration-address``,
by default the node's address too. A local URI advertised as-is would make every source
"migrate to itself".
"""

from __future__ import annotations

import argparse
import os
import urllib.parse

from kubehv.cli import logsetup
from kubehv.operator import agent, instance_logic, k8s, settings


def _param(text: str) -> tuple[str, str | int | float | bool]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: str | int | float | bool = raw
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def advertised_uri(local: str | None, host: str | None, transport: str) -> str | None:
    """The URI other nodes use: ``local`` if it already names a host, else ``local`` with
    ``host`` and ``transport`` (``qemu:///system`` -> ``qemu+tls://10.0.0.5/system``);
    ``None`` when there is nothing to derive from (the driver needs no peer URI then)."""
    if not local:
        return None
    parts = urllib.parse.urlsplit(local)
    if parts.hostname or not host or parts.scheme in ("", "fake", "test"):
        return local
    driver = parts.scheme.split("+", 1)[0]
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit(
        (f"{driver}+{transport}", netloc, parts.path or "/system", parts.query, "")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--node-name", default=env("NODE_NAME"), help="this node (or NODE_NAME)")
    parser.add_argument("--hypervisor", default=env("KUBEHV_HYPERVISOR", "kvm"))
    parser.add_argument("--connection-uri", default=env("KUBEHV_CONNECTION_URI"))
    parser.add_argument("--state-dir", default=env("KUBEHV_STATE_DIR", "/var/lib/kubehv"))
    parser.add_argument(
        "--host-ip",
        default=env("HOST_IP"),
        help="this node's address (or HOST_IP, from the downward API's status.hostIP)",
    )
    parser.add_argument(
        "--advertise-uri",
        default=env("KUBEHV_ADVERTISE_URI"),
        help="libvirt URI other nodes use to reach this node's hypervisor (default: the "
        "connection URI with --host-ip and --peer-transport)",
    )
    parser.add_argument(
        "--peer-transport",
        choices=["tls", "tcp", "ssh"],
        default=env("KUBEHV_PEER_TRANSPORT", "tls"),
        help="libvirt transport of the advertised URI (tls: docs/operations.md)",
    )
    parser.add_argument(
        "--migration-address",
        default=env("KUBEHV_MIGRATION_ADDRESS"),
        help="address migrations are sent to (default: --host-ip)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--resync-interval", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument(
        "--balloon-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the auto-balloon policy runs (0: never)",
    )
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument(
        "--driver-param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="driver node parameter (e.g. memory_total_mib=4096 for the fake driver)",
    )
    defaults = settings.SecretSettings()
    parser.add_argument(
        "--secrets",
        choices=["api", "controller"],
        default=env("KUBEHV_SECRETS", defaults.source),
        help="where instances' Secret keys (VNC password, cloud-init user data) come from: "
        "'controller' (the shipped DaemonSet: the controller hands over only the keys of this "
        "node's instances) or 'api' (this agent's own credentials; a process with an admin "
        "kubeconfig). Never one falling back on the other",
    )
    for flag, default, text in (
        ("url", defaults.url, "the controller's hand-over endpoint (--secrets=controller)"),
        ("server-name", defaults.server_name, "the name the controller's certificate must "
         "carry (default: the URL's host)"),
        ("token-file", defaults.token_file, "the pod's projected token for the hand-over"),
        ("ca-from", defaults.ca_from, "the ValidatingWebhookConfiguration whose caBundle "
         "verifies the controller"),
    ):  # fmt: skip
        variable = "KUBEHV_SECRETS_" + flag.upper().replace("-", "_")
        parser.add_argument(f"--secrets-{flag}", default=env(variable, default), help=text)
    parser.add_argument("--restart-backoff", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--crash-limit", type=int, default=5)
    parser.add_argument("--crash-window", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument("--stop-timeout", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--slow-call",
        type=float,
        default=k8s.SLOW_CALL_S,
        metavar="SECONDS",
        help="a hypervisor or API call still running after this long is logged with its "
        "stack (and a start shows HypervisorNotResponding in Ready)",
    )
    logsetup.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logsetup.setup(args)
    if not args.node_name:
        raise SystemExit("kubehv agent: --node-name or NODE_NAME is required")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf logs in through the same file
    k8s.SLOW_CALL_S = args.slow_call
    cfg = settings.AgentSettings(
        node_name=args.node_name,
        hypervisor=args.hypervisor,
        connection_uri=args.connection_uri,
        state_dir=args.state_dir,
        advertise_uri=args.advertise_uri
        or advertised_uri(args.connection_uri, args.host_ip, args.peer_transport),
        migration_address=args.migration_address or args.host_ip,
        heartbeat_interval_s=args.heartbeat_interval,
        resync_interval_s=args.resync_interval,
        balloon_interval_s=args.balloon_interval,
        metrics_port=args.metrics_port,
        kubeconfig=args.kubeconfig,
        driver_params=dict(args.driver_param),
        secrets=settings.SecretSettings(
            source=args.secrets,
            url=args.secrets_url,
            server_name=args.secrets_server_name,
            token_file=args.secrets_token_file,
            ca_from=args.secrets_ca_from,
        ),
        policy=instance_logic.Policy(
            backoff_base_s=args.restart_backoff,
            crash_limit=args.crash_limit,
            crash_window_s=args.crash_window,
            stop_timeout_s=args.stop_timeout,
        ),
    )
    return agent.run(cfg)
