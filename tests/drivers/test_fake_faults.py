"""The fake driver's own promises: fault injection, persistence, concurrency, its node model.

Why: the operator's tests lean on these knobs (fail a start, fail a migration at a given
step, slow a migration down, crash an instance, restart an agent); each must do exactly what
docs/drivers.md says, or those tests would prove nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubehv.drivers import errors, fake, registry, values
from tests.drivers import contract


def node(path: Path, name: str = "node-a", **params: values.ParamValue) -> fake.FakeHypervisor:
    return fake.FakeHypervisor(
        values.DriverConfig(node_name=name, state_dir=str(path), params=params)
    )


def spec(name: str, lo: int = 128, hi: int = 256, **params: Any) -> values.InstanceSpec:
    return values.InstanceSpec(
        name=name, uid=str(uuid.uuid4()), memory_min_mib=lo, memory_max_mib=hi, params=params
    )


def state(drv: fake.FakeHypervisor, name: str) -> values.InstanceState | None:
    info = drv.get_instance_info(name)
    return info.state if info is not None else None


@pytest.fixture
def pair(tmp_path: Path) -> tuple[fake.FakeHypervisor, fake.FakeHypervisor]:
    return node(tmp_path / "a", "node-a"), node(tmp_path / "b", "node-b")


# --- registry and configuration ----------------------------------------------------------


def test_registry_builds_the_fake_driver(tmp_path: Path) -> None:
    drv = registry.create_driver(
        "fake", values.DriverConfig(node_name="n", state_dir=str(tmp_path))
    )
    assert isinstance(drv, fake.FakeHypervisor)
    assert drv.NAME == "fake"
    assert drv.CAN_MIGRATE


def test_uri_names_the_state_dir(tmp_path: Path) -> None:
    drv = node(tmp_path / "a")
    again = fake.FakeHypervisor(values.DriverConfig(node_name="n", uri=drv.uri))
    drv.start_instance(spec("vm1"))
    assert again.list_instances() == ["vm1"]
    assert drv.uri == f"fake://{os.path.realpath(tmp_path / 'a')}"


def test_bad_node_params_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.ParameterError) as exc:
        node(tmp_path, memory_total_mib=-5, cpu_total="four", bogus=1)
    joined = " ".join(exc.value.problems)
    assert "memory_total_mib" in joined and "cpu_total" in joined and "bogus" in joined


def test_node_memory_from_params_and_startup_rule(tmp_path: Path) -> None:
    drv = node(tmp_path, memory_mib=1000, memory_dom0_mib=100, cpu_total=8)
    info = drv.get_node_info()
    assert (info.memory_total_mib, info.memory_free_mib, info.cpu_total) == (1000, 900, 8)
    assert drv.start_instance(spec("big", lo=100, hi=600)).memory_mib == 600
    # 300 MiB left: the next one starts with what is free, between its min and max
    assert drv.start_instance(spec("mid", lo=200, hi=600)).memory_mib == 300
    with pytest.raises(errors.InsufficientMemory):
        drv.start_instance(spec("none", lo=1, hi=10))
    assert drv.get_node_info().instances_memory_mib == 900
    drv.stop_instance(None, force=True, name="big")
    assert drv.get_node_info().memory_free_mib == 600


# --- lifecycle faults --------------------------------------------------------------------


def test_fail_start(tmp_path: Path) -> None:
    drv = node(tmp_path)
    with pytest.raises(errors.InstanceStartError) as exc:
        drv.start_instance(spec("vm1", fail_start=True))
    assert exc.value.reason == "StartFailed"
    assert drv.list_instances() == []
    assert drv.get_node_info().instances_memory_mib == 0


def test_crash_after_s_then_restart_counts_boots(tmp_path: Path) -> None:
    drv = node(tmp_path, memory_total_mib=1000)
    vm = spec("crashy", lo=100, hi=100, crash_after_s=0.2)
    drv.start_instance(vm)
    contract.wait_for(lambda: state(drv, "crashy") is values.InstanceState.CRASHED, 10, "the crash")
    assert drv.list_instances() == []
    assert drv.get_node_info().memory_free_mib == 1000
    drv.start_instance(vm)  # the operator restarts it: a crash loop
    assert drv.boot_count("crashy") == 2
    contract.wait_for(
        lambda: state(drv, "crashy") is values.InstanceState.CRASHED, 10, "the second crash"
    )
    drv.cleanup_instance("crashy")
    assert drv.get_instance_info("crashy") is None


def test_crash_on_demand_from_outside_the_agent(tmp_path: Path) -> None:
    agent = node(tmp_path)
    agent.start_instance(spec("vm1"))
    agent.start_instance(spec("vm2"))
    fake.crash_instance(str(tmp_path), "vm1", reason="test says so")  # another "process"
    agent.crash_instance("vm2")
    assert state(agent, "vm1") is values.InstanceState.CRASHED
    assert state(agent, "vm2") is values.InstanceState.CRASHED
    with pytest.raises(errors.InstanceNotFound):
        agent.crash_instance("vm1")  # no longer alive
    agent.stop_instance(None, name="vm1")  # stopping a crashed instance clears it
    assert agent.get_instance_info("vm1") is None


def test_graceful_stop_with_delay_passes_through_shutting_down(tmp_path: Path) -> None:
    drv = node(tmp_path)
    vm = spec("slowstop", shutdown_delay_s=0.3)
    drv.start_instance(vm)
    drv.stop_instance(vm)
    assert state(drv, "slowstop") is values.InstanceState.SHUTTING_DOWN
    assert drv.list_instances() == ["slowstop"]
    drv.stop_instance(vm, retry=True)
    contract.wait_for(lambda: drv.get_instance_info("slowstop") is None, 10, "power off")
    assert drv.list_instances() == []


def test_ignore_shutdown_makes_shutdown_instance_force(tmp_path: Path) -> None:
    drv = node(tmp_path)
    vm = spec("stubborn", ignore_shutdown=True)
    drv.start_instance(vm)
    drv.stop_instance(vm)
    assert state(drv, "stubborn") is values.InstanceState.RUNNING
    assert drv.shutdown_instance(vm, timeout_s=0.3, poll_s=0.05) is True
    assert drv.get_instance_info("stubborn") is None


def test_balloon_up_needs_free_memory(tmp_path: Path) -> None:
    drv = node(tmp_path, memory_total_mib=1000)
    drv.start_instance(spec("filler", lo=700, hi=700))
    vm = spec("growing", lo=100, hi=400)
    assert drv.start_instance(vm).memory_mib == 300
    drv.balloon_instance_memory(vm, 100)
    drv.balloon_instance_memory(vm, 300)
    with pytest.raises(errors.InsufficientMemory):
        drv.balloon_instance_memory(vm, 400)
    info = drv.get_instance_info("growing")
    assert info is not None and info.memory_mib == 300


def test_foreign_instances_are_listed_apart(tmp_path: Path) -> None:
    drv = node(tmp_path)
    drv.start_instance(spec("ours"))
    fake.add_foreign_instance(str(tmp_path), "someone-elses")
    assert drv.list_foreign_instances() == ["someone-elses"]
    assert drv.list_instances() == ["ours"]


# --- verify --------------------------------------------------------------------------------


def test_verify_reports_configured_and_file_faults(tmp_path: Path) -> None:
    assert node(tmp_path / "ok").verify().ok
    configured = node(tmp_path / "cfg", verify_fail="disk on fire").verify()
    assert configured.problems == ("disk on fire",)
    drv = node(tmp_path / "file")
    (tmp_path / "file" / "verify_fail").write_text("flipped at runtime\n")
    assert drv.verify().problems == ("flipped at runtime",)
    assert drv.format_verify_results(list(drv.verify().problems)) == "flipped at runtime"


def test_verify_reports_unwritable_state_dir(tmp_path: Path) -> None:
    drv = node(tmp_path)
    os.rmdir(tmp_path / "instances")
    (tmp_path / "instances").write_text("not a directory")  # unwritable even for root
    problems = drv.verify().problems
    assert len(problems) == 1 and "not writable" in problems[0]


# --- persistence (agent restart) and concurrency ----------------------------------------


def test_state_survives_reinstantiation(tmp_path: Path) -> None:
    first = node(tmp_path, memory_total_mib=4096)
    one, two = spec("one", lo=100, hi=300), spec("two", lo=100, hi=300)
    first.start_instance(one)
    first.start_instance(two, startup_paused=True)
    first.balloon_instance_memory(one, 150)
    first.reboot_instance(one)
    del first
    again = node(tmp_path, memory_total_mib=4096)  # the agent restarted
    assert again.list_instances() == ["one", "two"]
    info = again.get_instance_info("one")
    assert info is not None and info.memory_mib == 150 and info.state.is_alive
    assert state(again, "two") is values.InstanceState.PAUSED
    assert again.boot_count("one") == 2
    assert again.get_node_info().instances_memory_mib == 450
    again.stop_instance(two, force=True)
    assert again.list_instances() == ["one"]


def test_concurrent_starts_never_overcommit(tmp_path: Path) -> None:
    drv = node(tmp_path, memory_total_mib=1000)
    other = node(tmp_path, memory_total_mib=1000)  # a second driver object, same node
    outcomes: list[str] = []
    lock = threading.Lock()

    def start(i: int) -> None:
        d = drv if i % 2 else other
        try:
            d.start_instance(spec(f"vm{i}", lo=100, hi=100))
            result = "ok"
        except errors.InsufficientMemory:
            result = "full"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 10
    assert outcomes.count("full") == 6
    assert len(drv.list_instances()) == 10
    assert drv.get_node_info().memory_free_mib == 0


# --- migration faults ---------------------------------------------------------------------


def _migrate(
    src: fake.FakeHypervisor, dst: fake.FakeHypervisor, vm: values.InstanceSpec
) -> str | None:
    """The operator's protocol: each step; on failure both finalize(False). Returns failed step."""
    info = ""
    step = "migration_info"
    try:
        info = src.migration_info(vm)
        step = "accept"
        dst.accept_instance(vm, info, "node-b")
        step = "migrate"
        src.migrate_instance(vm, dst.migration_target(), live=True)
        step = "finalize_dst"
        dst.finalize_migration_dst(vm, info, True)
    except errors.MigrationError:
        try:
            if info:
                dst.finalize_migration_dst(vm, info, False)
            src.finalize_migration_source(vm, False, True)
        except errors.MigrationCompleted:
            pass  # the instance is on the target, exactly once: nothing to undo
        return step
    step = "finalize_source"
    try:
        src.finalize_migration_source(vm, True, True)
    except errors.MigrationError:
        return step
    return None


