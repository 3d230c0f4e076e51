"""Domain XML for an instance, built with ElementTree and read back the same way.

Why this module exists: the domain XML is where a manifest's strings reach QEMU. Building it
with an XML library (never string formatting) means a name, path or kernel command line
holding ``<``, ``&``, quotes or ``]]>`` is escaped, so it parses back to the same value and
cannot inject elements. The output is deterministic and pretty-printed so that golden files
(``tests/drivers/golden``) pin it byte for byte. No libvirt here: pure data in, text out.

Memory: ``<memory>`` is the instance's maximum (what the balloon can grow back to) and
``<currentMemory>`` its startup memory; a virtio ``<memballoon>`` with a statistics period
moves the guest between the two. (libvirt's ``<maxMemory>`` is for memory hotplug with NUMA
slots, which kubehv does not use.)

Every kubehv domain carries ``<metadata><kubehv:instance uid=...>`` in :data:`NAMESPACE`;
the driver lists only domains with that tag and calls the others foreign.
"""

from __future__ import annotations

import dataclasses
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from kubehv.drivers import values
from kubehv.drivers.libvirt import memstats

NAMESPACE = "https://kubehv.io/xmlns/libvirt/instance/v1"
PREFIX = "kubehv"
ET.register_namespace(PREFIX, NAMESPACE)

_TAG = f"{{{NAMESPACE}}}instance"

