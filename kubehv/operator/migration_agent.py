"""The node agent's half of the Migration protocol: the source and the target roles.

Why this module exists: only the agent on a node can talk to that node's hypervisor, so the
source agent runs migration_info / migrate_instance / finalize_migration_source and the
target agent accept_instance / finalize_migration_dst. Each step is decided by
:func:`migration_logic.next_step` from the Migration as it is now, so a restarted agent simply
looks again and carries on (Ganeti's cleanup mode for a Running migration: look where the
instance really runs). Every write is guarded by resourceVersion: the loser of a race sees
:class:`migration_store.Conflict`, re-reads, and decides again.

The kopf part is thin: one event handler on Migrations (filtered to this node's roles) plus a
periodic resync that lists this node's Migrations with server-side field selectors
(``status.sourceNode`` / ``status.targetNode``), which also retries steps that failed for a
transient reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import kopf

from kubehv.drivers import base, errors, values
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_spec, migration_store
from kubehv.operator import status as status_mod

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
STALL_TIMEOUT_S = 60.0
RESYNC_INTERVAL_S = 5.0
ORPHAN_MIGRATING_AFTER_S = 30.0
"""An instance Migrating this long with no Migration owning it is given back (see resync)."""


class AgentContext(Protocol):
    """What this module needs from the agent's context (kubehv.operator.context)."""

    @property
    def node_name(self) -> str: ...

    @property
    def driver(self) -> base.BaseHypervisor: ...

    @property
    def api_client(self) -> Any: ...


@dataclasses.dataclass
class _Running:
    task: asyncio.Task[None]


