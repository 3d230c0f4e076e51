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
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import kopf

from kubehv.operator import memory_commit, migration_store
from kubehv.operator import migration_logic as ml

log = logging.getLogger(__name__)

RESYNC_INTERVAL_S = 2.0


class ControllerContext(Protocol):
    @property
    def api_client(self) -> Any: ...


def limits_from(ctx: Any) -> ml.Limits:
    settings = getattr(ctx, "settings", None)
    per_node = getattr(settings, "max_migrations_per_node", None)
    per_cluster = getattr(settings, "max_migrations_per_cluster", None)
    default = ml.Limits()
    return ml.Limits(
        per_node=int(per_node) if isinstance(per_node, int) else default.per_node,
        per_cluster=int(per_cluster) if isinstance(per_cluster, int) else default.per_cluster,
    )


class MigrationController:
    def __init__(self, ctx: ControllerContext) -> None:
        self.store = migration_store.Store(ctx.api_client)
        self.limits = limits_from(ctx)
        self._lock = asyncio.Lock()

    async def handle(self, body: Mapping[str, Any]) -> None:
        view = ml.MigrationView.from_body(body)
        step = ml.next_step(view, ml.Role.CONTROLLER)
        if step is ml.Step.NONE:
            return
        # One controller decision at a time: scheduling counts the other migrations.
        async with self._lock:
            try:
                view = ml.MigrationView.from_body(
                    await migration_store.call(self.store.get_migration, view.namespace, view.name)
                )
                await self._step(view, ml.next_step(view, ml.Role.CONTROLLER))
            except (migration_store.Conflict, migration_store.NotFound):
                log.debug("migration %s changed under us; will look again", view.key)

    async def _step(self, view: ml.MigrationView, step: ml.Step) -> None:
        if step is ml.Step.NONE:
            return
        log.info("migration %s: controller step %s (phase %s)", view.key, step, view.phase)
        if step is ml.Step.SCHEDULE:
            await self._schedule(view)
        elif step is ml.Step.ABORT:
            reason = (
                "the Migration was deleted before the transfer started"
                if view.deleting
                else "abort was requested before the transfer started"
            )
            await self._write(view, ml.fail(view, reason, aborted=True))
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
        elif step is ml.Step.HAND_OFF:
            await self._hand_off(view)
        elif step is ml.Step.RELEASE:
            rest = [f for f in view.finalizers if f != ml.FINALIZER]
            await migration_store.call(self.store.set_migration_finalizers, view, rest)

    async def _write(self, view: ml.MigrationView, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await migration_store.call(self.store.patch_migration_status, view, patch)

    async def _schedule(self, view: ml.MigrationView) -> None:
        vi = await migration_store.call(self.store.get_instance, view.namespace, view.instance)
        nodes = await migration_store.call(self.store.list_nodes)
        others = await migration_store.call(self.store.list_migrations)
        if vi is not None:  # the same committed-memory rule as placement (memory_commit)
            placed = await migration_store.call(self.store.list_instances)
            nodes, unfit = memory_commit.migration_targets(vi, nodes, placed)
            if view.requested_target in unfit:
                await self._write(view, ml.fail(view, unfit[view.requested_target]))
                return
        decision = ml.schedule(
            view,
            ml.InstanceView.from_body(vi) if vi is not None else None,
            [ml.NodeView.from_body(n) for n in nodes],
            [ml.MigrationView.from_body(o) for o in others],
            self.limits,
        )
        if isinstance(decision, ml.Refused):
            await self._write(view, ml.fail(view, decision.reason))
            return
        if isinstance(decision, ml.Queued):
            current = view.conditions.get(ml.COND_QUEUED) or {}
            if current.get("message") != decision.reason:
                cond = ml.condition(ml.COND_QUEUED, True, "LimitReached", decision.reason)
                await self._write(view, ml.status_patch(view, conditions=[cond]))
            return
        # Protect the Migration before anything irreversible can happen: our finalizer first.
        if ml.FINALIZER not in view.finalizers:
            body = await migration_store.call(
                self.store.set_migration_finalizers, view, [*view.finalizers, ml.FINALIZER]
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
            vi = await migration_store.call(self.store.get_instance, view.namespace, view.instance)
            if vi is None:
                message = "instance was deleted"
                break
            status = vi.get("status") or {}
            if status.get("nodeName") != view.source_node:
                break
            cond = ml.condition("Migrating", False, "Migrated", message)
            new = {
                "nodeName": view.target_node,
                "phase": "Running",
                "conditions": ml.merged_conditions(status.get("conditions") or [], [cond]),
            }
            try:
                await migration_store.call(self.store.patch_instance_status, vi, new)
                break
            except migration_store.Conflict:
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
            items = await migration_store.call(self.store.list_migrations)
        except Exception as exc:
            log.warning("cannot list migrations: %s", exc)
            return
        items.sort(key=lambda b: str((b.get("metadata") or {}).get("creationTimestamp", "")))
        for item in items:
            try:
                await self.handle(item)
            except Exception:
                log.exception("migration controller step failed; will retry")


def register(registry: kopf.OperatorRegistry, ctx: ControllerContext) -> None:
    controller = MigrationController(ctx)

    @kopf.on.event(ml.GROUP, ml.PLURAL, registry=registry, id="migration-controller")
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
