"""The invariants of the issue "Exactly once", as predicates on a model state.

Why this module exists: one place states what the checker enforces, in the issue's words:

* I1 (every state): at most one running copy of the instance across both hypervisors; the
  paused incoming copy of a live migration does not count, and it may only be resumed once
  the source copy is gone (a resumed copy counts like any other);
* at rest (after the recovery run, when no actor has anything left to do):
  I2 an instance that should run runs (the model has no guest crashes, bad parameters or
  full nodes, so nothing legitimate can keep it stopped: a stopped one was lost by kubehv);
  I3 ``status.nodeName``/phase name where it runs, and no domain runs for an instance that
  no longer exists; I4 every Migration is terminal and a deleted Migration or instance is
  gone (no finalizer left hanging); and a node asked to drain reports ``Drained`` True, or
  False while the instance still runs there after its Migration failed (the condition then
  says so; retrying is a person's decision).

Messages are ``"<what>: <details>"``; the part before the colon names the bug class.
"""

from __future__ import annotations

from tests.model import world
from tests.model.world import NODES

TERMINAL = ("Succeeded", "Failed", "Aborted")


def copies(state: world.State) -> list[str]:
    """Nodes with a copy that runs or may run (the paused incoming copy excluded)."""
    return [n for n, h in zip(NODES, state.hyp, strict=True) if h.dom and not h.incoming]


def always(state: world.State) -> list[tuple[str, str]]:
    running = copies(state)
    if len(running) > 1:
        where = ", ".join(f"{n} ({state.hyp[NODES.index(n)].dom})" for n in running)
        return [("I1", f"two copies of the instance: {where}")]
    return []


def at_rest(state: world.State) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    mig = state.mig
    if mig is not None:
        phase = mig.stat("phase") or "Pending"
        if phase not in TERMINAL:
            bad.append(("I4", f"Migration never terminal: stuck in phase {phase}"))
        elif mig.deleting:
            bad.append(("I4", f"deleted Migration never goes: finalizer kept ({phase})"))
    vi = state.vi
    running = copies(state)
    if vi is None:
        if running:
            bad.append(("I3", f"domain without instance: runs on {', '.join(running)}"))
    elif vi.deleting:
        bad.append(("I4", "deleted instance never goes: its finalizer is kept"))
    else:
        run_state = world.get(vi.spec, "runState")
        phase, node = vi.stat("phase"), vi.stat("nodeName")
        if run_state == "Running" and not running:
            bad.append(("I2", f"instance lost: runs nowhere, status says {phase} on {node}"))
        if run_state == "Stopped" and running:
            bad.append(("I2", f"stopped instance runs: on {', '.join(running)}"))
        if running and (node != running[0] or phase not in ("Running", "Paused")):
            bad.append(("I3", f"status wrong: says {phase} on {node}, runs on {running[0]}"))
    for name, n in zip(NODES, state.nodes, strict=True):
        if not n.drain or n.drained == "True":
            continue
        # Acceptable only while the instance still runs there after its Migration failed
        # (the Drained condition then names that failure; retrying is a person's call).
        stuck_by_failure = (
            name in running
            and mig is not None
            and mig.stat("phase") in ("Failed", "Aborted")
            and n.drained == "False"
        )
        if not stuck_by_failure:
            bad.append(("DRAIN", f"drain never completes: node {name} Drained={n.drained or '-'}"))
    return bad