class MigrationAgent:
    """Source and target steps for one node."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.node = ctx.node_name
        self.driver = ctx.driver
        self.store = migration_store.Store(ctx.api_client)
        self.running: dict[str, _Running] = {}
        self.stall_timeout_s = float(_setting(ctx, "migration_stall_timeout_s", STALL_TIMEOUT_S))
        self.progress_interval_s = float(
            _setting(ctx, "migration_progress_interval_s", PROGRESS_INTERVAL_S)
        )
        self._locks: dict[str, asyncio.Lock] = {}

    # --- dispatch ------------------------------------------------------------------------

    async def handle(self, body: Mapping[str, Any]) -> None:
        """Look at a Migration and do this node's step, if any (safe to call any time)."""
        view = ml.MigrationView.from_body(body)
        role = ml.role_of(view, self.node)
        if role is None:
            return
        lock = self._locks.setdefault(view.uid, asyncio.Lock())
        async with lock:
            try:
                await self._step(view, role)
            except (migration_store.Conflict, migration_store.NotFound):
                log.debug("migration %s changed under us; will look again", view.key)
            if view.settled:
                self._locks.pop(view.uid, None)

    async def _step(self, view: ml.MigrationView, role: ml.Role) -> None:
        step = ml.next_step(view, role)
        if step is ml.Step.NONE:
            return
        log.info("migration %s: %s step %s (phase %s)", view.key, role, step, view.phase)
        if step is ml.Step.PREPARE:
            await self._prepare(view)
        elif step is ml.Step.ACCEPT:
            await self._accept(view)
        elif step is ml.Step.MIGRATE:
            await self._migrate(view)
        elif step is ml.Step.TRACK_COPY:
            await self._watch(view)
        elif step is ml.Step.FINALIZE_TARGET:
            await self._finalize_target(view)
        elif step is ml.Step.FINALIZE_SOURCE:
            await self._finalize_source(view)
        elif step is ml.Step.CLEANUP_SOURCE:
            await self._cleanup_source(view)
        elif step is ml.Step.CLEANUP_TARGET:
            await self._cleanup_target(view)

    async def resync(self) -> None:
        for field in ("status.sourceNode", "status.targetNode"):
            try:
                items = await migration_store.call(
                    self.store.list_migrations, f"{field}={self.node}"
                )
            except Exception as exc:
                log.warning("cannot list migrations (%s): %s", field, exc)
                continue
            for item in items:
                try:
                    await self.handle(item)
                except Exception:
                    log.exception("migration step failed; will retry")
        try:
            await self._release_orphaned_instances()
        except Exception:
            log.exception("cannot check for instances left Migrating; will retry")

    async def _release_orphaned_instances(self) -> None:
        """Give back instances left in phase Migrating with no Migration owning them.

        The protocol's own steps put the phase back, but a Migration force-deleted (its
        finalizer stripped) or a write lost at the wrong moment would leave the instance
        Migrating for ever, and the instance reconciler never touches a Migrating instance.
        Instances are listed *before* Migrations, so a Migration that marked one is seen.
        """
        instances = await migration_store.call(
            self.store.list_instances, f"status.nodeName={self.node}"
        )
        limit = ml.now() - datetime.timedelta(seconds=ORPHAN_MIGRATING_AFTER_S)
        stuck = [vi for vi in instances if _migrating_since(vi, limit)]
        if not stuck:
            return
        owners = [
            ml.MigrationView.from_body(b)
            for b in await migration_store.call(self.store.list_migrations)
        ]
        for vi in stuck:
            meta = vi.get("metadata") or {}
            namespace, name = str(meta.get("namespace")), str(meta.get("name"))
            if any(
                m.namespace == namespace
                and m.instance == name
                and (m.occupies_instance or not m.terminal)
                for m in owners
            ):
                continue
            log.warning("%s/%s was left Migrating with no Migration; releasing it", namespace, name)
            await self._set_instance_migrating(
                namespace, name, False, "MigrationGone", "no Migration owns the instance any more"
            )

    # --- helpers -------------------------------------------------------------------------

    async def _instance(self, view: ml.MigrationView) -> tuple[dict[str, Any], values.InstanceSpec]:
        vi = await migration_store.call(self.store.get_instance, view.namespace, view.instance)
        if vi is None:
            raise errors.InstanceNotFound(view.instance)
        return vi, migration_spec.instance_spec(vi)

    async def _write(self, view: ml.MigrationView, patch: Mapping[str, Any]) -> None:
        await migration_store.call(self.store.patch_migration_status, view, patch)

    async def _fail(self, view: ml.MigrationView, reason: str, aborted: bool = False) -> None:
        log.warning("migration %s %s: %s", view.key, "aborted" if aborted else "failed", reason)
        await self._write(view, ml.fail(view, reason, aborted=aborted))

    async def _set_instance_migrating(
        self, namespace: str, instance: str, migrating: bool, reason: str, message: str
    ) -> None:
        """Mark the VirtualInstance Migrating (phase + condition), or back to Running."""
        for _ in range(5):
            vi = await migration_store.call(self.store.get_instance, namespace, instance)
            if vi is None:
                return
            status = vi.get("status") or {}
            if not migrating and status.get("nodeName") != self.node:
                return  # the controller already handed it on
            cond = ml.condition("Migrating", migrating, reason, message)
            new: dict[str, Any] = {
                "conditions": ml.merged_conditions(status.get("conditions") or [], [cond])
            }
            if migrating:
                new["phase"] = "Migrating"
            elif status.get("phase") == "Migrating":
                spec = migration_spec.instance_spec(vi)
                info = await migration_store.call(self.driver.get_instance_info, spec.name)
                new["phase"] = "Running" if info is not None and info.state.is_alive else "Failed"
            try:
                await migration_store.call(self.store.patch_instance_status, vi, new)
                return
            except migration_store.Conflict:
                continue

    async def _target_node(self, name: str | None) -> dict[str, Any]:
        node = await migration_store.call(self.store.get_node, name or "")
        if node is None:
            raise errors.MigrationError(f"node {name} has no NodeHypervisor")
        return node

    # --- source steps --------------------------------------------------------------------

    async def _prepare(self, view: ml.MigrationView) -> None:
        try:
            _vi, spec = await self._instance(view)
            info = await migration_store.call(self.driver.get_instance_info, spec.name)
            if info is None or not info.state.is_alive:
                await self._fail(view, f"instance {spec.name} is not running on node {self.node}")
                return
            target = await self._target_node(view.target_node)
            free = ml.parse_mib((target.get("status") or {}).get("memoryFree"))
            conds: list[dict[str, Any]] = []
            if free is not None and info.memory_mib > free:
                if spec.memory_min_mib > free:
                    await self._fail(
                        view,
                        f"instance {spec.name} uses {info.memory_mib} MiB (minimum "
                        f"{spec.memory_min_mib} MiB) but target node {view.target_node} has "
                        f"only {free} MiB free",
                    )
                    return
                await migration_store.call(self.driver.balloon_instance_memory, spec, free)
                conds.append(
                    ml.condition(
                        ml.COND_MEMORY_REDUCED,
                        True,
                        "Ballooned",
                        f"ballooned {spec.name} from {info.memory_mib} MiB to {free} MiB to fit "
                        f"target node {view.target_node}",
                    )
                )
            blob = await migration_store.call(self.driver.migration_info, spec)
        except errors.HypervisorError as exc:
            await self._fail(view, f"preparing on source node {self.node}: {exc.message}")
            return
        await self._set_instance_migrating(
            view.namespace,
            view.instance,
            True,
            "MigrationStarted",
            f"migrating to {view.target_node} ({view.name})",
        )
        await self._write(
            view, ml.transition(view, ml.Phase.PREPARING, {"migrationInfo": blob}, conds)
        )

    async def _migrate(self, view: ml.MigrationView) -> None:
        # Claim Running first: if the controller aborted meanwhile, this write loses (409).
        body = await migration_store.call(
            self.store.patch_migration_status,
            view,
            ml.transition(view, ml.Phase.RUNNING),
        )
        self._start_monitor(ml.MigrationView.from_body(body), drive=True)

    async def _watch(self, view: ml.MigrationView) -> None:
        if view.uid in self.running:
            return  # this process drives it; the monitor sees aborts itself
        # Restarted while Running: Ganeti's cleanup mode. Look where the instance really runs.
        _vi, spec = await self._instance(view)
        info = await migration_store.call(self.driver.get_instance_info, spec.name)
        try:
            status: values.MigrationStatus | None = await migration_store.call(
                self.driver.get_migration_status, spec
            )
        except errors.HypervisorError:
            status = None
        recovery = ml.recover_running(info is not None and info.state.is_alive, status)
        log.warning("migration %s: source agent restarted while Running: %s", view.key, recovery)
        if recovery is ml.Recovery.RESUME_WATCH:
            self._start_monitor(view, drive=False)
        elif recovery is ml.Recovery.COMPLETED:
            await self._write(view, ml.transition(view, ml.Phase.FINALIZING))
        else:
            await self._source_failed(
                view,
                spec,
                "the source agent restarted during the migration and the hypervisor has no "
                f"migration going on; the instance still runs on {self.node}",
                aborted=False,
            )

    def _start_monitor(self, view: ml.MigrationView, drive: bool) -> None:
        task = asyncio.create_task(self._monitor(view, drive))
        self.running[view.uid] = _Running(task)
        task.add_done_callback(lambda _t: self.running.pop(view.uid, None))

    async def _monitor(self, view: ml.MigrationView, drive: bool) -> None:
        try:
            await self._monitor_inner(view, drive)
        except Exception:
            log.exception("migration %s: monitor crashed", view.key)

    async def _monitor_inner(self, view: ml.MigrationView, drive: bool) -> None:
        _vi, spec = await self._instance(view)
        migrate: asyncio.Task[None] | None = None
        if drive:
            node = await self._target_node(view.target_node)
            nspec = node.get("spec") or {}
            target = values.MigrationTarget(
                node=view.target_node or "",
                address=str(nspec.get("migrationAddress") or ""),
                uri=nspec.get("connectionURI") or None,
            )
            migrate = asyncio.create_task(
                migration_store.call(
                    self.driver.migrate_instance, spec, target, view.live, view.options()
                )
            )
        tracker = ml.ProgressTracker(stall_timeout_s=self.stall_timeout_s)
        last_progress: dict[str, int] | None = None
        abort_reason: str | None = None
        aborted_by_user = False
        outcome: BaseException | None = None
        current = view
        while True:
            if migrate is not None:
                done, _ = await asyncio.wait({migrate}, timeout=self.progress_interval_s)
                if done:
                    outcome = migrate.exception()
                    break
            else:
                await asyncio.sleep(self.progress_interval_s)
            # progress
            try:
                status = await migration_store.call(self.driver.get_migration_status, spec)
            except errors.HypervisorError:
                status = None
            if migrate is None and (
                status is None or status.state is not values.MigrationState.ACTIVE
            ):
                if status is not None and status.state is values.MigrationState.COMPLETED:
                    outcome = None
                else:
                    msg = status.message if status is not None else "unknown outcome"
                    outcome = errors.MigrationError(msg or "the migration ended without success")
                break
            at = time.monotonic()
            if status is not None and status.state is values.MigrationState.ACTIVE:
                tracker.update(status, at)
                progress = ml.progress_dict(status, tracker.rate_bytes_s)
                if progress != last_progress:
                    current = await self._write_progress(current, progress)
                    last_progress = progress
                else:
                    current = await self._reread(current)
            else:
                current = await self._reread(current)
            # abort requests, deadlines, stalls
            if abort_reason is None:
                if current.abort_requested:
                    abort_reason = (
                        "the Migration was deleted" if current.deleting else "abort was requested"
                    )
                    aborted_by_user = True
                elif ml.timed_out(current, ml.now()):
                    abort_reason = (
                        f"the migration did not complete within {current.completion_timeout_s} s "
                        "(completionTimeout)"
                    )
                elif tracker.stalled(at):
                    abort_reason = f"no progress for {int(self.stall_timeout_s)} s"
                if abort_reason is not None:
                    log.warning("migration %s: aborting: %s", view.key, abort_reason)
                    try:
                        await migration_store.call(self.driver.abort_migration, spec)
                    except errors.HypervisorError as exc:
                        log.warning("abort of %s failed: %s", view.key, exc)
        current = await self._reread(current)
        if outcome is None and abort_reason is None:
            try:
                last = await migration_store.call(self.driver.get_migration_status, spec)
            except errors.HypervisorError:
                last = values.MigrationStatus(state=values.MigrationState.COMPLETED)
            final = ml.progress_dict(
                dataclasses.replace(
                    last, state=values.MigrationState.COMPLETED, memory_remaining_bytes=0
                ),
                tracker.rate_bytes_s,
            )
            await self._write(
                current, ml.transition(current, ml.Phase.FINALIZING, {"progress": final})
            )
            return
        message = _message(outcome) if outcome is not None else ""
        if abort_reason is not None:
            reason = f"{abort_reason}; the instance still runs on {self.node}"
        else:
            reason = (
                f"migration to {view.target_node} failed: {message}; "
                f"the instance still runs on {self.node}"
            )
        await self._source_failed(current, spec, reason, aborted=aborted_by_user)

    async def _write_progress(
        self, view: ml.MigrationView, progress: dict[str, int]
    ) -> ml.MigrationView:
        for _ in range(3):
            try:
                body = await migration_store.call(
                    self.store.patch_migration_status,
                    view,
                    ml.status_patch(view, {"progress": progress}),
                )
                return ml.MigrationView.from_body(body)
            except migration_store.Conflict:
                view = await self._reread(view)
        return view

    async def _reread(self, view: ml.MigrationView) -> ml.MigrationView:
        body = await migration_store.call(self.store.get_migration, view.namespace, view.name)
        return ml.MigrationView.from_body(body)

    async def _source_failed(
        self, view: ml.MigrationView, spec: values.InstanceSpec, reason: str, aborted: bool
    ) -> None:
        """Failure seen by the source: finalize(False) here, then one write: Failed + done."""
        await self._finalize_source_quietly(spec, view.live)
        await self._set_instance_migrating(
            view.namespace, view.instance, False, "MigrationFailed", reason
        )
        for _ in range(5):
            if view.terminal:
                await self._write(
                    view,
                    ml.status_patch(view, conditions=[_done(ml.COND_SOURCE_FINALIZED, False)]),
                )
                return
            try:
                await self._write(
                    view,
                    ml.fail(
                        view,
                        reason,
                        aborted=aborted,
                        extra_conditions=[_done(ml.COND_SOURCE_FINALIZED, False)],
                    ),
                )
                return
            except migration_store.Conflict:
                view = await self._reread(view)

    async def _finalize_source_quietly(self, spec: values.InstanceSpec, live: bool) -> None:
        try:
            await migration_store.call(self.driver.finalize_migration_source, spec, False, live)
        except errors.HypervisorError as exc:
            log.warning("finalize_migration_source(%s, success=False): %s", spec.name, exc)

    async def _finalize_source(self, view: ml.MigrationView) -> None:
        _vi, spec = await self._instance(view)
        note = "finalized on the source"
        try:
            await migration_store.call(self.driver.finalize_migration_source, spec, True, view.live)
        except errors.HypervisorError as exc:
            # The instance already runs on the target: failing now would make the source run
            # it again. Report the cleanup problem and succeed.
            note = f"source cleanup reported a problem: {exc.message}"
        await self._write(
            view,
            ml.transition(
                view,
                ml.Phase.SUCCEEDED,
                conditions=[ml.condition(ml.COND_SOURCE_FINALIZED, True, "Succeeded", note)],
            ),
        )

    async def _cleanup_source(self, view: ml.MigrationView) -> None:
        _vi, spec = await self._instance(view)
        await self._finalize_source_quietly(spec, view.live)
        await self._set_instance_migrating(
            view.namespace,
            view.instance,
            False,
            f"Migration{view.phase}",
            view.failure_reason or str(view.phase),
        )
        await self._write(
            view, ml.status_patch(view, conditions=[_done(ml.COND_SOURCE_FINALIZED, False)])
        )

    # --- target steps --------------------------------------------------------------------

    async def _accept(self, view: ml.MigrationView) -> None:
        try:
            _vi, spec = await self._instance(view)
            me = await self._target_node(self.node)
            address = str((me.get("spec") or {}).get("migrationAddress") or "")
            await migration_store.call(
                self.driver.accept_instance, spec, view.migration_info, address
            )
        except errors.HypervisorError as exc:
            await self._fail(view, f"target node {self.node} refused the instance: {exc.message}")
            return
        await self._write(view, ml.transition(view, ml.Phase.TARGET_READY))

    async def _finalize_target(self, view: ml.MigrationView) -> None:
        _vi, spec = await self._instance(view)
        try:
            problem: errors.HypervisorError | None = None
            try:
                await migration_store.call(
                    self.driver.finalize_migration_dst, spec, view.migration_info, True
                )
            except errors.HypervisorError as exc:
                problem = exc
            info = await migration_store.call(self.driver.get_instance_info, spec.name)
            alive = info is not None and info.state.is_alive
            # A restarted target may have finalized already: the instance running here is
            # the answer (Ganeti's cleanup mode), not the repeated call's complaint.
            if not alive:
                raise problem or errors.MigrationError(
                    f"instance {spec.name} did not arrive on {self.node}"
                )
        except errors.HypervisorError as exc:
            with contextlib.suppress(errors.HypervisorError):
                await migration_store.call(
                    self.driver.finalize_migration_dst, spec, view.migration_info, False
                )
            await self._write(
                view,
                ml.fail(
                    view,
                    f"target node {self.node} could not take over the instance: {exc.message}",
                    extra_conditions=[_done(ml.COND_TARGET_FINALIZED, False)],
                ),
            )
            return
        await self._write(
            view,
            ml.status_patch(
                view,
                conditions=[
                    ml.condition(
                        ml.COND_TARGET_FINALIZED, True, "Succeeded", f"instance runs on {self.node}"
                    )
                ],
            ),
        )

    async def _cleanup_target(self, view: ml.MigrationView) -> None:
        try:
            _vi, spec = await self._instance(view)
            await migration_store.call(
                self.driver.finalize_migration_dst, spec, view.migration_info, False
            )
        except errors.HypervisorError as exc:
            log.warning("finalize_migration_dst(%s, success=False): %s", view.instance, exc)
        await self._write(
            view, ml.status_patch(view, conditions=[_done(ml.COND_TARGET_FINALIZED, False)])
        )


