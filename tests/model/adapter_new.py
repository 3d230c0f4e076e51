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
This module lists the steps :mod:`explore` may take; the parts live in
:mod:`adapter_owner`, :mod:`adapter_roles` and :mod:`adapter_controller`.
"""

from __future__ import annotations

from tests.model import world
from tests.model.adapter_common import Step, guard, on
from tests.model.adapter_controller import (
    drain_controller,
    heartbeat_check,
    migration_controller,
    place,
)
from tests.model.adapter_owner import owner_step
from tests.model.adapter_roles import follow_turn
from tests.model.sim import Sim
from tests.model.world import NODES

WATCHES_MIGRATIONS = True
"""The owner decides on its watch cache of the instance's Migration too (owner.migrations)."""


def steps(state: world.State) -> list[tuple[str, Step]]:
    out: list[tuple[str, Step]] = []
    for i, node in enumerate(NODES):
        agent = state.agents[i]
        if agent.proc != "up":
            continue
        if agent.monitor:
            out.append((f"{node}: owner follows the copy", on(follow_turn, node)))
            continue  # the owner is busy in its act: nothing else acts on the instance
        if agent.cache is not None or agent.mcache is not None:
            out.append((f"{node}: owner (watch cache)", on(owner_step, node, False)))
        out.append((f"{node}: owner (fresh read)", on(owner_step, node, True)))
    out.append(("controller: place", guard(place)))
    out.append(("controller: heartbeat check", guard(heartbeat_check)))
    if state.mig is not None:
        out.append(("controller: migration step", guard(migration_controller)))
    if any(n.drain or n.drained for n in state.nodes):
        out.append(("controller: drain", guard(drain_controller)))
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
