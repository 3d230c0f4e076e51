"""Domain XML for real workloads: overlay disks with a pinned backing chain, the cloud-init
CD-ROM, UEFI firmware, boot order and the guest-agent channel.

Why: libvirt must never probe a guest-writable qcow2 header for its backing file, so the
chain is written out (``<backingStore>``) and ends explicitly; the golden file pins the whole
document, the other tests the rules around it.

Regenerate after a deliberate change: ``KUBEHV_REGEN_GOLDEN=1 .venv/bin/pytest
tests/workloads/test_workload_domxml.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import libvirt

from kubehv.drivers import values
from kubehv.drivers.libvirt import domxml, workloads
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.storage import disks

GOLDEN = pathlib.Path(__file__).parent / "golden"
REGEN = os.environ.get("KUBEHV_REGEN_GOLDEN", "") not in ("", "0")
STORE = "/var/lib/kubehv/storage"
BASE = f"{STORE}/images/{'a' * 64}.img"


def _build(spec: values.InstanceSpec) -> str:
    return domxml.build(
        spec,
        hvparams.instance_params(spec),
        domxml.DomainSettings(
            domain_type="qemu", serial_log_dir="/var/log/libvirt/qemu", startup_memory_mib=256
        ),
    )


def _cloud_spec(**kw: object) -> values.InstanceSpec:
    root = values.Disk(
        path=f"{STORE}/instances/team-a/web/root.qcow2",
        format=values.DiskFormat.QCOW2,
        source=values.DiskSource.IMAGE,
        name="root",
        backing=(values.BackingFile(BASE, values.DiskFormat.QCOW2),),
        boot_order=1,
    )
    data = values.Disk(
        path=f"{STORE}/instances/team-a/web/data.qcow2",
        format=values.DiskFormat.QCOW2,
        source=values.DiskSource.BLANK,
        name="data",
    )
    seed = values.Disk(
        path=f"{STORE}/instances/team-a/web/cidata.iso",
        bus=values.DiskBus.SATA,
        readonly=True,
        device=values.DiskDevice.CDROM,
        name="cidata",
    )
    return values.InstanceSpec(
        name="team-a.web",
        uid="0b5c7a52-6a7e-4d38-9d55-3f1f0c0c2a11",
        memory_min_mib=256,
        memory_max_mib=512,
        disks=(root, data, seed),
        nics=(values.Nic(kind=values.NicKind.NETWORK, source="kubehv"),),
        cloud_init=values.CloudInit("uid", "web", ssh_authorized_keys=("ssh-ed25519 AAAA k",)),
        namespace="team-a",
        **kw,  # type: ignore[arg-type]
    )


def test_cloud_image_golden() -> None:
    xml = _build(_cloud_spec())
    golden = GOLDEN / "cloud-image.xml"
    if REGEN:
        golden.write_text(xml)
    assert xml == golden.read_text()


def test_backing_chain_is_pinned_and_ends() -> None:
    root = domxml.parse(_build(_cloud_spec()))
    overlay, blank, cdrom = root.findall("devices/disk")
    chain = overlay.find("backingStore")
    assert chain is not None and chain.get("type") == "file"
    assert chain.find("source").get("file") == BASE  # type: ignore[union-attr]
    assert chain.find("format").get("type") == "qcow2"  # type: ignore[union-attr]
    end = chain.find("backingStore")
    assert end is not None and len(end) == 0 and not end.attrib
    blank_end = blank.find("backingStore")
    assert blank_end is not None and len(blank_end) == 0  # a blank disk has no backing at all
    assert cdrom.get("device") == "cdrom" and cdrom.find("backingStore") is None
    assert cdrom.find("target").get("bus") == "ide"  # type: ignore[union-attr]  # i440fx


def test_boot_order_replaces_os_boot() -> None:
    root = domxml.parse(_build(_cloud_spec()))
    assert root.find("os/boot") is None
    assert root.find("devices/disk/boot").get("order") == "1"  # type: ignore[union-attr]


def test_cdrom_on_sata_for_q35() -> None:
    spec = _cloud_spec(params={"machine_type": "q35"})
    cdrom = domxml.parse(_build(spec)).findall("devices/disk")[2]
    assert cdrom.find("target").get("bus") == "sata"  # type: ignore[union-attr]


def test_uefi_firmware() -> None:
    root = domxml.parse(_build(_cloud_spec(firmware=values.Firmware.UEFI)))
    loader = root.find("os/loader")
    assert loader is not None and loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert loader.get("type") == "pflash" and loader.get("readonly") == "yes"
    nvram = root.find("os/nvram")
    assert nvram is not None and nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_guest_agent_channel_only_for_cloud_init() -> None:
    channel = "devices/channel/target[@name='org.qemu.guest_agent.0']"
    assert domxml.parse(_build(_cloud_spec())).find(channel) is not None
    plain = values.InstanceSpec(name="plain", uid="u-1", memory_min_mib=64, memory_max_mib=64)
    assert domxml.parse(_build(plain)).find(channel) is None


def test_storage_migration_copies_only_node_made_writable_disks() -> None:
    storage = disks.NodeStorage(STORE)
    base = _cloud_spec()
    shared = values.Disk(path="/var/lib/libvirt/images/shared.img")  # hostPath: shared storage
    spec = dataclasses.replace(base, disks=(*base.disks, shared))
    flags, params = workloads.storage_migration(storage, _build(spec))
    assert flags == libvirt.VIR_MIGRATE_NON_SHARED_INC
    assert params == {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda", "vdb"]}
    plain = values.InstanceSpec(name="plain", uid="u-1", memory_min_mib=64, memory_max_mib=64)
    assert workloads.storage_migration(storage, _build(plain)) == (0, {})


def test_storage_migration_leaves_disks_declared_shared() -> None:
    storage = disks.NodeStorage(STORE)
    base = _cloud_spec()
    kept = tuple(dataclasses.replace(d, shared=d.name == "data") for d in base.disks)
    spec = dataclasses.replace(base, disks=kept)
    flags, params = workloads.storage_migration(storage, _build(spec), spec)
    assert flags == libvirt.VIR_MIGRATE_NON_SHARED_INC
    assert params == {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}  # root only
    drivers = domxml.parse(_build(spec)).findall("devices/disk/driver")
    assert [d.get("cache") for d in drivers[:2]] == [None, "none"]  # no host cache if shared
    everything = tuple(dataclasses.replace(d, shared=True) for d in base.disks)
    spec = dataclasses.replace(spec, disks=everything)
    assert workloads.storage_migration(storage, _build(spec), spec) == (0, {})


def test_nics_without_mac_keep_one_across_starts() -> None:
    """A random MAC per define would give the guest a new DHCP address at every start."""
    spec = _cloud_spec()
    first = domxml.parse(_build(spec)).find("devices/interface/mac")
    again = domxml.parse(_build(spec)).find("devices/interface/mac")
    assert first is not None and again is not None
    assert first.get("address") == again.get("address") == domxml.stable_mac(spec.uid, 0)
    other = domxml.parse(_build(dataclasses.replace(spec, uid="another")))
    assert other.find("devices/interface/mac").get("address") != first.get("address")  # type: ignore[union-attr]


def test_nat_network_is_the_same_on_every_node() -> None:
    xml = workloads.network_xml("kubehv", "kubehv0", "192.168.150.0/24")
    assert xml == workloads.network_xml("kubehv", "kubehv0", "192.168.150.0/24")
    root = domxml.parse(xml)
    assert root.find("forward").get("mode") == "nat"  # type: ignore[union-attr]
    assert root.find("ip").get("address") == "192.168.150.1"  # type: ignore[union-attr]
    dhcp = root.find("ip/dhcp/range")
    assert dhcp is not None and dhcp.get("start") == "192.168.150.2"
    assert dhcp.get("end") == "192.168.150.254"
    assert root.find("mac").get("address", "").startswith("52:54:00:")  # type: ignore[union-attr]