@pytest.mark.parametrize(
    "step", ["migration_info", "accept", "migrate", "finalize_dst", "finalize_source"]
)
def test_fail_migration_at_each_step(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor], step: str
) -> None:
    src, dst = pair
    vm = spec("mover", fail_migration_at=step)
    src.start_instance(vm)
    assert _migrate(src, dst, vm) == step
    if step == "finalize_dst":
        # The transfer completed: the source copy is gone, as libvirt's is. The copy on the
        # target (resumed at the end of the transfer, as libvirt does) is the only one:
        # undoing is refused (MigrationCompleted) and the source cannot take it back.
        assert src.list_instances() == []
        assert dst.list_instances() == ["mover"]
        assert state(dst, "mover") is values.InstanceState.RUNNING
    elif step == "finalize_source":
        # The move itself worked: the instance runs once, on the target; the source keeps
        # only a leftover that is not an instance and that cleanup removes.
        assert dst.list_instances() == ["mover"]
        assert src.list_instances() == []
        assert src.get_instance_info("mover") is None
        src.cleanup_instance("mover")
        assert not os.listdir(src.store.instances_dir)
    else:
        assert src.list_instances() == ["mover"]
        assert state(src, "mover") is values.InstanceState.RUNNING
        assert dst.list_instances() == []
        assert dst.get_node_info().instances_memory_mib == 0


