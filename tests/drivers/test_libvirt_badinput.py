"""Bad input to the kvm driver (issue 2 item 5): each case is a clear, typed error.

Why: a manifest is user input that ends up in domain XML and in QEMU's file accesses. Every
bad value must be stopped by the right check -- cluster-side syntax (no I/O) or node-side
(files, allowed directories) -- with a message naming the culprit, and nothing may reach
libvirt: no domain appears, and no malformed or injected XML is ever produced. Runs on
``test:///default`` (no daemon) so the "nothing reached libvirt" half is checked for real.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import domxml
from kubehv.drivers.libvirt.driver import LibvirtHypervisor

TEST_URI = "test:///default"


@dataclasses.dataclass
class Env:
    driver: LibvirtHypervisor
    allowed: pathlib.Path
    kernel: pathlib.Path

    def spec(self, name: str = "", **overrides: Any) -> values.InstanceSpec:
        fields: dict[str, Any] = {
            "name": name or f"bad-{os.getpid()}",
            "uid": "uid-bad",
            "memory_min_mib": 64,
            "memory_max_mib": 128,
            "boot": values.KernelBoot(kernel=str(self.kernel), cmdline="console=ttyS0"),
        }
        fields.update(overrides)
        return values.InstanceSpec(**fields)


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Iterator[Env]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    kernel = allowed / "vmlinuz"
    kernel.write_text("kernel\n")
    driver = LibvirtHypervisor(
        values.DriverConfig(node_name="n", uri=TEST_URI, params={"allowed_dirs": str(allowed)})
    )
    before = set(_all_domains())
    yield Env(driver, allowed, kernel)
    assert set(_all_domains()) == before, "a bad input created a domain"


def _all_domains() -> list[str]:
    return [d.name() for d in libvirt.open(TEST_URI).listAllDomains(0)]


def _refused(env: Env, spec: values.InstanceSpec, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as exc:
        env.driver.start_instance(spec)
    assert isinstance(exc.value, errors.HypervisorError)
    assert exc.value.message  # a sentence for a person, not a bare code


def test_unknown_parameter(env: Env) -> None:
    with pytest.raises(errors.ParameterError, match="unknown parameter 'acclerator'") as exc:
        LibvirtHypervisor.check_parameter_syntax({"acclerator": "tcg"})
    assert "accelerator" in str(exc.value)  # the message lists the known names
    _refused(env, env.spec(params={"acclerator": "tcg"}), errors.ParameterError, "acclerator")


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"accelerator": 1}, "accelerator"),
        ({"reboot_acpi_timeout_s": "30"}, "reboot_acpi_timeout_s"),
        ({"migration_bandwidth_mib_s": True}, "migration_bandwidth_mib_s"),
        ({"accelerator": "xen"}, "accelerator"),
        ({"migration_downtime_ms": -5}, "migration_downtime_ms"),
        ({"machine_type": "pc'/><evil"}, "machine_type"),
        ({"cpu_model": "<host>"}, "cpu_model"),
    ],
)
def test_wrong_type_or_value(env: Env, params: dict[str, Any], name: str) -> None:
    with pytest.raises(errors.ParameterError, match=name):
        LibvirtHypervisor.check_parameter_syntax(params)
    _refused(env, env.spec(params=params), errors.ParameterError, name)


@pytest.mark.parametrize("path", ["vmlinuz", "boot/vmlinuz", "/var/lib/kubehv/../../etc/passwd"])
def test_relative_kernel_path(env: Env, path: str) -> None:
    spec = env.spec(boot=values.KernelBoot(kernel=path))
    with pytest.raises(errors.InvalidInstanceSpec, match="kernel path"):
        LibvirtHypervisor.check_instance_spec(spec)
    _refused(env, spec, errors.InvalidInstanceSpec, "kernel path")
    with pytest.raises(errors.ParameterError, match="kernel_path"):
        LibvirtHypervisor.check_parameter_syntax({"kernel_path": path})


def test_missing_file_on_the_node(env: Env) -> None:
    missing = str(env.allowed / "no-such-kernel")
    LibvirtHypervisor.check_parameter_syntax({"kernel_path": missing})  # syntax is fine
    with pytest.raises(errors.NodeParameterError, match="kernel_path"):
        LibvirtHypervisor.validate_parameters({"kernel_path": missing})
    spec = env.spec(boot=values.KernelBoot(kernel=missing))
    LibvirtHypervisor.check_instance_spec(spec)  # cluster side cannot know
    _refused(env, spec, errors.NodeParameterError, "no-such-kernel")


def test_existing_file_outside_the_allowed_directories(env: Env) -> None:
    with pytest.raises(errors.NodeParameterError, match="initrd_path"):
        LibvirtHypervisor.validate_parameters({"initrd_path": "/etc/passwd"})
    spec = env.spec(boot=values.KernelBoot(kernel="/etc/passwd"))
    _refused(env, spec, errors.NodeParameterError, "allowed directories")
    link = env.allowed / "sneaky"
    link.symlink_to("/etc/passwd")
    spec = env.spec(boot=values.KernelBoot(kernel=str(link)))
    _refused(env, spec, errors.NodeParameterError, "allowed directories")


def test_disk_outside_the_allowed_directories(env: Env) -> None:
    spec = env.spec(disks=(values.Disk(path="/etc/shadow"),))
    _refused(env, spec, errors.NodeParameterError, "disk")


def test_memory_min_above_max(env: Env) -> None:
    spec = env.spec(memory_min_mib=256, memory_max_mib=128)
    with pytest.raises(errors.InvalidInstanceSpec, match="minimum memory"):
        LibvirtHypervisor.check_instance_spec(spec)
    _refused(env, spec, errors.InvalidInstanceSpec, "minimum memory")


NASTY_NAMES = ["vm<1>", "a&b", "it's", 'say"hi', "x]]>y", "x'/><devices/><name>y", "Upper"]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_names_with_xml_metacharacters(env: Env, name: str) -> None:
    spec = env.spec(name=name)
    with pytest.raises(errors.InvalidInstanceSpec, match="instance name"):
        LibvirtHypervisor.check_instance_spec(spec)
    _refused(env, spec, errors.InvalidInstanceSpec, "instance name")
    env.driver.stop_instance(None, force=True, name="never-existed-" + str(os.getpid()))


@pytest.mark.parametrize("nasty", ["<", "&", "'", '"', "]]>", "</cmdline><kernel>/x</kernel>"])
def test_metacharacters_in_the_command_line_are_escaped_not_injected(env: Env, nasty: str) -> None:
    cmdline = f"console=ttyS0 note={nasty}"
    spec = env.spec(
        name=f"esc-{os.getpid()}", boot=values.KernelBoot(str(env.kernel), None, cmdline)
    )
    env.driver.start_instance(spec)
    try:
        dom = libvirt.open(TEST_URI).lookupByName(spec.name)
        root = domxml.parse(dom.XMLDesc(0))  # libvirt's view parses...
        assert root.findtext("os/cmdline") == cmdline  # ...to the very same string
        assert [k.text for k in root.iter("kernel")] == [str(env.kernel)]
    finally:
        env.driver.stop_instance(spec, force=True)


def test_bad_vnc_settings(env: Env) -> None:
    spec = env.spec(console=values.ConsoleSpec(vnc=True, vnc_listen="0.0.0.0'/><x"))
    _refused(env, spec, errors.InvalidInstanceSpec, "VNC listen")
    spec = env.spec(console=values.ConsoleSpec(vnc=True, vnc_port=22))
    _refused(env, spec, errors.InvalidInstanceSpec, "VNC port")
    spec = env.spec(console=values.ConsoleSpec(vnc=True, vnc_password_file="pw.txt"))
    _refused(env, spec, errors.InvalidInstanceSpec, "VNC password file")


def test_bad_nic_and_mac(env: Env) -> None:
    spec = env.spec(nics=(values.Nic(kind=values.NicKind.BRIDGE, source="br0'/><x"),))
    _refused(env, spec, errors.InvalidInstanceSpec, "NIC source")
    spec = env.spec(nics=(values.Nic(mac="52:54:00:zz:00:01"),))
    _refused(env, spec, errors.InvalidInstanceSpec, "MAC")
