"""The node agent: one process per node, owning that node's instances.

Why this module exists: it wires the owner (:mod:`owner`) into kopf and runs it. kopf
watches only this node's VirtualInstances (server-side field selector
``status.nodeName=<node>``) and the Migrations that name this node, through event handlers,
so kopf itself writes nothing on the objects (no annotations, no kopf finalizer): the
agent's own finalizer and status patches are the only writes. Events only poke the owner
of an instance; timers: the heartbeat (NodeHypervisor status) and the watcher (drift,
recovery after a restart, drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import registry as driver_registry
from kubehv.drivers import values
from kubehv.operator import (
    balloon_loop,
    context,
    k8s,
    memory_footprint,
    metrics,
    node_status,
    secret_source,
    workloads,
)
from kubehv.operator import owner as owner_mod
from kubehv.operator import settings as opsettings

log = logging.getLogger(__name__)


def build_context(cfg: opsettings.AgentSettings) -> context.AgentContext:
    """Connect to the API, make sure this node's NodeHypervisor exists, create the driver."""
    api_client = k8s.load_api_client(cfg.kubeconfig)
    kube = k8s.Kube(api_client)
    wanted = node_status.nhv_body(
        cfg.node_name, cfg.hypervisor, cfg.advertise_uri or cfg.connection_uri,
        cfg.migration_address,
    )  # fmt: skip
    spec = node_status.ensure_node(kube, wanted).spec
    # The NodeHypervisor's spec wins over flags: it is what the cluster says this node is.
    # With an advertised URI apart, the agent itself keeps its local connection URI.
    cfg.hypervisor = spec.hypervisor or cfg.hypervisor
    if not cfg.advertise_uri:
        cfg.connection_uri = spec.connection_uri or cfg.connection_uri
    cfg.migration_address = spec.migration_address or cfg.migration_address
    driver = driver_registry.create_driver(
        cfg.hypervisor,
        values.DriverConfig(
            node_name=cfg.node_name,
            uri=cfg.connection_uri,
            state_dir=cfg.state_dir,
            params=cfg.driver_params,
        ),
    )
    return context.AgentContext(
        settings=cfg,
        api_client=api_client,
        kube=kube,
        driver=driver,
        secrets=secret_source.from_settings(kube, cfg.secrets),
        node_defaults=dict(spec.default_parameters),
    )


def register(registry: kopf.OperatorRegistry, ctx: context.AgentContext) -> owner_mod.Owner:
    """Wire the owner of this node's instances into kopf: events poke it, timers run."""
    owner = owner_mod.Owner(ctx)
    publisher = node_status.Publisher(ctx, owner.known_instances)
    node = ctx.node_name

    @kopf.on.event(constants.GROUP, constants.PLURAL_VI, registry=registry, id="instance")
    async def on_instance(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        await owner.on_instance_event(event.get("type"), dict(body))

    def involved(status: kopf.Status, **_: Any) -> bool:
        """kopf's filter (before parsing): this node has a role in the Migration."""
        roles = api.MigrationStatus.model_validate(dict(status))
        return node in (roles.source_node, roles.target_node)

    @kopf.on.event(
        constants.GROUP, constants.PLURAL_MIG, registry=registry, when=involved, id="migration"
    )
    async def on_migration(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        await owner.on_migration_event(event.get("type"), dict(body))

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry, id="agent-timers")
    async def start_timers(**_: Any) -> None:
        tasks.append(asyncio.create_task(publisher.run_forever(), name="heartbeat"))
        tasks.append(asyncio.create_task(_watcher(ctx, owner), name="watcher"))
        balloons = balloon_loop.BalloonLoop(ctx, owner)
        tasks.append(asyncio.create_task(balloons.run_forever(), name="balloon"))
        tasks.append(asyncio.create_task(memory_footprint.trim_forever(), name="heap-trim"))
        addresses = workloads.AddressPublisher(
            ctx.kube,
            ctx.driver,
            owner.instances,
            owner.remember_body,
            ctx.settings.resync_interval_s,
        )
        tasks.append(asyncio.create_task(addresses.run_forever(), name="addresses"))

    @kopf.on.cleanup(registry=registry, id="agent-timers-stop")
    async def stop_timers(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await owner.stop()

    @kopf.on.probe(registry=registry, id="node")
    def probe(**_: Any) -> str:
        return ctx.node_name

    return owner


async def _watcher(ctx: context.AgentContext, owner: owner_mod.Owner) -> None:
    """Ganeti's watcher: a returning agent looks at everything first (recovery), then
    compares with the hypervisor every resync interval."""
    while True:
        try:
            await owner.resync()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watcher pass failed; will try again")
        await asyncio.sleep(ctx.settings.resync_interval_s)


def run(cfg: opsettings.AgentSettings) -> int:
    memory_footprint.limit_malloc_arenas()  # before any thread: agent RSS at 1000 instances
    ctx = build_context(cfg)
    metrics.serve(cfg.metrics_port)
    registry = kopf.OperatorRegistry()
    opsettings.register_login(registry, ctx.api_client.creds)
    register(registry, ctx)

    @kopf.on.startup(registry=registry, id="agent-settings")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        opsettings.configure_agent_kopf(settings, cfg.node_name)

    log.info(
        "agent for node %s (%s driver) starting; Secrets from %s",
        cfg.node_name, cfg.hypervisor, cfg.secrets.source,
    )  # fmt: skip
    kopf.run(registry=registry, standalone=True, clusterwide=True)
    return 0
