"""The parts of the driver contract that live in base.py itself, and the registry.

Why: the startup-memory rule, node info from /proc, verify formatting, the powercycle guard
and the registry are shared by every driver; a bug here is a bug in all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, TypedDict, Unpack

import psutil
import pytest

from kubehv.drivers import base, errors, registry, values

DATA = Path(__file__).parent / "data"


class MiniDriver(base.BaseHypervisor):
    """The smallest driver: only the abstract methods, so base defaults show through."""

    NAME: ClassVar[str] = "mini"
    ANCILLARY_FILES: ClassVar[tuple[str, ...]] = ("/etc/mini/a.conf",)
    ANCILLARY_FILES_OPT: ClassVar[tuple[str, ...]] = ("/etc/mini/b.conf",)

    def start_instance(
        self, instance: values.InstanceSpec, startup_paused: bool = False
    ) -> values.InstanceInfo:
        raise errors.NotSupported("mini starts nothing")

    def stop_instance(
        self,
        instance: values.InstanceSpec | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
    ) -> None:
        return None

    def reboot_instance(self, instance: values.InstanceSpec) -> None:
        raise errors.NotSupported("mini reboots nothing")

    def list_instances(self) -> list[str]:
        return []

    def get_instance_info(self, instance_name: str) -> values.InstanceInfo | None:
        return None

    def get_all_instances_info(self) -> list[values.InstanceInfo]:
        return []

    def get_node_info(self) -> values.NodeInfo:
        return values.NodeInfo(
            memory_total_mib=1000,
            memory_free_mib=400,
            memory_dom0_mib=600,
            cpu_total=1,
            cpu_nodes=1,
            cpu_sockets=1,
        )


class SpecFields(TypedDict, total=False):
    """The InstanceSpec fields a test may set through :func:`spec`."""

    name: str
    uid: str
    memory_min_mib: int
    memory_max_mib: int
    vcpus: int
    boot: values.KernelBoot | None
    disks: tuple[values.Disk, ...]
    nics: tuple[values.Nic, ...]
    console: values.ConsoleSpec
    params: Mapping[str, values.ParamValue]


def spec(lo: int = 100, hi: int = 300, **fields: Unpack[SpecFields]) -> values.InstanceSpec:
    return dataclasses.replace(
        values.InstanceSpec(name="vm", uid="u", memory_min_mib=lo, memory_max_mib=hi), **fields
    )


# --- startup memory ------------------------------------------------------------------------


@pytest.mark.parametrize(("free", "expected"), [(10_000, 300), (300, 300), (250, 250), (100, 100)])
def test_startup_memory_clamps_free_into_min_max(free: int, expected: int) -> None:
    assert base.startup_memory(spec(), free) == expected


def test_startup_memory_fails_when_min_does_not_fit() -> None:
    with pytest.raises(errors.InsufficientMemory) as exc:
        base.startup_memory(spec(), 99)
    assert (exc.value.needed_mib, exc.value.free_mib) == (100, 99)
    assert exc.value.reason == "InsufficientMemory"
    assert "100 MiB" in str(exc.value) and "99 MiB" in str(exc.value)


def test_instance_startup_memory_asks_the_node_when_not_told() -> None:
    drv = MiniDriver(values.DriverConfig(node_name="n"))
    assert drv.instance_startup_memory(spec()) == 300  # free 400 >= max
    assert drv.instance_startup_memory(spec(hi=500)) == 400
    assert drv.instance_startup_memory(spec(hi=500), free_mib=150) == 150


# --- node info -----------------------------------------------------------------------------


def _proc_meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} missing from /proc/meminfo")


def test_linux_node_info_agrees_with_proc_meminfo() -> None:
    info = base.BaseHypervisor.get_linux_node_info()
    assert info.memory_total_mib == _proc_meminfo_kib("MemTotal") // 1024
    assert 0 < info.memory_free_mib <= info.memory_total_mib
    assert info.memory_dom0_mib == info.memory_total_mib - info.memory_free_mib
    assert info.cpu_total == psutil.cpu_count(logical=True)
    assert info.cpu_nodes >= 1 and info.cpu_sockets >= 1


def test_linux_node_info_from_fixture_files() -> None:
    info = base.BaseHypervisor.get_linux_node_info(
        meminfo=str(DATA / "meminfo"), cpuinfo=str(DATA / "cpuinfo")
    )
    assert info.memory_total_mib == 16000
    # free + buffers + cached, as Ganeti counts it
    assert info.memory_free_mib == (1024000 + 102400 + 2048000) // 1024
    assert info.memory_dom0_mib == 16000 - info.memory_free_mib
    assert info.cpu_sockets == 2


def test_linux_node_info_without_cpuinfo(tmp_path: Path) -> None:
    info = base.BaseHypervisor.get_linux_node_info(
        meminfo=str(DATA / "meminfo"), cpuinfo=str(tmp_path / "absent")
    )
    assert info.cpu_sockets == 1


# --- verify, powercycle --------------------------------------------------------------------


def test_format_verify_results() -> None:
    assert base.BaseHypervisor.format_verify_results([]) is None
    assert base.BaseHypervisor.format_verify_results(["a"]) == "a"
    assert base.BaseHypervisor.format_verify_results(["a", "b"]) == "a; b"
    assert MiniDriver(values.DriverConfig(node_name="n")).verify().ok


def test_linux_powercycle_refuses_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(errors.PowercycleRefused) as exc:
        base.BaseHypervisor.linux_powercycle()
    assert "explicitly allowed" in str(exc.value)
    with pytest.raises(errors.PowercycleRefused):
        base.BaseHypervisor.linux_powercycle(False, sysrq_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_powercycle_node_refuses_by_default() -> None:
    with pytest.raises(errors.PowercycleRefused):
        MiniDriver(values.DriverConfig(node_name="n")).powercycle_node()


def test_linux_powercycle_when_allowed_writes_sysrq(tmp_path: Path) -> None:
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    base.BaseHypervisor.linux_powercycle(True, sysrq_dir=str(tmp_path))
    assert (tmp_path / "sys" / "kernel" / "sysrq").read_text() == "1\n"
    assert (tmp_path / "sysrq-trigger").read_text() == "b\n"


# --- defaults of the base class --------------------------------------------------------------


def test_base_defaults_say_not_supported_or_nothing_to_do() -> None:
    drv = MiniDriver(values.DriverConfig(node_name="n"))
    vm = spec()
    for call in (
        lambda: drv.pause_instance(vm),
        lambda: drv.resume_instance(vm),
        lambda: drv.balloon_instance_memory(vm, 200),
        lambda: drv.migrate_instance(vm, values.MigrationTarget("b", "b"), True),
        lambda: drv.get_migration_status(vm),
        lambda: drv.abort_migration(vm),
    ):
        with pytest.raises(errors.NotSupported) as exc:
            call()
        assert "mini" in str(exc.value)
    assert drv.migration_info(vm) == ""
    drv.accept_instance(vm, "", "b")
    drv.finalize_migration_dst(vm, "", True)
    drv.finalize_migration_source(vm, True, True)
    drv.cleanup_instance("vm")
    assert drv.list_foreign_instances() == []
    console = drv.get_instance_console(vm)
    assert console.kind is values.ConsoleKind.MESSAGE and "mini" in console.message
    assert not MiniDriver.CAN_MIGRATE and not MiniDriver.CAPABILITIES.can_migrate


def test_ancillary_files() -> None:
    files = MiniDriver.get_ancillary_files()
    assert files.all == ("/etc/mini/a.conf", "/etc/mini/b.conf")
    assert files.optional == ("/etc/mini/b.conf",)
    assert base.BaseHypervisor.get_ancillary_files() == values.AncillaryFiles()


def test_check_balloon_memory() -> None:
    base.check_balloon_memory(spec(), 100)
    base.check_balloon_memory(spec(), 300)
    for bad in (99, 301):
        with pytest.raises(errors.InvalidInstanceSpec, match=str(bad)):
            base.check_balloon_memory(spec(), bad)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"name": "UPPER"}, "instance name"),
        ({"name": "-lead"}, "instance name"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_min_mib": 0}, "positive"),
        ({"disks": (values.Disk(path="disk.img"),)}, "disk path"),
        ({"disks": (values.Disk(path="/a/../etc/shadow"),)}, "disk path"),
        ({"nics": (values.Nic(mac="zz:zz"),)}, "MAC"),
        ({"nics": (values.Nic(kind=values.NicKind.BRIDGE, source="br0;rm"),)}, "NIC source"),
    ],
)
def test_check_instance_spec_problems(fields: SpecFields, fragment: str) -> None:
    with pytest.raises(errors.InvalidInstanceSpec, match=fragment):
        base.check_instance_spec(spec(**fields))


def test_check_instance_spec_lists_every_problem_and_accepts_good_specs() -> None:
    base.check_instance_spec(
        spec(
            boot=values.KernelBoot(kernel="/var/lib/kubehv/vmlinuz", initrd="/var/lib/i.img"),
            disks=(values.Disk(path="/dev/vg/disk0", kind=values.DiskKind.BLOCK),),
            nics=(values.Nic(mac="52:54:00:12:34:56", source="default"),),
        )
    )
    with pytest.raises(errors.InvalidInstanceSpec) as exc:
        base.check_instance_spec(spec(name="Bad<", lo=500, hi=100, vcpus=0))
    text = str(exc.value)
    assert "instance name" in text and "minimum memory" in text and "vcpus" in text


# --- registry --------------------------------------------------------------------------------


def test_registry_unknown_name_lists_known_ones() -> None:
    with pytest.raises(errors.UnknownDriver) as exc:
        registry.get_driver_class("xen")
    assert "xen" in str(exc.value)
    for known in registry.names():
        assert known in str(exc.value)
    assert {"fake", "kvm"} <= set(registry.names())
    assert exc.value.reason == "UnknownHypervisor"


def test_registry_register_and_refuse_non_drivers() -> None:
    registry.register("mini-test", f"{__name__}:MiniDriver")
    registry.register("not-a-driver", "os.path:join")
    registry.register("not-importable", "kubehv.no_such_module:X")
    try:
        drv = registry.create_driver("mini-test", values.DriverConfig(node_name="n"))
        assert type(drv).__name__ == "MiniDriver" and drv.config.node_name == "n"
        with pytest.raises(errors.UnknownDriver, match="not a BaseHypervisor"):
            registry.get_driver_class("not-a-driver")
        with pytest.raises(errors.UnknownDriver, match="cannot be loaded"):
            registry.get_driver_class("not-importable")
    finally:
        for name in ("mini-test", "not-a-driver", "not-importable"):
            registry._DRIVERS.pop(name, None)
    assert "mini-test" not in registry.names()