def test_migration_without_faults_moves_state(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor],
) -> None:
    src, dst = pair
    vm = spec("mover", lo=100, hi=300)
    src.start_instance(vm, startup_paused=True)
    src.balloon_instance_memory(vm, 200)
    src.reboot_instance(vm)
    src.pause_instance(vm)
    assert _migrate(src, dst, vm) is None
    info = dst.get_instance_info("mover")
    assert info is not None and info.memory_mib == 200
    assert info.state is values.InstanceState.PAUSED  # paused stays paused
    assert dst.boot_count("mover") == 2
    assert not os.listdir(src.store.instances_dir)


def test_accept_refuses_without_memory(tmp_path: Path) -> None:
    src, dst = node(tmp_path / "a"), node(tmp_path / "b", memory_total_mib=100)
    vm = spec("big", lo=200, hi=200)
    src.start_instance(vm)
    info = src.migration_info(vm)
    with pytest.raises(errors.InsufficientMemory):
        dst.accept_instance(vm, info, "node-b")


def test_migrate_without_accept_fails(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor],
) -> None:
    src, dst = pair
    vm = spec("mover")
    src.start_instance(vm)
    src.migration_info(vm)
    with pytest.raises(errors.MigrationError, match="has not accepted"):
        src.migrate_instance(vm, dst.migration_target(), live=True)
    assert src.get_migration_status(vm).state is values.MigrationState.FAILED
    assert state(src, "mover") is values.InstanceState.RUNNING


