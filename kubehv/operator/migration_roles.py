"""What the source and target roles of a migration share: guarded writes and the journal.

Why this module exists: both roles (:mod:`migration_source`, :mod:`migration_target`) act
only when the owner of the instance (:mod:`owner`) tells them to, write the Migration's
status guarded by resourceVersion (the loser of a race gets :class:`k8s.Conflict`, and the
owner decides again on a fresh read), mark the VirtualInstance Migrating and back, and
journal each step that touches the hypervisor before doing it (:mod:`journal`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kubehv import api
from kubehv.api import virtualinstance as vim
from kubehv.drivers import base, errors, values
from kubehv.operator import context, journal, k8s, translate
from kubehv.operator import migration_logic as ml
from kubehv.operator import status as status_mod

log = logging.getLogger(__name__)


def done_condition(ctype: str, success: bool, message: str = "") -> api.Condition:
    return ml.condition(
        ctype,
        True,
        "Succeeded" if success else "RolledBack",
        message
        or (
            "finalized after a successful migration" if success else "finalized with success=False"
        ),
    )


def error_message(exc: BaseException) -> str:
    if isinstance(exc, errors.HypervisorError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class Role:
    """Shared plumbing of one role on one node."""

    def __init__(self, ctx: context.AgentContext) -> None:
        self.ctx = ctx
        self.node = ctx.node_name
        self.driver: base.BaseHypervisor = ctx.driver
        self.kube = ctx.kube
        self.state_dir = ctx.settings.state_dir

    # --- reads ---------------------------------------------------------------------------

    async def instance(
        self, view: ml.MigrationView
    ) -> tuple[api.VirtualInstance, values.InstanceSpec]:
        body = await k8s.call(self.kube.get_instance, view.namespace, view.instance)
        if body is None:
            raise errors.InstanceNotFound(view.instance)
        vi = api.VirtualInstance.model_validate(body)
        return vi, translate.instance_spec(vi, self.ctx.node_defaults)

    async def spec_or_bare(self, view: ml.MigrationView | None, name: str) -> values.InstanceSpec:
        """The instance's spec, or a bare one by name when the VirtualInstance is gone
        (the driver's finalize and abort calls address the domain by name)."""
        if view is not None:
            try:
                _vi, spec = await self.instance(view)
                return spec
            except errors.InstanceNotFound:
                pass
        return values.InstanceSpec(name=name, uid="", memory_min_mib=1, memory_max_mib=1)

    def hypervisor_name(self, view: ml.MigrationView) -> str:
        return translate.hypervisor_name(view.namespace, view.instance)

    async def reread(self, view: ml.MigrationView) -> ml.MigrationView:
        return ml.MigrationView.from_body(
            await k8s.call(self.kube.get_migration, view.namespace, view.name)
        )

    async def node_object(self, name: str | None) -> api.NodeHypervisor:
        body = await k8s.call(self.kube.get_node, name or "")
        if body is None:
            raise errors.MigrationError(f"node {name} has no NodeHypervisor")
        return api.NodeHypervisor.model_validate(body)

    # --- writes --------------------------------------------------------------------------

    async def write(self, view: ml.MigrationView, patch: Mapping[str, Any]) -> ml.MigrationView:
        body = await k8s.call(self.kube.patch_migration_status, view, patch)
        return ml.MigrationView.from_body(body)

    async def finish(
        self,
        view: ml.MigrationView,
        reason: str,
        done: Sequence[api.Condition],
        aborted: bool = False,
    ) -> None:
        """One write: the terminal phase (unless already terminal) with this side's record."""
        for _ in range(5):
            try:
                if view.terminal:
                    await self.write(view, ml.status_patch(view, conditions=done))
                else:
                    log.warning(
                        "migration %s %s: %s", view.key, "aborted" if aborted else "failed", reason
                    )
                    await self.write(
                        view, ml.fail(view, reason, aborted=aborted, extra_conditions=done)
                    )
                return
            except k8s.Conflict:
                view = await self.reread(view)

    async def set_instance_migrating(
        self, view: ml.MigrationView, migrating: bool, reason: str, message: str
    ) -> None:
        """Mark the VirtualInstance Migrating (phase + condition), or back from it."""
        for _ in range(5):
            body = await k8s.call(self.kube.get_instance, view.namespace, view.instance)
            if body is None:
                return
            vi = api.VirtualInstance.model_validate(body)
            st = vi.status
            if not migrating and st.node_name != self.node:
                return  # the controller already handed it on
            cond = status_mod.Condition("Migrating", migrating, reason, message)
            new: dict[str, Any] = {
                "conditions": status_mod.merge_model_conditions(st.conditions, [cond])
            }
            if migrating:
                new["phase"] = vim.Phase.MIGRATING.value
            elif st.phase is vim.Phase.MIGRATING:
                info = await k8s.call(self.driver.get_instance_info, translate.instance_name(vi))
                alive = info is not None and info.state.is_alive
                new["phase"] = (vim.Phase.RUNNING if alive else vim.Phase.FAILED).value
            try:
                await k8s.call(self.kube.patch_instance_status, vi, new)
                return
            except k8s.Conflict:
                continue

    # --- journal -------------------------------------------------------------------------

    async def journal(
        self,
        view: ml.MigrationView,
        role: journal.Role,
        stage: journal.Stage,
        peer: str | None,
        memory_before_mib: int | None = None,
    ) -> None:
        entry = journal.Entry(
            instance=self.hypervisor_name(view),
            migration_uid=view.uid,
            migration=view.key,
            role=role,
            stage=stage,
            peer=peer or "",
            vi=f"{view.namespace}/{view.instance}",
            migration_info=view.migration_info if role is journal.Role.TARGET else "",
            memory_before_mib=memory_before_mib,
        )
        old = journal.load(self.state_dir, entry.instance)
        if old is not None and old.migration_uid == view.uid and memory_before_mib is None:
            entry = dataclasses.replace(entry, memory_before_mib=old.memory_before_mib)
        await k8s.call(journal.store, self.state_dir, entry)

    async def forget(self, view: ml.MigrationView) -> None:
        await k8s.call(journal.clear, self.state_dir, self.hypervisor_name(view), view.uid)