DOMAIN_TYPES = {"kvm": "kvm", "tcg": "qemu"}
"""Accelerator -> libvirt domain type ('qemu' is TCG emulation)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DomainSettings:
    """What the driver decided for this node, beyond the instance spec itself."""

    domain_type: str
    serial_log_dir: str
    startup_memory_mib: int
    vnc_password: str | None = None
    uefi_loader: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    uefi_vars_template: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"


@dataclasses.dataclass(frozen=True, slots=True)
class Tag:
    """The kubehv metadata read back from a domain."""

    uid: str
    memory_min_mib: int
    memory_max_mib: int


def parse(xml_text: str) -> ET.Element:
    """Parse XML that libvirtd or this module produced (trusted: no external entities)."""
    return ET.fromstring(xml_text)  # noqa: S314 - libvirtd's own output, not user input


def serial_log_path(serial_log_dir: str, instance_name: str) -> str:
    """The serial log convention shared with the tests: ``DIR/NAME.serial.log``."""
    return f"{serial_log_dir.rstrip('/')}/{instance_name}.serial.log"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk_target(bus: values.DiskBus, index: int) -> str:
    prefix = {values.DiskBus.VIRTIO: "vd", values.DiskBus.IDE: "hd"}.get(bus, "sd")
    return prefix + chr(ord("a") + index)


def _metadata(root: ET.Element, spec: values.InstanceSpec) -> None:
    md = _sub(root, "metadata")
    _sub(
        md,
        _TAG,
        uid=spec.uid,
        name=spec.name,
        memory_min_mib=str(spec.memory_min_mib),
        memory_max_mib=str(spec.memory_max_mib),
    )


def _os(
    root: ET.Element,
    spec: values.InstanceSpec,
    params: Mapping[str, values.ParamValue],
    settings: DomainSettings,
) -> None:
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=str(params.get("machine_type") or "pc"))
    if spec.firmware is values.Firmware.UEFI:
        _sub(os_el, "loader", settings.uefi_loader, readonly="yes", type="pflash")
        _sub(os_el, "nvram", template=settings.uefi_vars_template)
    kernel = spec.boot.kernel if spec.boot else str(params.get("kernel_path") or "")
    initrd = spec.boot.initrd if spec.boot else str(params.get("initrd_path") or "")
    cmdline = spec.boot.cmdline if spec.boot else str(params.get("kernel_args") or "")
    if kernel:
        _sub(os_el, "kernel", kernel)
        if initrd:
            _sub(os_el, "initrd", initrd)
        if cmdline:
            _sub(os_el, "cmdline", cmdline)
    elif not any(d.boot_order for d in spec.disks):
        _sub(os_el, "boot", dev="hd")  # per-device <boot order> excludes <os><boot>


def _cpu(root: ET.Element, params: Mapping[str, values.ParamValue]) -> None:
    model = str(params.get("cpu_model") or "")
    if model in ("host-model", "host-passthrough"):
        _sub(root, "cpu", mode=model)
    elif model:
        cpu = _sub(root, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", model, fallback="forbid")


def _disks(
    devices: ET.Element, spec: values.InstanceSpec, params: Mapping[str, values.ParamValue]
) -> None:
    per_bus: dict[values.DiskBus, int] = {}
    cache = str(params.get("disk_cache") or "default")
    for disk in spec.disks:
        bus = disk.bus
        if disk.device is values.DiskDevice.CDROM and bus is values.DiskBus.SATA:
            # i440fx ("pc") machines have IDE, not AHCI: a CD-ROM goes where the machine has it.
            machine = str(params.get("machine_type") or "pc")
            bus = values.DiskBus.SATA if "q35" in machine else values.DiskBus.IDE
        index = per_bus.get(bus, 0)
        per_bus[bus] = index + 1
        el = _sub(devices, "disk", type=disk.kind.value, device=disk.device.value)
        driver = {"name": "qemu", "type": disk.format.value}
        if disk.shared and disk.source is not values.DiskSource.HOST_PATH:
            # Declared shared: another node opens the same file after a migration, so no
            # host page cache may hold its writes (libvirt refuses the migration otherwise).
            driver["cache"] = "none"
        elif cache != "default" and disk.device is values.DiskDevice.DISK:
            driver["cache"] = cache
        _sub(el, "driver", **driver)
        if disk.kind is values.DiskKind.BLOCK:
            _sub(el, "source", dev=disk.path)
        else:
            _sub(el, "source", file=disk.path)
        if disk.backing or disk.source is not values.DiskSource.HOST_PATH:
            _backing_chain(el, disk.backing)
        _sub(el, "target", dev=_disk_target(bus, index), bus=bus.value)
        if disk.boot_order:
            _sub(el, "boot", order=str(disk.boot_order))
        if disk.readonly:
            _sub(el, "readonly")


def _backing_chain(parent: ET.Element, chain: tuple[values.BackingFile, ...]) -> None:
    """Pin the whole backing chain: libvirt then never probes a (guest-writable) header."""
    for layer in chain:
        parent = _sub(parent, "backingStore", type="file")
        _sub(parent, "format", type=layer.format.value)
        _sub(parent, "source", file=layer.path)
    _sub(parent, "backingStore")  # the chain ends here


def _guest_agent(devices: ET.Element, spec: values.InstanceSpec) -> None:
    """A virtio channel for qemu-guest-agent (guest addresses), for cloud-init guests."""
    if spec.cloud_init is not None:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


def stable_mac(uid: str, index: int) -> str:
    """The MAC of NIC ``index`` when the spec gives none: the same on every start and node.

    libvirt would pick a random one at each define, so a stop and start (or any restart)
    would change the guest's DHCP address; derived from the instance's uid, it stays.
    """
    digest = hashlib.sha256(f"{uid}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _nics(devices: ET.Element, spec: values.InstanceSpec) -> None:
    for index, nic in enumerate(spec.nics):
        el = _sub(devices, "interface", type=nic.kind.value)
        mac = nic.mac or (stable_mac(spec.uid, index) if spec.uid else None)
        if mac:
            _sub(el, "mac", address=mac)
        if nic.kind is values.NicKind.NETWORK:
            _sub(el, "source", network=nic.source or "default")
        elif nic.kind is values.NicKind.BRIDGE:
            _sub(el, "source", bridge=nic.source or "")
        _sub(el, "model", type=nic.model.value)


def _consoles(devices: ET.Element, spec: values.InstanceSpec, settings: DomainSettings) -> None:
    if spec.console.serial:
        serial = _sub(devices, "serial", type="pty")
        _sub(
            serial,
            "log",
            file=serial_log_path(settings.serial_log_dir, spec.name),
            append="on",
        )
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if spec.console.vnc:
        attrs = {"type": "vnc", "listen": spec.console.vnc_listen}
        if spec.console.vnc_port is None:
            attrs.update(port="-1", autoport="yes")
        else:
            attrs.update(port=str(spec.console.vnc_port), autoport="no")
        if settings.vnc_password is not None:
            attrs["passwd"] = settings.vnc_password
        graphics = _sub(devices, "graphics", **attrs)
        _sub(graphics, "listen", type="address", address=spec.console.vnc_listen)
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")


def build(
    spec: values.InstanceSpec,
    params: Mapping[str, values.ParamValue],
    settings: DomainSettings,
) -> str:
    """The domain XML for ``spec`` (``params``: the instance's checked hypervisor params)."""
    root = ET.Element("domain", type=settings.domain_type)
    _sub(root, "name", spec.name)
    _metadata(root, spec)
    _sub(root, "memory", str(spec.memory_max_mib * 1024), unit="KiB")
    _sub(root, "currentMemory", str(settings.startup_memory_mib * 1024), unit="KiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    _os(root, spec, params, settings)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _cpu(root, params)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    _disks(devices, spec, params)
    _nics(devices, spec)
    _consoles(devices, spec, settings)
    _guest_agent(devices, spec)
    period = int(params.get("balloon_stats_period_s") or 0)
    memstats.memballoon(devices, period, spec.free_page_reporting)
    return to_text(root)


def to_text(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def canonical(xml_text: str) -> str:
    """Re-indent any domain XML the same way (for golden comparisons)."""
    root = parse(xml_text)
    for el in root.iter():
        if el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None
    return to_text(root)


def read_tag(xml_text: str) -> Tag | None:
    """The kubehv tag of a domain's XML, or ``None`` for a foreign domain."""
    try:
        root = parse(xml_text)
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{_TAG}")
    if el is None or not el.get("uid"):
        return None
    try:
        return Tag(
            uid=el.get("uid", ""),
            memory_min_mib=int(el.get("memory_min_mib", "0")),
            memory_max_mib=int(el.get("memory_max_mib", "0")),
        )
    except ValueError:
        return None


def graphics_port(xml_text: str) -> tuple[str | None, int | None]:
    """(listen address, port) of the first VNC display in a live domain's XML."""
    root = parse(xml_text)
    el = root.find("devices/graphics[@type='vnc']")
    if el is None:
        return None, None
    port = el.get("port")
    return el.get("listen"), int(port) if port and port.lstrip("-").isdigit() else None


def graphics_password(xml_text: str) -> str | None:
    """The VNC password in an XML we built (to scrub it from messages), if any."""
    try:
        root = parse(xml_text)
    except ET.ParseError:
        return None
    el = root.find("devices/graphics[@type='vnc']")
    return el.get("passwd") if el is not None else None
