"""The kvm driver against libvirt's built-in ``test:///default`` driver (no daemon, fast).

Why: it runs the shared driver contract and the kvm driver's own rules (tagging, foreign
domains, refusing to touch what kubehv did not create, balloon bounds, parameter node checks)
through the real libvirt client library, in milliseconds, on every machine. The test driver
has no real guest and no second node, so this suite is ``contract.DriverContract`` without
the migration part (tests/drivers/contract_migration.py): nothing is collected that cannot
run; the real daemon runs the migration tests in test_libvirt_real.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from kubehv.drivers import errors, registry, values
from kubehv.drivers.libvirt import connection, domxml
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from tests.drivers import contract

TEST_URI = "test:///default"
_counter = itertools.count()


@dataclasses.dataclass
class LibvirtTestEnv:
    driver: LibvirtHypervisor
    files_dir: pathlib.Path
    prefix: str
    peer: Any = None
    wait_stopped_timeout_s: float = 5.0

    def make_spec(
        self, name: str, exact_name: bool = False, **overrides: Any
    ) -> values.InstanceSpec:
        kernel = self.files_dir / "vmlinuz"
        kernel.write_text("not a kernel: the test driver never runs it\n")
        fields: dict[str, Any] = {
            "name": name if exact_name else f"{self.prefix}-{name}-{next(_counter)}",
            "uid": f"uid-{self.prefix}-{name}",
            "memory_min_mib": 64,
            "memory_max_mib": 128,
            "boot": values.KernelBoot(kernel=str(kernel), cmdline="console=ttyS0"),
            "params": {"reboot_acpi_timeout_s": 0},
        }
        return values.InstanceSpec(**contract.merge_overrides(fields, overrides))

    def cleanup(self) -> None:
        for name in self.driver.list_instances():
            if name.startswith((self.prefix, "ct-")):
                self.driver.stop_instance(None, force=True, name=name)
                self.driver.cleanup_instance(name)


def _make_env(tmp_path: pathlib.Path) -> LibvirtTestEnv:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    driver = LibvirtHypervisor(
        values.DriverConfig(
            node_name="test-node", uri=TEST_URI, params={"allowed_dirs": str(files)}
        )
    )
    return LibvirtTestEnv(driver=driver, files_dir=files, prefix=f"t{os.getpid()}")


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Iterator[LibvirtTestEnv]:
    e = _make_env(tmp_path)
    yield e
    e.cleanup()


@pytest.fixture
def contract_env(tmp_path: pathlib.Path) -> Iterator[contract.ContractEnv]:
    e = _make_env(tmp_path)
    yield contract.ContractEnv(
        driver=e.driver,
        make_spec=lambda name, **over: e.make_spec(name, exact_name=True, **over),
        peer=None,  # test:/// cannot migrate: a design fact, not a missing real part
        wait_stopped_timeout_s=5.0,
        settle_timeout_s=10.0,
    )
    e.cleanup()


class TestContractOnTestDriver(contract.DriverContract):
    pass


# --- the kvm driver's own rules ----------------------------------------------------------


def test_registry_name_is_kvm() -> None:
    assert registry.get_driver_class("kvm") is LibvirtHypervisor


def test_only_tagged_domains_are_listed_and_the_rest_is_foreign(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("tagged")
    env.driver.start_instance(spec)
    conn = libvirt.open(TEST_URI)
    foreign = conn.createXML(
        f"<domain type='test'><name>{env.prefix}-foreign</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>",
        0,
    )
    try:
        assert spec.name in env.driver.list_instances()
        assert foreign.name() not in env.driver.list_instances()
        assert foreign.name() in env.driver.list_foreign_instances()
        assert spec.name not in env.driver.list_foreign_instances()
        assert env.driver.get_instance_info(foreign.name()) is None
        assert [i.name for i in env.driver.get_all_instances_info()].count(spec.name) == 1
        assert foreign.name() not in [i.name for i in env.driver.get_all_instances_info()]
        with pytest.raises(errors.InstanceStopError, match="not created by kubehv"):
            env.driver.stop_instance(None, force=True, name=foreign.name())
        assert foreign.isActive()
    finally:
        foreign.destroy()


def test_domain_carries_the_kubehv_tag_and_memory(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("tag", memory_min_mib=64, memory_max_mib=192)
    info = env.driver.start_instance(spec)
    assert info.uid == spec.uid
    dom = libvirt.open(TEST_URI).lookupByName(spec.name)
    assert not dom.isPersistent()  # transient by design
    tag = domxml.read_tag(dom.XMLDesc(0))
    assert tag == domxml.Tag(uid=spec.uid, memory_min_mib=64, memory_max_mib=192)
    assert dom.maxMemory() == 192 * 1024
    root = domxml.parse(dom.XMLDesc(0))
    assert root.get("type") == "qemu"  # accelerator auto: never KVM on the test driver


def test_start_twice_is_already_running(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("twice")
    env.driver.start_instance(spec)
    with pytest.raises(errors.InstanceAlreadyRunning):
        env.driver.start_instance(spec)


def test_stopped_transient_domain_is_gone(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("gone")
    env.driver.start_instance(spec)
    env.driver.stop_instance(None, force=True, name=spec.name)
    env.driver.cleanup_instance(spec.name)
    with pytest.raises(libvirt.libvirtError):
        libvirt.open(TEST_URI).lookupByName(spec.name)
    env.driver.stop_instance(spec, force=True)  # not running: not an error


def test_cleanup_undefines_a_persistent_leftover(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("leftover")
    xml = env.driver.domain_xml(spec, 64)
    conn = libvirt.open(TEST_URI)
    conn.defineXML(xml)
    assert env.driver.get_instance_info(spec.name) is None  # defined, not running
    env.driver.cleanup_instance(spec.name)
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(spec.name)


def test_balloon_is_bounded_by_min_and_max(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("balloon", memory_min_mib=64, memory_max_mib=128)
    env.driver.start_instance(spec)
    env.driver.balloon_instance_memory(spec, 96)
    info = env.driver.get_instance_info(spec.name)
    assert info is not None and info.memory_mib == 96
    for bad in (32, 256):
        with pytest.raises(errors.InvalidInstanceSpec, match="between"):
            env.driver.balloon_instance_memory(spec, bad)


def test_startup_memory_is_clamped_to_free_memory(env: LibvirtTestEnv) -> None:
    free = env.driver.get_node_info().memory_free_mib
    spec = env.make_spec("huge", memory_min_mib=64, memory_max_mib=free + 4096)
    info = env.driver.start_instance(spec)
    assert 64 <= info.memory_mib <= free
    too_big = env.make_spec("too-big", memory_min_mib=free + 1, memory_max_mib=free + 2)
    with pytest.raises(errors.InsufficientMemory):
        env.driver.start_instance(too_big)


def test_pause_and_resume(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("pause")
    env.driver.start_instance(spec, startup_paused=True)
    info = env.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.PAUSED
    env.driver.resume_instance(spec)
    info = env.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING
    env.driver.pause_instance(spec)
    env.driver.pause_instance(spec)  # idempotent
    info = env.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.PAUSED


def test_node_info_from_libvirt(env: LibvirtTestEnv) -> None:
    node = env.driver.get_node_info()
    raw = libvirt.open(TEST_URI).getInfo()
    assert node.cpu_total == raw[2]
    assert node.memory_total_mib == raw[1]
    assert node.hypervisor_version.startswith("TEST ")


def test_console_is_virsh_console_on_the_nodes_uri(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("console")
    env.driver.start_instance(spec)
    console = env.driver.get_instance_console(spec)
    assert console.kind is values.ConsoleKind.SERIAL
    assert console.command == ("virsh", "-c", TEST_URI, "console", spec.name)


def test_vnc_password_never_leaves_the_file(env: LibvirtTestEnv) -> None:
    secret = "s3cr3t-vnc-pw"
    pw = env.files_dir / "vnc.pw"
    pw.write_text(secret + "\n")
    spec = env.make_spec(
        "vnc",
        console=values.ConsoleSpec(vnc=True, vnc_port=5999, vnc_password_file=str(pw)),
    )
    env.driver.start_instance(spec)
    console = env.driver.get_instance_console(spec)
    assert console.kind is values.ConsoleKind.VNC
    assert console.port == 5999
    assert secret not in repr(console)
    dom = libvirt.open(TEST_URI).lookupByName(spec.name)
    assert secret not in dom.XMLDesc(0)  # only VIR_DOMAIN_XML_SECURE shows it
    assert secret in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)  # it did reach libvirt
    info = env.driver.migration_info(spec)
    assert secret not in info
    missing = env.make_spec(
        "vnc-missing",
        console=values.ConsoleSpec(vnc=True, vnc_password_file=str(env.files_dir / "nope")),
    )
    with pytest.raises(errors.NodeParameterError) as exc:
        env.driver.start_instance(missing)
    assert secret not in str(exc.value)


def test_migration_info_and_accept(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("mig")
    env.driver.start_instance(spec)
    info = json.loads(env.driver.migration_info(spec))
    assert info["uid"] == spec.uid and info["source_uri"] == TEST_URI
    assert len(info["domain_xml_sha256"]) == 64
    # The instance is already here, so this node cannot accept it.
    with pytest.raises(errors.InstanceAlreadyRunning):
        env.driver.accept_instance(spec, json.dumps(info), "10.0.0.2")
    other = env.make_spec("mig-other")
    with pytest.raises(errors.MigrationError, match="uid"):
        env.driver.accept_instance(other, json.dumps(info), "10.0.0.2")
    env.driver.accept_instance(
        dataclasses.replace(other, uid=spec.uid), json.dumps(info), "10.0.0.2"
    )


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused-by-user"])
def test_finalize_destination_failure_never_destroys_a_copy_that_is_not_incoming(
    env: LibvirtTestEnv, paused: bool
) -> None:
    """Only a copy in libvirt's incoming states (paused for migration) may be destroyed:
    a running one (libvirt resumed it) or one paused for another reason (it arrived paused)
    may be the only copy. Undoing is refused with MigrationCompleted and the copy stays.
    The incoming case itself needs a real migration: tests/drivers/test_libvirt_real.py."""
    spec = env.make_spec("arrived")
    env.driver.start_instance(spec, startup_paused=paused)
    with pytest.raises(errors.MigrationCompleted) as exc:
        env.driver.finalize_migration_dst(spec, "", success=False)
    assert exc.value.reason == "MigrationCompleted"
    assert "only copy" in exc.value.message
    info = env.driver.get_instance_info(spec.name)
    want = values.InstanceState.PAUSED if paused else values.InstanceState.RUNNING
    assert info is not None and info.state is want
    env.driver.stop_instance(spec, force=True)
    env.driver.finalize_migration_dst(spec, "", success=False)  # nothing here: no-op
    with pytest.raises(errors.MigrationError, match="did not arrive"):
        env.driver.finalize_migration_dst(spec, "", success=True)


def test_finalize_source_failure_resumes_a_paused_guest(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("src-paused")
    env.driver.start_instance(spec, startup_paused=True)  # as a non-live attempt leaves it
    env.driver.finalize_migration_source(spec, success=False, live=False)
    info = env.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING
    # No migration completed: "success" must not remove the only copy.
    with pytest.raises(errors.MigrationError, match="has not completed"):
        env.driver.finalize_migration_source(spec, success=True, live=True)
    assert env.driver.get_instance_info(spec.name) is not None
    status = env.driver.get_migration_status(spec)
    assert status.state is values.MigrationState.FAILED
    assert "no migration job" in status.message
    env.driver.abort_migration(spec)  # no job: not an error
    env.driver.stop_instance(spec, force=True)
    with pytest.raises(errors.MigrationError, match="no longer runs"):
        env.driver.finalize_migration_source(spec, success=False, live=True)
    env.driver.finalize_migration_source(spec, success=True, live=True)  # gone: nothing to do


def test_migrate_without_target_uri_is_a_typed_error(env: LibvirtTestEnv) -> None:
    spec = env.make_spec("no-uri")
    env.driver.start_instance(spec)
    with pytest.raises(errors.MigrationError, match="URI"):
        env.driver.migrate_instance(
            spec, values.MigrationTarget(node="b", address="10.0.0.2"), live=True
        )
    assert env.driver.get_instance_info(spec.name) is not None


def test_reconnects_after_the_connection_dies(env: LibvirtTestEnv) -> None:
    # test:///default keeps its fake host only while some connection to it is open; hold
    # one, so the driver's reconnect finds the same host (as it finds a restarted libvirtd)
    keeper = libvirt.open(TEST_URI)
    try:
        spec = env.make_spec("reconnect")
        env.driver.start_instance(spec)
        old = env.driver.conn.get()
        old.close()  # what a libvirtd restart does to a client
        assert spec.name in env.driver.list_instances()
        assert env.driver.conn.get() is not old
    finally:
        keeper.close()


def test_unreachable_libvirtd_is_typed_and_verify_reports_it(tmp_path: pathlib.Path) -> None:
    uri = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1
    driver = LibvirtHypervisor(values.DriverConfig(node_name="down", uri=uri))
    result = driver.verify()
    assert not result.ok
    assert uri in result.problems[0]
    with pytest.raises(errors.HypervisorUnavailable) as exc:
        driver.list_instances()
    assert exc.value.retryable


def test_auto_accelerator_never_picks_kvm_on_the_test_driver(env: LibvirtTestEnv) -> None:
    assert env.driver.conn.kvm_usable() is False


def test_nested_host_is_detected_from_capabilities() -> None:
    nested = "<capabilities><host><cpu><feature name='hypervisor'/></cpu></host></capabilities>"
    bare = "<capabilities><host><cpu><feature name='vmx'/></cpu></host></capabilities>"
    assert connection._host_is_virtual(nested)
    assert not connection._host_is_virtual(bare)
    assert connection._host_is_virtual("not xml")  # unsure: assume nested, pick TCG


def test_bad_node_settings_are_refused() -> None:
    with pytest.raises(errors.ParameterError, match="serial_log_dir"):
        LibvirtHypervisor(
            values.DriverConfig(node_name="n", uri=TEST_URI, params={"serial_log_dir": "rel"})
        )
    with pytest.raises(errors.ParameterError, match="unknown parameter"):
        LibvirtHypervisor(values.DriverConfig(node_name="n", uri=TEST_URI, params={"x": "y"}))
