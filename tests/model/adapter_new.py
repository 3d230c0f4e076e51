"""Adapter: the actors' steps of kubehv's owner model (issue "One owner per instance").

Why this module exists: the model checker judges kubehv's own decisions. Here the agent is
the owner of the instance on its node (``operator/owner.py``): each model step is one look
at the instance (its watch cache, or a fresh read) and one call of the pure
:func:`owner_logic.decide`, then the act it answers, performed in the order
``operator/instances.py``, ``migration_source.py`` and ``migration_target.py`` do it. The
source's ``_follow`` loop (the owner is busy meanwhile, nothing else acts on the instance)
is one step per turn. The controller's steps call :func:`migration_logic.next_step` /
``schedule``, :func:`heartbeat.instance_status_patch`, :func:`placement.choose` and
:func:`drain.plan` as ``controller.py``, ``migration_controller.py`` and ``drain.py`` do.
The driver answers by the driver contract of that code (``drivers/base.py``): migration
status read from the hypervisor (never from process memory), abort never fails for want of
a job, and ``finalize_migration_dst(success=False)`` refuses to destroy a copy that runs
(:class:`errors.MigrationCompleted`). The journal is durable agent state; a crash keeps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pydantic

from kubehv import api
from kubehv.drivers import errors, values
from kubehv.operator import (
    drain,
    heartbeat,
    instance_logic,
    instances,
    journal,
    k8s,
    placement,
)
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_progress as progress
from kubehv.operator import migration_roles as roles
from kubehv.operator import migration_scheduling as sched
from kubehv.operator import owner_logic as ol
from kubehv.operator import status as st
from tests.model import world
from tests.model.sim import GRACE_S, T0_TIME, Sim, mig_body, vi_body
from tests.model.world import NODES, Conflict, NotFound, Obj

IL = instance_logic
Act = ol.Act
POLICY = IL.Policy()
Step = Callable[[Sim], None]
WATCHES_MIGRATIONS = True
"""The owner decides on its watch cache of the instance's Migration too (owner.migrations)."""
FAILED_STEP = (Conflict, NotFound, errors.HypervisorError, ValueError)
"""What the glue raises and its callers log (the owner's ``_drive``, resync loops)."""


def _run(fn: Step) -> Step:
    def step(sim: Sim) -> None:
        with contextlib.suppress(*FAILED_STEP):
            fn(sim)

    return step


def _call(fn: Callable[..., None], args: tuple[Any, ...], sim: Sim) -> None:
    fn(sim, *args)


def _on(fn: Callable[..., None], *args: Any) -> Step:
    return _run(functools.partial(_call, fn, args))


def steps(state: world.State) -> list[tuple[str, Step]]:
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        agent = state.agents[i]
        if agent.proc != "up":
            continue
        if agent.monitor:
            out.append((f"{node}: owner follows the copy", _on(follow_turn, node)))
            continue  # the owner is busy in its act: nothing else acts on the instance
        if agent.cache is not None or agent.mcache is not None:
            out.append((f"{node}: owner (watch cache)", _on(owner_step, node, False)))
        out.append((f"{node}: owner (fresh read)", _on(owner_step, node, True)))
    out.append(("controller: place", _run(place)))
    out.append(("controller: heartbeat check", _run(heartbeat_check)))
    if state.mig is not None:
        out.append(("controller: migration step", _run(migration_controller)))
    if any(n.drain or n.drained for n in state.nodes):
        out.append(("controller: drain", _run(drain_controller)))
    return out


def restart(sim: Sim, node: str) -> None:
    """A fresh agent process: memory gone (the journal on disk stays), heartbeat published."""
    sim.set_agent(
        node,
        proc="up",
        stale=False,
        cache=sim.vi if sim.list_vi_on(node) else None,
        mcache=None,
        monitor="",
        abort_by="",
        tracker="",
        evicting=None,
    )
    sim.set_node(node, ready="True")


# --- the world through kubehv's types and driver contract --------------------------------


