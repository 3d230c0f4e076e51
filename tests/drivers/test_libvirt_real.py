"""The kvm driver on a real libvirtd with real QEMU (TCG) guests, and real migrations.

Why: only a booted guest proves the domain XML, the balloon, the ACPI stop and reboot, and a
migration between two libvirt nodes actually work. Every claim is checked from outside the
driver: the guest's serial log (markers printed by tests/guest/init), libvirt's own view
(virsh on each node, ``memoryStats``) and /proc/meminfo.

Runs the shared contract on the root libvirtd (``qemu:///system``) with a network-namespace
node as migration peer, plus the scenarios of issue 2 item 4. Domain names carry this
process's pid (or the contract's random suffix) because other sessions share the libvirtd.
Timings are printed (run with ``-s``) for the record, never asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from kubehv.devenv import serial
from kubehv.devenv.libvirtd import read_pid
from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import connection
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from tests.drivers import contract, contract_migration

pytestmark = pytest.mark.real_libvirt

MIB = 1024 * 1024
QEMU_LOG_DIR = "/var/log/libvirt/qemu"  # libvirt's own per-domain QEMU log, NAME.log
SLOW_BANDWIDTH_MIB_S = 20  # a 128 MiB TCG guest then migrates in seconds, enough to watch


def _driver(uri: str, guest: Any, name: str) -> LibvirtHypervisor:
    allowed = os.path.dirname(guest.kernel)
    return LibvirtHypervisor(
        values.DriverConfig(node_name=name, uri=uri, params={"allowed_dirs": allowed})
    )


@dataclasses.dataclass
class Host:
    """One libvirt host as the tests see it: a driver and where its serial logs land."""

    driver: LibvirtHypervisor
    log_path: Callable[[str], str]
    node: Any = None  # the LibvirtNode, for netns nodes

    def serial_log(self, name: str) -> str:
        return self.log_path(serial.serial_log_path(name))

    def virsh_names(self) -> list[str]:
        conn = libvirt.open(self.driver.uri)
        try:
            return [d.name() for d in conn.listAllDomains(0)]
        finally:
            conn.close()


class Guests:
    """Specs for the test guest; remembers names to clean up on every host afterwards."""

    def __init__(self, guest: Any, hosts: list[Host]) -> None:
        self.guest = guest
        self.hosts = hosts
        self.names: list[str] = []

    def spec(self, name: str, **overrides: Any) -> values.InstanceSpec:
        self.names.append(name)
        defaults: dict[str, Any] = {
            "memory_min_mib": 96,
            "memory_max_mib": 128,
            "boot": values.KernelBoot(
                kernel=self.guest.kernel, initrd=self.guest.initrd, cmdline=self.guest.cmdline
            ),
            "params": {"accelerator": "auto", "reboot_acpi_timeout_s": 30},
        }
        return contract.spec_factory(name, **contract.merge_overrides(defaults, overrides))

    def cleanup(self) -> None:
        for name in self.names:
            for host in self.hosts:
                try:
                    host.driver.stop_instance(None, force=True, name=name)
                    host.driver.cleanup_instance(name)
                except errors.HypervisorError:
                    pass
                for path in (host.serial_log(name), host.log_path(f"{QEMU_LOG_DIR}/{name}.log")):
                    with contextlib.suppress(OSError):
                        os.unlink(path)


@pytest.fixture
def root_host(libvirtd: Any, guest_image: Any) -> Host:
    return Host(_driver(libvirtd.uri, guest_image, "root"), log_path=lambda p: p)


def _node_host(node: Any, guest_image: Any) -> Host:
    return Host(_driver(node.uri, guest_image, node.name), log_path=node.host_path, node=node)


@pytest.fixture
def node_hosts(libvirt_nodes: Any, guest_image: Any) -> list[Host]:
    return [_node_host(libvirt_nodes[i], guest_image) for i in range(2)]


@pytest.fixture
def guests(guest_image: Any, root_host: Host, node_hosts: list[Host]) -> Iterator[Guests]:
    g = Guests(guest_image, [root_host, *node_hosts])
    yield g
    g.cleanup()


def _name(label: str) -> str:
    return f"kvm-{os.getpid()}-{label}"


# --- the contract on the real daemon -----------------------------------------------------


@pytest.fixture
def contract_env(
    guests: Guests, root_host: Host, node_hosts: list[Host], libvirt_nodes: Any
) -> contract.ContractEnv:
    peer_host = node_hosts[1]
    peer_node = peer_host.node

    def observe_boots(spec: values.InstanceSpec) -> int:
        return serial.count_marker(root_host.serial_log(spec.name), guests.guest.boot_marker)

    return contract.ContractEnv(
        driver=root_host.driver,
        make_spec=guests.spec,
        peer=contract.Peer(
            driver=peer_host.driver,
            target=values.MigrationTarget(
                node=peer_node.name, address=peer_node.address, uri=peer_node.uri
            ),
        ),
        wait_stopped_timeout_s=90.0,
        settle_timeout_s=120.0,
        guest_honours_shutdown=True,
        observe_boots=observe_boots,
        slow_migration_options=values.MigrationOptions(bandwidth_mib_s=SLOW_BANDWIDTH_MIB_S),
        unreachable_target=values.MigrationTarget(
            node="nowhere",
            address=libvirt_nodes.unreachable_address,
            uri=libvirt_nodes.unreachable_uri,
        ),
    )


class TestContractOnRealLibvirt(contract_migration.MigrationContract):
    pass


# --- what only a real guest can show -----------------------------------------------------


def _boot(host: Host, spec: values.InstanceSpec, guest: Any) -> float:
    """Start ``spec`` on ``host`` and wait for its boot marker; returns seconds to boot."""
    t0 = time.monotonic()
    host.driver.start_instance(spec)
    serial.wait_for_marker(host.serial_log(spec.name), guest.boot_marker)
    return time.monotonic() - t0


def _still_alive(host: Host, name: str, guest: Any) -> None:
    """The guest keeps printing alive markers on ``host`` (it runs, it is not frozen)."""
    path = host.serial_log(name)
    seen = serial.count_marker(path, guest.alive_marker)
    serial.wait_for_more(path, guest.alive_marker, after=seen + 1)


def test_guest_boots_and_runs(guests: Guests, root_host: Host) -> None:
    spec = guests.spec(_name("boot"))
    seconds = _boot(root_host, spec, guests.guest)
    print(f"\nMEASURED guest boot (start_instance -> boot marker): {seconds:.2f} s")
    _still_alive(root_host, spec.name, guests.guest)
    info = root_host.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING
    dom = libvirt.open(root_host.driver.uri).lookupByName(spec.name)
    assert dom.XMLDesc(0).startswith("<domain type='qemu'")  # TCG: auto refused nested KVM
    text = serial.read_log(root_host.serial_log(spec.name))
    assert "memtotal_kib=" in text


def test_graceful_stop_is_an_acpi_power_off(guests: Guests, root_host: Host) -> None:
    spec = guests.spec(_name("graceful"))
    _boot(root_host, spec, guests.guest)
    forced = root_host.driver.shutdown_instance(spec, timeout_s=90, poll_s=0.5)
    assert forced is False
    assert spec.name not in root_host.virsh_names()  # transient: gone, not "shut off"
    assert "KUBEHV-GUEST-POWER-BUTTON" in serial.read_log(root_host.serial_log(spec.name))


def test_forced_stop_destroys_at_once(guests: Guests, root_host: Host) -> None:
    spec = guests.spec(_name("forced"))
    _boot(root_host, spec, guests.guest)
    root_host.driver.stop_instance(spec, force=True)
    assert root_host.driver.get_instance_info(spec.name) is None
    assert spec.name not in root_host.virsh_names()
    assert "KUBEHV-GUEST-POWER-BUTTON" not in serial.read_log(root_host.serial_log(spec.name))


def test_reboot_boots_the_guest_twice(guests: Guests, root_host: Host) -> None:
    spec = guests.spec(_name("reboot"))
    _boot(root_host, spec, guests.guest)
    root_host.driver.reboot_instance(spec)
    serial.wait_for_marker(root_host.serial_log(spec.name), guests.guest.boot_marker, count=2)
    info = root_host.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING


def test_balloon_changes_the_guests_actual_memory(guests: Guests, root_host: Host) -> None:
    spec = guests.spec(_name("balloon"), memory_min_mib=64, memory_max_mib=128)
    _boot(root_host, spec, guests.guest)
    dom = libvirt.open(root_host.driver.uri).lookupByName(spec.name)
    assert dom.memoryStats()["actual"] == 128 * 1024
    root_host.driver.balloon_instance_memory(spec, 64)
    contract.wait_for(
        lambda: dom.memoryStats()["actual"] == 64 * 1024, 60, "the balloon to reach 64 MiB"
    )
    root_host.driver.balloon_instance_memory(spec, 128)
    contract.wait_for(
        lambda: dom.memoryStats()["actual"] == 128 * 1024, 60, "the balloon to return to 128"
    )


def test_node_info_agrees_with_proc_meminfo(root_host: Host, node_hosts: list[Host]) -> None:
    """Total memory must match exactly (libvirt reads the same MemTotal line). Free memory
    is read a few milliseconds apart while other sessions start and stop 128 MiB guests on
    this machine, so it may differ by a couple of guests: 256 MiB tolerance. Namespace nodes
    share the kernel, so their libvirtd (reached over TCP) must agree as well."""
    for host in (root_host, node_hosts[0]):
        via_libvirt = host.driver.get_node_info()
        via_proc = LibvirtHypervisor.get_linux_node_info()
        assert via_libvirt.memory_total_mib == via_proc.memory_total_mib
        assert abs(via_libvirt.memory_free_mib - via_proc.memory_free_mib) <= 256
        assert via_libvirt.cpu_total == via_proc.cpu_total
        assert via_libvirt.hypervisor_version.startswith("QEMU ")


def test_verify_reports_an_unreachable_libvirtd(libvirt_nodes: Any, guest_image: Any) -> None:
    driver = _driver(libvirt_nodes.unreachable_uri, guest_image, "nowhere")
    result = driver.verify()
    assert not result.ok
    assert libvirt_nodes.unreachable_uri in result.problems[0]
    with pytest.raises(errors.HypervisorUnavailable):
        driver.get_node_info()


def _in_thread(call: Callable[[], object], timeout_s: float) -> BaseException | None:
    """Run ``call``; the exception it raised, None if it returned; fails if still running."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the call still waits after {timeout_s:.0f} s"
    return outcome[0]


