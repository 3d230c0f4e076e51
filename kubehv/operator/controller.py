"""The cluster controller: placement, heartbeat loss, the webhook; Migrations and drain too.

In a cluster, its webhook server also hands agents the Secret keys of their own instances
(:mod:`secret_handover`).

Why this module exists: it wires the pure modules (:mod:`placement`, :mod:`heartbeat`,
:mod:`webhook`) into kopf. kopf event handlers keep in-memory caches of NodeHypervisors and
VirtualInstances (no kopf bookkeeping writes on the objects); placement happens on an
unplaced instance's event and again on a timer for those waiting for room. One decision at a
time (an asyncio lock) so two placements never count the same free memory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, TypeVar

import kopf
import pydantic

from kubehv import api
from kubehv.api import constants
from kubehv.api import virtualinstance as vim
from kubehv.operator import (
    context,
    drain,
    events,
    health,
    heartbeat,
    k8s,
    leader,
    metrics,
    migration_controller,
    placement,
    secret_handover,
    webhook,
)
from kubehv.operator import settings as opsettings
from kubehv.operator import status as st

log = logging.getLogger(__name__)


Obj = TypeVar("Obj", api.VirtualInstance, api.NodeHypervisor)


class Controller:
    def __init__(self, ctx: context.ControllerContext) -> None:
        self.ctx = ctx
        self.kube = ctx.kube
        self.nodes: dict[str, api.NodeHypervisor] = {}
        self.vis: dict[str, api.VirtualInstance] = {}
        self.lock = asyncio.Lock()

    # --- caches (objects parsed once, where they arrive) ---------------------------------

    def remember(
        self,
        cache: dict[str, Obj],
        kind: type[Obj],
        event_type: str | None,
        body: Mapping[str, Any],
    ) -> Obj | None:
        try:
            obj = kind.model_validate(body)
        except pydantic.ValidationError as exc:
            log.warning("cannot read a %s (%s); ignoring it", kind.KIND, exc)
            return None
        key = obj.metadata.uid or ""
        if event_type == "DELETED":
            cache.pop(key, None)
            return None
        old = cache.get(key)
        if old is not None and _rv(old) > _rv(obj):
            return old
        cache[key] = obj
        return obj

    def assigned(self) -> list[placement.Assigned]:
        out = []
        for vi in self.vis.values():
            a = placement.assigned_of(vi)
            if a is not None:
                out.append(a)
        return out

    def silent_nodes(self) -> set[str]:
        now = datetime.datetime.now(datetime.UTC)
        grace = self.ctx.settings.heartbeat_grace_s
        return {
            n.metadata.name or "" for n in self.nodes.values() if heartbeat.is_stale(n, now, grace)
        }

    # --- placement -----------------------------------------------------------------------

    async def place(self, uid: str) -> None:
        async with self.lock:
            vi = self.vis.get(uid)
            if vi is None or not _unplaced(vi):
                return
            with metrics.timed_reconcile("Placement"):
                await self._place(vi)

    async def _place(self, vi: api.VirtualInstance) -> None:
        decision = placement.choose(
            placement.Request.of(vi),
            list(self.nodes.values()),
            self.assigned(),
            self.silent_nodes(),
        )
        gen = vi.metadata.generation or 0
        if decision.node is None:
            cond = st.Condition(constants.COND_SCHEDULED, False, "NoNodeFits", decision.message)
            desired = {
                "phase": vim.Phase.PENDING.value,
                "conditions": st.merge_model_conditions(vi.status.conditions, [cond], gen),
            }
            patch = st.changed_fields(_status(vi), desired)
            if patch:
                await self._patch_vi(vi, patch)
                await events.apost(
                    self.kube,
                    vi,
                    "FailedScheduling",
                    decision.message,
                    type_=events.WARNING,
                    component="kubehv-controller",
                )
            return
        cond = st.Condition(constants.COND_SCHEDULED, True, "Scheduled", decision.message)
        patch = {
            "nodeName": decision.node,
            "phase": vim.Phase.SCHEDULED.value,
            "conditions": st.merge_model_conditions(vi.status.conditions, [cond], gen),
        }
        await self._patch_vi(vi, patch)
        await events.apost(
            self.kube, vi, "Scheduled", decision.message, component="kubehv-controller"
        )

    async def _patch_vi(self, vi: api.VirtualInstance, patch: Mapping[str, Any]) -> None:
        """A status write guarded by the resourceVersion ``vi`` was read at: a hand-off
        (placement, Unknown) must lose to any newer write, never overwrite it."""
        meta = vi.metadata
        try:
            result = await k8s.call(
                self.kube.patch_vi_status,
                meta.namespace or "",
                meta.name or "",
                patch,
                meta.resource_version,
            )
        except (k8s.NotFound, k8s.Conflict):
            return  # gone, or changed meanwhile: the watch brings the newer object
        self.remember(self.vis, api.VirtualInstance, "MODIFIED", result)

    # --- timers --------------------------------------------------------------------------

    async def tick(self) -> None:
        """Retry waiting placements; mark silent nodes and their instances.

        One object's failure is logged and skipped: the others still get their turn."""
        for uid, vi in list(self.vis.items()):
            if _unplaced(vi):
                try:
                    await self.place(uid)
                except Exception:
                    log.exception("placement of %s failed; will retry", uid)
        for node in list(self.nodes.values()):
            try:
                await self._check_heartbeat(node)
            except Exception:
                log.exception("heartbeat check of node %s failed; will retry", node.metadata.name)

    async def _check_heartbeat(self, node: api.NodeHypervisor) -> None:
        now = datetime.datetime.now(datetime.UTC)
        grace = self.ctx.settings.heartbeat_grace_s
        name = node.metadata.name or ""
        if not heartbeat.is_stale(node, now, grace):
            return
        patch = heartbeat.node_status_patch(node, now, grace)
        if patch:
            log.warning("node %s: heartbeat lost", name)
            result = await k8s.call(self.kube.patch_node_status, name, patch)
            self.remember(self.nodes, api.NodeHypervisor, "MODIFIED", result)
            await events.apost(
                self.kube,
                node,
                heartbeat.REASON_NODE,
                f"no heartbeat from node {name}; its instances are Unknown",
                type_=events.WARNING,
                component="kubehv-controller",
            )
        for vi in list(self.vis.values()):
            if vi.status.node_name != name:
                continue
            vpatch = heartbeat.instance_status_patch(vi, name)
            if vpatch:
                await self._patch_vi(vi, vpatch)

    def count_phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vi in self.vis.values():
            phase = vi.status.phase.value if vi.status.phase else vim.Phase.PENDING.value
            counts[phase] = counts.get(phase, 0) + 1
        return counts