@functools.lru_cache(maxsize=65536)
def _vi_model(obj: Obj | None) -> api.VirtualInstance | None:
    """The typed model of a (frozen) VirtualInstance; parsed once per distinct object."""
    return None if obj is None else api.VirtualInstance.model_validate(vi_body(obj))


@functools.lru_cache(maxsize=65536)
def _mig_model(obj: Obj) -> api.Migration:
    return api.Migration.model_validate(mig_body(obj))


def _remember(sim: Sim, node: str, body: dict[str, Any]) -> None:
    """owner.remember: keep our newest copy; an instance no longer on this node is dropped."""
    if (body.get("status") or {}).get("nodeName") != node:
        sim.set_agent(node, cache=None)
        return
    cached = sim.agent(node).cache
    rv = int(body["metadata"]["resourceVersion"])
    if cached is not None and cached.rv > rv:
        return
    if sim.vi is not None and sim.vi.rv == rv:
        sim.set_agent(node, cache=sim.vi)


def _status(sim: Sim, node: str) -> values.MigrationStatus:
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


def _entry(sim: Sim, node: str) -> journal.Entry | None:
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


# --- the owner (operator/owner.py) -------------------------------------------------------


@dataclasses.dataclass
class _Look:
    inputs: ol.Inputs
    body: dict[str, Any] | None
    view: ml.MigrationView | None


def _look(sim: Sim, node: str, fresh: bool) -> _Look | None:
    agent = sim.agent(node)
    if fresh:
        obj, mobj = sim.vi, sim.mig
        if obj is not None:
            _remember(sim, node, vi_body(obj))
    else:
        obj, mobj = agent.cache, agent.mcache
    body = None if obj is None else vi_body(obj)
    mbodies = [] if mobj is None else [mobj]
    try:
        vi = _vi_model(obj)
        migrations = [_mig_model(m) for m in mbodies]
    except pydantic.ValidationError:
        return None
    mig = ol.open_migration(migrations, world.NAMESPACE, world.INSTANCE, node)
    if fresh:
        # owner.py keeps only an open Migration; keeping a settled one too decides the same
        # (open_migration skips it) and spares the model a cache the watch would refill.
        sim.set_agent(node, mcache=sim.mig if mbodies and _involves(sim.mig, node) else None)
    inputs = ol.Inputs(
        node=node,
        instance=vi,
        fresh=fresh,
        migration=mig,
        domain=sim.info(node),
        journal=_entry(sim, node),
        node_draining=sim.node(node).drain,
        history=IL.History(),
        now=sim.now.timestamp(),
        policy=POLICY,
    )
    return _Look(inputs, body, ml.MigrationView.of(mig) if mig is not None else None)


def _involves(mig: Obj | None, node: str) -> bool:
    return mig is not None and node in (mig.stat("sourceNode"), mig.stat("targetNode"))


def owner_step(sim: Sim, node: str, fresh: bool) -> None:
    look = _look(sim, node, fresh)
    if look is None:
        return
    action = ol.decide(look.inputs)
    if action.act is Act.REREAD:
        look = _look(sim, node, True)
        if look is None:
            return
        action = ol.decide(look.inputs)
        fresh = True
    phase = look.inputs.instance.status.phase if look.inputs.instance else None
    sim.did = f"decide -> {action.act.value} ({'fresh' if fresh else 'cached'} phase {phase})"
    _perform(sim, node, look, action)


def _perform(sim: Sim, node: str, look: _Look, action: ol.Action) -> None:
    act, inputs, view = action.act, look.inputs, look.view
    if act in ol.MIGRATION_ACTS:
        with contextlib.suppress(Conflict, NotFound):
            _migration_act(sim, node, act, view, action.message)
        return
    if act is Act.CLEAR_JOURNAL:
        sim.set_agent(node, journal=None)
        return
    if inputs.instance is None or look.body is None:
        return
    vi, body = inputs.instance, look.body
    observed = IL.Observed(inputs.domain)
    if act in (Act.NOTHING, Act.WAIT):
        if vi.status.node_name == node and inputs.migration is None:
            _refresh(sim, node, vi, observed)
        return
    try:
        _instance_act(sim, node, vi, body, observed, action)
    except errors.HypervisorError as exc:
        text = f"{act} failed: {exc.message}"
        _write(sim, node, vi, IL.desired_status(vi, IL.Observed(sim.info(node)), message=text))


