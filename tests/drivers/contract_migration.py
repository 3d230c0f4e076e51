"""The migration part of the driver contract: for suites that have a second node (a peer).

Why a separate class: a backend with one node (libvirt's ``test:///default``) cannot migrate
anywhere, and a test that skips for want of a peer says nothing. Suites with a peer
(the fake driver, two real libvirt nodes) subclass :class:`MigrationContract`, which is the
whole :class:`~tests.drivers.contract.DriverContract` plus these tests; the others subclass
``DriverContract`` alone, so nothing is collected that cannot run. What each test covers is
still decided from the driver's capabilities (live/non-live, progress, abort).

The exactly-once part (issue 11): a migration's outcome is read from the hypervisor by a
*fresh* driver object after the process that called ``migrate_instance`` was SIGKILLed (the
transfer goes on without it, on libvirt as on the fake); an abort racing the end of the
transfer leaves the instance on exactly one node; the target destroys only a copy that is
still incoming, and refuses (``MigrationCompleted``) to destroy one that arrived.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from types import MappingProxyType
from typing import Any

import pytest

from kubehv.drivers import base, errors, values
from tests.drivers import contract


class _Migration(threading.Thread):
    """migrate_instance in a thread, as the operator runs it, keeping its outcome."""

    def __init__(
        self,
        driver: base.BaseHypervisor,
        spec: values.InstanceSpec,
        target: values.MigrationTarget,
        live: bool,
        options: values.MigrationOptions | None,
    ) -> None:
        super().__init__(daemon=True)
        self.args = (driver, spec, target, live, options)
        self.error: BaseException | None = None

    def run(self) -> None:
        driver, spec, target, live, options = self.args
        try:
            driver.migrate_instance(spec, target, live, options)
        except BaseException as exc:
            self.error = exc


def _as_dict(proxy: MappingProxyType[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    return dict, (dict(proxy),)


def _dumps(obj: object) -> bytes:
    """Pickle specs and configs, whose parameters are read-only mappings (sent as dicts)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf)
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _as_dict}
    pickler.dump(obj)
    return buf.getvalue()


_CHILD = """
import pickle, sys
cls, config, spec, target, live, options = pickle.load(sys.stdin.buffer)
cls(config).migrate_instance(spec, target, live, options)
"""


