"""``kubehv controller``: run the cluster controller (a Deployment, or a test process).

Why this module exists: flags -> :class:`kubehv.operator.settings.ControllerSettings`, then
the operator. With leader election on (the default), a second replica waits as a standby
that serves its health endpoint (and, in a cluster, the webhook) while it waits.
"""

from __future__ import annotations

import argparse
import os

from kubehv.cli import logsetup
from kubehv.operator import controller, settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--webhook-port", type=int, default=0, help="0: no webhook")
    parser.add_argument("--webhook-host", default="127.0.0.1")
    parser.add_argument("--webhook-name", default="kubehv.io")
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--health-port", type=int, default=0)
    parser.add_argument("--heartbeat-grace", type=float, default=40.0, metavar="SECONDS")
    parser.add_argument("--check-interval", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--no-leader-election", action="store_true")
    parser.add_argument("--lease-name", default="kubehv-controller")
    parser.add_argument("--lease-namespace", default=env("POD_NAMESPACE", "default"))
    parser.add_argument("--identity", default=env("POD_NAME", ""))
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="leader Lease duration; renew deadline and retry period follow client-go's "
        "proportions (15:10:2)",
    )
    parser.add_argument("--max-migrations-per-node", type=int, default=None)
    parser.add_argument("--max-migrations-per-cluster", type=int, default=None)
    logsetup.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logsetup.setup(args)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    cfg = settings.ControllerSettings(
        heartbeat_grace_s=args.heartbeat_grace,
        check_interval_s=args.check_interval,
        webhook_port=args.webhook_port,
        webhook_host=args.webhook_host,
        webhook_name=args.webhook_name,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        kubeconfig=args.kubeconfig,
        leader_election=not args.no_leader_election,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        identity=args.identity,
        lease_duration_s=args.lease_duration,
        max_migrations_per_node=args.max_migrations_per_node,
        max_migrations_per_cluster=args.max_migrations_per_cluster,
    )
    return controller.run(cfg)
