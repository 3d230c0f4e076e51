"""Golden files and injection tests for the kvm driver's domain XML builder.

Why: the domain XML is where manifest strings reach QEMU. The golden files pin the XML byte
for byte (after canonical pretty-printing) for a handful of representative specs; the
injection tests show that XML metacharacters are either refused by a typed error or escaped
so that the XML parses back to the very same values.

Regenerate the golden files after a deliberate change with
``KUBEHV_REGEN_GOLDEN=1 .venv/bin/pytest tests/drivers/test_domxml.py`` and review the diff.
"""

from __future__ import annotations

import os
import pathlib
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubehv.drivers import errors, values
from kubehv.drivers.libvirt import domxml
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.libvirt.driver import LibvirtHypervisor

GOLDEN = pathlib.Path(__file__).parent / "golden"
REGEN = os.environ.get("KUBEHV_REGEN_GOLDEN", "") not in ("", "0")

UID = "0b5c7a52-6a7e-4d38-9d55-3f1f0c0c2a11"


def _build(
    spec: values.InstanceSpec, domain_type: str = "qemu", password: str | None = None
) -> str:
    checked = hvparams.instance_params(spec)
    return domxml.build(
        spec,
        checked,
        domxml.DomainSettings(
            domain_type=domain_type,
            serial_log_dir="/var/log/libvirt/qemu",
            startup_memory_mib=spec.memory_min_mib,
            vnc_password=password,
        ),
    )


