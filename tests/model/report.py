"""Counterexamples as text a person can follow: one line per step, the world after it.

Why this module exists: a violation is only useful with its story; this prints each step
(the actor and what it did) with a one-line summary of the API objects, both hypervisors
and the agents after the step.
"""

from __future__ import annotations

from tests.model import explore, world
from tests.model.world import NODES


def summary(state: world.State) -> str:
    vi = state.vi
    if vi is None:
        inst = "VI gone"
    else:
        flags = " deleting" if vi.deleting else ""
        inst = f"VI {vi.stat('phase') or '-'}@{vi.stat('nodeName') or '-'}{flags}"
    mig = state.mig
    if mig is None:
        move = "M -"
    else:
        conds = "".join(
            c["type"][0]
            for c in mig.stat("conditions") or []
            if c.get("status") == "True"
            and c["type"] in ("TargetFinalized", "SourceFinalized", "InstanceMoved")
        )
        extra = (" abort" if mig.annotations else "") + (" deleting" if mig.deleting else "")
        move = f"M {mig.stat('phase') or 'Pending'}{('[' + conds + ']') if conds else ''}{extra}"
    hyps = []
    for node, h, agent in zip(NODES, state.hyp, state.agents, strict=True):
        dom = h.dom or "-"
        if h.incoming:
            dom += "(incoming)"
        if h.job:
            dom += f"(job {h.job})"
        who = {"up": "", "crashed": " agent DOWN", "frozen": " agent STOPPED"}[agent.proc]
        if agent.stale:
            who += " stale"
        if agent.monitor:
            who += f" monitor={agent.monitor}"
        hyps.append(f"{node}: {dom}{who}")
    return " | ".join([inst, move, *hyps])


def render(violation: explore.Violation) -> str:
    lines = [f"{violation.invariant}: {violation.message}"]
    for n, (label, state) in enumerate(violation.trace):
        lines.append(f"  {n:2d}. {label:<58} {summary(state)}")
    return "\n".join(lines)