def _migrate_in_child(
    driver: base.BaseHypervisor,
    spec: values.InstanceSpec,
    target: values.MigrationTarget,
    live: bool,
    options: values.MigrationOptions | None,
) -> subprocess.Popen[bytes]:
    """migrate_instance in another process (an agent) with its own driver object."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE)
    assert child.stdin is not None
    child.stdin.write(_dumps((type(driver), driver.config, spec, target, live, options)))
    child.stdin.close()
    return child


def _fresh(driver: base.BaseHypervisor) -> base.BaseHypervisor:
    """A new driver object on the same node: what a restarted agent has."""
    return type(driver)(driver.config)


def _status(driver: base.BaseHypervisor, spec: values.InstanceSpec) -> values.MigrationStatus:
    return driver.get_migration_status(spec)


def _transferring(
    driver: base.BaseHypervisor, spec: values.InstanceSpec, caps: values.Capabilities
) -> bool:
    status = driver.get_migration_status(spec)
    if status.state is not values.MigrationState.ACTIVE:
        return False
    return not caps.migration_progress or status.memory_processed_bytes > 0


def _runs_on(driver: base.BaseHypervisor, name: str) -> bool:
    return contract.is_alive(driver, name) and name in driver.list_instances()


class MigrationContract(contract.DriverContract):
    """DriverContract plus migration in Ganeti's order, failure and abort (needs a peer)."""

    def peer(self, env: contract.ContractEnv) -> contract.Peer:
        assert env.peer is not None, "a MigrationContract suite needs contract_env.peer"
        if not self.caps(env).can_migrate:
            pytest.skip("driver cannot migrate (capabilities)")
        return env.peer

    def begin(
        self, env: contract.ContractEnv, label: str, live: bool
    ) -> tuple[values.InstanceSpec, str, _Migration]:
        """Start a slow instance, prepare both sides, and run migrate_instance in a thread."""
        peer = self.peer(env)
        spec = self.start(env, label, **env.slow_migration)
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        mover = _Migration(env.driver, spec, peer.target, live, env.slow_migration_options)
        mover.start()
        return spec, info, mover

    @pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
    def test_migration_in_ganeti_order(self, env: contract.ContractEnv, live: bool) -> None:
        peer = self.peer(env)
        caps = self.caps(env)
        if not (caps.live_migration if live else caps.non_live_migration):
            pytest.skip(f"driver cannot do {'live' if live else 'non-live'} migration")
        spec, info, mover = self.begin(env, "mig", live)
        seen: list[values.MigrationStatus] = []
        while mover.is_alive():
            # MigrationError: e.g. the job is not visible yet, or already gone
            with contextlib.suppress(errors.MigrationError):
                seen.append(env.driver.get_migration_status(spec))
            time.sleep(0.02)
        mover.join()
        assert mover.error is None, f"migrate_instance failed: {mover.error!r}"
        # Polls that ran before the thread reached migrate_instance see no job, truthfully.
        while seen and seen[0].state is values.MigrationState.FAILED:
            assert "no migration job" in seen.pop(0).message
        done = env.driver.get_migration_status(spec, peer.target)
        assert done.state is values.MigrationState.COMPLETED, done
        peer.driver.finalize_migration_dst(spec, info, True)
        env.driver.finalize_migration_source(spec, True, live)
        assert spec.name in peer.driver.list_instances()
        assert contract.is_alive(peer.driver, spec.name)
        assert spec.name not in env.driver.list_instances()
        assert not contract.is_alive(env.driver, spec.name)
        if caps.migration_progress:
            active = [s for s in seen if s.state is values.MigrationState.ACTIVE]
            assert active, f"no active migration status observed (saw {seen})"
            assert all(s.memory_total_bytes > 0 for s in active)
            odd = [
                (i, s)
                for i, s in enumerate(seen)
                if s.state not in (values.MigrationState.ACTIVE, values.MigrationState.COMPLETED)
            ]
            assert not odd, (odd, len(seen))

    def test_failed_migration_leaves_instance_on_source(self, env: contract.ContractEnv) -> None:
        peer = self.peer(env)
        if env.unreachable_target is None:
            pytest.skip("no unreachable target in this environment")
        live = self.caps(env).live_migration
        spec = self.start(env, "migfail")
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        with pytest.raises(errors.MigrationError):
            env.driver.migrate_instance(spec, env.unreachable_target, live)
        peer.driver.finalize_migration_dst(spec, info, False)
        env.driver.finalize_migration_source(spec, False, live)
        assert contract._state(env.driver, spec.name) is values.InstanceState.RUNNING
        assert spec.name in env.driver.list_instances()
        assert spec.name not in peer.driver.list_instances()

    def test_abort_migration_keeps_instance_on_source(self, env: contract.ContractEnv) -> None:
        peer = self.peer(env)
        caps = self.caps(env)
        if not caps.migration_abort:
            pytest.skip("driver cannot abort migrations (capability migration_abort)")
        live = caps.live_migration
        spec, info, mover = self.begin(env, "migabort", live)

        def transferring() -> bool:
            try:
                status = env.driver.get_migration_status(spec)
            except errors.MigrationError:
                return False
            return status.state is values.MigrationState.ACTIVE and (
                not caps.migration_progress or status.memory_processed_bytes > 0
            )

        contract.wait_for(transferring, env.settle_timeout_s, "the migration to be under way")
        env.driver.abort_migration(spec)
        mover.join(env.settle_timeout_s)
        assert not mover.is_alive(), "migrate_instance did not return after abort"
        assert isinstance(mover.error, errors.MigrationError), mover.error
        peer.driver.finalize_migration_dst(spec, info, False)
        env.driver.finalize_migration_source(spec, False, live)
        assert contract._state(env.driver, spec.name) is values.InstanceState.RUNNING
        assert spec.name in env.driver.list_instances()
        assert spec.name not in peer.driver.list_instances()

    # --- exactly once ----------------------------------------------------------------------

    @pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
    def test_outcome_is_read_from_the_hypervisor_after_the_caller_is_killed(
        self, env: contract.ContractEnv, live: bool
    ) -> None:
        """SIGKILL the process blocked in migrate_instance: the hypervisor's job goes on,
        and a NEW driver object reads its outcome; the guest then runs on the target only,
        and neither side may undo the migration."""
        peer = self.peer(env)
        caps = self.caps(env)
        if not (caps.live_migration if live else caps.non_live_migration):
            pytest.skip(f"driver cannot do {'live' if live else 'non-live'} migration")
        spec = self.start(env, "migkill", **env.slow_migration)
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        child = _migrate_in_child(env.driver, spec, peer.target, live, env.slow_migration_options)
        fresh = _fresh(env.driver)
        try:
            contract.wait_for(
                lambda: _transferring(fresh, spec, caps),
                env.settle_timeout_s,
                "a fresh driver object to see the migration job transferring",
            )
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        killed = time.monotonic()
        after = _fresh(env.driver)  # and another one, after the agent is gone
        contract.wait_for(
            lambda: _status(after, spec).state is not values.MigrationState.ACTIVE,
            env.settle_timeout_s,
            "the migration job to end without the process that started it",
        )
        print(
            f"\nMEASURED {type(env.driver).NAME} {'live' if live else 'non-live'}: the "
            f"migration ended {time.monotonic() - killed:.2f} s after its caller was SIGKILLed"
        )
        status = after.get_migration_status(spec, peer.target)
        assert status.state is values.MigrationState.COMPLETED, status
        assert _runs_on(peer.driver, spec.name)
        assert _state_of(peer.driver, spec.name) is values.InstanceState.RUNNING
        assert not contract.is_alive(after, spec.name)
        assert spec.name not in after.list_instances()
        with pytest.raises(errors.MigrationCompleted):
            peer.driver.finalize_migration_dst(spec, info, False)
        with pytest.raises(errors.MigrationError):
            after.finalize_migration_source(spec, False, live)
        assert _runs_on(peer.driver, spec.name)  # refused means: still there, still once
        peer.driver.finalize_migration_dst(spec, info, True)
        after.finalize_migration_source(spec, True, live)
        assert _runs_on(peer.driver, spec.name)
        assert not contract.is_alive(env.driver, spec.name)

    @pytest.mark.parametrize("when", ["near-the-end", "after-the-end"])
    def test_abort_racing_completion_runs_the_guest_exactly_once(
        self, env: contract.ContractEnv, when: str
    ) -> None:
        """An abort that races the end of the transfer never raises, and leaves the guest on
        exactly one node: COMPLETED (on the target, which refuses to destroy it) or
        CANCELLED/FAILED (on the source only)."""
        peer = self.peer(env)
        caps = self.caps(env)
        if not caps.migration_abort:
            pytest.skip("driver cannot abort migrations (capability migration_abort)")
        live = caps.live_migration
        spec, info, mover = self.begin(env, "migrace", live)

        def near_the_end() -> bool:
            status = _status(env.driver, spec)
            if status.state is not values.MigrationState.ACTIVE:
                return True  # it ended before we got there: abort after the end then
            total = status.memory_total_bytes
            return total > 0 and status.memory_remaining_bytes <= total * 0.15

        if when == "near-the-end":
            contract.wait_for(near_the_end, env.settle_timeout_s, "the transfer's last 15%")
        else:
            mover.join(env.settle_timeout_s)
        env.driver.abort_migration(spec)
        mover.join(env.settle_timeout_s)
        assert not mover.is_alive(), "migrate_instance did not return"
        env.driver.abort_migration(spec)  # once more, with no job at all: still no error
        status = _fresh(env.driver).get_migration_status(spec, peer.target)
        print(f"\nabort {when}: {status.state.value} ({status.message})")
        if status.state is values.MigrationState.COMPLETED:
            assert mover.error is None, mover.error
            assert _runs_on(peer.driver, spec.name)
            assert not contract.is_alive(env.driver, spec.name)
            with pytest.raises(errors.MigrationCompleted):
                peer.driver.finalize_migration_dst(spec, info, False)
            assert _runs_on(peer.driver, spec.name)
            peer.driver.finalize_migration_dst(spec, info, True)
            env.driver.finalize_migration_source(spec, True, live)
            assert _runs_on(peer.driver, spec.name)
        else:
            assert when == "near-the-end", f"an abort after the end changed it: {status}"
            assert status.state in (values.MigrationState.CANCELLED, values.MigrationState.FAILED)
            assert isinstance(mover.error, errors.MigrationError), mover.error
            peer.driver.finalize_migration_dst(spec, info, False)
            env.driver.finalize_migration_source(spec, False, live)
            assert _state_of(env.driver, spec.name) is values.InstanceState.RUNNING
            assert not contract.is_alive(peer.driver, spec.name)
        on_source = contract.is_alive(env.driver, spec.name)
        on_target = contract.is_alive(peer.driver, spec.name)
        assert on_source != on_target, f"source={on_source} target={on_target}"

    def test_target_destroys_a_copy_that_is_still_incoming(self, env: contract.ContractEnv) -> None:
        """finalize_migration_dst(False) during the transfer: the incoming copy goes, the
        transfer fails, and the guest runs on the source only."""
        peer = self.peer(env)
        caps = self.caps(env)
        live = caps.live_migration
        spec, info, mover = self.begin(env, "migundo", live)
        contract.wait_for(
            lambda: _transferring(env.driver, spec, caps),
            env.settle_timeout_s,
            "the migration to be under way",
        )
        peer.driver.finalize_migration_dst(spec, info, False)
        mover.join(env.settle_timeout_s)
        assert not mover.is_alive(), "migrate_instance did not return"
        assert isinstance(mover.error, errors.MigrationError), mover.error
        status = _fresh(env.driver).get_migration_status(spec)
        assert status.state in (values.MigrationState.FAILED, values.MigrationState.CANCELLED)
        env.driver.finalize_migration_source(spec, False, live)
        assert _state_of(env.driver, spec.name) is values.InstanceState.RUNNING
        assert not contract.is_alive(peer.driver, spec.name)
        assert spec.name not in peer.driver.list_instances()

    def test_paused_instance_arrives_paused_and_is_the_only_copy(
        self, env: contract.ContractEnv
    ) -> None:
        """A paused copy that ARRIVED is not an incoming one: never destroyed, kept paused."""
        peer = self.peer(env)
        caps = self.caps(env)
        if not caps.pause:
            pytest.skip("driver cannot pause instances (capability pause)")
        live = caps.live_migration
        spec = self.start(env, "migpaused")
        env.driver.pause_instance(spec)
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        env.driver.migrate_instance(spec, peer.target, live, None)
        status = _fresh(env.driver).get_migration_status(spec, peer.target)
        assert status.state is values.MigrationState.COMPLETED, status
        assert _state_of(peer.driver, spec.name) is values.InstanceState.PAUSED
        with pytest.raises(errors.MigrationCompleted):
            peer.driver.finalize_migration_dst(spec, info, False)
        peer.driver.finalize_migration_dst(spec, info, True)
        env.driver.finalize_migration_source(spec, True, live)
        assert _state_of(peer.driver, spec.name) is values.InstanceState.PAUSED
        assert not contract.is_alive(env.driver, spec.name)
        peer.driver.resume_instance(spec)
        assert _state_of(peer.driver, spec.name) is values.InstanceState.RUNNING

    def test_no_job_is_not_an_error_and_status_says_so(self, env: contract.ContractEnv) -> None:
        self.peer(env)
        spec = self.start(env, "nojob")
        env.driver.abort_migration(spec)  # never migrated: nothing to abort, no error
        env.driver.abort_migration(self.spec(env, "absent"))
        status = _fresh(env.driver).get_migration_status(spec)
        assert status.state is values.MigrationState.FAILED
        assert "no migration job" in status.message
        with pytest.raises(errors.MigrationError, match="not completed"):
            env.driver.finalize_migration_source(spec, True, self.caps(env).live_migration)
        assert _state_of(env.driver, spec.name) is values.InstanceState.RUNNING

    def test_accept_needs_the_minimum_memory_to_fit_not_the_maximum(
        self, env: contract.ContractEnv
    ) -> None:
        """The controller places with ballooning when max > free >= min; the target agrees."""
        peer = self.peer(env)
        spec = self.start(env, "migmem")
        info = env.driver.migration_info(spec)
        free = peer.driver.get_node_info().memory_free_mib
        too_big = dataclasses.replace(spec, memory_min_mib=free + 4096, memory_max_mib=free + 8192)
        with pytest.raises(errors.InsufficientMemory) as exc:
            peer.driver.accept_instance(too_big, info, peer.target.address)
        assert exc.value.needed_mib == free + 4096
        roomy = dataclasses.replace(spec, memory_max_mib=free + 4096)
        peer.driver.accept_instance(roomy, info, peer.target.address)
        peer.driver.finalize_migration_dst(roomy, info, False)
        assert not contract.is_alive(peer.driver, spec.name)


def _state_of(driver: base.BaseHypervisor, name: str) -> values.InstanceState | None:
    info = driver.get_instance_info(name)
    return info.state if info is not None else None
