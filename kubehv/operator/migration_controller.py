"""The cluster controller's half of the Migration protocol.

Why this module exists: choosing a target, enforcing one migration per instance and the
parallel limits, refusing unsafe hypervisor version pairs and instances that do not fit need
the cluster-wide view that no agent has. The controller is also the only writer of a
VirtualInstance's ``status.nodeName``, so it performs the final hand-off after Succeeded, and
it owns the finalizer that keeps a deleted Migration around until both agents have cleaned
up. Decisions come from :mod:`migration_logic`; this module reads, asks, and writes (guarded
by resourceVersion).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import kopf

from kubehv import api
from kubehv.api import constants
from kubehv.operator import heartbeat, k8s, memory_commit, metrics
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_scheduling as sched

log = logging.getLogger(__name__)

RESYNC_INTERVAL_S = 2.0


class ControllerContext(Protocol):
    @property
    def api_client(self) -> Any: ...


def limits_from(ctx: Any) -> sched.Limits:
    settings = getattr(ctx, "settings", None)
    per_node = getattr(settings, "max_migrations_per_node", None)
    per_cluster = getattr(settings, "max_migrations_per_cluster", None)
    default = sched.Limits()
    return sched.Limits(
        per_node=int(per_node) if isinstance(per_node, int) else default.per_node,
        per_cluster=int(per_cluster) if isinstance(per_cluster, int) else default.per_cluster,
    )


class MigrationController:
    def __init__(self, ctx: ControllerContext) -> None:
        self.store = k8s.Kube(ctx.api_client)
        self.limits = limits_from(ctx)
        self.settings = getattr(ctx, "settings", None)
        self._lock = asyncio.Lock()

    async def handle(self, body: Mapping[str, Any]) -> None:
        try:
            view = ml.MigrationView.from_body(body)
        except ValueError as exc:
            log.warning("cannot read a Migration (%s); not acting on it", exc)
            return
        await self.handle_view(view)

    async def _silent(self, view: ml.MigrationView) -> set[str]:
        """Nodes whose agent stopped reporting (read only when a step may depend on it)."""
        if view.phase is not ml.Phase.FINALIZING:
            return set()
        now = datetime.datetime.now(datetime.UTC)
        grace = float(getattr(self.settings, "heartbeat_grace_s", 40.0))
        nodes = [
            api.NodeHypervisor.model_validate(n) for n in await k8s.call(self.store.list_nodes)
        ]
        return {n.metadata.name or "" for n in nodes if heartbeat.is_stale(n, now, grace)}

    async def handle_view(self, view: ml.MigrationView) -> None:
        step = ml.next_step(view, ml.Role.CONTROLLER, silent=await self._silent(view))
        if step is ml.Step.NONE and await self._gone_before_running(view):
            step = ml.Step.ABORT
        if step is ml.Step.NONE:
            return
        # One controller decision at a time: scheduling counts the other migrations.
        async with self._lock:
            try:
                view = ml.MigrationView.from_body(
                    await k8s.call(self.store.get_migration, view.namespace, view.name)
                )
                silent = await self._silent(view)
                await self._step(view, ml.next_step(view, ml.Role.CONTROLLER, silent=silent))
            except (k8s.Conflict, k8s.NotFound):
                log.debug("migration %s changed under us; will look again", view.key)

    async def _gone_before_running(self, view: ml.MigrationView) -> bool:
        """The instance was deleted while nothing irreversible had happened yet."""
        if view.phase not in ml.BEFORE_RUNNING - {ml.Phase.PENDING}:
            return False
        body = await k8s.call(self.store.get_instance, view.namespace, view.instance)
        return body is None or bool(
            api.VirtualInstance.model_validate(body).metadata.deletion_timestamp
        )

    async def _step(self, view: ml.MigrationView, step: ml.Step) -> None:
        if step is ml.Step.NONE and await self._gone_before_running(view):
            step = ml.Step.ABORT
        if step is ml.Step.NONE:
            return
        log.info("migration %s: controller step %s (phase %s)", view.key, step, view.phase)
        if step is ml.Step.SCHEDULE:
            await self._schedule(view)
        elif step is ml.Step.ABORT:
            if view.deleting:
                reason = "the Migration was deleted before the transfer started"
            elif view.abort_annotated:
                reason = "abort was requested before the transfer started"
            else:
                reason = "the VirtualInstance was deleted before the transfer started"
            await self._write(view, ml.fail(view, reason, aborted=True))
            metrics.record_migration("Aborted", _seconds(view))
        elif step is ml.Step.TIME_OUT:
            waiting = {
                ml.Phase.SCHEDULED: f"the source agent on {view.source_node}",
                ml.Phase.PREPARING: f"the target agent on {view.target_node}",
                ml.Phase.TARGET_READY: f"the source agent on {view.source_node}",
            }.get(view.phase, "the agents")
            await self._write(
                view,
                ml.fail(
                    view,
                    f"timed out after {view.completion_timeout_s} s in phase {view.phase} "
                    f"waiting for {waiting}; the instance still runs on {view.source_node}",
                ),
            )
            metrics.record_migration("Failed", _seconds(view))
        elif step is ml.Step.SUCCEED_WITHOUT_SOURCE:
            note = (
                f"the source node {view.source_node} stopped reporting after the instance "
                f"arrived on {view.target_node}; its leftover is cleaned when its agent returns"
            )
            cond = ml.condition(ml.COND_SOURCE_FINALIZED, False, "SourceSilent", note)
            await self._write(view, ml.transition(view, ml.Phase.SUCCEEDED, conditions=[cond]))
            metrics.record_migration("Succeeded", _seconds(view))
        elif step is ml.Step.HAND_OFF:
            await self._hand_off(view)
        elif step is ml.Step.RELEASE:
            rest = [f for f in view.finalizers if f != constants.MIGRATION_FINALIZER]
            await k8s.call(self.store.set_migration_finalizers, view, rest)

    async def _write(self, view: ml.MigrationView, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await k8s.call(self.store.patch_migration_status, view, patch)

    async def _schedule(self, view: ml.MigrationView) -> None:
        vi = await k8s.call(self.store.get_instance, view.namespace, view.instance)
        nodes = await k8s.call(self.store.list_nodes)
        others = await k8s.call(self.store.list_migrations)
        instance = api.VirtualInstance.model_validate(vi) if vi is not None else None
        targets = [api.NodeHypervisor.model_validate(n) for n in nodes]
        if instance is not None:  # the same committed-memory rule as placement
            placed = await k8s.call(self.store.list_instances)
            targets, unfit = memory_commit.migration_targets(
                instance, targets, [api.VirtualInstance.model_validate(p) for p in placed]
            )
            if view.requested_target in unfit:
                await self._write(view, ml.fail(view, unfit[view.requested_target]))
                metrics.record_migration("Failed", None)
                return
        decision = sched.schedule(
            view,
            instance,
            targets,
            [ml.MigrationView.from_body(o) for o in others],
            self.limits,
        )
        if isinstance(decision, sched.Refused):
            await self._write(view, ml.fail(view, decision.reason))
            metrics.record_migration("Failed", None)
            return
        if isinstance(decision, sched.Queued):
            current = view.conditions.get(ml.COND_QUEUED)
            if current is None or current.message != decision.reason:
                cond = ml.condition(ml.COND_QUEUED, True, "LimitReached", decision.reason)
                await self._write(view, ml.status_patch(view, conditions=[cond]))
            return
        # Protect the Migration before anything irreversible can happen: our finalizer first.
        if constants.MIGRATION_FINALIZER not in view.finalizers:
            body = await k8s.call(
                self.store.set_migration_finalizers,
                view,
                [*view.finalizers, constants.MIGRATION_FINALIZER],
            )
            view = ml.MigrationView.from_body(body)
        conds = [ml.condition(ml.COND_QUEUED, False, "Scheduled", "scheduled")]
        if decision.balloon_to_mib is not None:
            conds.append(
                ml.condition(
                    ml.COND_MEMORY_REDUCED,
                    False,
                    "BalloonRequested",
                    f"the source agent will balloon {view.instance} down to "
                    f"{decision.balloon_to_mib} MiB to fit {decision.target}",
                )
            )
        await self._write(
            view,
            ml.transition(
                view,
                ml.Phase.SCHEDULED,
                {
                    "sourceNode": decision.source,
                    "targetNode": decision.target,
                    "startTime": ml.format_time(ml.now()),
                },
                conds,
            ),
        )

    async def _hand_off(self, view: ml.MigrationView) -> None:
        """Succeeded: the VirtualInstance now lives on the target (we alone write nodeName)."""
        message = f"instance moved from {view.source_node} to {view.target_node}"
        for _ in range(5):
            body = await k8s.call(self.store.get_instance, view.namespace, view.instance)
            if body is None:
                message = "instance was deleted"
                break
            vi = api.VirtualInstance.model_validate(body)
            if vi.status.node_name != view.source_node:
                break
            cond = ml.condition("Migrating", False, "Migrated", message)
            new = {
                "nodeName": view.target_node,
                "phase": "Running",
                "conditions": ml.merged_conditions(vi.status.conditions, [cond]),
            }
            try:
                await k8s.call(self.store.patch_instance_status, vi, new)
                break
            except k8s.Conflict:
                continue
        else:
            return  # kept losing: the next event or resync tries again
        await self._write(
            view,
            ml.status_patch(
                view, conditions=[ml.condition(ml.COND_INSTANCE_MOVED, True, "Moved", message)]
            ),
        )

    async def resync(self) -> None:
        try:
            items = await k8s.call(self.store.list_migrations)
        except Exception as exc:
            log.warning("cannot list migrations: %s", exc)
            return
        views = []
        for item in items:
            try:
                views.append(ml.MigrationView.from_body(item))
            except ValueError as exc:
                log.warning("cannot read a Migration (%s); skipping it", exc)
        views.sort(key=lambda v: (v.creation_time or ml.now(), v.name))
        for view in views:
            try:
                await self.handle_view(view)
            except Exception:
                log.exception("migration controller step failed; will retry")


def register(registry: kopf.OperatorRegistry, ctx: ControllerContext) -> None:
    controller = MigrationController(ctx)

    @kopf.on.event(
        constants.GROUP, constants.PLURAL_MIG, registry=registry, id="migration-controller"
    )
    async def on_migration(body: kopf.Body, **_: Any) -> None:
        await controller.handle(dict(body))

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry, id="migration-controller-resync")
    async def start_resync(**_: Any) -> None:
        tasks.append(asyncio.create_task(_resync_forever(controller)))

    @kopf.on.cleanup(registry=registry, id="migration-controller-stop")
    async def stop_resync(**_: Any) -> None:
        for task in tasks:
            task.cancel()


async def _resync_forever(controller: MigrationController) -> None:
    while True:
        await asyncio.sleep(RESYNC_INTERVAL_S)
        await controller.resync()


def _seconds(view: ml.MigrationView) -> float | None:
    if view.start_time is None:
        return None
    return max(0.0, (ml.now() - view.start_time).total_seconds())
