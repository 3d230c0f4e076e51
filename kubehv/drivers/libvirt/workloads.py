"""The kvm driver's workload helpers: node storage, guest addresses and the node NAT network.

Why this module exists: ``driver.py`` maps the driver contract to libvirt; what a real
workload needs on top -- disks made from cloud images (:mod:`kubehv.drivers.storage`), the
addresses a guest got, and a node-local NAT network with DHCP for guests to get them from --
lives here so that the contract module stays a thin mapping.

Guest addresses: libvirt knows them from three places, asked in this order and merged by MAC:
the DHCP leases of a libvirt network (``type: network`` NICs), qemu-guest-agent when the
guest runs it (cloud-init guests get its channel), and the host's ARP table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import os
import xml.etree.ElementTree as ET

import libvirt

from kubehv.drivers import values
from kubehv.drivers.libvirt import domxml
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.storage import disks

_SOURCES = (
    ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
    ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
)


def node_storage(settings: hvparams.NodeSettings, config: values.DriverConfig) -> disks.NodeStorage:
    """The node's instance storage, and the confinement of manifest paths that goes with it."""
    storage = disks.NodeStorage(
        qemu_root=settings.storage_dir,
        local_root=settings.storage_dir_agent or settings.storage_dir,
        image_max_bytes=settings.image_max_size_mib << 20,
    )
    forbidden = [storage.qemu_root, storage.local_root]
    vnc_dir = None
    if config.state_dir:
        forbidden.append(config.state_dir)
        vnc_dir = os.path.join(config.state_dir, "vnc")
    storage.forbidden = tuple(os.path.normpath(d) for d in forbidden)
    hvparams.set_forbidden_dirs(storage.forbidden, vnc_dir)
    return storage


def guest_interfaces(dom: libvirt.virDomain) -> list[values.GuestInterface]:
    """The domain's NICs in XML order, each with the addresses any source knows."""
    nics: list[tuple[str, str]] = []  # (mac, host-side device)
    root = domxml.parse(dom.XMLDesc(0))
    for el in root.iterfind("devices/interface"):
        mac_el = el.find("mac")
        target = el.find("target")
        if mac_el is not None and mac_el.get("address"):
            dev = target.get("dev", "") if target is not None else ""
            nics.append((str(mac_el.get("address")).lower(), dev))
    names: dict[str, str] = {}
    found: dict[str, list[str]] = {mac: [] for mac, _ in nics}
    for source, flag in _SOURCES:
        try:
            answer = dom.interfaceAddresses(flag, 0) or {}
        except libvirt.libvirtError:
            continue  # no lease file, no guest agent, ...: the next source may know
        for ifname, data in answer.items():
            mac = str((data or {}).get("hwaddr") or "").lower()
            if mac not in found:
                continue
            if source == "agent":
                names[mac] = str(ifname)
            for addr in (data or {}).get("addrs") or []:
                ip = str(addr.get("addr") or "")
                if _useful(ip) and ip not in found[mac]:
                    found[mac].append(ip)
    return [
        values.GuestInterface(
            name=names.get(mac) or dev or f"nic{i}", mac=mac, ip_addresses=tuple(found[mac])
        )
        for i, (mac, dev) in enumerate(nics)
    ]


def _useful(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified)


def network_xml(name: str, bridge: str, cidr: str) -> str:
    """A NAT network with DHCP over the whole subnet but its first address (the host's)."""
    net = ipaddress.ip_network(cidr, strict=False)
    hosts = list(net.hosts())
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "forward", mode="nat")
    ET.SubElement(root, "bridge", name=bridge, stp="off", delay="0")
    # The same gateway MAC on every node: a guest that live-migrates keeps its ARP entry for
    # the gateway, which must still answer on the new node.
    digest = hashlib.sha256(f"{name}/{cidr}".encode()).digest()
    ET.SubElement(root, "mac", address="52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3]))
    ip = ET.SubElement(root, "ip", address=str(hosts[0]), netmask=str(net.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=str(hosts[1]), end=str(hosts[-1]))
    return domxml.to_text(root)


def ensure_nat_network(conn: libvirt.virConnect, name: str, bridge: str, cidr: str) -> None:
    """Define and start the node-local NAT network ``name`` if it is missing or stopped."""
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise
        net = conn.networkDefineXML(network_xml(name, bridge, cidr))
    if not net.isActive():
        with contextlib.suppress(libvirt.libvirtError):
            net.setAutostart(True)
        net.create()


def prepare(
    storage: disks.NodeStorage,
    conn: libvirt.virConnect,
    settings: hvparams.NodeSettings,
    instance: values.InstanceSpec,
) -> disks.Prepared:
    """Everything on the node an instance needs before its domain is created.

    NICs of type network without a source join the node's NAT network (created on first use);
    disks and the cloud-init seed come from :meth:`NodeStorage.prepare`.
    """
    nics = []
    for given in instance.nics:
        nic = given
        if nic.kind is values.NicKind.NETWORK and not nic.source:
            nic = dataclasses.replace(nic, source=settings.nat_network)
        if nic.kind is values.NicKind.NETWORK and nic.source == settings.nat_network:
            ensure_nat_network(conn, settings.nat_network, settings.nat_bridge, settings.nat_cidr)
        nics.append(nic)
    return storage.prepare(dataclasses.replace(instance, nics=tuple(nics)))


# --- migration with node-local disks ------------------------------------------------------


def local_disk_targets(
    storage: disks.NodeStorage, dom_xml: str, instance: values.InstanceSpec | None = None
) -> list[str]:
    """Target devices (vda...) of the writable disks the node made: they must be copied.

    hostPath disks are the admin's storage, shared between nodes by assumption (as before
    image disks existed), disks the spec declares ``shared`` are on storage both nodes see,
    and read-only disks (the cloud-init seed) are rebuilt on the target.
    """
    out = []
    shared = storage.shared_paths(instance) if instance is not None else set()
    root = domxml.parse(dom_xml)
    for el in root.iterfind("devices/disk"):
        source, target = el.find("source"), el.find("target")
        path = source.get("file", "") if source is not None else ""
        if el.find("readonly") is not None or target is None or not path:
            continue
        if path.startswith(storage.qemu_root.rstrip("/") + "/") and path not in shared:
            out.append(str(target.get("dev")))
    return out


def storage_migration(
    storage: disks.NodeStorage, dom_xml: str, instance: values.InstanceSpec | None = None
) -> tuple[int, dict[str, object]]:
    """(extra flags, extra params) to copy the node-local disks along with the guest.

    Incremental copy (``VIR_MIGRATE_NON_SHARED_INC``): only the instance's overlay travels;
    the target already has the base image in its cache and an empty overlay on it, made by
    :func:`accept`.
    """
    targets = local_disk_targets(storage, dom_xml, instance)
    if not targets:
        return 0, {}
    return libvirt.VIR_MIGRATE_NON_SHARED_INC, {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: targets}


def accept(
    storage: disks.NodeStorage,
    conn: libvirt.virConnect,
    settings: hvparams.NodeSettings,
    instance: values.InstanceSpec,
) -> disks.Prepared:
    """Target side: the base image in this node's cache, fresh empty overlays, the seed.

    Whatever this node still holds for the instance (an earlier stay here, a retained disk)
    is stale -- the source's disks are the truth -- and an incremental copy onto an overlay
    with old data would mix both, so its node-local files are removed first (shared disks
    are the very files the source uses: kept).
    """
    storage.drop_local(instance)
    return prepare(storage, conn, settings, instance)
