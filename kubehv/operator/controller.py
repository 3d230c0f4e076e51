"""The cluster controller: placement, heartbeat loss, the webhook; Migrations and drain too.

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
import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import kopf

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
    webhook,
)
from kubehv.operator import settings as opsettings
from kubehv.operator import status as st

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, ctx: context.ControllerContext) -> None:
        self.ctx = ctx
        self.kube = ctx.kube
        self.nodes: dict[str, dict[str, Any]] = {}
        self.vis: dict[str, dict[str, Any]] = {}
        self.lock = asyncio.Lock()

    # --- caches --------------------------------------------------------------------------

    def remember(self, cache: dict[str, dict[str, Any]], event_type: str | None, body: Any) -> None:
        meta = body.get("metadata") or {}
        key = str(meta.get("uid", ""))
        if event_type == "DELETED":
            cache.pop(key, None)
            return
        old = cache.get(key)
        if old is not None and _rv(old) > _rv(body):
            return
        cache[key] = dict(body)

    def assigned(self) -> list[placement.Assigned]:
        out = []
        for vi in self.vis.values():
            a = placement.assigned_of(vi)
            if a is not None:
                out.append(a)
        return out

    # --- placement -----------------------------------------------------------------------

    async def place(self, uid: str) -> None:
        async with self.lock:
            vi = self.vis.get(uid)
            if vi is None or not _unplaced(vi):
                return
            with metrics.timed_reconcile("Placement"):
                await self._place(vi)

    async def _place(self, vi: dict[str, Any]) -> None:
        nodes = [placement.NodeView.of(n) for n in self.nodes.values()]
        now = datetime.datetime.now(datetime.UTC)
        grace = self.ctx.settings.heartbeat_grace_s
        nodes = [
            n if not heartbeat.is_stale(n, now, grace) else _not_ready(n, "HeartbeatLost")
            for n in nodes
        ]
        decision = placement.choose(placement.Request.of(vi), nodes, self.assigned())
        current = vi.get("status") or {}
        gen = int((vi.get("metadata") or {}).get("generation") or 0)
        if decision.node is None:
            cond = st.Condition("Scheduled", False, "NoNodeFits", decision.message)
            desired = {
                "phase": "Pending",
                "conditions": st.merge_conditions(current.get("conditions") or [], [cond], gen),
            }
            patch = st.changed_fields(current, desired)
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
        cond = st.Condition("Scheduled", True, "Scheduled", decision.message)
        patch = {
            "nodeName": decision.node,
            "phase": "Scheduled",
            "conditions": st.merge_conditions(current.get("conditions") or [], [cond], gen),
        }
        await self._patch_vi(vi, patch)
        await events.apost(
            self.kube, vi, "Scheduled", decision.message, component="kubehv-controller"
        )

    async def _patch_vi(self, vi: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        meta = vi.get("metadata") or {}
        try:
            result = await k8s.call(
                self.kube.patch_vi_status, meta.get("namespace"), meta.get("name"), patch
            )
        except Exception as exc:
            if k8s.is_status(exc, 404):
                return
            raise
        self.remember(self.vis, "MODIFIED", result)

    # --- timers --------------------------------------------------------------------------

    async def tick(self) -> None:
        """Retry waiting placements; mark silent nodes and their instances."""
        for uid, vi in list(self.vis.items()):
            if _unplaced(vi):
                await self.place(uid)
        now = datetime.datetime.now(datetime.UTC)
        grace = self.ctx.settings.heartbeat_grace_s
        for nhv in list(self.nodes.values()):
            node = placement.NodeView.of(nhv)
            if not heartbeat.is_stale(node, now, grace):
                continue
            patch = heartbeat.node_status_patch(nhv, now, grace)
            if patch:
                log.warning("node %s: heartbeat lost", node.name)
                result = await k8s.call(self.kube.patch_nhv_status, node.name, patch)
                self.remember(self.nodes, "MODIFIED", result)
                await events.apost(
                    self.kube,
                    nhv,
                    heartbeat.REASON_NODE,
                    f"no heartbeat from node {node.name}; its instances are Unknown",
                    type_=events.WARNING,
                    component="kubehv-controller",
                )
            for vi in list(self.vis.values()):
                if (vi.get("status") or {}).get("nodeName") != node.name:
                    continue
                vpatch = heartbeat.instance_status_patch(vi, node.name)
                if vpatch:
                    await self._patch_vi(vi, vpatch)

    def count_phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vi in self.vis.values():
            phase = (vi.get("status") or {}).get("phase") or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
        return counts


def _unplaced(vi: Mapping[str, Any]) -> bool:
    meta = vi.get("metadata") or {}
    return not meta.get("deletionTimestamp") and not (vi.get("status") or {}).get("nodeName")


def _not_ready(node: placement.NodeView, reason: str) -> placement.NodeView:
    return dataclasses.replace(node, ready=False, ready_reason=reason)


def _rv(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def register(registry: kopf.OperatorRegistry, ctx: context.ControllerContext) -> Controller:
    ctl = Controller(ctx)

    @kopf.on.event(k8s.GROUP, k8s.NHV_PLURAL, registry=registry, id="node-cache")
    async def on_node(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        ctl.remember(ctl.nodes, event.get("type"), body)

    @kopf.on.event(k8s.GROUP, k8s.VI_PLURAL, registry=registry, id="placement")
    async def on_instance(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        ctl.remember(ctl.vis, event.get("type"), body)
        uid = str(body.get("metadata", {}).get("uid", ""))
        if event.get("type") != "DELETED" and _unplaced(body):
            await ctl.place(uid)

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
        admission = webhook.AdmissionServer(keeper, cfg.webhook_port)
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
    opsettings.register_login(registry)
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
