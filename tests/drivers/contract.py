"""The driver contract suite: ONE set of behaviour tests every hypervisor driver must pass.

Why this module exists: the operator talks to every driver through the same
``BaseHypervisor`` contract; this suite is what "honours the contract" means. It decides what
to test from ``driver.CAPABILITIES``, never from the driver's name.

How to plug a driver in (a test module per driver / per backend)::

    import pytest
    from tests.drivers import contract

    @pytest.fixture
    def contract_env(tmp_path):
        driver = MyHypervisor(values.DriverConfig(node_name="a", ...))
        yield contract.ContractEnv(
            driver=driver,
            make_spec=lambda name, **over: contract.spec_factory(
                name, memory_min_mib=64, memory_max_mib=128, boot=..., **over
            ),
            peer=contract.Peer(driver=other_driver, target=values.MigrationTarget(...)),
            unreachable_target=values.MigrationTarget(node="x", address="192.0.2.1", uri=...),
            slow_migration_options=values.MigrationOptions(bandwidth_mib_s=1),
            observe_boots=my_boot_counter,  # e.g. count boot markers on the serial console
        )

    @pytest.mark.real_libvirt  # whatever markers the backend needs
    class TestMyDriverContract(contract_migration.MigrationContract):  # with a peer
        pass                 # (contract.DriverContract alone when there is no second node)

``make_spec(name, **overrides)`` must return a spec the driver can really start (the real
libvirt one boots the test guest); overrides are InstanceSpec fields, and an override
``params={...}`` is merged into the default params. Every test names its instances
uniquely and force-stops + cleans them up on both nodes afterwards, so the suite can run
against a shared hypervisor.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from kubehv.drivers import base, errors, values


@dataclasses.dataclass
class Peer:
    """A second node, reachable for migration: its driver and how the source reaches it."""

    driver: base.BaseHypervisor
    target: values.MigrationTarget


@dataclasses.dataclass
class ContractEnv:
    """What a driver's test module hands to the suite through the ``contract_env`` fixture."""

    driver: base.BaseHypervisor
    make_spec: Callable[..., values.InstanceSpec]
    peer: Peer | None = None
    # How long a graceful stop may take before shutdown_instance forces it.
    wait_stopped_timeout_s: float = 30.0
    # How long other state changes (reboot, balloon, migration) may take to show.
    settle_timeout_s: float = 60.0
    # Whether the guest reacts to a graceful stop (False: the suite accepts a forced stop).
    guest_honours_shutdown: bool = True
    # How many times the guest booted, when the driver/test can tell (e.g. serial markers).
    observe_boots: Callable[[values.InstanceSpec], int] | None = None
    # Spec overrides / options that make a migration slow enough to watch and to abort.
    slow_migration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    slow_migration_options: values.MigrationOptions | None = None
    # A target that cannot be reached (for the failure path); None skips that test.
    unreachable_target: values.MigrationTarget | None = None


def spec_factory(name: str, **fields: Any) -> values.InstanceSpec:
    """Build an InstanceSpec with a fresh uid; ``fields`` are InstanceSpec fields."""
    fields.setdefault("uid", str(uuid.uuid4()))
    fields.setdefault("memory_min_mib", 128)
    fields.setdefault("memory_max_mib", 256)
    return values.InstanceSpec(name=name, **fields)