@pytest.mark.parametrize("how", ["duration", "bandwidth"])
def test_slow_migration_progress_polled_from_other_threads(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor], tmp_path: Path, how: str
) -> None:
    src, dst = pair
    params: dict[str, Any] = {"migration_duration_s": 1.0} if how == "duration" else {}
    options = values.MigrationOptions(bandwidth_mib_s=256) if how == "bandwidth" else None
    vm = spec("slow", lo=256, hi=256, **params)
    src.start_instance(vm)
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    observer = node(tmp_path / "a", "node-a")  # another driver object on the source node
    seen: list[values.MigrationStatus] = []
    mover = threading.Thread(
        target=src.migrate_instance, args=(vm, dst.migration_target(), False, options)
    )
    mover.start()
    while mover.is_alive():
        seen.append(observer.get_migration_status(vm))
    mover.join()
    # Until the job exists, another driver object sees no job (as with libvirt); from then
    # on it sees the job, whose progress only grows.
    first = next(i for i, s in enumerate(seen) if s.state is values.MigrationState.ACTIVE)
    assert all("no migration job" in s.message for s in seen[:first])
    seen = seen[first:]
    processed = [s.memory_processed_bytes for s in seen]
    assert processed == sorted(processed)
    partial = [s for s in seen if 0 < s.memory_processed_bytes < s.memory_total_bytes]
    assert partial and all(s.state is values.MigrationState.ACTIVE for s in partial)
    assert all(s.memory_total_bytes == 256 * 1024 * 1024 for s in seen)
    done = src.get_migration_status(vm)
    assert done.state is values.MigrationState.COMPLETED and done.percent == 100.0


def test_abort_before_transfer_starts(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor],
) -> None:
    src, dst = pair
    vm = spec("mover")
    src.start_instance(vm)
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    src.abort_migration(vm)
    with pytest.raises(errors.MigrationAborted):
        src.migrate_instance(vm, dst.migration_target(), live=True)
    assert src.get_migration_status(vm).state is values.MigrationState.CANCELLED
    dst.finalize_migration_dst(vm, info, False)
    src.finalize_migration_source(vm, False, True)
    assert src.list_instances() == ["mover"] and dst.list_instances() == []


_MIGRATE_IN_CHILD = """
import json, sys
from kubehv.drivers import fake, values
src = fake.FakeHypervisor(values.DriverConfig(node_name="node-a", state_dir=sys.argv[1]))
vm = values.InstanceSpec(name="mover", uid=sys.argv[3], memory_min_mib=128,
                         memory_max_mib=256, params=json.loads(sys.argv[4]))
src.migrate_instance(vm, values.MigrationTarget(node="node-b", address="b", uri=sys.argv[2]),
                     live=True)
"""