def _write(sim: Sim, node: str, vi: api.VirtualInstance, desired: dict[str, Any]) -> None:
    patch = IL.status_patch(vi, desired)
    if not patch:
        return
    try:
        result = sim.patch_vi_status(patch, None)
    except NotFound:
        return
    _remember(sim, node, result)


def _guarded(sim: Sim, node: str, body: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    result = sim.patch_vi_status(new, body["metadata"]["resourceVersion"])
    _remember(sim, node, result)
    return result


def _refresh(sim: Sim, node: str, vi: api.VirtualInstance, observed: IL.Observed) -> None:
    phase = vi.status.phase.value if vi.status.phase else ""
    if (
        phase == "Migrating"
        or ol.deleting(vi)
        or not ol.has_finalizer(vi)
        or (phase in ("Evicted", "Unknown") and observed.info is None)
    ):
        return
    failed = phase == "Failed" and not observed.alive
    if (not failed and observed.info is not None) or vi.spec.run_state.value == IL.STOPPED:
        _write(sim, node, vi, IL.desired_status(vi, observed))


def _instance_act(
    sim: Sim,
    node: str,
    vi: api.VirtualInstance,
    body: dict[str, Any],
    observed: IL.Observed,
    action: ol.Action,
) -> None:
    act = action.act
    if act in (Act.ADD_FINALIZER, Act.FINALIZE):
        if act is Act.FINALIZE:
            sim.hv.destroy(node)
        current = list(vi.metadata.finalizers)
        wanted = (
            [*current, k8s.FINALIZER]
            if act is Act.ADD_FINALIZER
            else [f for f in current if f != k8s.FINALIZER]
        )
        try:
            result = sim.set_vi_finalizers(wanted, vi.metadata.resource_version)
        except (Conflict, NotFound):
            return
        if act is Act.ADD_FINALIZER:
            _remember(sim, node, result)
        return
    if act in (Act.START, Act.RESTART):
        if vi.status.phase in instances.CLAIM_BEFORE_START:
            try:
                body = _guarded(sim, node, body, {"phase": "Starting"})
            except Conflict:
                return
            vi = api.VirtualInstance.model_validate(body)
        with contextlib.suppress(errors.InstanceAlreadyRunning):
            sim.hv.start(node, paused=vi.spec.run_state.value == IL.PAUSED)
        count = int(vi.status.restart_count or 0) + 1 if act is Act.RESTART else None
        desired = IL.desired_status(
            vi,
            IL.Observed(sim.info(node)),
            restart_count=count,
            reboot_generation=vi.spec.reboot_generation,
            console="",
        )
        _write(sim, node, vi, desired)
        return
    if act in (Act.CRASH_LOOP, Act.MARK_LOST):
        reason = IL.REASON_CRASH_LOOP if act is Act.CRASH_LOOP else ol.REASON_LOST
        new = IL.desired_status(
            vi, IL.Observed(None), phase="Failed", ready_reason=reason, message=action.message
        )
        _write(sim, node, vi, new)
        return
    if act is Act.EVICT:
        cond = st.Condition("Evicted", True, "NodeDrained", action.message)
        new = {
            "phase": "Evicted",
            "conditions": st.merge_model_conditions(vi.status.conditions, [cond]),
        }
        try:
            _guarded(sim, node, body, new)
        except Conflict:
            return
        sim.hv.destroy(node)
        return
    if act is Act.RELEASE_MIGRATING:
        _release_migrating(sim, node, vi, body, observed)
        return
    if act is Act.STOP:
        sim.hv.destroy(node)
    elif act is Act.PAUSE:
        sim.hv.pause(node)
    elif act is Act.RESUME:
        sim.hv.resume(node)
    elif act is not Act.CLEANUP:
        raise AssertionError(f"the model does not cover act {act}")
    _write(sim, node, vi, IL.desired_status(vi, IL.Observed(sim.info(node))))


def _release_migrating(
    sim: Sim, node: str, vi: api.VirtualInstance, body: dict[str, Any], observed: IL.Observed
) -> None:
    cond = st.Condition("Migrating", False, "MigrationGone", "no Migration owns it any more")
    new: dict[str, Any] = {
        "phase": IL.phase_for(vi, observed) if observed.alive else "Failed",
        "conditions": st.merge_model_conditions(vi.status.conditions, [cond]),
    }
    if not observed.alive:
        ready = st.Condition("Ready", False, ol.REASON_MIGRATED_AWAY, "not here after a migration")
        new["conditions"] = st.merge_model_conditions(vi.status.conditions, [cond, ready])
        new["observedGeneration"] = vi.metadata.generation or 0
    with contextlib.suppress(Conflict):
        _guarded(sim, node, body, new)


# --- the migration roles (migration_source.py, migration_target.py, migration_roles.py) ---


def _instance(sim: Sim) -> dict[str, Any]:
    body = sim.get_vi()
    if body is None:
        raise errors.InstanceNotFound(world.INSTANCE)
    return body


def _reread(sim: Sim) -> ml.MigrationView:
    body = sim.get_mig()
    if body is None:
        raise NotFound("migration")
    return ml.MigrationView.from_body(body)


def _mwrite(sim: Sim, patch: dict[str, Any]) -> ml.MigrationView:
    return ml.MigrationView.from_body(sim.patch_mig(patch))


def _done(ctype: str, message: str = "") -> api.Condition:
    return roles.done_condition(ctype, False, message)


def _finish(
    sim: Sim, view: ml.MigrationView, reason: str, done: api.Condition, aborted: bool = False
) -> None:
    for _ in range(5):
        try:
            if view.terminal:
                _mwrite(sim, ml.status_patch(view, conditions=[done]))
            else:
                _mwrite(sim, ml.fail(view, reason, aborted=aborted, extra_conditions=[done]))
            return
        except Conflict:
            view = _reread(sim)


def _set_instance_migrating(sim: Sim, node: str, migrating: bool, reason: str) -> None:
    for _ in range(5):
        vi = _vi_model(sim.vi)
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


def _migration_act(
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
            _mwrite(sim, ml.fail(view, f"instance is not running on node {node}"))
            return
        _journal(sim, node, view, "source", "Preparing")
        _set_instance_migrating(sim, node, True, "MigrationStarted")
        _mwrite(sim, ml.transition(view, ml.Phase.PREPARING, {"migrationInfo": "model"}))
    elif act is Act.MIGRATE:
        view = _mwrite(sim, ml.transition(view, ml.Phase.RUNNING))
        _journal(sim, node, view, "source", "Copying")
        _instance(sim)
        with contextlib.suppress(errors.HypervisorError):  # the copy task's error is seen.error
            sim.hv.start_migration(node, world.other(node))
        sim.set_agent(node, monitor="drive", abort_by="")
    elif act is Act.TRACK_COPY:
        status = _status(sim, node)
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
        _mwrite(sim, ml.transition(view, ml.Phase.SUCCEEDED, conditions=[cond]))
        _forget(sim, node, view)
    elif act is Act.CLEANUP_SOURCE:
        with contextlib.suppress(errors.HypervisorError):
            _finalize_src(sim, node, False)
        _set_instance_migrating(sim, node, False, f"Migration{view.phase}")
        _mwrite(sim, ml.status_patch(view, conditions=[_done(ml.COND_SOURCE_FINALIZED)]))
        _forget(sim, node, view)
    elif act is Act.ACCEPT:
        _instance(sim)
        _journal(sim, node, view, "target", "Accepting")
        if sim.hv.dom(node):
            _mwrite(sim, ml.fail(view, f"target node {node} refused the instance: exists"))
            return
        _mwrite(sim, ml.transition(view, ml.Phase.TARGET_READY))
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
        _mwrite(sim, ml.status_patch(view, conditions=[cond]))
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
        _mwrite(sim, ml.status_patch(view, conditions=[done]))
        _forget(sim, node, view)
    elif act is Act.TAKE_OVER:
        _mwrite(sim, ml.transition(view, ml.Phase.FINALIZING))
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
            _mwrite(sim, ml.transition(view, ml.Phase.FINALIZING, {"progress": {"percent": 100}}))
            return
        except Conflict:
            view = _reread(sim)


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
    status = _status(sim, node)
    if status.state is not values.MigrationState.ACTIVE:
        sim.set_agent(node, monitor="")
        current = _reread(sim)
        sim.did = f"copy {status.state.value}"
        if status.state is values.MigrationState.COMPLETED:
            _completed(sim, current)
            return
        _source_failed(sim, node, current, "the copy failed", agent.abort_by == "user")
        return
    current = _reread(sim)
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


# --- controller (controller.py, migration_controller.py, drain.py) -----------------------


def _nodes(sim: Sim) -> list[api.NodeHypervisor]:
    return [_node_model(b) for b in sim.node_bodies()]


def _node_model(body: dict[str, Any]) -> api.NodeHypervisor:
    return api.NodeHypervisor.model_validate(body)


def _ctl_remember(sim: Sim, body: dict[str, Any]) -> None:
    rv = int(body["metadata"]["resourceVersion"])
    if sim.ctl_cache is not None and sim.ctl_cache.rv > rv:
        return
    if sim.vi is not None and sim.vi.rv == rv:
        sim.ctl_cache = sim.vi


def _ctl_patch(sim: Sim, cached: Obj, patch: dict[str, Any]) -> None:
    """controller._patch_vi: guarded by the resourceVersion the cache holds."""
    try:
        result = sim.patch_vi_status(patch, cached.rv)
    except (NotFound, Conflict):
        return
    _ctl_remember(sim, result)


def _silent(nodes: list[api.NodeHypervisor]) -> set[str]:
    return {n.metadata.name or "" for n in nodes if heartbeat.is_stale(n, T0_TIME, GRACE_S)}


def place(sim: Sim) -> None:
    cached = sim.ctl_cache
    if cached is None or cached.deleting or cached.stat("nodeName"):
        return
    vi = _vi_model(cached)
    assert vi is not None
    nodes = _nodes(sim)
    assigned = [a for a in [placement.assigned_of(vi)] if a is not None]
    decision = placement.choose(placement.Request.of(vi), nodes, assigned, _silent(nodes))
    gen = vi.metadata.generation or 0
    if decision.node is None:
        cond = st.Condition("Scheduled", False, "NoNodeFits", decision.message)
        desired = {
            "phase": "Pending",
            "conditions": st.merge_model_conditions(vi.status.conditions, [cond], gen),
        }
        current = vi.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        patch = st.changed_fields(current, desired)
        if patch:
            _ctl_patch(sim, cached, patch)
        return
    cond = st.Condition("Scheduled", True, "Scheduled", decision.message)
    patch = {
        "nodeName": decision.node,
        "phase": "Scheduled",
        "conditions": st.merge_model_conditions(vi.status.conditions, [cond], gen),
    }
    _ctl_patch(sim, cached, patch)


def heartbeat_check(sim: Sim) -> None:
    for node in _nodes(sim):
        name = node.metadata.name or ""
        if not heartbeat.is_stale(node, T0_TIME, GRACE_S):
            continue
        if heartbeat.node_status_patch(node, T0_TIME, GRACE_S):
            sim.set_node(name, ready="Unknown")
        cached = sim.ctl_cache
        if cached is None or cached.stat("nodeName") != name:
            continue
        vi = _vi_model(cached)
        assert vi is not None
        vpatch = heartbeat.instance_status_patch(vi, name)
        if vpatch:
            sim.did = f"node {name} silent: instance -> Unknown"
            _ctl_patch(sim, cached, vpatch)


def _gone_before_running(sim: Sim, view: ml.MigrationView) -> bool:
    if view.phase not in ml.BEFORE_RUNNING - {ml.Phase.PENDING}:
        return False
    vi = _vi_model(sim.vi)
    return vi is None or bool(vi.metadata.deletion_timestamp)


def migration_controller(sim: Sim) -> None:
    view = _reread(sim)
    step = ml.next_step(view, ml.Role.CONTROLLER, sim.now)
    if step is ml.Step.NONE and _gone_before_running(sim, view):
        step = ml.Step.ABORT
    sim.did = f"{step.value} ({view.phase})"
    S = ml.Step
    if step is S.SCHEDULE:
        decision = sched.schedule(view, _vi_model(sim.vi), _nodes(sim), [view], sched.Limits())
        sim.did += f" -> {type(decision).__name__}"
        if isinstance(decision, sched.Refused):
            _mwrite(sim, ml.fail(view, decision.reason))
            return
        if isinstance(decision, sched.Queued):
            cond = ml.condition(ml.COND_QUEUED, True, "LimitReached", decision.reason)
            _mwrite(sim, ml.status_patch(view, conditions=[cond]))
            return
        if ml.FINALIZER not in view.finalizers:
            body = sim.set_mig_finalizers([*view.finalizers, ml.FINALIZER], view.resource_version)
            view = ml.MigrationView.from_body(body)
        fields = {
            "sourceNode": decision.source,
            "targetNode": decision.target,
            "startTime": ml.format_time(sim.now),
        }
        _mwrite(sim, ml.transition(view, ml.Phase.SCHEDULED, fields))
    elif step is S.ABORT:
        _mwrite(sim, ml.fail(view, "aborted before the transfer started", aborted=True))
    elif step is S.TIME_OUT:
        _mwrite(sim, ml.fail(view, f"timed out in phase {view.phase}"))
    elif step is S.HAND_OFF:
        vi = _vi_model(sim.vi)
        if vi is not None and vi.status.node_name == view.source_node:
            cond = ml.condition("Migrating", False, "Migrated", "moved")
            new = {
                "nodeName": view.target_node,
                "phase": "Running",
                "conditions": ml.merged_conditions(vi.status.conditions, [cond]),
            }
            sim.patch_vi_status(new, vi.metadata.resource_version)
        cond = ml.condition(ml.COND_INSTANCE_MOVED, True, "Moved", "moved")
        _mwrite(sim, ml.status_patch(view, conditions=[cond]))
    elif step is S.RELEASE:
        rest = [f for f in view.finalizers if f != ml.FINALIZER]
        sim.set_mig_finalizers(rest, view.resource_version)


def drain_controller(sim: Sim) -> None:
    for node in _nodes(sim):
        facts = sched.NodeFacts.of(node)
        if not facts.drain:
            if sim.node(facts.name).drained:
                sim.set_node(facts.name, drained="")
            continue
        on_node = [_vi_model(sim.vi)] if sim.list_vi_on(facts.name) else []
        instances = [sched.InstanceFacts.of(vi) for vi in on_node if vi is not None]
        migrations = [] if sim.mig is None else [ml.MigrationView.from_body(mig_body(sim.mig))]
        to_migrate, to_replace, message = drain.plan(facts.name, instances, migrations)
        for inst in to_migrate:
            m = drain.drain_migration(inst, facts.name)
            with contextlib.suppress(Conflict):
                sim.create_mig(m["metadata"]["name"], world.freeze(m["spec"]))
        for _inst in to_replace:
            vi = _vi_model(sim.vi)
            if vi is None:
                continue
            phase = vi.status.phase.value if vi.status.phase else ""
            if vi.status.node_name != facts.name or phase not in drain.NOT_RUNNING:
                continue
            cond = st.Condition("Evicted", True, "NodeDrained", f"stopped on {facts.name}")
            new = {
                "nodeName": None,
                "phase": "Pending",
                "conditions": st.merge_model_conditions(vi.status.conditions, [cond]),
            }
            with contextlib.suppress(Conflict):
                sim.patch_vi_status(new, vi.metadata.resource_version)
        sim.set_node(facts.name, drained="True" if message == "" else "False")