def merge_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Helper for make_spec implementations: InstanceSpec fields, ``params`` merged."""
    out = dict(defaults)
    for key, value in overrides.items():
        if key == "params":
            out["params"] = {**dict(defaults.get("params", {})), **dict(value)}
        else:
            out[key] = value
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until ``predicate`` holds; fail with ``what`` after ``timeout_s`` (a deadline only)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def is_alive(driver: base.BaseHypervisor, name: str) -> bool:
    info = driver.get_instance_info(name)
    return info is not None and info.state.is_alive


class DriverContract:
    """The suite. Subclass it as ``Test<Driver>Contract`` next to a ``contract_env`` fixture."""

    # --- plumbing ------------------------------------------------------------------------

    @pytest.fixture
    def env(self, contract_env: ContractEnv) -> Iterator[ContractEnv]:
        self._started: list[str] = []
        yield contract_env
        drivers = [contract_env.driver]
        if contract_env.peer is not None:
            drivers.append(contract_env.peer.driver)
        for name in self._started:
            for drv in drivers:
                try:
                    drv.stop_instance(None, force=True, name=name)
                    drv.cleanup_instance(name)
                except errors.HypervisorError:
                    pass

    def spec(self, env: ContractEnv, label: str, **overrides: Any) -> values.InstanceSpec:
        name = f"ct-{label}-{secrets.token_hex(3)}"
        self._started.append(name)
        return env.make_spec(name, **overrides)

    def start(
        self, env: ContractEnv, label: str, paused: bool = False, **overrides: Any
    ) -> values.InstanceSpec:
        spec = self.spec(env, label, **overrides)
        env.driver.start_instance(spec, startup_paused=paused)
        return spec

    def caps(self, env: ContractEnv) -> values.Capabilities:
        return env.driver.CAPABILITIES

    # --- lifecycle -----------------------------------------------------------------------

    def test_start_lists_and_reports_running_with_startup_memory(self, env: ContractEnv) -> None:
        spec = self.spec(env, "start")
        expected = env.driver.instance_startup_memory(spec)
        info = env.driver.start_instance(spec)
        assert info.name == spec.name
        assert spec.name in env.driver.list_instances()
        now = env.driver.get_instance_info(spec.name)
        assert now is not None
        assert now.state is values.InstanceState.RUNNING
        assert now.memory_mib == expected
        assert spec.memory_min_mib <= now.memory_mib <= spec.memory_max_mib
        assert now.vcpus == spec.vcpus

    def test_startup_memory_rule(self, env: ContractEnv) -> None:
        spec = env.make_spec("ct-rule", memory_min_mib=100, memory_max_mib=300)
        assert env.driver.instance_startup_memory(spec, free_mib=10_000) == 300
        assert env.driver.instance_startup_memory(spec, free_mib=200) == 200
        assert env.driver.instance_startup_memory(spec, free_mib=100) == 100
        with pytest.raises(errors.InsufficientMemory) as exc:
            env.driver.instance_startup_memory(spec, free_mib=99)
        assert exc.value.needed_mib == 100
        assert exc.value.free_mib == 99

    def test_start_twice_is_already_running(self, env: ContractEnv) -> None:
        spec = self.start(env, "twice")
        with pytest.raises(errors.InstanceAlreadyRunning):
            env.driver.start_instance(spec)
        assert env.driver.list_instances().count(spec.name) == 1

    def test_startup_paused_then_resume(self, env: ContractEnv) -> None:
        if not self.caps(env).startup_paused:
            pytest.skip("driver cannot start paused (capability startup_paused)")
        spec = self.start(env, "paused", paused=True)
        info = env.driver.get_instance_info(spec.name)
        assert info is not None and info.state is values.InstanceState.PAUSED
        assert spec.name in env.driver.list_instances()
        env.driver.resume_instance(spec)
        wait_for(
            lambda: _state(env.driver, spec.name) is values.InstanceState.RUNNING,
            env.settle_timeout_s,
            "the instance to run after resume",
        )

    def test_pause_and_resume(self, env: ContractEnv) -> None:
        if not self.caps(env).pause:
            spec = self.start(env, "nopause")
            with pytest.raises(errors.NotSupported):
                env.driver.pause_instance(spec)
            return
        spec = self.start(env, "pause")
        env.driver.pause_instance(spec)
        assert _state(env.driver, spec.name) is values.InstanceState.PAUSED
        env.driver.resume_instance(spec)
        assert _state(env.driver, spec.name) is values.InstanceState.RUNNING

    def test_graceful_stop_of_a_paused_instance_powers_it_off(self, env: ContractEnv) -> None:
        spec = self.start(env, "pausedstop")
        if not self.caps(env).pause:
            with pytest.raises(errors.NotSupported):
                env.driver.pause_instance(spec)
            return
        env.driver.pause_instance(spec)
        assert _state(env.driver, spec.name) is values.InstanceState.PAUSED
        # A paused guest cannot hear the power button: the graceful path must not fail or
        # wait for the timeout's force, it powers the guest off (what deleting a Paused
        # VirtualInstance does).
        env.driver.stop_instance(spec)
        wait_for(
            lambda: not is_alive(env.driver, spec.name),
            env.settle_timeout_s,
            "a graceful stop of a paused instance",
        )
        assert spec.name not in env.driver.list_instances()

    def test_graceful_stop_through_shutdown_instance(self, env: ContractEnv) -> None:
        spec = self.start(env, "graceful")
        forced = env.driver.shutdown_instance(
            spec, timeout_s=env.wait_stopped_timeout_s, poll_s=0.1
        )
        if env.guest_honours_shutdown:
            assert forced is False, "the guest did not stop gracefully within the timeout"
        assert not is_alive(env.driver, spec.name)
        assert spec.name not in env.driver.list_instances()

    def test_force_stop(self, env: ContractEnv) -> None:
        spec = self.start(env, "force")
        env.driver.stop_instance(spec, force=True)
        wait_for(lambda: not is_alive(env.driver, spec.name), env.settle_timeout_s, "a forced stop")
        assert spec.name not in env.driver.list_instances()

    def test_stop_by_name_only(self, env: ContractEnv) -> None:
        spec = self.start(env, "byname")
        env.driver.stop_instance(None, force=True, name=spec.name)
        wait_for(lambda: not is_alive(env.driver, spec.name), env.settle_timeout_s, "stop by name")
        assert spec.name not in env.driver.list_instances()

    def test_stopping_what_does_not_run_is_not_an_error(self, env: ContractEnv) -> None:
        spec = self.spec(env, "absent")
        env.driver.stop_instance(spec)
        env.driver.stop_instance(spec, retry=True)
        env.driver.stop_instance(spec, force=True)
        env.driver.stop_instance(None, name=spec.name)
        env.driver.stop_instance(None, force=True, name=spec.name)
        assert env.driver.get_instance_info(spec.name) is None

    def test_cleanup_after_stop(self, env: ContractEnv) -> None:
        spec = self.start(env, "cleanup")
        env.driver.stop_instance(spec, force=True)
        wait_for(lambda: not is_alive(env.driver, spec.name), env.settle_timeout_s, "stop")
        env.driver.cleanup_instance(spec.name)
        env.driver.cleanup_instance(spec.name)  # twice: still fine
        env.driver.cleanup_instance(f"ct-never-{secrets.token_hex(3)}")
        assert env.driver.get_instance_info(spec.name) is None
        assert spec.name not in env.driver.list_instances()
        # and the name can be used again
        env.driver.start_instance(spec)
        assert is_alive(env.driver, spec.name)

    def test_reboot_keeps_it_running(self, env: ContractEnv) -> None:
        spec = self.start(env, "reboot")
        boots_before = None
        if env.observe_boots is not None:
            observe = env.observe_boots
            wait_for(lambda: observe(spec) >= 1, env.settle_timeout_s, "the first boot")
            boots_before = observe(spec)
        env.driver.reboot_instance(spec)
        wait_for(
            lambda: _state(env.driver, spec.name) is values.InstanceState.RUNNING,
            env.settle_timeout_s,
            "the instance to run after reboot",
        )
        assert spec.name in env.driver.list_instances()
        if env.observe_boots is not None and boots_before is not None:
            observe = env.observe_boots
            wait_for(
                lambda: observe(spec) > boots_before,
                env.settle_timeout_s,
                "a second boot after reboot",
            )

    def test_reboot_of_absent_instance_is_typed_error(self, env: ContractEnv) -> None:
        spec = self.spec(env, "noreboot")
        with pytest.raises(errors.HypervisorError):
            env.driver.reboot_instance(spec)

    def test_balloon_within_bounds_and_refused_outside(self, env: ContractEnv) -> None:
        spec = self.start(env, "balloon")
        if not self.caps(env).ballooning:
            with pytest.raises(errors.NotSupported):
                env.driver.balloon_instance_memory(spec, spec.memory_min_mib)
            return
        target = spec.memory_min_mib
        env.driver.balloon_instance_memory(spec, target)
        wait_for(
            lambda: _memory(env.driver, spec.name) == target,
            env.settle_timeout_s,
            f"info memory to become {target} MiB after ballooning",
        )
        for bad in (spec.memory_min_mib - 1, spec.memory_max_mib + 1):
            with pytest.raises(errors.InvalidInstanceSpec) as exc:
                env.driver.balloon_instance_memory(spec, bad)
            assert str(bad) in str(exc.value)
        assert _memory(env.driver, spec.name) == target

    # --- inventory -----------------------------------------------------------------------

    def test_get_all_instances_info(self, env: ContractEnv) -> None:
        one = self.start(env, "all1")
        two = self.start(env, "all2")
        infos = {i.name: i for i in env.driver.get_all_instances_info()}
        assert {one.name, two.name} <= set(infos)
        assert set(infos) <= set(env.driver.list_instances()) | {one.name, two.name}
        for spec in (one, two):
            assert infos[spec.name].state.is_alive
            assert infos[spec.name].vcpus == spec.vcpus
        assert not set(env.driver.list_instances()) & set(env.driver.list_foreign_instances())

    def test_node_info_is_sane(self, env: ContractEnv) -> None:
        node = env.driver.get_node_info()
        assert node.memory_total_mib > 0
        assert 0 <= node.memory_free_mib <= node.memory_total_mib
        assert node.memory_dom0_mib >= 0
        assert node.cpu_total >= 1
        assert node.cpu_nodes >= 1
        assert node.cpu_sockets >= 1

    def test_verify_ok(self, env: ContractEnv) -> None:
        result = env.driver.verify()
        assert result.ok, result.problems
        assert env.driver.format_verify_results(list(result.problems)) is None

    def test_console_names_the_instance(self, env: ContractEnv) -> None:
        spec = self.start(env, "console")
        console = env.driver.get_instance_console(spec)
        assert console.instance == spec.name
        assert isinstance(console.kind, values.ConsoleKind)
        if console.kind is values.ConsoleKind.MESSAGE:
            assert console.message
        else:
            assert console.command or console.port is not None

    def test_ancillary_files_are_absolute(self, env: ContractEnv) -> None:
        files = type(env.driver).get_ancillary_files()
        assert set(files.optional) <= set(files.all)
        assert all(path.startswith("/") for path in files.all)

    # --- parameters and bad input --------------------------------------------------------

    def test_parameter_syntax_rejects_unknown_and_wrong_types_listing_each(
        self, env: ContractEnv
    ) -> None:
        cls = type(env.driver)
        cls.check_parameter_syntax({})  # defaults alone are valid
        with pytest.raises(errors.ParameterError) as exc:
            cls.check_parameter_syntax({"no_such_param": 1, "nor_this_one": "x"})
        assert any("no_such_param" in p for p in exc.value.problems)
        assert any("nor_this_one" in p for p in exc.value.problems)
        wrong = {name: _wrong_value(p.type) for name, p in cls.PARAMETERS.items()}
        if not wrong:
            return
        with pytest.raises(errors.ParameterError) as exc:
            cls.check_parameter_syntax(wrong)
        for name in wrong:
            assert any(repr(name) in p for p in exc.value.problems), name

    @pytest.mark.parametrize(
        "bad",
        [
            {"memory_min_mib": 512, "memory_max_mib": 256},
            {"boot": values.KernelBoot(kernel="boot/vmlinuz")},
            {"boot": values.KernelBoot(kernel="/boot/vmlinuz", initrd="../initrd")},
            {"name": "evil<name>"},
            {"name": "a&b"},
            {"name": "it's"},
            {"name": 'say"hi'},
            {"name": "x'/><devices/>"},
        ],
        ids=[
            "min-above-max",
            "relative-kernel",
            "relative-initrd",
            "lt",
            "amp",
            "apos",
            "quot",
            "xml-injection",
        ],
    )
    def test_bad_specs_are_refused_before_anything_runs(
        self, env: ContractEnv, bad: dict[str, Any]
    ) -> None:
        spec = dataclasses.replace(self.spec(env, "bad"), **bad)
        with pytest.raises(errors.InvalidInstanceSpec):
            type(env.driver).check_instance_spec(spec)
        with pytest.raises(errors.InvalidInstanceSpec):
            env.driver.start_instance(spec)
        assert spec.name not in env.driver.list_instances()


def _state(driver: base.BaseHypervisor, name: str) -> values.InstanceState | None:
    info = driver.get_instance_info(name)
    return info.state if info is not None else None


def _memory(driver: base.BaseHypervisor, name: str) -> int | None:
    info = driver.get_instance_info(name)
    return info.memory_mib if info is not None else None


def _wrong_value(kind: type) -> values.ParamValue:
    """A value of the wrong type for a parameter of type ``kind``."""
    if kind is bool:
        return "yes"
    if kind in (int, float):
        return "many"
    return 12345
