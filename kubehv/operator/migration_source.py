"""The source role of a migration: prepare, copy, follow the copy, finalize or roll back.

Why this module exists: only the source node's agent can talk to the source hypervisor.
Each method is one act the owner of the instance decided (:mod:`owner_logic`), run under
the owner's serialisation. The outcome of a copy is always read from the hypervisor
(``get_migration_status``, which answers after an agent restart too), never from this
process's memory: after an abort, a timeout or a stall the copy may still have completed,
and then the migration goes on to Finalizing (the instance runs on the target, once).
Steps that touch the hypervisor are journaled first (:mod:`journal`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from kubehv import api
from kubehv.drivers import errors, values
from kubehv.operator import journal, k8s, metrics
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_progress as progress
from kubehv.operator import migration_roles as roles

log = logging.getLogger(__name__)

State = values.MigrationState


@dataclasses.dataclass
class _Copy:
    """What following one copy has seen so far."""

    abort_reason: str | None = None
    aborted_by_user: bool = False
    error: str = ""


class SourceRole(roles.Role):
    @property
    def progress_interval_s(self) -> float:
        return float(self.ctx.settings.migration_progress_interval_s)

    @property
    def stall_timeout_s(self) -> float:
        return float(self.ctx.settings.migration_stall_timeout_s)

    async def _target(self, view: ml.MigrationView) -> values.MigrationTarget:
        node = await self.node_object(view.target_node)
        return values.MigrationTarget(
            node=view.target_node or "",
            address=node.spec.migration_address or "",
            uri=node.spec.connection_uri or None,
        )

    async def _status(
        self, spec: values.InstanceSpec, target: values.MigrationTarget
    ) -> values.MigrationStatus:
        """Where the copy stands, from the hypervisor: confirmed on the target when this
        agent can reach the target's hypervisor, else from the source alone (the target
        agent confirms arrival itself before it keeps the copy)."""
        try:
            return await k8s.call(self.driver.get_migration_status, spec, target)
        except errors.HypervisorUnavailable as exc:
            log.info("cannot ask %s's hypervisor (%s); asking the source only", target.node, exc)
            return await k8s.call(self.driver.get_migration_status, spec)

    # --- Scheduled -> Preparing ----------------------------------------------------------

    async def prepare(self, view: ml.MigrationView) -> None:
        try:
            _vi, spec = await self.instance(view)
            info = await k8s.call(self.driver.get_instance_info, spec.name)
            if info is None or not info.state.is_alive:
                await self.write(
                    view, ml.fail(view, f"instance {spec.name} is not running on node {self.node}")
                )
                return
            free = (await self.node_object(view.target_node)).status.memory_free
            conds: list[api.Condition] = []
            await self.journal(
                view,
                journal.Role.SOURCE,
                journal.Stage.PREPARING,
                view.target_node,
                info.memory_mib,
            )
            if isinstance(free, int) and info.memory_mib > free:
                if spec.memory_min_mib > free:
                    await self.write(
                        view,
                        ml.fail(
                            view,
                            f"instance {spec.name} uses {info.memory_mib} MiB (minimum "
                            f"{spec.memory_min_mib} MiB) but target node {view.target_node} "
                            f"has only {free} MiB free",
                        ),
                    )
                    return
                await k8s.call(self.driver.balloon_instance_memory, spec, free)
                conds.append(
                    ml.condition(
                        ml.COND_MEMORY_REDUCED,
                        True,
                        "Ballooned",
                        f"ballooned {spec.name} from {info.memory_mib} MiB to {free} MiB to fit "
                        f"target node {view.target_node}",
                    )
                )
            blob = await k8s.call(self.driver.migration_info, spec)
        except errors.HypervisorError as exc:
            await self.write(
                view, ml.fail(view, f"preparing on source node {self.node}: {exc.message}")
            )
            return
        await self.set_instance_migrating(
            view, True, "MigrationStarted", f"migrating to {view.target_node} ({view.name})"
        )
        await self.write(
            view, ml.transition(view, ml.Phase.PREPARING, {"migrationInfo": blob}, conds)
        )

    # --- TargetReady -> Running -> Finalizing (or Failed) --------------------------------

    async def migrate(self, view: ml.MigrationView) -> None:
        """Claim Running (loses to a concurrent abort: 409), then copy and follow it."""
        view = await self.write(view, ml.transition(view, ml.Phase.RUNNING))
        await self.journal(view, journal.Role.SOURCE, journal.Stage.COPYING, view.target_node)
        await self._follow(view, drive=True)

    async def track_copy(self, view: ml.MigrationView) -> None:
        """Running and this process did not start the copy (it restarted): Ganeti's cleanup
        mode. Ask both hypervisors where the instance is, then carry on from there."""
        spec = await self.spec_or_bare(view, self.hypervisor_name(view))
        info = await k8s.call(self.driver.get_instance_info, spec.name)
        target = await self._target(view)
        try:
            status = await self._status(spec, target)
        except errors.HypervisorError as exc:
            log.warning("migration %s: cannot read the copy's state yet: %s", view.key, exc)
            return  # asked again on the next look; never guessed
        recovery = progress.recover_running(info is not None and info.state.is_alive, status)
        log.warning(
            "migration %s: following a copy this process did not start: %s", view.key, recovery
        )
        if recovery is progress.Recovery.RESUME_WATCH:
            await self._follow(view, drive=False)
        elif recovery is progress.Recovery.COMPLETED:
            await self._completed(view, status)
        else:
            await self._failed(
                view,
                "the source agent restarted during the migration and the hypervisor has no "
                f"migration going on ({status.message or 'no job'}); the instance still runs "
                f"on {self.node}",
                aborted=False,
            )

    async def _follow(self, view: ml.MigrationView, drive: bool) -> None:
        _vi, spec = await self.instance(view)
        target = await self._target(view)
        copy: asyncio.Task[None] | None = None
        if drive:
            copy = asyncio.create_task(
                k8s.call(self.driver.migrate_instance, spec, target, view.live, view.options())
            )
        tracker = progress.ProgressTracker(stall_timeout_s=self.stall_timeout_s)
        seen = _Copy()
        last_progress: dict[str, int] | None = None
        last_active: values.MigrationStatus | None = None
        current = view
        looks = 0
        while True:
            if copy is not None and not copy.done():
                await asyncio.wait({copy}, timeout=self.progress_interval_s)
            else:
                await asyncio.sleep(self.progress_interval_s if looks else 0)
            looks += 1
            if copy is not None and copy.done() and copy.exception() is not None:
                seen.error = roles.error_message(copy.exception())  # type: ignore[arg-type]
            try:
                status = await self._status(spec, target)
            except errors.HypervisorError as exc:
                log.warning("migration %s: cannot read progress: %s", view.key, exc)
                continue
            if status.state is not State.ACTIVE and (copy is None or copy.done()):
                break  # the hypervisor's answer is the outcome
            at = time.monotonic()
            if status.state is State.ACTIVE:
                last_active = status
                tracker.update(status, at)
                shown = progress.progress_dict(status, tracker.rate_bytes_s)
                if shown != last_progress:
                    current = await self._write_progress(current, shown)
                    last_progress = shown
                else:
                    current = await self.reread(current)
            else:
                current = await self.reread(current)
            if seen.abort_reason is None:
                seen.abort_reason, seen.aborted_by_user = await self._why_abort(
                    current, tracker, at
                )
                if seen.abort_reason is not None:
                    log.warning("migration %s: aborting: %s", view.key, seen.abort_reason)
                    await k8s.call(self.driver.abort_migration, spec)
        current = await self.reread(current)
        if status.state is State.COMPLETED:
            if seen.abort_reason:
                log.warning(
                    "migration %s: the copy completed before the abort (%s) took effect",
                    view.key,
                    seen.abort_reason,
                )
            await self._completed(
                current, progress.final_figures(status, last_active), tracker.rate_bytes_s
            )
            return
        if seen.abort_reason is not None:
            reason = f"{seen.abort_reason}; the instance still runs on {self.node}"
        else:
            message = seen.error or status.message or "the migration ended without success"
            reason = (
                f"migration to {view.target_node} failed: {message}; "
                f"the instance still runs on {self.node}"
            )
        await self._failed(current, reason, aborted=seen.aborted_by_user)

    async def _why_abort(
        self, current: ml.MigrationView, tracker: progress.ProgressTracker, at: float
    ) -> tuple[str | None, bool]:
        if current.abort_requested:
            why = "the Migration was deleted" if current.deleting else "abort was requested"
            return why, True
        body = await k8s.call(self.kube.get_instance, current.namespace, current.instance)
        if body is None or api.VirtualInstance.model_validate(body).metadata.deletion_timestamp:
            return "the VirtualInstance was deleted", True
        if ml.timed_out(current, ml.now()):
            return (
                f"the migration did not complete within {current.completion_timeout_s} s "
                "(completionTimeout)",
                False,
            )
        if tracker.stalled(at):
            return f"no progress for {int(self.stall_timeout_s)} s", False
        return None, False

    async def _completed(
        self,
        view: ml.MigrationView,
        last: values.MigrationStatus,
        rate: float | None = None,
    ) -> None:
        final = progress.progress_dict(
            dataclasses.replace(
                last,
                state=State.COMPLETED,
                memory_remaining_bytes=0,
                disk_processed_bytes=last.disk_total_bytes,
                disk_remaining_bytes=0,
            ),
            rate,
        )
        metrics.record_migration_bytes(last.memory_processed_bytes)
        for _ in range(5):
            if view.phase is not ml.Phase.RUNNING:
                return  # someone (the target, past the deadline) moved it on already
            try:
                await self.write(
                    view, ml.transition(view, ml.Phase.FINALIZING, {"progress": final})
                )
                return
            except k8s.Conflict:
                view = await self.reread(view)

    async def _write_progress(
        self, view: ml.MigrationView, shown: dict[str, int]
    ) -> ml.MigrationView:
        for _ in range(3):
            try:
                return await self.write(view, ml.status_patch(view, {"progress": shown}))
            except k8s.Conflict:
                view = await self.reread(view)
        return view

    async def _failed(self, view: ml.MigrationView, reason: str, aborted: bool) -> None:
        """Failure seen by the source (its copy runs on): roll back here, then one write."""
        await self._roll_back(view)
        await self.set_instance_migrating(view, False, "MigrationFailed", reason)
        metrics.record_migration("Aborted" if aborted else "Failed", _seconds(view))
        await self.finish(
            view, reason, [roles.done_condition(ml.COND_SOURCE_FINALIZED, False)], aborted
        )
        await self.forget(view)

    async def _roll_back(self, view: ml.MigrationView) -> None:
        """finalize_migration_source(False), and give back memory ballooned for the target."""
        spec = await self.spec_or_bare(view, self.hypervisor_name(view))
        try:
            await k8s.call(self.driver.finalize_migration_source, spec, False, view.live)
        except errors.HypervisorError as exc:
            log.warning("finalize_migration_source(%s, success=False): %s", spec.name, exc)
        entry = journal.load(self.state_dir, spec.name)
        before = entry.memory_before_mib if entry and entry.migration_uid == view.uid else None
        if before is None:
            return
        info = await k8s.call(self.driver.get_instance_info, spec.name)
        if info is not None and info.state.is_alive and info.memory_mib < before:
            try:
                await k8s.call(self.driver.balloon_instance_memory, spec, before)
                log.info("migration %s: gave %s back its %s MiB", view.key, spec.name, before)
            except errors.HypervisorError as exc:
                log.warning("cannot restore the memory of %s: %s", spec.name, exc)

    # --- the end -------------------------------------------------------------------------

    async def finalize(self, view: ml.MigrationView) -> None:
        """Finalizing and the target has the instance: clean up here, Succeeded."""
        spec = await self.spec_or_bare(view, self.hypervisor_name(view))
        await self.journal(view, journal.Role.SOURCE, journal.Stage.FINALIZING, view.target_node)
        note = "finalized on the source"
        try:
            await k8s.call(self.driver.finalize_migration_source, spec, True, view.live)
        except errors.HypervisorError as exc:
            # The instance already runs on the target: failing now would make the source run
            # it again. Report the cleanup problem and succeed.
            note = f"source cleanup reported a problem: {exc.message}"
        await self.write(
            view,
            ml.transition(
                view,
                ml.Phase.SUCCEEDED,
                conditions=[ml.condition(ml.COND_SOURCE_FINALIZED, True, "Succeeded", note)],
            ),
        )
        metrics.record_migration("Succeeded", _seconds(view))
        await self.forget(view)

    async def cleanup(self, view: ml.MigrationView) -> None:
        """Failed or Aborted (written by another): roll back here and record it."""
        await self._roll_back(view)
        await self.set_instance_migrating(
            view, False, f"Migration{view.phase}", view.failure_reason or str(view.phase)
        )
        await self.write(
            view,
            ml.status_patch(
                view, conditions=[roles.done_condition(ml.COND_SOURCE_FINALIZED, False)]
            ),
        )
        await self.forget(view)

    async def abandon(self, view: ml.MigrationView, reason: str) -> None:
        """The instance was deleted: stop any copy, undo this side, end the Migration."""
        spec = await self.spec_or_bare(view, self.hypervisor_name(view))
        if view.phase is ml.Phase.RUNNING:
            await k8s.call(self.driver.abort_migration, spec)
        try:
            await k8s.call(self.driver.finalize_migration_source, spec, False, view.live)
        except errors.HypervisorError as exc:
            log.warning("finalize_migration_source(%s, success=False): %s", spec.name, exc)
        await self.finish(
            view, reason, [roles.done_condition(ml.COND_SOURCE_FINALIZED, False, reason)], True
        )
        await self.forget(view)


def _seconds(view: ml.MigrationView) -> float | None:
    if view.start_time is None:
        return None
    return max(0.0, (ml.now() - view.start_time).total_seconds())