GOLDEN_CASES: dict[str, tuple[values.InstanceSpec, str, str | None]] = {
    "minimal": (
        values.InstanceSpec(
            name="minimal",
            uid=UID,
            memory_min_mib=128,
            memory_max_mib=128,
            console=values.ConsoleSpec(serial=False),
        ),
        "qemu",
        None,
    ),
    "kernel-serial": (
        values.InstanceSpec(
            name="kernel-serial",
            uid=UID,
            memory_min_mib=64,
            memory_max_mib=128,
            vcpus=2,
            boot=values.KernelBoot(
                kernel="/var/lib/kubehv/images/vmlinuz",
                initrd="/var/lib/kubehv/images/initrd.gz",
                cmdline="console=ttyS0 quiet panic=-1",
            ),
        ),
        "qemu",
        None,
    ),
    "disks-nics-vnc": (
        values.InstanceSpec(
            name="disks-nics-vnc",
            uid=UID,
            memory_min_mib=256,
            memory_max_mib=512,
            disks=(
                values.Disk(
                    path="/var/lib/libvirt/images/root.qcow2", format=values.DiskFormat.QCOW2
                ),
                values.Disk(path="/var/lib/libvirt/images/data.raw"),
                values.Disk(
                    path="/dev/vg0/scratch",
                    kind=values.DiskKind.BLOCK,
                    bus=values.DiskBus.SATA,
                    readonly=True,
                ),
            ),
            nics=(
                values.Nic(mac="52:54:00:12:34:56"),
                values.Nic(
                    kind=values.NicKind.NETWORK, source="default", model=values.NicModel.E1000
                ),
                values.Nic(kind=values.NicKind.BRIDGE, source="br0", mac="52:54:00:ab:cd:ef"),
            ),
            console=values.ConsoleSpec(serial=True, vnc=True, vnc_listen="0.0.0.0", vnc_port=5901),
            params={"disk_cache": "none", "balloon_stats_period_s": 5},
        ),
        "qemu",
        "golden-not-a-secret",
    ),
    "kvm-q35-host-cpu": (
        values.InstanceSpec(
            name="kvm-q35-host-cpu",
            uid=UID,
            memory_min_mib=512,
            memory_max_mib=1024,
            vcpus=4,
            console=values.ConsoleSpec(vnc=True),
            params={"accelerator": "kvm", "machine_type": "q35", "cpu_model": "host-passthrough"},
        ),
        "kvm",
        None,
    ),
    "free-page-reporting": (
        values.InstanceSpec(
            name="free-page-reporting",
            uid=UID,
            memory_min_mib=96,
            memory_max_mib=256,
            free_page_reporting=True,
            params={"balloon_stats_period_s": 1},
        ),
        "qemu",
        None,
    ),
    "tcg-cpu-model": (
        values.InstanceSpec(
            name="tcg-cpu-model",
            uid=UID,
            memory_min_mib=128,
            memory_max_mib=256,
            params={"accelerator": "tcg", "cpu_model": "qemu64", "balloon_stats_period_s": 0},
        ),
        "qemu",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden(case: str) -> None:
    spec, domain_type, password = GOLDEN_CASES[case]
    LibvirtHypervisor.check_instance_spec(spec)
    got = domxml.canonical(_build(spec, domain_type, password))
    path = GOLDEN / f"{case}.xml"
    if REGEN or not path.exists():
        if not REGEN:
            pytest.fail(f"missing golden file {path}; run with KUBEHV_REGEN_GOLDEN=1")
        path.write_text(got)
    assert got == path.read_text()


def test_builder_output_is_already_canonical() -> None:
    for spec, domain_type, password in GOLDEN_CASES.values():
        xml = _build(spec, domain_type, password)
        assert domxml.canonical(xml) == xml


def test_tcg_and_kvm_differ_only_in_domain_type() -> None:
    spec = GOLDEN_CASES["kernel-serial"][0]
    tcg = domxml.parse(_build(spec, "qemu"))
    kvm = domxml.parse(_build(spec, "kvm"))
    assert tcg.get("type") == "qemu"
    assert kvm.get("type") == "kvm"
    kvm.set("type", "qemu")
    assert ET.tostring(tcg) == ET.tostring(kvm)


def test_memory_balloon_and_tag() -> None:
    spec = GOLDEN_CASES["kernel-serial"][0]
    root = domxml.parse(_build(spec))
    assert root.findtext("memory") == str(128 * 1024)
    assert root.findtext("currentMemory") == str(64 * 1024)
    balloon = root.find("devices/memballoon")
    assert balloon is not None and balloon.get("model") == "virtio"
    tag = domxml.read_tag(_build(spec))
    assert tag == domxml.Tag(uid=UID, memory_min_mib=64, memory_max_mib=128)


def test_serial_log_follows_the_convention() -> None:
    spec = GOLDEN_CASES["kernel-serial"][0]
    root = domxml.parse(_build(spec))
    log = root.find("devices/serial[@type='pty']/log")
    assert log is not None
    assert log.get("file") == "/var/log/libvirt/qemu/kernel-serial.serial.log"
    assert log.get("append") == "on"
    assert root.find("devices/console[@type='pty']") is not None


def test_untagged_xml_is_foreign() -> None:
    assert domxml.read_tag("<domain type='qemu'><name>x</name></domain>") is None
    assert (
        domxml.read_tag("<domain><metadata><other xmlns='urn:x' uid='1'/></metadata></domain>")
        is None
    )
    assert domxml.read_tag("not xml <") is None


# --- injection ---------------------------------------------------------------------------

NASTY = ["<", "&", "'", '"', "]]>", "</cmdline><kernel>/etc/shadow</kernel>", "&amp;", "<!--"]


@pytest.mark.parametrize("nasty", NASTY)
def test_cmdline_metacharacters_are_escaped_and_round_trip(nasty: str) -> None:
    cmdline = f"console=ttyS0 x={nasty} y='{nasty}'"
    spec = values.InstanceSpec(
        name="inject",
        uid=UID,
        memory_min_mib=64,
        memory_max_mib=64,
        boot=values.KernelBoot(kernel="/var/lib/kubehv/k", cmdline=cmdline),
    )
    LibvirtHypervisor.check_instance_spec(spec)  # allowed: it is only escaped
    root = domxml.parse(_build(spec))
    assert root.findtext("os/cmdline") == cmdline
    assert [k.text for k in root.iter("kernel")] == ["/var/lib/kubehv/k"]


@pytest.mark.parametrize("nasty", NASTY)
def test_names_with_metacharacters_are_refused(nasty: str) -> None:
    spec = values.InstanceSpec(name=f"vm{nasty}", uid=UID, memory_min_mib=64, memory_max_mib=64)
    with pytest.raises(errors.InvalidInstanceSpec, match="instance name"):
        LibvirtHypervisor.check_instance_spec(spec)


@pytest.mark.parametrize("nasty", NASTY)
def test_paths_and_uids_with_metacharacters_are_refused(nasty: str) -> None:
    bad_kernel = values.InstanceSpec(
        name="vm",
        uid=UID,
        memory_min_mib=64,
        memory_max_mib=64,
        boot=values.KernelBoot(kernel=f"/var/lib/kubehv/k{nasty}"),
    )
    with pytest.raises(errors.InvalidInstanceSpec, match="kernel path"):
        LibvirtHypervisor.check_instance_spec(bad_kernel)
    bad_uid = values.InstanceSpec(name="vm", uid=f"u{nasty}", memory_min_mib=64, memory_max_mib=64)
    with pytest.raises(errors.InvalidInstanceSpec, match="uid"):
        LibvirtHypervisor.check_instance_spec(bad_uid)
    with pytest.raises(errors.ParameterError, match="kernel_path"):
        LibvirtHypervisor.check_parameter_syntax({"kernel_path": f"/var/lib/kubehv/k{nasty}"})


def test_control_characters_are_refused_not_written() -> None:
    spec = values.InstanceSpec(
        name="vm",
        uid=UID,
        memory_min_mib=64,
        memory_max_mib=64,
        boot=values.KernelBoot(kernel="/var/lib/kubehv/k", cmdline="a\x00b"),
    )
    with pytest.raises(errors.InvalidInstanceSpec, match="command line"):
        LibvirtHypervisor.check_instance_spec(spec)
    with pytest.raises(errors.ParameterError, match="kernel_args"):
        LibvirtHypervisor.check_parameter_syntax({"kernel_args": "a\x1bb"})


_XML_TEXT = st.text(
    alphabet=st.characters(
        blacklist_categories=["Cs"], blacklist_characters="\r", min_codepoint=0x20
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(cmdline=_XML_TEXT)
def test_any_accepted_cmdline_round_trips(cmdline: str) -> None:
    spec = values.InstanceSpec(
        name="prop",
        uid=UID,
        memory_min_mib=64,
        memory_max_mib=64,
        boot=values.KernelBoot(kernel="/var/lib/kubehv/k", cmdline=cmdline),
    )
    try:
        LibvirtHypervisor.check_instance_spec(spec)
    except errors.InvalidInstanceSpec:
        return
    root = domxml.parse(_build(spec))
    assert (root.findtext("os/cmdline") or "") == cmdline
    assert len(root.findall("os/kernel")) == 1
