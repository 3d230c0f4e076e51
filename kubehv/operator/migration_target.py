"""The target role of a migration: accept the incoming domain, keep it or undo it.

Why this module exists: only the target node's agent can talk to the target hypervisor.
Each method is one act the owner of the instance decided (:mod:`owner_logic`); the rule
that matters most lives here: the target never destroys an incoming domain that may be the
only copy. ``finalize_migration_dst(success=False)`` refuses to destroy a resumed domain
(``errors.MigrationCompleted``); that answer is taken as what it is, the migration finished.
"""

from __future__ import annotations

import logging

from kubehv.drivers import errors
from kubehv.operator import journal, k8s, translate, workloads
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_roles as roles

log = logging.getLogger(__name__)

_COMPLETED = getattr(errors, "MigrationCompleted", None)


def _completed(exc: BaseException) -> bool:
    return (_COMPLETED is not None and isinstance(exc, _COMPLETED)) or (
        isinstance(exc, errors.HypervisorError) and exc.reason == "MigrationCompleted"
    )


class TargetRole(roles.Role):
    async def accept(self, view: ml.MigrationView) -> None:
        try:
            vi, spec = await self.instance(view)
            # The seed ISO is rebuilt here: with the Secret's user data, as the source had it.
            spec = translate.instance_spec(
                vi,
                self.ctx.node_defaults,
                user_data=await workloads.user_data(self.ctx.secrets, vi),
            )
            address = (await self.node_object(self.node)).spec.migration_address or ""
            await self.journal(view, journal.Role.TARGET, journal.Stage.ACCEPTING, view.source_node)
            await k8s.call(self.driver.accept_instance, spec, view.migration_info, address)
        except errors.HypervisorError as exc:
            await self.write(
                view,
                ml.fail(view, f"target node {self.node} refused the instance: {exc.message}"),
            )
            return
        await self.write(view, ml.transition(view, ml.Phase.TARGET_READY))

    async def finalize(self, view: ml.MigrationView) -> None:
        """Finalizing: keep the arrived domain (finalize_migration_dst(True))."""
        _vi, spec = await self.instance(view)
        await self.journal(view, journal.Role.TARGET, journal.Stage.FINALIZING, view.source_node)
        problem: errors.HypervisorError | None = None
        try:
            await k8s.call(self.driver.finalize_migration_dst, spec, view.migration_info, True)
        except errors.HypervisorError as exc:
            problem = exc
        info = await k8s.call(self.driver.get_instance_info, spec.name)
        # A restarted target may have finalized already: the instance running here is the
        # answer (Ganeti's cleanup mode), not the repeated call's complaint.
        if info is None or not info.state.is_alive:
            message = problem.message if problem else f"instance {spec.name} did not arrive"
            await self.finish(
                view,
                f"target node {self.node} could not take over the instance: {message}",
                [roles.done_condition(ml.COND_TARGET_FINALIZED, False)],
            )
            await self.forget(view)
            return
        await self.write(
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
        await self.forget(view)

    async def cleanup(self, view: ml.MigrationView | None, name: str) -> None:
        """Undo the incoming side (finalize_migration_dst(False)); never a resumed copy."""
        if view is not None:
            info_blob = view.migration_info
        else:
            entry = await k8s.call(journal.load, self.state_dir, name)
            info_blob = entry.migration_info if entry is not None else ""
        kept = ""
        try:
            spec = await self.spec_or_bare(view, name)
            await k8s.call(self.driver.finalize_migration_dst, spec, info_blob, False)
        except errors.HypervisorError as exc:
            if _completed(exc):
                kept = exc.message
                log.error(
                    "migration %s: the copy of %s completed on %s after all; keeping it: %s",
                    view.key if view else name,
                    name,
                    self.node,
                    exc.message,
                )
                try:
                    await k8s.call(self.driver.finalize_migration_dst, spec, info_blob, True)
                except errors.HypervisorError as again:
                    log.warning("finalize_migration_dst(%s, success=True): %s", name, again)
            else:
                log.warning("finalize_migration_dst(%s, success=False): %s", name, exc)
        if view is None:
            await k8s.call(journal.clear, self.state_dir, name)
            return
        if kept:
            done = ml.condition(
                ml.COND_TARGET_FINALIZED,
                True,
                ml.REASON_COMPLETED_ANYWAY,
                f"the copy completed after all; the instance runs on {self.node} (kept): {kept}",
            )
        else:
            done = roles.done_condition(ml.COND_TARGET_FINALIZED, False)
        await self.write(view, ml.status_patch(view, conditions=[done]))
        await self.forget(view)

    async def take_over(self, view: ml.MigrationView, message: str) -> None:
        """Running past its deadline, the copy runs here: the migration did complete."""
        log.warning("migration %s: %s; moving on to Finalizing", view.key, message)
        await self.write(view, ml.transition(view, ml.Phase.FINALIZING))

    async def not_arrived(self, view: ml.MigrationView, message: str) -> None:
        """Running past its deadline and nothing here: it failed (the source keeps its copy)."""
        await self.finish(view, message, [roles.done_condition(ml.COND_TARGET_FINALIZED, False)])
        await self.forget(view)

    async def abandon(self, view: ml.MigrationView, name: str, reason: str) -> None:
        """The instance was deleted: undo the incoming side, end the Migration (I4)."""
        try:
            spec = await self.spec_or_bare(view, name)
            await k8s.call(self.driver.finalize_migration_dst, spec, view.migration_info, False)
        except errors.HypervisorError as exc:
            log.warning("finalize_migration_dst(%s, success=False): %s", name, exc)
        await self.finish(
            view, reason, [roles.done_condition(ml.COND_TARGET_FINALIZED, False, reason)], True
        )
        await self.forget(view)
