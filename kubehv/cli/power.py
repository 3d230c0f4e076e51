"""``kubehv start|stop|restart|pause|unpause NAME``: change what an instance should do.

Why: like ``virtctl``, the verbs edit the VirtualInstance's spec — the node agent makes it
so — rather than act on the hypervisor behind the API's back: ``start``/``stop``/``pause``/
``unpause`` set ``spec.runState``; ``restart`` bumps ``spec.rebootGeneration`` (the agent
reboots the guest and copies the number into ``status.rebootGeneration``). Each patch
carries the resourceVersion of the read it was decided on, so a concurrent change makes it
retry from a fresh read instead of overwriting. ``--wait`` follows the status until the
agent reports the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from kubehv import api
from kubehv.api import virtualinstance as vim
from kubehv.cli import kube

RunState = vim.RunState
Phase = vim.Phase


@dataclasses.dataclass(frozen=True)
class Verb:
    """What a verb wants, from which run states, and the status that shows it done."""

    allowed_from: frozenset[RunState]
    done_phase: Phase
    past: str
    run_state: RunState | None = None  # None: restart (a reboot generation bump)


VERBS: dict[str, Verb] = {
    "start": Verb(frozenset({RunState.STOPPED, RunState.RUNNING}), Phase.RUNNING, "started",
                  RunState.RUNNING),
    "stop": Verb(frozenset(RunState), Phase.STOPPED, "stopped", RunState.STOPPED),
    "pause": Verb(frozenset({RunState.RUNNING, RunState.PAUSED}), Phase.PAUSED, "paused",
                  RunState.PAUSED),
    "unpause": Verb(frozenset({RunState.PAUSED, RunState.RUNNING}), Phase.RUNNING, "unpaused",
                    RunState.RUNNING),
    "restart": Verb(frozenset({RunState.RUNNING}), Phase.RUNNING, "restarted"),
}  # fmt: skip
HINTS = {
    ("start", RunState.PAUSED): "it is paused: use kubehv unpause",
    ("pause", RunState.STOPPED): "it is stopped: start it first",
    ("unpause", RunState.STOPPED): "it is stopped, not paused: use kubehv start",
    ("restart", RunState.STOPPED): "it is stopped: use kubehv start",
    ("restart", RunState.PAUSED): "it is paused: unpause it first",
}
CONFLICT_RETRIES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the VirtualInstance")
    parser.add_argument("--wait", action="store_true", help="wait until the agent reports it")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for --wait")


def plan(verb_name: str, vi: api.VirtualInstance) -> dict[str, Any] | None:
    """The merge patch for ``verb_name`` on ``vi`` (None: nothing to change). Raises
    ValueError when the verb does not apply to the instance's run state."""
    verb = VERBS[verb_name]
    current = vi.spec.run_state
    if current not in verb.allowed_from:
        hint = HINTS.get((verb_name, current), "")
        raise ValueError(f"cannot {verb_name} {vi.metadata.name}: {hint or current}")
    if verb.run_state is None:
        spec: dict[str, Any] = {"rebootGeneration": vi.spec.reboot_generation + 1}
    elif verb.run_state == current:
        return None
    else:
        spec = {"runState": str(verb.run_state)}
    return {"metadata": {"resourceVersion": vi.metadata.resource_version}, "spec": spec}


def done(verb_name: str, generation: int) -> Callable[[api.VirtualInstance], bool]:
    verb = VERBS[verb_name]

    def check(vi: api.VirtualInstance) -> bool:
        if verb.run_state is None and (vi.status.reboot_generation or 0) < generation:
            return False
        return vi.status.phase == verb.done_phase

    return check


def apply(k: kube.Kube, verb_name: str, name: str) -> tuple[api.VirtualInstance, bool]:
    """(the instance after the verb, whether it changed anything)."""
    for _ in range(CONFLICT_RETRIES):
        vi = k.get_vi(name)
        patch = plan(verb_name, vi)
        if patch is None:
            return vi, False
        try:
            return k.patch_vi(name, patch), True
        except kube.ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"{name} kept changing; try again")


def run(args: argparse.Namespace) -> int:
    verb_name: str = args.command
    try:
        with kube.Kube(args) as k:
            vi, changed = apply(k, verb_name, args.name)
            kind = f"virtualinstance.kubehv.io/{args.name}"
            verb = VERBS[verb_name]
            print(f"{kind} {verb.past}" if changed else f"{kind} already {verb.past}")
            if not args.wait:
                return 0
            check = done(verb_name, vi.spec.reboot_generation)
            deadline = time.monotonic() + args.timeout
            while not check(vi):
                if time.monotonic() > deadline:
                    return kube.fail(
                        f"timed out: {args.name} is {vi.status.phase or 'Pending'}"
                        + (f" ({vi.status.message})" if vi.status.message else "")
                    )
                time.sleep(0.5)
                vi = k.get_vi(args.name)
            print(f"{args.name} is {vi.status.phase}")
            return 0
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc, f"no VirtualInstance {args.name} in namespace {k.namespace}")
    except (ValueError, RuntimeError) as exc:
        return kube.fail(str(exc))