def _done(ctype: str, success: bool) -> dict[str, Any]:
    return ml.condition(
        ctype,
        True,
        "Succeeded" if success else "RolledBack",
        "finalized after a successful migration" if success else "finalized with success=False",
    )


def _message(exc: BaseException) -> str:
    if isinstance(exc, errors.HypervisorError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _setting(ctx: Any, name: str, default: float) -> float:
    settings = getattr(ctx, "settings", None)
    value = getattr(settings, name, None)
    return float(value) if isinstance(value, int | float) else default


# --- kopf wiring -----------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, ctx: AgentContext) -> None:
    """Register the Migration handlers of the agent on ``ctx.node_name``."""
    agent = MigrationAgent(ctx)
    node = ctx.node_name

    def involved(body: kopf.Body, **_: Any) -> bool:
        status = body.get("status") or {}
        return node in (status.get("sourceNode"), status.get("targetNode"))

    @kopf.on.event(ml.GROUP, ml.PLURAL, registry=registry, when=involved, id="migration-agent")
    async def on_migration(body: kopf.Body, **_: Any) -> None:
        await agent.handle(dict(body))

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry, id="migration-agent-resync")
    async def start_resync(**_: Any) -> None:
        tasks.append(asyncio.create_task(_resync_forever(agent)))

    @kopf.on.cleanup(registry=registry, id="migration-agent-stop")
    async def stop_resync(**_: Any) -> None:
        for task in tasks:
            task.cancel()


def _migrating_since(vi: Mapping[str, Any], limit: datetime.datetime) -> bool:
    """True if ``vi`` is in phase Migrating and has been since before ``limit``."""
    status = vi.get("status") or {}
    if status.get("phase") != "Migrating":
        return False
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Migrating"), None)
    since = status_mod.parse_time((cond or {}).get("lastTransitionTime"))
    return since is None or since < limit


async def _resync_forever(agent: MigrationAgent) -> None:
    while True:
        await asyncio.sleep(RESYNC_INTERVAL_S)
        await agent.resync()
