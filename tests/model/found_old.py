"""The bugs the checker finds in kubehv's logic as filed (issue "Exactly once"), by signature.

Why this module exists: the checker must show that it *finds* the bugs the issue reports
before it can claim their absence after the fix. Each entry names a bug, the scenario it
shows up in and how to recognise its violation (invariant + the signature
:func:`explore._signature` gives it); ``python -m tests.model.found_old`` runs the scenarios
on the old adapter and writes the shortest counterexample of each to
``tests/model/FOUND_ON_OLD_LOGIC.md``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from types import ModuleType

from tests.model import adapter_old, explore, report, scenarios


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    scenario: str  # a prefix of the scenario's name
    invariant: str
    signature: str  # a substring of the violation's signature


BUGS = (
    Bug(
        "kill -9 of the source agent during a live migration (issue bug 1): the controller "
        "overwrites phase Migrating with Unknown, the migration completes, the restarted agent "
        "starts the instance again from Unknown (instance_logic.decide) -> two copies",
        "live migration a->b, source",
        "I1",
        "decide -> start (cached phase Unknown) | faults: kill -9",
    ),
    Bug(
        "SIGSTOP of the source agent past the heartbeat grace, then SIGCONT (issue bug 2): "
        "heartbeat.instance_status_patch overwrites Migrating with Unknown, the copy "
        "completes, and after SIGCONT instance_logic.decide starts the guest from Unknown",
        "live migration a->b, source",
        "I1",
        "decide -> start (cached phase Unknown) | faults: SIGSTOP",
    ),
    Bug(
        "a Stopped instance (evictionPolicy LiveMigrate) on a drained node (issue bug 3): the "
        "drain asks for a Migration, schedule() refuses a Stopped instance, Drained never True",
        "drain node a: Stopped instance",
        "DRAIN",
        "drain never completes | faults: none",
    ),
    Bug(
        "delete of the instance mid-migration: deletion is decided before the Migrating guard "
        "(decide -> finalize on the source), the copy completes, the guest keeps running on "
        "the target with no VirtualInstance",
        "live migration a->b, source",
        "I3",
        "domain without instance | faults: delete instance",
    ),
    Bug(
        "a Migration whose instance was deleted is never terminal: every agent step raises "
        "InstanceNotFound, for ever (its finalizer blocks namespace deletion)",
        "live migration a->b, source",
        "I4",
        "Migration never terminal | faults: delete instance",
    ),
    Bug(
        "kill -9 of the source agent while libvirt goes on copying: the kvm driver's "
        "migration tracker was in memory only, the resumed monitor reads 'no migration known' "
        "as failure, and the target's cleanup (finalize_migration_dst(False)) destroys the "
        "guest that had arrived: the instance is lost",
        "live migration a->b, source",
        "I2",
        "instance lost | faults: kill -9",
    ),
    Bug(
        "abort racing a completing migration: handled as a failure; the target destroys what "
        "is the only copy (instance lost, Migration Aborted 'the instance still runs on a')",
        "live migration a->b, source",
        "I2",
        "instance lost | faults: abort",
    ),
    Bug(
        "completionTimeout racing a completing migration: the same loss as an abort",
        "live migration a->b, source",
        "I2",
        "instance lost | faults: deadlines pass",
    ),
    Bug(
        "drain with evictionPolicy Stop: the drain agent shuts the guest down outside the "
        "reconciler's lock and without a guarding phase; the reconciler (on its cache) restarts "
        "it while the instance is Evicted and re-placed on the other node -> two copies",
        "drain node a: running instance, evictionPolicy Stop",
        "I1",
        "| faults: none",
    ),
    Bug(
        "drain with evictionPolicy Stop: drain agent and reconciler stop and restart the guest "
        "in turn for ever (no rest)",
        "drain node a: running instance, evictionPolicy Stop",
        "I4",
        "no rest | faults: none",
    ),
    Bug(
        "the agent starts a domain from its watch cache, not a fresh read: a cache that lags "
        "behind a completed migration restarts the guest on the source -> two copies",
        "live migration a->b, source",
        "I1",
        "decide -> restart (cached phase Running) | faults: none",
    ),
    Bug(
        "delete of the instance and its Migration mid-migration: the deleted Migration keeps "
        "its finalizer for ever (namespace deletion hangs)",
        "live migration a->b, source",
        "I4",
        "deleted Migration never goes",
    ),
)


def matches(bug: Bug, result: explore.Result) -> explore.Violation | None:
    """The shortest violation of ``result`` that is ``bug``."""
    if not result.scenario.startswith(bug.scenario):
        return None
    hits = [
        v
        for (inv, sig), v in result.violations.items()
        if inv == bug.invariant and bug.signature in sig
    ]
    return min(hits, key=lambda v: len(v.trace)) if hits else None


def run(adapter: ModuleType, depth: int) -> list[explore.Result]:
    return [explore.explore(s, adapter) for s in scenarios.all_scenarios(adapter, depth)]


def write_markdown(results: list[explore.Result], path: str) -> None:
    lines = [
        "# What the model checker found on the logic as filed",
        "",
        "Generated by `python -m tests.model.found_old` (tests/model/found_old.py) on the code",
        "of `main` before the owner rebuild (commit 1db62e8): kubehv's own",
        "`instance_logic.decide`, `migration_logic.next_step` / `recover_running` / `schedule`,",
        "`heartbeat.instance_status_patch`, `placement.choose`, `drain.plan`, driven through",
        "`tests/model/adapter_old.py`. Each trace is the shortest one the breadth-first search",
        "found: the steps up to `-- recovery --` are the explored interleaving (faults marked",
        "FAULT); after it no fault strikes and every actor gets its turn until nothing moves.",
        "Each line: the step, then the world after it (VI = the VirtualInstance as the API",
        "server holds it, M = the Migration [T/S/I = TargetFinalized / SourceFinalized /",
        "InstanceMoved], then each hypervisor's domain and its agent).",
        "",
        "| scenario | depth | states | recoveries run | seconds | violations (distinct) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.depth} | {r.states} | {r.settled} | {r.seconds:.1f} "
            f"| {len(r.violations)} |"
        )
    lines.append("")
    for n, bug in enumerate(BUGS, 1):
        found = [v for r in results if (v := matches(bug, r)) is not None]
        lines.append(f"## {n}. {bug.name}")
        lines.append("")
        if not found:
            lines.append("NOT FOUND at this depth.")
            lines.append("")
            continue
        best = min(found, key=lambda v: len(v.trace))
        lines.append("```")
        lines.append(report.render(best))
        lines.append("```")
        lines.append("")
    lines.append("## Every distinct violation (signature: invariant, what, faults in the trace)")
    lines.append("")
    for r in results:
        lines.append(f"- {r.scenario}:")
        for inv, sig in sorted(r.violations):
            lines.append(f"  - {inv}: {sig} ({len(r.violations[inv, sig].trace)} steps)")
    lines.append("")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def main() -> int:
    depth = int(os.environ.get("KUBEHV_MODEL_DEPTH", "8"))
    start = time.monotonic()
    results = run(adapter_old, depth)
    out = os.path.join(os.path.dirname(__file__), "FOUND_ON_OLD_LOGIC.md")
    write_markdown(results, out)
    print(f"wrote {out} in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
