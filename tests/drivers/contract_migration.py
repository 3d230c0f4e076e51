"""The migration part of the driver contract: for suites that have a second node (a peer).

Why a separate class: a backend with one node (libvirt's ``test:///default``) cannot migrate
anywhere, and a test that skips for want of a peer says nothing. Suites with a peer
(the fake driver, two real libvirt nodes) subclass :class:`MigrationContract`, which is the
whole :class:`~tests.drivers.contract.DriverContract` plus these tests; the others subclass
``DriverContract`` alone, so nothing is collected that cannot run. What each test covers is
still decided from the driver's capabilities (live/non-live, progress, abort).
"""

from __future__ import annotations

import contextlib
import threading
import time

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


class MigrationContract(contract.DriverContract):
    """DriverContract plus migration in Ganeti's order, failure and abort (needs a peer)."""

    def peer(self, env: contract.ContractEnv) -> contract.Peer:
        assert env.peer is not None, "a MigrationContract suite needs contract_env.peer"
        if not self.caps(env).can_migrate:
            pytest.skip("driver cannot migrate (capabilities)")
        return env.peer

    @pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
    def test_migration_in_ganeti_order(self, env: contract.ContractEnv, live: bool) -> None:
        peer = self.peer(env)
        caps = self.caps(env)
        if not (caps.live_migration if live else caps.non_live_migration):
            pytest.skip(f"driver cannot do {'live' if live else 'non-live'} migration")
        spec = self.start(env, "mig", **env.slow_migration)
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        mover = _Migration(env.driver, spec, peer.target, live, env.slow_migration_options)
        mover.start()
        seen: list[values.MigrationStatus] = []
        while mover.is_alive():
            # MigrationError: e.g. the job is not visible yet, or already gone
            with contextlib.suppress(errors.MigrationError):
                seen.append(env.driver.get_migration_status(spec))
            time.sleep(0.02)
        mover.join()
        assert mover.error is None, f"migrate_instance failed: {mover.error!r}"
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
            assert all(
                s.state in (values.MigrationState.ACTIVE, values.MigrationState.COMPLETED)
                for s in seen
            )

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
        spec = self.start(env, "migabort", **env.slow_migration)
        info = env.driver.migration_info(spec)
        peer.driver.accept_instance(spec, info, peer.target.address)
        mover = _Migration(env.driver, spec, peer.target, live, env.slow_migration_options)
        mover.start()

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