def _status(vi: api.VirtualInstance) -> dict[str, Any]:
    return vi.status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _unplaced(vi: api.VirtualInstance) -> bool:
    return not vi.metadata.deletion_timestamp and not vi.status.node_name


def _rv(obj: api.VirtualInstance | api.NodeHypervisor) -> int:
    try:
        return int(obj.metadata.resource_version or 0)
    except ValueError:
        return 0


def register(registry: kopf.OperatorRegistry, ctx: context.ControllerContext) -> Controller:
    ctl = Controller(ctx)

    @kopf.on.event(constants.GROUP, constants.PLURAL_NHV, registry=registry, id="node-cache")
    async def on_node(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        ctl.remember(ctl.nodes, api.NodeHypervisor, event.get("type"), body)

    @kopf.on.event(constants.GROUP, constants.PLURAL_VI, registry=registry, id="placement")
    async def on_instance(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        vi = ctl.remember(ctl.vis, api.VirtualInstance, event.get("type"), body)
        if vi is not None and _unplaced(vi):
            await ctl.place(vi.metadata.uid or "")

    tasks: list[asyncio.Task[None]] = []

    async def loop() -> None:
        while True:
            await asyncio.sleep(ctx.settings.check_interval_s)
            try:
                await ctl.tick()
                metrics.set_instance_phases(ctl.count_phases())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller tick failed; will try again")

    @kopf.on.startup(registry=registry, id="controller-timers")
    async def start(**_: Any) -> None:
        tasks.append(asyncio.create_task(loop(), name="controller-tick"))

    @kopf.on.cleanup(registry=registry, id="controller-timers-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return ctl


def _register_others(registry: kopf.OperatorRegistry, ctx: context.ControllerContext) -> None:
    migration_controller.register(registry, ctx)
    drain.register(registry, ctx)


def run(cfg: opsettings.ControllerSettings) -> int:
    api_client = k8s.load_api_client(cfg.kubeconfig)
    ctx = context.ControllerContext(settings=cfg, api_client=api_client, kube=k8s.Kube(api_client))
    # Every replica, leader or standby, serves /healthz and (in a cluster) the webhook from
    # here on; the Lease gates only the controller's work (kubehv.operator.health, leader).
    probes = health.Health()
    if cfg.health_port:
        probes.serve(cfg.health_port)
    metrics.serve(cfg.metrics_port)  # a standby too: kubehv_leader 0
    keeper = webhook.cluster_keeper(api_client) if cfg.webhook_port else None
    if keeper is not None:
        # The same server hands Secret keys to agents, for their own instances only.
        handover = secret_handover.Handover(
            ctx.kube,
            secret_handover.token_reviewer(ctx.kube),
            secret_handover.agent_username(),
        )
        admission = webhook.AdmissionServer(
            keeper, cfg.webhook_port, routes={secret_handover.PATH: handover.handle}
        )
        admission.start()
        probes.ready["webhook"] = admission.serving
    elector = None
    if cfg.leader_election:
        identity = cfg.identity or f"{os.uname().nodename}-{os.getpid()}"
        elector = leader.Elector(
            api_client,
            cfg.lease_name,
            cfg.lease_namespace,
            identity,
            leader.Timing.for_lease(cfg.lease_duration_s),
        )
        probes.is_leader = elector.leading.is_set
        log.info("waiting for the lease %s/%s", cfg.lease_namespace, cfg.lease_name)
        elector.acquire()
    else:
        probes.is_leader = lambda: True
        leader.LEADER.set(1)
    registry = kopf.OperatorRegistry()
    opsettings.register_login(registry, ctx.api_client.creds)
    register(registry, ctx)
    _register_others(registry, ctx)
    if cfg.webhook_port and keeper is None:
        webhook.register(registry)

    @kopf.on.startup(registry=registry, id="controller-settings")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        opsettings.configure_controller_kopf(settings)
        if cfg.webhook_port and keeper is None:
            # Outside a cluster (tests, the demo): a loopback server and a configuration that
            # kopf manages, with a throw-away self-signed certificate.
            certdir = tempfile.mkdtemp(prefix="kubehv-webhook-")
            atexit.register(shutil.rmtree, certdir, True)
            certfile, keyfile, pem = webhook.self_signed(certdir, cfg.webhook_host)
            settings.admission.server = kopf.WebhookServer(
                addr=cfg.webhook_host,
                port=cfg.webhook_port,
                host=cfg.webhook_host,
                certfile=certfile,
                pkeyfile=keyfile,
                cadata=pem,
            )
            settings.admission.managed = cfg.webhook_name

    try:
        kopf.run(registry=registry, standalone=True, clusterwide=True)
    finally:
        if elector is not None:
            elector.release()
    return 0
