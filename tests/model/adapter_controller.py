"""Adapter part: the controller (``controller.py``, ``migration_controller.py``, ``drain.py``).

Why this module exists: placement (:func:`placement.choose`), heartbeat loss
(:func:`heartbeat.instance_status_patch`), the Migration protocol's controller steps
(:func:`migration_logic.next_step`, :func:`migration_scheduling.schedule`) and the drain
(:func:`drain.plan`), with the I/O glue of those modules: the controller's watch cache of the
instance, writes guarded by the resourceVersion it was read at.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kubehv import api
from kubehv.api import constants
from kubehv.operator import drain, heartbeat, placement
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_scheduling as sched
from kubehv.operator import status as st
from tests.model import world
from tests.model.adapter_common import mwrite, nodes, reread, vi_model
from tests.model.sim import GRACE_S, T0_TIME, Sim, mig_body
from tests.model.world import Conflict, NotFound, Obj

# --- controller (controller.py, migration_controller.py, drain.py) -----------------------


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
    vi = vi_model(cached)
    assert vi is not None
    known = nodes(sim)
    assigned = [a for a in [placement.assigned_of(vi)] if a is not None]
    decision = placement.choose(placement.Request.of(vi), known, assigned, _silent(known))
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
    for node in nodes(sim):
        name = node.metadata.name or ""
        if not heartbeat.is_stale(node, T0_TIME, GRACE_S):
            continue
        if heartbeat.node_status_patch(node, T0_TIME, GRACE_S):
            sim.set_node(name, ready="Unknown")
        cached = sim.ctl_cache
        if cached is None or cached.stat("nodeName") != name:
            continue
        vi = vi_model(cached)
        assert vi is not None
        vpatch = heartbeat.instance_status_patch(vi, name)
        if vpatch:
            sim.did = f"node {name} silent: instance -> Unknown"
            _ctl_patch(sim, cached, vpatch)


def _gone_before_running(sim: Sim, view: ml.MigrationView) -> bool:
    if view.phase not in ml.BEFORE_RUNNING - {ml.Phase.PENDING}:
        return False
    vi = vi_model(sim.vi)
    return vi is None or bool(vi.metadata.deletion_timestamp)


def migration_controller(sim: Sim) -> None:
    view = reread(sim)
    step = ml.next_step(view, ml.Role.CONTROLLER, sim.now)
    if step is ml.Step.NONE and _gone_before_running(sim, view):
        step = ml.Step.ABORT
    sim.did = f"{step.value} ({view.phase})"
    S = ml.Step
    if step is S.SCHEDULE:
        decision = sched.schedule(view, vi_model(sim.vi), nodes(sim), [view], sched.Limits())
        sim.did += f" -> {type(decision).__name__}"
        if isinstance(decision, sched.Refused):
            mwrite(sim, ml.fail(view, decision.reason))
            return
        if isinstance(decision, sched.Queued):
            cond = ml.condition(ml.COND_QUEUED, True, "LimitReached", decision.reason)
            mwrite(sim, ml.status_patch(view, conditions=[cond]))
            return
        if constants.MIGRATION_FINALIZER not in view.finalizers:
            body = sim.set_mig_finalizers(
                [*view.finalizers, constants.MIGRATION_FINALIZER], view.resource_version
            )
            view = ml.MigrationView.from_body(body)
        fields = {
            "sourceNode": decision.source,
            "targetNode": decision.target,
            "startTime": ml.format_time(sim.now),
        }
        mwrite(sim, ml.transition(view, ml.Phase.SCHEDULED, fields))
    elif step is S.ABORT:
        mwrite(sim, ml.fail(view, "aborted before the transfer started", aborted=True))
    elif step is S.TIME_OUT:
        mwrite(sim, ml.fail(view, f"timed out in phase {view.phase}"))
    elif step is S.HAND_OFF:
        vi = vi_model(sim.vi)
        if vi is not None and vi.status.node_name == view.source_node:
            cond = ml.condition("Migrating", False, "Migrated", "moved")
            new = {
                "nodeName": view.target_node,
                "phase": "Running",
                "conditions": ml.merged_conditions(vi.status.conditions, [cond]),
            }
            sim.patch_vi_status(new, vi.metadata.resource_version)
        cond = ml.condition(ml.COND_INSTANCE_MOVED, True, "Moved", "moved")
        mwrite(sim, ml.status_patch(view, conditions=[cond]))
    elif step is S.RELEASE:
        rest = [f for f in view.finalizers if f != constants.MIGRATION_FINALIZER]
        sim.set_mig_finalizers(rest, view.resource_version)


def drain_controller(sim: Sim) -> None:
    for node in nodes(sim):
        facts = sched.NodeFacts.of(node)
        if not facts.drain:
            if sim.node(facts.name).drained:
                sim.set_node(facts.name, drained="")
            continue
        on_node = [vi_model(sim.vi)] if sim.list_vi_on(facts.name) else []
        instances = [sched.InstanceFacts.of(vi) for vi in on_node if vi is not None]
        migrations = [] if sim.mig is None else [ml.MigrationView.from_body(mig_body(sim.mig))]
        to_migrate, to_replace, message = drain.plan(facts.name, instances, migrations)
        for inst in to_migrate:
            m = drain.drain_migration(inst, facts.name)
            with contextlib.suppress(Conflict):
                sim.create_mig(m["metadata"]["name"], world.freeze(m["spec"]))
        for _inst in to_replace:
            vi = vi_model(sim.vi)
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
