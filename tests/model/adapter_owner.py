"""Adapter part: the owner of the instance on a node (``operator/owner.py``, ``instances.py``).

Why this module exists: each model step of an agent is one look at the instance — its watch
caches, or a fresh read — one call of the pure :func:`owner_logic.decide`, and the act it
answers, performed as ``owner.py`` and ``instances.py`` do (guarded claims before
irreversible acts, status written only on change). Migration acts go to
:mod:`adapter_roles`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pydantic

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import errors
from kubehv.operator import instance_logic, instances
from kubehv.operator import migration_logic as ml
from kubehv.operator import owner_logic as ol
from kubehv.operator import status as st
from tests.model import world
from tests.model.adapter_common import mig_model, vi_model
from tests.model.adapter_roles import journal_entry, migration_act
from tests.model.sim import Sim, vi_body
from tests.model.world import Conflict, NotFound, Obj

IL = instance_logic
Act = ol.Act
POLICY = IL.Policy()


def remember(sim: Sim, node: str, body: dict[str, Any]) -> None:
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
            remember(sim, node, vi_body(obj))
    else:
        obj, mobj = agent.cache, agent.mcache
    body = None if obj is None else vi_body(obj)
    mbodies = [] if mobj is None else [mobj]
    try:
        vi = vi_model(obj)
        migrations = [mig_model(m) for m in mbodies]
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
        journal=journal_entry(sim, node),
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
            migration_act(sim, node, act, view, action.message)
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
    remember(sim, node, result)


def _guarded(sim: Sim, node: str, body: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    result = sim.patch_vi_status(new, body["metadata"]["resourceVersion"])
    remember(sim, node, result)
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
            [*current, constants.INSTANCE_FINALIZER]
            if act is Act.ADD_FINALIZER
            else [f for f in current if f != constants.INSTANCE_FINALIZER]
        )
        try:
            result = sim.set_vi_finalizers(wanted, vi.metadata.resource_version)
        except (Conflict, NotFound):
            return
        if act is Act.ADD_FINALIZER:
            remember(sim, node, result)
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
    if act is Act.EVICT:  # instances.InstanceActs._evict: the guest goes, then Evicted
        sim.hv.destroy(node)
        cond = st.Condition("Evicted", True, "NodeDrained", action.message)
        new = {
            "phase": "Evicted",
            "conditions": st.merge_model_conditions(vi.status.conditions, [cond]),
        }
        with contextlib.suppress(Conflict):
            _guarded(sim, node, body, new)
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
