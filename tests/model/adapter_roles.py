"""Adapter part: the migration roles of the owner model and the driver contract they use.

Why this module exists: the owner performs a migration act (``owner_logic.Act``) through
``operator/migration_source.py``, ``migration_target.py`` and ``migration_roles.py``; this is
that I/O glue on the model, in the same order (journal first, then the hypervisor, then
the guarded status write), with the driver answering as ``drivers/base.py`` promises:
migration status read from the hypervisors (never from process memory), abort that never
fails for want of a job, and ``finalize_migration_dst(success=False)`` that refuses to
destroy a copy that runs (:class:`errors.MigrationCompleted`). The source's ``_follow``
loop is one model step per turn (:func:`follow_turn`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from kubehv import api
from kubehv.drivers import errors, values
from kubehv.operator import journal
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_progress as progress
from kubehv.operator import migration_roles as roles
from kubehv.operator import owner_logic as ol
from kubehv.operator import status as st
from tests.model import world
from tests.model.adapter_common import FAILED_STEP, mwrite, reread, vi_model
from tests.model.sim import Sim
from tests.model.world import Conflict

Act = ol.Act


# --- the driver contract and the journal ------------------------------------------------


def copy_status(sim: Sim, node: str) -> values.MigrationStatus:
    """get_migration_status(spec, target) as the contract says: from the hypervisors."""
    h = sim.hv.h[node]
    state = values.MigrationState
    if h.job:
        return values.MigrationStatus(state=state.ACTIVE)
    if h.dom:
        return values.MigrationStatus(state=state.FAILED, message="no migration job")
    if sim.hv.dom(world.other(node)):
        return values.MigrationStatus(state=state.COMPLETED)
    return values.MigrationStatus(state=state.FAILED, message="on neither node")


def _finalize_dst(sim: Sim, node: str, success: bool) -> None:
    h = sim.hv.h[node]
    if success:
        if not h.dom:
            raise errors.MigrationError(f"{world.DOMAIN} did not arrive on {node}")
        sim.hv.resume(node)
        return
    if not h.dom:
        return
    if h.incoming and sim.hv.h[world.other(node)].job:
        sim.hv.destroy(node)  # still incoming: the transfer has not finished
        return
    raise errors.MigrationCompleted(world.DOMAIN, node)


def _finalize_src(sim: Sim, node: str, success: bool) -> None:
    if success:
        sim.hv.destroy(node)
        return
    if not sim.hv.dom(node):
        raise errors.MigrationError("no longer runs on the source")
    sim.hv.resume(node)


def _journal(sim: Sim, node: str, view: ml.MigrationView, role: str, stage: str) -> None:
    sim.set_agent(node, journal=(view.uid, role, stage, view.key))


def _forget(sim: Sim, node: str, view: ml.MigrationView) -> None:
    entry = sim.agent(node).journal
    if entry is not None and entry[0] == view.uid:
        sim.set_agent(node, journal=None)


def journal_entry(sim: Sim, node: str) -> journal.Entry | None:
    raw = sim.agent(node).journal
    if raw is None:
        return None
    uid, role, stage, key = raw
    return journal.Entry(
        instance=world.DOMAIN,
        migration_uid=uid,
        migration=key,
        role=journal.Role(role),
        stage=journal.Stage(stage),
        peer=world.other(node),
        vi=f"{world.NAMESPACE}/{world.INSTANCE}",
        migration_info="model" if role == "target" else "",
    )


# --- the migration roles (migration_source.py, migration_target.py, migration_roles.py) ---


def _instance(sim: Sim) -> dict[str, Any]:
    body = sim.get_vi()
    if body is None:
        raise errors.InstanceNotFound(world.INSTANCE)
    return body


def _done(ctype: str, message: str = "") -> api.Condition:
    return roles.done_condition(ctype, False, message)


def _finish(
    sim: Sim, view: ml.MigrationView, reason: str, done: api.Condition, aborted: bool = False
) -> None:
    for _ in range(5):
        try:
            if view.terminal:
                mwrite(sim, ml.status_patch(view, conditions=[done]))
            else:
                mwrite(sim, ml.fail(view, reason, aborted=aborted, extra_conditions=[done]))
            return
        except Conflict:
            view = reread(sim)


def _set_instance_migrating(sim: Sim, node: str, migrating: bool, reason: str) -> None:
    for _ in range(5):
        vi = vi_model(sim.vi)
        if vi is None:
            return
        if not migrating and vi.status.node_name != node:
            return
        cond = st.Condition("Migrating", migrating, reason, reason)
        new: dict[str, Any] = {
            "conditions": st.merge_model_conditions(vi.status.conditions, [cond])
        }
        if migrating:
            new["phase"] = "Migrating"
        elif vi.status.phase is not None and vi.status.phase.value == "Migrating":
            new["phase"] = "Running" if sim.alive(node) else "Failed"
        try:
            sim.patch_vi_status(new, vi.metadata.resource_version)
            return
        except Conflict:
            continue


def migration_act(
    sim: Sim, node: str, act: ol.Act, view: ml.MigrationView | None, message: str
) -> None:
    if view is None:
        if act is Act.CLEANUP_TARGET:  # a journal entry whose Migration is gone
            try:
                _finalize_dst(sim, node, False)
            except errors.HypervisorError as exc:
                if exc.reason == "MigrationCompleted":
                    with contextlib.suppress(errors.HypervisorError):
                        _finalize_dst(sim, node, True)
            sim.set_agent(node, journal=None)
        return
    if act is Act.PREPARE:
        _instance(sim)
        if not sim.alive(node):
            mwrite(sim, ml.fail(view, f"instance is not running on node {node}"))
            return
        _journal(sim, node, view, "source", "Preparing")
        _set_instance_migrating(sim, node, True, "MigrationStarted")
        mwrite(sim, ml.transition(view, ml.Phase.PREPARING, {"migrationInfo": "model"}))
    elif act is Act.MIGRATE:
        view = mwrite(sim, ml.transition(view, ml.Phase.RUNNING))
        _journal(sim, node, view, "source", "Copying")
        _instance(sim)
        with contextlib.suppress(errors.HypervisorError):  # the copy task's error is seen.error
            sim.hv.start_migration(node, world.other(node))
        sim.set_agent(node, monitor="drive", abort_by="")
    elif act is Act.TRACK_COPY:
        status = copy_status(sim, node)
        recovery = progress.recover_running(sim.alive(node), status)
        sim.did += f" -> recover_running: {recovery.value}"
        if recovery is progress.Recovery.RESUME_WATCH:
            _instance(sim)
            sim.set_agent(node, monitor="watch", abort_by="")
        elif recovery is progress.Recovery.COMPLETED:
            _completed(sim, view)
        else:
            _source_failed(sim, node, view, "restarted; no migration going on", aborted=False)
    elif act is Act.FINALIZE_SOURCE:
        _journal(sim, node, view, "source", "Finalizing")
        with contextlib.suppress(errors.HypervisorError):
            _finalize_src(sim, node, True)
        cond = ml.condition(ml.COND_SOURCE_FINALIZED, True, "Succeeded", "finalized")
        mwrite(sim, ml.transition(view, ml.Phase.SUCCEEDED, conditions=[cond]))
        _forget(sim, node, view)
    elif act is Act.CLEANUP_SOURCE:
        with contextlib.suppress(errors.HypervisorError):
            _finalize_src(sim, node, False)
        _set_instance_migrating(sim, node, False, f"Migration{view.phase}")
        mwrite(sim, ml.status_patch(view, conditions=[_done(ml.COND_SOURCE_FINALIZED)]))
        _forget(sim, node, view)
    elif act is Act.ACCEPT:
        _instance(sim)
        _journal(sim, node, view, "target", "Accepting")
        if sim.hv.dom(node):
            mwrite(sim, ml.fail(view, f"target node {node} refused the instance: exists"))
            return
        mwrite(sim, ml.transition(view, ml.Phase.TARGET_READY))
    elif act is Act.FINALIZE_TARGET:
        _instance(sim)
        _journal(sim, node, view, "target", "Finalizing")
        with contextlib.suppress(errors.HypervisorError):
            _finalize_dst(sim, node, True)
        if not sim.alive(node):
            _finish(sim, view, "did not arrive", _done(ml.COND_TARGET_FINALIZED))
            _forget(sim, node, view)
            return
        cond = ml.condition(ml.COND_TARGET_FINALIZED, True, "Succeeded", f"runs on {node}")
        mwrite(sim, ml.status_patch(view, conditions=[cond]))
        _forget(sim, node, view)
    elif act is Act.CLEANUP_TARGET:
        kept = ""
        try:
            _finalize_dst(sim, node, False)
        except errors.HypervisorError as exc:
            if exc.reason == "MigrationCompleted":
                kept = exc.message
                with contextlib.suppress(errors.HypervisorError):
                    _finalize_dst(sim, node, True)
        if kept:
            done = ml.condition(
                ml.COND_TARGET_FINALIZED, True, ml.REASON_COMPLETED_ANYWAY, f"kept: {kept}"
            )
        else:
            done = _done(ml.COND_TARGET_FINALIZED)
        mwrite(sim, ml.status_patch(view, conditions=[done]))
        _forget(sim, node, view)
    elif act is Act.TAKE_OVER:
        mwrite(sim, ml.transition(view, ml.Phase.FINALIZING))
    elif act is Act.FAIL_NOT_ARRIVED:
        _finish(sim, view, message, _done(ml.COND_TARGET_FINALIZED))
        _forget(sim, node, view)
    elif act is Act.ABANDON:
        _abandon(sim, node, view, message)


def _abandon(sim: Sim, node: str, view: ml.MigrationView, reason: str) -> None:
    if ml.role_of(view, node) is ml.Role.SOURCE:
        if view.phase is ml.Phase.RUNNING:
            sim.hv.abort_job(node)
        with contextlib.suppress(errors.HypervisorError):
            _finalize_src(sim, node, False)
        _finish(sim, view, reason, _done(ml.COND_SOURCE_FINALIZED, reason), aborted=True)
    else:
        with contextlib.suppress(errors.HypervisorError):
            _finalize_dst(sim, node, False)
        _finish(sim, view, reason, _done(ml.COND_TARGET_FINALIZED, reason), aborted=True)
    _forget(sim, node, view)


def _completed(sim: Sim, view: ml.MigrationView) -> None:
    for _ in range(5):
        if view.phase is not ml.Phase.RUNNING:
            return
        try:
            mwrite(sim, ml.transition(view, ml.Phase.FINALIZING, {"progress": {"percent": 100}}))
            return
        except Conflict:
            view = reread(sim)


def _source_failed(sim: Sim, node: str, view: ml.MigrationView, reason: str, aborted: bool) -> None:
    with contextlib.suppress(errors.HypervisorError):
        _finalize_src(sim, node, False)
    _set_instance_migrating(sim, node, False, "MigrationFailed")
    _finish(sim, view, reason, _done(ml.COND_SOURCE_FINALIZED), aborted)
    _forget(sim, node, view)


def follow_turn(sim: Sim, node: str) -> None:
    """One turn of ``SourceRole._follow``; the act (and the owner's busy time) ends with it."""
    try:
        _follow_turn(sim, node)
    except FAILED_STEP:
        sim.set_agent(node, monitor="")
        raise


def _follow_turn(sim: Sim, node: str) -> None:
    agent = sim.agent(node)
    status = copy_status(sim, node)
    if status.state is not values.MigrationState.ACTIVE:
        sim.set_agent(node, monitor="")
        current = reread(sim)
        sim.did = f"copy {status.state.value}"
        if status.state is values.MigrationState.COMPLETED:
            _completed(sim, current)
            return
        _source_failed(sim, node, current, "the copy failed", agent.abort_by == "user")
        return
    current = reread(sim)
    sim.did = "copy active"
    if agent.abort_by:
        return
    vi = sim.get_vi()
    if current.abort_requested or vi is None or (vi.get("metadata") or {}).get("deletionTimestamp"):
        by = "user"
    elif ml.timed_out(current, sim.now):
        by = "deadline"
    else:
        return
    sim.hv.abort_job(node)
    sim.set_agent(node, abort_by=by)
    sim.did = f"abort ({by})"