def test_a_silent_libvirtd_fails_calls_instead_of_hanging(
    node_hosts: list[Host], guest_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirtd frozen (SIGSTOP): it accepts but never answers. Over its local socket (the
    agent pod's qemu:///system) a call in flight fails by keepalive and a new connection by the
    open deadline, both as HypervisorUnavailable; after SIGCONT the driver works again."""
    node = node_hosts[0].node
    socket = node.host_path("/run/libvirt/libvirt-sock")
    driver = _driver(f"qemu:///system?socket={socket}", guest_image, "silent")
    assert driver.verify().ok
    pid = read_pid(pathlib.Path(node.host_path("/run/libvirt/libvirtd.pid")))
    assert pid is not None
    monkeypatch.setattr(connection, "OPEN_TIMEOUT_S", 5.0)
    interval, count = connection.KEEPALIVE
    os.kill(pid, signal.SIGSTOP)
    try:
        in_flight = _in_thread(driver.list_instances, interval * (count + 1) + 30)
        assert isinstance(in_flight, errors.HypervisorUnavailable), in_flight
        reopen = _in_thread(driver.list_instances, 30)
        assert isinstance(reopen, errors.HypervisorUnavailable), reopen
        assert "did not answer within 5 s" in reopen.message
    finally:
        os.kill(pid, signal.SIGCONT)

    def works() -> bool:
        try:
            driver.list_instances()
        except errors.HypervisorUnavailable:
            return False
        return True

    contract.wait_for(works, 60, "the driver to reconnect after SIGCONT")


def test_driver_reconnects_after_libvirtd_restarts(node_hosts: list[Host]) -> None:
    host = node_hosts[0]
    assert host.driver.verify().ok
    host.node.restart()
    outcomes: list[str] = []

    def works() -> bool:
        try:
            host.driver.list_instances()
        except errors.HypervisorUnavailable:
            outcomes.append("unavailable")
            return False
        return True

    contract.wait_for(works, 60, "the driver to reconnect")
    assert host.driver.verify().ok


class _Watcher(threading.Thread):
    """Polls migration status (and the source's state) while a migration runs."""

    def __init__(self, host: Host, spec: values.InstanceSpec) -> None:
        super().__init__(daemon=True)
        self.host, self.spec = host, spec
        self.statuses: list[values.MigrationStatus] = []
        self.states: list[values.InstanceState] = []
        self.job_downtimes: list[int] = []  # max downtime sampled while the job was active
        self.raw: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = libvirt.open(self.host.driver.uri)
        try:
            while not self.stop.is_set():
                status = None
                with contextlib.suppress(errors.MigrationError):  # not visible yet
                    status = self.host.driver.get_migration_status(self.spec)
                    self.statuses.append(status)
                info = self.host.driver.get_instance_info(self.spec.name)
                if info is not None:
                    self.states.append(info.state)
                with contextlib.suppress(libvirt.libvirtError):  # gone at the end
                    dom = conn.lookupByName(self.spec.name)
                    downtime = dom.migrateGetMaxDowntime(0)
                    if status is not None and status.state is values.MigrationState.ACTIVE:
                        self.job_downtimes.append(downtime)
                    self.raw.append(dom.jobStats(0))
                self.stop.wait(0.1)
        finally:
            conn.close()


def _migrate(
    src: Host,
    dst: Host,
    spec: values.InstanceSpec,
    live: bool,
    options: values.MigrationOptions,
) -> tuple[float, _Watcher]:
    node = dst.node
    target = values.MigrationTarget(node=node.name, address=node.address, uri=node.uri)
    info = src.driver.migration_info(spec)
    dst.driver.accept_instance(spec, info, node.address)
    watcher = _Watcher(src, spec)
    watcher.start()
    t0 = time.monotonic()
    try:
        src.driver.migrate_instance(spec, target, live, options)
        seconds = time.monotonic() - t0
    finally:
        watcher.stop.set()
        watcher.join()
    dst.driver.finalize_migration_dst(spec, info, True)
    src.driver.finalize_migration_source(spec, True, live)
    return seconds, watcher


def test_live_migration_between_nodes(guests: Guests, node_hosts: list[Host]) -> None:
    a, b = node_hosts
    spec = guests.spec(_name("live"))
    _boot(a, spec, guests.guest)
    seconds, watcher = _migrate(
        a, b, spec, True, values.MigrationOptions(SLOW_BANDWIDTH_MIB_S, max_downtime_ms=750)
    )
    print(f"\nMEASURED live migration at {SLOW_BANDWIDTH_MIB_S} MiB/s: {seconds:.2f} s")
    active = [s for s in watcher.statuses if s.state is values.MigrationState.ACTIVE]
    assert active, watcher.statuses
    assert max(s.memory_processed_bytes for s in active) > 0, watcher.raw
    assert all(s.memory_total_bytes >= 96 * MIB for s in active)
    # the max downtime asked for is the one the running job has, in every sample of it
    assert watcher.job_downtimes and set(watcher.job_downtimes) == {750}, watcher.job_downtimes
    # live: it kept running until the switch-over, whose brief pause may be sampled more
    # than once on a loaded machine (a trailing run of PAUSED)
    before_switch = list(watcher.states)
    while before_switch and before_switch[-1] is values.InstanceState.PAUSED:
        before_switch.pop()
    assert values.InstanceState.PAUSED not in before_switch, watcher.states
    assert spec.name in b.virsh_names()
    assert spec.name not in a.virsh_names()
    _still_alive(b, spec.name, guests.guest)
    status = a.driver.get_migration_status(spec)
    assert status.state is values.MigrationState.COMPLETED


def test_unlimited_live_migration_time(guests: Guests, node_hosts: list[Host]) -> None:
    a, b = node_hosts
    spec = guests.spec(_name("fast"))
    _boot(a, spec, guests.guest)
    seconds, _ = _migrate(a, b, spec, True, values.MigrationOptions())
    print(f"\nMEASURED live migration, no bandwidth limit: {seconds:.2f} s")
    _still_alive(b, spec.name, guests.guest)
    assert spec.name not in a.virsh_names()


def test_non_live_migration_pauses_during_transfer(guests: Guests, node_hosts: list[Host]) -> None:
    a, b = node_hosts
    spec = guests.spec(_name("cold"))
    _boot(a, spec, guests.guest)
    seconds, watcher = _migrate(
        a, b, spec, False, values.MigrationOptions(bandwidth_mib_s=SLOW_BANDWIDTH_MIB_S)
    )
    print(f"\nMEASURED non-live migration at {SLOW_BANDWIDTH_MIB_S} MiB/s: {seconds:.2f} s")
    assert values.InstanceState.PAUSED in watcher.states
    assert spec.name in b.virsh_names()
    assert spec.name not in a.virsh_names()
    info = b.driver.get_instance_info(spec.name)
    assert info is not None and info.state is values.InstanceState.RUNNING
    _still_alive(b, spec.name, guests.guest)


def test_migration_to_unreachable_target_keeps_it_on_source(
    guests: Guests, node_hosts: list[Host], libvirt_nodes: Any
) -> None:
    a, b = node_hosts
    spec = guests.spec(_name("unreach"))
    _boot(a, spec, guests.guest)
    info = a.driver.migration_info(spec)
    b.driver.accept_instance(spec, info, b.node.address)
    target = values.MigrationTarget(
        node="nowhere",
        address=libvirt_nodes.unreachable_address,
        uri=libvirt_nodes.unreachable_uri,
    )
    with pytest.raises(errors.MigrationError) as exc:
        a.driver.migrate_instance(spec, target, True)
    assert not isinstance(exc.value, errors.MigrationAborted)
    b.driver.finalize_migration_dst(spec, info, False)
    a.driver.finalize_migration_source(spec, False, True)
    assert a.driver.get_migration_status(spec).state is values.MigrationState.FAILED
    assert spec.name in a.virsh_names()
    assert spec.name not in b.virsh_names()
    _still_alive(a, spec.name, guests.guest)


@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
def test_abort_during_limited_migration_keeps_it_on_source(
    guests: Guests, node_hosts: list[Host], live: bool
) -> None:
    a, b = node_hosts
    spec = guests.spec(_name(f"abort-{'live' if live else 'cold'}"))
    _boot(a, spec, guests.guest)
    node = b.node
    target = values.MigrationTarget(node=node.name, address=node.address, uri=node.uri)
    info = a.driver.migration_info(spec)
    b.driver.accept_instance(spec, info, node.address)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            a.driver.migrate_instance(spec, target, live, values.MigrationOptions(5))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    mover = threading.Thread(target=run, daemon=True)
    mover.start()

    def transferring() -> bool:
        try:
            return a.driver.get_migration_status(spec).memory_processed_bytes > 0
        except errors.MigrationError:
            return False  # not visible yet

    contract.wait_for(transferring, 60, "the migration to transfer memory")
    a.driver.abort_migration(spec)
    mover.join(60)
    assert outcome and isinstance(outcome[0], errors.MigrationAborted), outcome
    assert a.driver.get_migration_status(spec).state is values.MigrationState.CANCELLED
    b.driver.finalize_migration_dst(spec, info, False)
    a.driver.finalize_migration_source(spec, False, live)
    state = a.driver.get_instance_info(spec.name)
    assert state is not None and state.state is values.InstanceState.RUNNING
    assert spec.name not in b.virsh_names()
    _still_alive(a, spec.name, guests.guest)


def test_serial_console_and_vnc_report_where_to_connect(
    guests: Guests, root_host: Host, tmp_path: pathlib.Path
) -> None:
    spec = guests.spec(_name("vnc"), console=values.ConsoleSpec(serial=True, vnc=True))
    _boot(root_host, spec, guests.guest)
    console = root_host.driver.get_instance_console(spec)
    assert console.kind is values.ConsoleKind.VNC
    assert console.host == "127.0.0.1"
    assert console.port is not None and console.port >= 5900
