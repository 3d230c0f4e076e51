"""The node agent: one process per node, reconciling that node's VirtualInstances.

Why this module exists: it wires the plain-function modules into kopf and runs them.
kopf watches only this node's VirtualInstances (server-side field selector
``status.nodeName=<node>``) through event handlers, so kopf itself writes nothing on the
objects (no annotations, no kopf finalizer): the agent's own finalizer and status patches
are the only writes. Timers: the heartbeat (NodeHypervisor status) and the watcher
(drift). The migration and drain modules register their handlers on the same registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from kubehv.drivers import registry as driver_registry
from kubehv.drivers import values
from kubehv.operator import (
    context,
    drain,
    k8s,
    metrics,
    migration_agent,
    node_status,
    workloads,
)
from kubehv.operator import instances as instances_mod
from kubehv.operator import settings as opsettings

log = logging.getLogger(__name__)


def build_context(cfg: opsettings.AgentSettings) -> context.AgentContext:
    """Connect to the API, make sure this node's NodeHypervisor exists, create the driver."""
    api_client = k8s.load_api_client(cfg.kubeconfig)
    kube = k8s.Kube(api_client)
    body = node_status.nhv_body(
        cfg.node_name, cfg.hypervisor, cfg.connection_uri, cfg.migration_address
    )
    nhv = node_status.ensure_node(kube, body)
    spec = nhv.get("spec") or {}
    # The NodeHypervisor's spec wins over flags: it is what the cluster says this node is.
    cfg.hypervisor = str(spec.get("hypervisor") or cfg.hypervisor)
    cfg.connection_uri = spec.get("connectionURI") or cfg.connection_uri
    cfg.migration_address = spec.get("migrationAddress") or cfg.migration_address
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
        node_defaults=dict(spec.get("defaultParameters") or {}),
    )


def register(registry: kopf.OperatorRegistry, ctx: context.AgentContext) -> None:
    reconciler = instances_mod.Reconciler(ctx)
    publisher = node_status.Publisher(ctx)

    @kopf.on.event(k8s.GROUP, k8s.VI_PLURAL, registry=registry, id="instance")
    async def on_instance(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        await reconciler.on_event(event.get("type"), dict(body))

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry, id="agent-timers")
    async def start_timers(**_: Any) -> None:
        tasks.append(asyncio.create_task(publisher.run_forever(), name="heartbeat"))
        tasks.append(asyncio.create_task(_watcher(ctx, reconciler), name="watcher"))
        addresses = workloads.AddressPublisher(
            ctx.kube,
            ctx.driver,
            lambda: list(reconciler.bodies.values()),
            reconciler.remember,
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

    @kopf.on.probe(registry=registry, id="node")
    def probe(**_: Any) -> str:
        return ctx.node_name


async def _watcher(ctx: context.AgentContext, reconciler: instances_mod.Reconciler) -> None:
    while True:
        await asyncio.sleep(ctx.settings.resync_interval_s)
        try:
            await reconciler.resync()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watcher pass failed; will try again")


def _register_others(registry: kopf.OperatorRegistry, ctx: context.AgentContext) -> None:
    """The migration and drain agents (owned by the migration engineer)."""
    migration_agent.register(registry, ctx)
    drain.register_agent(registry, ctx)


def run(cfg: opsettings.AgentSettings) -> int:
    ctx = build_context(cfg)
    metrics.serve(cfg.metrics_port)
    registry = kopf.OperatorRegistry()
    opsettings.register_login(registry)
    register(registry, ctx)
    _register_others(registry, ctx)

    @kopf.on.startup(registry=registry, id="agent-settings")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        opsettings.configure_agent_kopf(settings, cfg.node_name)

    log.info("agent for node %s (%s driver) starting", cfg.node_name, cfg.hypervisor)
    kopf.run(registry=registry, standalone=True, clusterwide=True)
    return 0
