"""VirtualInstance (a dict from the API) -> the driver's :class:`values.InstanceSpec`.

Why this module exists: drivers never see Kubernetes objects. This is the one place that
reads a VirtualInstance spec for the hypervisor: memory quantities to MiB, disks, NICs,
boot, console, and the hypervisor parameters merged as Ganeti does (the node's
NodeHypervisor ``defaultParameters`` under the instance's own ``hypervisorParameters``).
No I/O: the VNC password file path is handed in by the caller, which wrote it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from kubehv.api import quantity
from kubehv.drivers import values

_MAX_NAME = 128


def to_mib(value: Any) -> int | None:
    """A Kubernetes quantity ("512Mi", "1Gi", bytes as a number) in whole MiB, rounded up.

    ``None`` for a missing or unparseable value (the CRD schema refuses those anyway).
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        return quantity.to_mib(value if isinstance(value, int) else str(value))
    except (ValueError, ArithmeticError):
        return None


def instance_name(vi: Mapping[str, Any]) -> str:
    """The hypervisor-level name: ``<namespace>.<name>``, unique on a node.

    Object names are unique only per namespace, and one node runs instances of many
    namespaces, so the namespace is part of the name (namespaces have no dots, so the first
    dot splits it back). Names longer than the drivers' 128-character limit keep a readable
    prefix and end in a hash of the full name.
    """
    meta = vi.get("metadata") or {}
    full = f"{meta.get('namespace') or 'default'}.{meta.get('name', '')}"
    if len(full) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: _MAX_NAME - 13].rstrip('.-')}-{digest}"


def memory_mib(spec: Mapping[str, Any]) -> tuple[int, int]:
    memory = spec.get("memory") or {}
    mem_min = to_mib(memory.get("min")) or 0
    mem_max = to_mib(memory.get("max")) or mem_min
    return mem_min, mem_max


def raw_params(spec: Mapping[str, Any]) -> dict[str, values.ParamValue]:
    raw = spec.get("hypervisorParameters") or {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str | int | float | bool)}


def merged_params(
    spec: Mapping[str, Any], node_defaults: Mapping[str, Any] | None = None
) -> dict[str, values.ParamValue]:
    """Node defaults under instance values (Ganeti's FillHV)."""
    out: dict[str, values.ParamValue] = {
        str(k): v
        for k, v in (node_defaults or {}).items()
        if isinstance(v, str | int | float | bool)
    }
    out.update(raw_params(spec))
    return out


def vnc_secret_ref(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    vnc = (spec.get("console") or {}).get("vnc") or {}
    ref = vnc.get("passwordSecretRef") or {}
    if not vnc.get("enabled") or not ref.get("name"):
        return None
    return str(ref["name"]), str(ref.get("key") or "password")


def _boot(spec: Mapping[str, Any]) -> values.KernelBoot | None:
    boot = spec.get("boot") or {}
    if not boot.get("kernel"):
        return None
    return values.KernelBoot(
        kernel=str(boot["kernel"]),
        initrd=str(boot["initrd"]) if boot.get("initrd") else None,
        cmdline=str(boot.get("cmdline") or ""),
    )


def _bytes(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(quantity.parse_decimal(str(value)))
    except (ValueError, ArithmeticError):
        return None


def _disk(d: Mapping[str, Any]) -> values.Disk:
    common: dict[str, Any] = {
        "name": str(d.get("name") or ""),
        "bus": values.DiskBus(d.get("bus") or "virtio"),
        "readonly": bool(d.get("readOnly", False)),
        "boot_order": int(d["bootOrder"]) if d.get("bootOrder") else None,
        "delete_policy": values.DeletePolicy(d.get("deletePolicy") or "Delete"),
    }
    image = d.get("image")
    if image:
        return values.Disk(
            source=values.DiskSource.IMAGE,
            image=values.ImageRef(
                url=str(image.get("url", "")), sha256=str(image.get("sha256", ""))
            ),
            size_bytes=_bytes(image.get("size")),
            format=values.DiskFormat.QCOW2,
            **common,
        )
    blank = d.get("blank")
    if blank:
        return values.Disk(
            source=values.DiskSource.BLANK,
            size_bytes=_bytes(blank.get("size")),
            format=values.DiskFormat.QCOW2,
            **common,
        )
    return values.Disk(
        path=str(d.get("path", "")),
        kind=values.DiskKind(d.get("type") or "file"),
        format=values.DiskFormat(d.get("format") or "raw"),
        **common,
    )


def _disks(spec: Mapping[str, Any]) -> tuple[values.Disk, ...]:
    return tuple(_disk(d) for d in spec.get("disks") or [])


def user_data_secret_ref(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """(Secret name, key) of the cloud-init user data, when the spec names one."""
    ref = (spec.get("cloudInit") or {}).get("userDataSecretRef") or {}
    if not ref.get("name"):
        return None
    return str(ref["name"]), str(ref.get("key") or "userdata")


def _cloud_init(vi: Mapping[str, Any], user_data: str | None) -> values.CloudInit | None:
    ci = (vi.get("spec") or {}).get("cloudInit")
    if ci is None:
        return None
    meta = vi.get("metadata") or {}
    return values.CloudInit(
        instance_id=str(meta.get("uid") or instance_name(vi)),
        hostname=str(meta.get("name", "")),
        user_data=user_data if user_data is not None else ci.get("userData"),
        network_data=ci.get("networkData"),
        ssh_authorized_keys=tuple(str(k) for k in ci.get("sshAuthorizedKeys") or []),
    )


def _nics(spec: Mapping[str, Any]) -> tuple[values.Nic, ...]:
    out = []
    for n in spec.get("nics") or []:
        out.append(
            values.Nic(
                kind=values.NicKind(n.get("type") or "user"),
                source=n.get("source") or None,  # network without source: the node's NAT
                model=values.NicModel(n.get("model") or "virtio"),
                mac=(str(n["mac"]).lower() if n.get("mac") else None),
            )
        )
    return tuple(out)


def _console(spec: Mapping[str, Any], vnc_password_file: str | None) -> values.ConsoleSpec:
    console = spec.get("console") or {}
    vnc = console.get("vnc") or {}
    port = vnc.get("port")
    return values.ConsoleSpec(
        serial=bool(console.get("serial", True)),
        vnc=bool(vnc.get("enabled", False)),
        vnc_listen=str(vnc.get("listen") or "127.0.0.1"),
        vnc_port=int(port) if isinstance(port, int) and port > 0 else None,
        vnc_password_file=vnc_password_file,
    )


def instance_spec(
    vi: Mapping[str, Any],
    node_defaults: Mapping[str, Any] | None = None,
    vnc_password_file: str | None = None,
    user_data: str | None = None,
) -> values.InstanceSpec:
    """The driver's view of a VirtualInstance. Raises ValueError on an unknown enum value.

    ``user_data``: the cloud-init user data read from ``userDataSecretRef`` by the caller.
    """
    spec = vi.get("spec") or {}
    meta = vi.get("metadata") or {}
    mem_min, mem_max = memory_mib(spec)
    return values.InstanceSpec(
        name=instance_name(vi),
        uid=str(meta.get("uid", "")),
        memory_min_mib=mem_min,
        memory_max_mib=mem_max,
        vcpus=int(spec.get("vcpus") or 1),
        boot=_boot(spec),
        disks=_disks(spec),
        nics=_nics(spec),
        console=_console(spec, vnc_password_file),
        params=merged_params(spec, node_defaults),
        namespace=str(meta.get("namespace") or "default"),
        firmware=values.Firmware(spec.get("firmware") or "bios"),
        cloud_init=_cloud_init(vi, user_data),
    )
