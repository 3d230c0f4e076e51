"""The owner's pure decision (kubehv.operator.owner_logic): fences, migration roles, drain.

These are the exactly-once rules of docs/architecture.md (I1-I4) as single decisions; the
model checker (tests/model) explores their interleavings.
"""

from __future__ import annotations

from typing import Any

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import values
from kubehv.operator import journal
from kubehv.operator import owner_logic as ol

NODE, OTHER = "n1", "n2"
S = values.InstanceState


def vi(spec: dict[str, Any] | None = None, **status: Any) -> api.VirtualInstance:
    st: dict[str, Any] = {"nodeName": NODE, "phase": "Scheduled", **status}
    return api.VirtualInstance.model_validate(
        {
            "metadata": {
                "name": "vm",
                "namespace": "ns",
                "uid": "u1",
                "generation": 1,
                "finalizers": [constants.INSTANCE_FINALIZER],
            },
            "spec": {
                "hypervisor": "fake",
                "memory": {"min": "64Mi", "max": "128Mi"},
                **(spec or {}),
            },
            "status": {k: v for k, v in st.items() if v is not None},
        }
    )


def mig(phase: str, source: str = NODE, target: str = OTHER, **status: Any) -> api.Migration:
    return api.Migration.model_validate(
        {
            "metadata": {"name": "m", "namespace": "ns", "uid": "m1", "resourceVersion": "7"},
            "spec": {"instance": "vm"},
            "status": {
                "phase": phase,
                "sourceNode": source,
                "targetNode": target,
                "startTime": "2026-01-01T00:00:00Z",
                **status,
            },
        }
    )


def dom(state: values.InstanceState = S.RUNNING) -> values.InstanceInfo:
    return values.InstanceInfo("ns.vm", "1", 128, 1, state, 0.0)


def decide(
    instance: api.VirtualInstance,
    *,
    fresh: bool = True,
    migration: api.Migration | None = None,
    domain: values.InstanceInfo | None = None,
    entry: journal.Entry | None = None,
    draining: bool = False,
    node: str = NODE,
    now: float = 1_767_225_610.0,  # 10 s after the start time
) -> ol.Action:
    return ol.decide(
        ol.Inputs(
            node=node,
            instance=instance,
            fresh=fresh,
            migration=migration,
            domain=domain,
            journal=entry,
            node_draining=draining,
            history=ol.History(),
            now=now,
        )
    )


def test_start_only_on_a_fresh_read() -> None:
    assert decide(vi(), fresh=False).act is ol.Act.REREAD
    assert decide(vi()).act is ol.Act.START


def test_never_starts_an_instance_assigned_elsewhere() -> None:
    assert decide(vi(nodeName=OTHER)).act is ol.Act.NOTHING


def test_unknown_and_gone_is_marked_lost_not_started() -> None:
    action = decide(vi(phase="Unknown", hypervisorId="7"))
    assert action.act is ol.Act.MARK_LOST
    assert "may run elsewhere" in action.message
    assert decide(vi(phase="Unknown", hypervisorId="7"), domain=dom()).act is ol.Act.NOTHING


def test_unknown_that_never_ran_is_started_fenced() -> None:
    """Found by the model checker: placed, node silent before the first start, back again.
    Nothing ever ran, so nothing can run elsewhere: start it (on a fresh read)."""
    assert decide(vi(phase="Unknown"), fresh=False).act is ol.Act.REREAD
    assert decide(vi(phase="Unknown")).act is ol.Act.START


def test_migrating_instance_is_the_migrations() -> None:
    running = mig("Running")
    assert decide(vi(phase="Migrating"), migration=running).act is ol.Act.TRACK_COPY
    target_view = decide(vi(phase="Migrating"), migration=running, node=OTHER)
    assert target_view.act is ol.Act.NOTHING
    # A missing domain on the source during the copy is never restarted.
    assert decide(vi(phase="Running"), migration=running).act is ol.Act.TRACK_COPY


def test_migrating_without_migration_is_released_on_a_fresh_read() -> None:
    assert decide(vi(phase="Migrating"), fresh=False).act is ol.Act.REREAD
    assert decide(vi(phase="Migrating")).act is ol.Act.RELEASE_MIGRATING


def test_deletion_waits_for_the_migration() -> None:
    gone = vi(phase="Migrating")
    gone = gone.model_copy(
        update={"metadata": gone.metadata.model_copy(update={"deletion_timestamp": "x"})}
    )
    # The source does not prepare a deleted instance's migration, and does not finalize the
    # instance (stop + drop finalizer) while the Migration owns it.
    assert decide(gone, migration=mig("Scheduled")).act is ol.Act.NOTHING
    assert decide(gone, migration=mig("Running")).act is ol.Act.TRACK_COPY
    failed = mig(
        "Failed",
        conditions=[
            {"type": "SourceFinalized", "status": "True", "reason": "RolledBack"},
            {"type": "TargetFinalized", "status": "True", "reason": "RolledBack"},
        ],
    )
    assert decide(gone, migration=failed, domain=dom()).act is ol.Act.FINALIZE


def test_target_judges_an_overdue_copy_by_what_arrived() -> None:
    late = 1_767_225_600.0 + 600 + 61
    running = mig("Running")
    assert decide(vi(), migration=running, node=OTHER, now=late).act is ol.Act.FAIL_NOT_ARRIVED
    here = decide(vi(), migration=running, node=OTHER, domain=dom(), now=late)
    assert here.act is ol.Act.TAKE_OVER
    paused = decide(vi(), migration=running, node=OTHER, domain=dom(S.PAUSED), now=late)
    assert paused.act is ol.Act.NOTHING


def test_drain_stop_policy_evicts_through_the_owner() -> None:
    inst = vi({"evictionPolicy": "Stop"}, phase="Running")
    assert decide(inst, domain=dom(), draining=True, fresh=False).act is ol.Act.REREAD
    assert decide(inst, domain=dom(), draining=True).act is ol.Act.EVICT
    evicted = vi({"evictionPolicy": "Stop"}, phase="Evicted")
    assert decide(evicted, draining=True).act is ol.Act.NOTHING
    # The drain was undone right after the eviction: the instance runs again here.
    assert decide(evicted, draining=False).act is ol.Act.START


def test_journal_entry_without_migration_is_resolved_first() -> None:
    entry = journal.Entry("ns.vm", "m1", "ns/m", journal.Role.TARGET, journal.Stage.ACCEPTING, NODE)
    assert decide(vi(nodeName=OTHER), entry=entry, fresh=False).act is ol.Act.REREAD
    assert decide(vi(nodeName=OTHER), entry=entry, domain=dom(S.PAUSED)).act is (
        ol.Act.CLEANUP_TARGET
    )
    assert decide(vi(nodeName=OTHER), entry=entry).act is ol.Act.CLEAR_JOURNAL
    out = journal.Entry("ns.vm", "m1", "ns/m", journal.Role.SOURCE, journal.Stage.COPYING, OTHER)
    # Never START from a journal that says a copy went out, before it is resolved.
    assert decide(vi(phase="Running"), entry=out, fresh=False).act is ol.Act.REREAD