def _migrate_in_killed_child(
    src: fake.FakeHypervisor, dst: fake.FakeHypervisor, vm: values.InstanceSpec
) -> str:
    """Start the migration in a child process (an agent), SIGKILL it once memory moves."""
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    params = json.dumps(dict(vm.params))
    child = subprocess.Popen(
        [sys.executable, "-c", _MIGRATE_IN_CHILD, src.store.state_dir, dst.uri, vm.uid, params],
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    try:
        contract.wait_for(
            lambda: src.get_migration_status(vm).memory_processed_bytes > 0,
            60,
            "the child to start transferring",
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return info


# That a migration COMPLETES after its agent is killed is the driver contract's
# test_outcome_is_read_from_the_hypervisor_after_the_caller_is_killed (fake and kvm alike);
# these are the fake's own knobs and paths on top of it.


def test_migration_fails_on_its_own_after_its_agent_is_killed(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor], tmp_path: Path
) -> None:
    """The fault knob still fires with nobody watching: the instance stays on the source."""
    src, dst = pair
    vm = spec("mover", migration_duration_s=3.0, fail_migration_at="migrate")
    src.start_instance(vm)
    info = _migrate_in_killed_child(src, dst, vm)
    fresh = node(tmp_path / "a", "node-a")
    contract.wait_for(
        lambda: fresh.get_migration_status(vm).state is values.MigrationState.FAILED,
        30,
        "the migration to fail without its agent",
    )
    assert "fake fault" in fresh.get_migration_status(vm).message
    assert src.list_instances() == ["mover"] and dst.list_instances() == []
    assert dst.get_node_info().instances_memory_mib == 0  # the incoming copy is gone
    dst.finalize_migration_dst(vm, info, False)
    fresh.finalize_migration_source(vm, False, True)
    assert state(src, "mover") is values.InstanceState.RUNNING
    # and a new migration works afterwards
    assert _migrate(src, dst, spec("mover")) is None
    assert dst.list_instances() == ["mover"]


def test_abort_from_a_new_driver_object_after_the_agent_is_killed(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor], tmp_path: Path
) -> None:
    src, dst = pair
    vm = spec("mover", migration_duration_s=60.0)
    src.start_instance(vm)
    info = _migrate_in_killed_child(src, dst, vm)
    fresh = node(tmp_path / "a", "node-a")
    fresh.abort_migration(vm)
    status = fresh.get_migration_status(vm)
    assert status.state is values.MigrationState.CANCELLED, status
    assert 0 < status.memory_processed_bytes < status.memory_total_bytes
    fresh.abort_migration(vm)  # again, and after the end: never an error
    dst.finalize_migration_dst(vm, info, False)
    fresh.finalize_migration_source(vm, False, True)
    assert src.list_instances() == ["mover"] and dst.list_instances() == []


def test_accept_by_minimum_memory(tmp_path: Path) -> None:
    """The target accepts when min fits though max does not (the controller's rule)."""
    src = node(tmp_path / "a")
    dst = node(tmp_path / "b", memory_total_mib=300)
    vm = spec("roomy", lo=200, hi=500)
    src.start_instance(vm)
    src.balloon_instance_memory(vm, 250)  # what the source does before the transfer
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    assert dst.get_node_info().instances_memory_mib == 250
    src.migrate_instance(vm, dst.migration_target(), live=True)
    dst.finalize_migration_dst(vm, info, True)
    src.finalize_migration_source(vm, True, True)
    got = dst.get_instance_info("roomy")
    assert got is not None and got.memory_mib == 250


def test_crash_during_migration_fails_it_and_nothing_arrives(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor],
) -> None:
    """crash_after_s shorter than the transfer: the source copy crashes, the job fails, the
    incoming copy goes; the instance runs nowhere (the operator must restart it)."""
    src, dst = pair
    vm = spec("crashy", migration_duration_s=5.0, crash_after_s=0.5)
    src.start_instance(vm)
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    with pytest.raises(errors.MigrationError, match="crashed"):
        src.migrate_instance(vm, dst.migration_target(), live=True)
    assert state(src, "crashy") is values.InstanceState.CRASHED
    assert dst.list_instances() == [] and dst.get_node_info().instances_memory_mib == 0
    status = src.get_migration_status(vm, dst.migration_target())
    assert status.state is values.MigrationState.FAILED
    with pytest.raises(errors.MigrationError, match="no longer runs"):
        src.finalize_migration_source(vm, False, True)
    dst.finalize_migration_dst(vm, info, False)


def test_stopping_the_source_during_migration_fails_it(
    pair: tuple[fake.FakeHypervisor, fake.FakeHypervisor], tmp_path: Path
) -> None:
    src, dst = pair
    vm = spec("stopped", migration_duration_s=60.0)
    src.start_instance(vm)
    info = src.migration_info(vm)
    dst.accept_instance(vm, info, "node-b")
    mover = threading.Thread(
        target=_migrate_quietly, args=(src, vm, dst.migration_target()), daemon=True
    )
    mover.start()
    contract.wait_for(
        lambda: src.get_migration_status(vm).memory_processed_bytes > 0, 30, "the transfer"
    )
    node(tmp_path / "a", "node-a").stop_instance(vm, force=True)  # another agent object
    mover.join(30)
    assert not mover.is_alive()
    assert dst.list_instances() == [] and src.list_instances() == []
    status = src.get_migration_status(vm, dst.migration_target())
    assert status.state is values.MigrationState.FAILED and "neither node" in status.message
    dst.finalize_migration_dst(vm, info, False)


def _migrate_quietly(
    src: fake.FakeHypervisor, vm: values.InstanceSpec, target: values.MigrationTarget
) -> None:
    with contextlib.suppress(errors.MigrationError):
        src.migrate_instance(vm, target, live=True)
