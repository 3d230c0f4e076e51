"""The Migration state machine, without a server: who acts when, what they write, scheduling."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pydantic
import pytest

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import values
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_progress as progress
from kubehv.operator import migration_scheduling as sched

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def mig(
    phase: str = "Pending",
    *,
    name: str = "m1",
    uid: str = "u1",
    source: str | None = None,
    target: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    spec: dict[str, Any] | None = None,
    deleting: bool = False,
    abort: bool = False,
    start: datetime.datetime | None = None,
    created: datetime.datetime = T0,
) -> ml.MigrationView:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": uid,
        "resourceVersion": "7",
        "creationTimestamp": ml.format_time(created),
        "finalizers": [constants.MIGRATION_FINALIZER],
    }
    if deleting:
        meta["deletionTimestamp"] = ml.format_time(T0)
    if abort:
        meta["annotations"] = {constants.ABORT_ANNOTATION: "true"}
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if source:
        status["sourceNode"] = source
    if target:
        status["targetNode"] = target
    if start:
        status["startTime"] = ml.format_time(start)
    return ml.MigrationView.from_body(
        {"metadata": meta, "spec": {"instance": "vm1", **(spec or {})}, "status": status}
    )


def cond(ctype: str, ok: bool = True) -> dict[str, Any]:
    return ml.condition(ctype, ok, "Test", "test", T0).model_dump(by_alias=True, mode="json")


# --- reading ---------------------------------------------------------------------------------


def test_view_defaults_and_spec_fields() -> None:
    view = mig(spec={"mode": "non-live", "bandwidth": 20, "maxDowntime": 300})
    assert view.phase is ml.Phase.PENDING
    assert not view.live
    assert view.options() == values.MigrationOptions(bandwidth_mib_s=20, max_downtime_ms=300)
    assert view.completion_timeout_s == ml.DEFAULT_COMPLETION_TIMEOUT_S
    assert mig().live
    # Not a Migration: refused where it is parsed (the edge), never guessed into Pending.
    with pytest.raises(pydantic.ValidationError):
        ml.MigrationView.from_body({})


def test_abort_requested_by_delete_or_annotation() -> None:
    assert mig(deleting=True).abort_requested
    assert mig(abort=True).abort_requested
    assert not mig().abort_requested


# --- who acts at which phase -----------------------------------------------------------------

S, T, C = ml.Role.SOURCE, ml.Role.TARGET, ml.Role.CONTROLLER


@pytest.mark.parametrize(
    ("phase", "conds", "expected"),
    [
        ("Pending", [], {C: ml.Step.SCHEDULE, S: ml.Step.NONE, T: ml.Step.NONE}),
        ("Scheduled", [], {C: ml.Step.NONE, S: ml.Step.PREPARE, T: ml.Step.NONE}),
        ("Preparing", [], {C: ml.Step.NONE, S: ml.Step.NONE, T: ml.Step.ACCEPT}),
        ("TargetReady", [], {C: ml.Step.NONE, S: ml.Step.MIGRATE, T: ml.Step.NONE}),
        ("Running", [], {C: ml.Step.NONE, S: ml.Step.TRACK_COPY, T: ml.Step.NONE}),
        ("Finalizing", [], {C: ml.Step.NONE, S: ml.Step.NONE, T: ml.Step.FINALIZE_TARGET}),
        (
            "Finalizing",
            [cond(ml.COND_TARGET_FINALIZED)],
            {C: ml.Step.NONE, S: ml.Step.FINALIZE_SOURCE, T: ml.Step.NONE},
        ),
        ("Succeeded", [], {C: ml.Step.HAND_OFF, S: ml.Step.NONE, T: ml.Step.NONE}),
        ("Succeeded", [cond(ml.COND_INSTANCE_MOVED)], {C: ml.Step.NONE}),
        ("Failed", [], {S: ml.Step.CLEANUP_SOURCE, T: ml.Step.CLEANUP_TARGET}),
        (
            "Aborted",
            [cond(ml.COND_SOURCE_FINALIZED), cond(ml.COND_TARGET_FINALIZED)],
            {S: ml.Step.NONE, T: ml.Step.NONE},
        ),
    ],
)
def test_exactly_one_actor_per_phase(
    phase: str, conds: list[dict[str, Any]], expected: dict[ml.Role, ml.Step]
) -> None:
    view = mig(phase, source="a", target="b", conditions=conds, start=T0)
    for role, step in expected.items():
        assert ml.next_step(view, role, T0) is step, role


def test_abort_before_running_is_the_controllers() -> None:
    for phase in ("Pending", "Scheduled", "Preparing", "TargetReady"):
        view = mig(phase, source="a", target="b", abort=True, start=T0)
        assert ml.next_step(view, C, T0) is ml.Step.ABORT
        assert ml.next_step(view, S, T0) is ml.Step.NONE
        assert ml.next_step(view, T, T0) is ml.Step.NONE
    running = mig("Running", source="a", target="b", deleting=True, start=T0)
    assert ml.next_step(running, C, T0) is ml.Step.NONE
    assert ml.next_step(running, S, T0) is ml.Step.TRACK_COPY


def test_timeout_before_running_only() -> None:
    late = T0 + datetime.timedelta(seconds=601)
    assert ml.next_step(mig("Preparing", source="a", target="b", start=T0), C, late) is (
        ml.Step.TIME_OUT
    )
    assert ml.next_step(mig("Running", source="a", target="b", start=T0), C, late) is (ml.Step.NONE)
    custom = mig("Scheduled", source="a", target="b", start=T0, spec={"completionTimeout": 5})
    assert ml.next_step(custom, C, T0 + datetime.timedelta(seconds=6)) is ml.Step.TIME_OUT


def test_release_only_when_settled() -> None:
    both = [cond(ml.COND_SOURCE_FINALIZED), cond(ml.COND_TARGET_FINALIZED)]
    done = mig("Aborted", source="a", target="b", conditions=both, deleting=True)
    assert ml.next_step(done, C) is ml.Step.RELEASE
    half = mig("Aborted", source="a", target="b", conditions=both[:1], deleting=True)
    assert ml.next_step(half, C) is ml.Step.NONE
    never_scheduled = mig("Failed", deleting=True)
    assert ml.next_step(never_scheduled, C) is ml.Step.RELEASE


def test_role_of() -> None:
    view = mig("Running", source="a", target="b")
    assert ml.role_of(view, "a") is S
    assert ml.role_of(view, "b") is T
    assert ml.role_of(view, "c") is None


# --- writes ----------------------------------------------------------------------------------


def test_transition_is_guarded_by_resource_version() -> None:
    patch = ml.transition(mig("Scheduled", source="a", target="b"), ml.Phase.PREPARING)
    assert patch["metadata"]["resourceVersion"] == "7"
    assert patch["status"]["phase"] == "Preparing"


def test_illegal_transitions_refused() -> None:
    with pytest.raises(ValueError, match="illegal"):
        ml.transition(mig("Succeeded"), ml.Phase.FAILED)
    with pytest.raises(ValueError, match="illegal"):
        ml.transition(mig("Pending"), ml.Phase.RUNNING)
    with pytest.raises(ValueError, match="illegal"):
        ml.transition(mig("Finalizing"), ml.Phase.ABORTED)


def test_fail_sets_reason_and_end_time() -> None:
    patch = ml.fail(mig("Running", source="a", target="b"), "boom", aborted=True)
    assert patch["status"]["phase"] == "Aborted"
    assert patch["status"]["failureReason"] == "boom"
    assert "endTime" in patch["status"]


def test_conditions_merge_by_type_and_keep_transition_time() -> None:
    old = [cond("A"), cond("B", False)]
    later = ml.condition("A", True, "Again", "again", T0 + datetime.timedelta(hours=1))
    merged = ml.merged_conditions(old, [later, cond("C")])
    assert [c["type"] for c in merged] == ["A", "B", "C"]
    assert merged[0]["reason"] == "Again"
    assert merged[0]["lastTransitionTime"] == ml.format_time(T0)


# --- versions and memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "safe"),
    [
        ("7.2.0", "7.2.0", True),
        ("7.2.0", "7.2.5", True),
        ("7.2.5", "7.2.0", False),
        ("7.2.0", "8.0.0", False),
        ("7.1.0", "7.2.0", False),
        ("QEMU 7.2.0 / libvirt 9.0.0", "QEMU 7.2.1 / libvirt 9.0.0", True),
        ("fake", "fake", True),
        ("", "7.2.0", False),
    ],
)
def test_version_pair(src: str, dst: str, safe: bool) -> None:
    assert (sched.version_pair_problem(src, dst) is None) is safe


def test_memory_in_the_apis_units() -> None:
    """One quantity parser: a bare integer is bytes, as the API defines it (the old
    migration parser read it as MiB)."""
    actual = inst(actual=None)
    assert sched.InstanceFacts.of(actual).memory_in_use_mib == 1024  # max when not reported
    assert sched.InstanceFacts.of(inst(actual=512)).actual_memory_mib == 512
    raw = inst(actual=None)
    raw.status.actual_memory = str(256 * 2**20)  # bytes, as a bare integer
    assert sched.InstanceFacts.of(raw).actual_memory_mib == 256


# --- scheduling ------------------------------------------------------------------------------


def node(
    name: str,
    free: int = 4096,
    version: str = "1.0.0",
    *,
    ready: bool = True,
    drain: bool = False,
    hypervisor: str = "fake",
) -> api.NodeHypervisor:
    return api.NodeHypervisor.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "nodeName": name,
                "hypervisor": hypervisor,
                "drain": drain,
                "migrationAddress": f"10.0.0.{len(name)}",
            },
            "status": {
                "memoryFree": free,
                "hypervisorVersion": version,
                "canMigrate": True,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
    )


def inst(
    node_name: str | None = "a", actual: int | None = 512, phase: str = "Running"
) -> api.VirtualInstance:
    status: dict[str, Any] = {"phase": phase}
    if node_name:
        status["nodeName"] = node_name
    if actual is not None:
        status["actualMemory"] = f"{actual}Mi"
    return api.VirtualInstance.model_validate(
        {
            "metadata": {"name": "vm1", "namespace": "ns"},
            "spec": {"hypervisor": "fake", "memory": {"min": "256Mi", "max": "1024Mi"}},
            "status": status,
        }
    )


LIMITS = sched.Limits(per_node=1, per_cluster=2)


def test_schedule_picks_roomiest_ready_node() -> None:
    nodes = [node("a"), node("b", free=1000), node("c", free=3000), node("d", ready=False)]
    decision = sched.schedule(mig(), inst(), nodes, [], LIMITS)
    assert decision == sched.Scheduled("a", "c", None)


def test_schedule_respects_requested_target() -> None:
    decision = sched.schedule(
        mig(spec={"targetNode": "b"}), inst(), [node("a"), node("b", 1000)], [], LIMITS
    )
    assert decision == sched.Scheduled("a", "b", None)


@pytest.mark.parametrize(
    ("instance", "needle"),
    [
        (None, "does not exist"),
        (inst(node_name=None), "not placed"),
        (inst(phase="Stopped"), "only a running instance"),
    ],
)
def test_schedule_refuses_bad_instances(instance: api.VirtualInstance | None, needle: str) -> None:
    decision = sched.schedule(mig(), instance, [node("a"), node("b")], [], LIMITS)
    assert isinstance(decision, sched.Refused)
    assert needle in decision.reason


def test_unsafe_version_pair_refused_unless_allowed() -> None:
    nodes = [node("a", version="7.2.0"), node("b", version="8.0.0")]
    refused = sched.schedule(mig(spec={"targetNode": "b"}), inst(), nodes, [], LIMITS)
    assert isinstance(refused, sched.Refused)
    assert "7.2.0" in refused.reason and "8.0.0" in refused.reason
    allowed = sched.schedule(
        mig(spec={"targetNode": "b", "allowUnsafeVersionPair": True}), inst(), nodes, [], LIMITS
    )
    assert allowed == sched.Scheduled("a", "b", None)


def test_memory_balloon_down_or_refuse_with_both_numbers() -> None:
    nodes = [node("a"), node("b", free=400)]
    decision = sched.schedule(mig(spec={"targetNode": "b"}), inst(actual=900), nodes, [], LIMITS)
    assert decision == sched.Scheduled("a", "b", 400)
    small = [node("a"), node("b", free=200)]
    refused = sched.schedule(mig(spec={"targetNode": "b"}), inst(actual=900), small, [], LIMITS)
    assert isinstance(refused, sched.Refused)
    assert "900 MiB" in refused.reason and "200 MiB" in refused.reason


def test_one_active_migration_per_instance() -> None:
    running = mig("Running", name="m0", uid="u0", source="a", target="b")
    refused = sched.schedule(mig(), inst(), [node("a"), node("b")], [running], LIMITS)
    assert isinstance(refused, sched.Refused)
    assert "m0" in refused.reason
    older = mig("Pending", name="m0", uid="u0", created=T0 - datetime.timedelta(seconds=1))
    assert isinstance(
        sched.schedule(mig(), inst(), [node("a"), node("b")], [older], LIMITS), sched.Refused
    )
    done = mig(
        "Failed",
        name="m0",
        uid="u0",
        source="a",
        target="b",
        conditions=[cond(ml.COND_SOURCE_FINALIZED)],
    )
    assert isinstance(
        sched.schedule(mig(), inst(), [node("a"), node("b")], [done], LIMITS), sched.Scheduled
    )


def test_controller_ends_finalizing_when_the_source_is_silent() -> None:
    """I4: the copy arrived (TargetFinalized) and the source agent is gone past the
    deadline: the controller ends the Migration Succeeded (then hands the instance over)."""
    view = mig(
        "Finalizing",
        source="a",
        target="b",
        conditions=[cond(ml.COND_TARGET_FINALIZED)],
        start=T0,
    )
    late = T0 + datetime.timedelta(seconds=ml.DEFAULT_COMPLETION_TIMEOUT_S + 1)
    C = ml.Role.CONTROLLER
    assert ml.next_step(view, C, late, silent={"a"}) is ml.Step.SUCCEED_WITHOUT_SOURCE
    assert ml.next_step(view, C, late, silent=set()) is ml.Step.NONE  # the source may finish
    assert ml.next_step(view, C, T0, silent={"a"}) is ml.Step.NONE  # not overdue yet
    not_arrived = mig("Finalizing", source="a", target="b", start=T0)
    assert ml.next_step(not_arrived, C, late, silent={"a"}) is ml.Step.NONE


def test_same_named_instance_elsewhere_does_not_block() -> None:
    """Found by the kvm fault matrix: instances are namespaced, so is the one-migration rule."""
    other = ml.MigrationView.from_body(
        {
            "metadata": {"name": "m0", "namespace": "elsewhere", "uid": "u0"},
            "spec": {"instance": "vm1"},
            "status": {"phase": "Running", "sourceNode": "c", "targetNode": "d"},
        }
    )
    nodes = [node("a"), node("b"), node("c"), node("d")]
    assert isinstance(sched.schedule(mig(), inst(), nodes, [other], LIMITS), sched.Scheduled)


def test_parallel_limits_queue() -> None:
    other = mig("Running", name="m9", uid="u9", source="a", target="c")
    other = ml.MigrationView.from_body(
        {
            "metadata": {"name": "m9", "namespace": "ns", "uid": "u9"},
            "spec": {"instance": "vm9"},
            "status": {"phase": "Running", "sourceNode": "a", "targetNode": "c"},
        }
    )
    decision = sched.schedule(mig(), inst(), [node("a"), node("b"), node("c")], [other], LIMITS)
    assert isinstance(decision, sched.Queued)
    elsewhere = ml.MigrationView.from_body(
        {
            "metadata": {"name": "m9", "namespace": "ns", "uid": "u9"},
            "spec": {"instance": "vm9"},
            "status": {"phase": "Running", "sourceNode": "c", "targetNode": "d"},
        }
    )
    nodes = [node("a"), node("b"), node("c", free=9000), node("d")]
    assert sched.schedule(mig(), inst(), nodes, [elsewhere], LIMITS) == sched.Scheduled(
        "a", "b", None
    )
    two = [elsewhere, other]
    assert isinstance(sched.schedule(mig(), inst(), nodes, two, LIMITS), sched.Queued)


def test_no_target_explains_each_node() -> None:
    decision = sched.schedule(
        mig(), inst(), [node("a"), node("b", drain=True), node("c", hypervisor="kvm")], [], LIMITS
    )
    assert isinstance(decision, sched.Refused)
    assert "b is not schedulable" in decision.reason
    assert "c runs kvm" in decision.reason


# --- progress and restart --------------------------------------------------------------------


def st(processed: int, remaining: int, state: str = "active") -> values.MigrationStatus:
    return values.MigrationStatus(
        state=values.MigrationState(state),
        memory_total_bytes=1000,
        memory_processed_bytes=processed,
        memory_remaining_bytes=remaining,
    )


def test_progress_tracker_rate_and_stall() -> None:
    tracker = progress.ProgressTracker(stall_timeout_s=10)
    assert tracker.update(st(0, 1000), 0.0)
    assert tracker.update(st(100, 900), 1.0)
    assert tracker.rate_bytes_s == pytest.approx(100.0)
    assert not tracker.update(st(100, 900), 5.0)
    assert not tracker.stalled(10.0)
    assert tracker.stalled(11.5)
    shown = progress.progress_dict(st(100, 900), tracker.rate_bytes_s)
    assert (
        shown
        == {
            "memoryTotal": 1000,
            "memoryProcessed": 100,
            "memoryRemaining": 900,
            "percent": 10,
            "rateBytesPerSecond": 0,
        }
        or shown["percent"] == 10
    )


def test_progress_counts_disk_bytes_of_a_storage_migration() -> None:
    """The disk copy runs first and memory figures stand still meanwhile: not a stall."""
    tracker = progress.ProgressTracker(stall_timeout_s=10)

    def disk(processed: int) -> values.MigrationStatus:
        return values.MigrationStatus(
            state=values.MigrationState.ACTIVE,
            memory_total_bytes=1000,
            memory_remaining_bytes=1000,
            disk_total_bytes=3000,
            disk_processed_bytes=processed,
            disk_remaining_bytes=3000 - processed,
        )

    assert tracker.update(disk(0), 0.0)
    assert tracker.update(disk(1000), 8.0)
    assert tracker.update(disk(2000), 16.0)
    assert not tracker.stalled(20.0)
    assert tracker.rate_bytes_s == pytest.approx(125.0)
    shown = progress.progress_dict(disk(2000), tracker.rate_bytes_s)
    assert shown["diskTotal"] == 3000 and shown["diskRemaining"] == 1000
    assert shown["percent"] == 50  # (4000 - 1000 - 1000) of 4000 bytes


def test_final_figures_keep_the_last_sample_when_the_hypervisor_has_none() -> None:
    seen = dataclasses.replace(st(900, 100), disk_total_bytes=3000, disk_processed_bytes=2900)
    gone = values.MigrationStatus(state=values.MigrationState.COMPLETED)  # domain left
    final = progress.final_figures(gone, seen)
    assert final.state is values.MigrationState.COMPLETED
    assert (final.memory_total_bytes, final.disk_total_bytes) == (1000, 3000)
    kept = st(1000, 0, "completed")  # the hypervisor kept its own statistics: those win
    assert progress.final_figures(kept, seen) is kept
    assert progress.final_figures(gone, None) is gone


def test_recover_running_cleanup_mode() -> None:
    active = st(1, 2)
    assert progress.recover_running(True, active) is progress.Recovery.RESUME_WATCH
    assert progress.recover_running(False, None) is progress.Recovery.COMPLETED
    assert progress.recover_running(True, st(0, 0, "completed")) is progress.Recovery.COMPLETED
    assert progress.recover_running(True, None) is progress.Recovery.INTERRUPTED
    assert progress.recover_running(True, st(0, 0, "failed")) is progress.Recovery.INTERRUPTED
