"""VirtualInstance (the typed ``kubehv.api`` model) -> the driver's :class:`values.InstanceSpec`.

Why this module exists: drivers never see Kubernetes objects. This is the one place that
reads a VirtualInstance spec for the hypervisor: memory quantities to MiB, disks, NICs,
boot, console, and the hypervisor parameters merged as Ganeti does (the node's
NodeHypervisor ``defaultParameters`` under the instance's own ``hypervisorParameters``).
No I/O: the VNC password file path is handed in by the caller, which wrote it. A raw
object (a dict from the API) is parsed into the model first, once, here at the edge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from kubehv import api
from kubehv.api import quantity
from kubehv.api import virtualinstance as vim
from kubehv.api import workloads as wl
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


def hypervisor_name(namespace: str | None, name: str | None) -> str:
    """The hypervisor-level name: ``<namespace>.<name>``, unique on a node.

    Object names are unique only per namespace, and one node runs instances of many
    namespaces, so the namespace is part of the name (namespaces have no dots, so the first
    dot splits it back). Names longer than the drivers' 128-character limit keep a readable
    prefix and end in a hash of the full name.
    """
    full = f"{namespace or 'default'}.{name or ''}"
    if len(full) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: _MAX_NAME - 13].rstrip('.-')}-{digest}"


def typed(vi: api.VirtualInstance | Mapping[str, Any]) -> api.VirtualInstance:
    """The model of ``vi`` (parsed if it is a raw object; raises ValueError if invalid)."""
    if isinstance(vi, api.VirtualInstance):
        return vi
    return api.VirtualInstance.model_validate(vi)


def instance_name(vi: api.VirtualInstance | Mapping[str, Any]) -> str:
    """The hypervisor-level name of ``vi`` (see :func:`hypervisor_name`)."""
    model = typed(vi)
    return hypervisor_name(model.metadata.namespace, model.metadata.name)


def merged_params(
    spec: vim.VirtualInstanceSpec, node_defaults: Mapping[str, Any] | None = None
) -> dict[str, values.ParamValue]:
    """Node defaults under instance values (Ganeti's FillHV)."""
    out: dict[str, values.ParamValue] = {
        str(k): v
        for k, v in (node_defaults or {}).items()
        if isinstance(v, str | int | float | bool)
    }
    out.update(spec.hypervisor_parameters)
    return out


def _boot(spec: vim.VirtualInstanceSpec) -> values.KernelBoot | None:
    boot = spec.boot
    if boot is None or not boot.kernel:
        return None
    return values.KernelBoot(
        kernel=boot.kernel, initrd=boot.initrd or None, cmdline=boot.cmdline or ""
    )


def _bytes(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(quantity.parse_decimal(str(value)))
    except (ValueError, ArithmeticError):
        return None


def _disk(d: wl.DiskSpec) -> values.Disk:
    common: dict[str, Any] = {
        "name": d.name or "",
        "bus": values.DiskBus(d.bus.value),
        "readonly": d.read_only,
        "boot_order": d.boot_order or None,
        "delete_policy": values.DeletePolicy(d.delete_policy.value),
        "shared": d.shared or d.path is not None,
    }
    if d.image is not None:
        return values.Disk(
            source=values.DiskSource.IMAGE,
            image=values.ImageRef(url=d.image.url, sha256=d.image.sha256),
            size_bytes=_bytes(d.image.size),
            format=values.DiskFormat.QCOW2,
            **common,
        )
    if d.blank is not None:
        return values.Disk(
            source=values.DiskSource.BLANK,
            size_bytes=_bytes(d.blank.size),
            format=values.DiskFormat.QCOW2,
            **common,
        )
    return values.Disk(
        path=d.path or "",
        kind=values.DiskKind(d.type.value),
        format=values.DiskFormat(d.format.value),
        **common,
    )


def _disks(spec: vim.VirtualInstanceSpec) -> tuple[values.Disk, ...]:
    return tuple(_disk(d) for d in spec.disks)


def user_data_secret_ref(vi: api.VirtualInstance | Mapping[str, Any]) -> tuple[str, str] | None:
    """(Secret name, key) of the cloud-init user data, when the spec names one."""
    ci = typed(vi).spec.cloud_init
    ref = ci.user_data_secret_ref if ci is not None else None
    if ref is None:
        return None
    return ref.name, ref.key


def _cloud_init(model: api.VirtualInstance, user_data: str | None) -> values.CloudInit | None:
    ci = model.spec.cloud_init
    if ci is None:
        return None
    return values.CloudInit(
        instance_id=model.metadata.uid or instance_name(model),
        hostname=model.metadata.name or "",
        user_data=user_data if user_data is not None else ci.user_data,
        network_data=ci.network_data,
        ssh_authorized_keys=tuple(ci.ssh_authorized_keys),
    )


def _nics(spec: vim.VirtualInstanceSpec) -> tuple[values.Nic, ...]:
    return tuple(
        values.Nic(
            kind=values.NicKind(n.type.value),
            source=n.source or None,  # network without source: the node's NAT
            model=values.NicModel(n.model.value),
            mac=n.mac.lower() if n.mac else None,
        )
        for n in spec.nics
    )


def _console(spec: vim.VirtualInstanceSpec, vnc_password_file: str | None) -> values.ConsoleSpec:
    vnc = spec.console.vnc
    return values.ConsoleSpec(
        serial=spec.console.serial,
        vnc=vnc.enabled,
        vnc_listen=vnc.listen or "127.0.0.1",
        vnc_port=vnc.port if vnc.port is not None and vnc.port > 0 else None,
        vnc_password_file=vnc_password_file,
    )


def instance_spec(
    vi: api.VirtualInstance | Mapping[str, Any],
    node_defaults: Mapping[str, Any] | None = None,
    vnc_password_file: str | None = None,
    user_data: str | None = None,
) -> values.InstanceSpec:
    """The driver's view of a VirtualInstance. Raises ValueError on an invalid object.

    ``user_data``: the cloud-init user data read from ``userDataSecretRef`` by the caller.
    """
    model = typed(vi)
    spec = model.spec
    return values.InstanceSpec(
        name=instance_name(model),
        uid=model.metadata.uid or "",
        memory_min_mib=spec.memory.min_mib,
        memory_max_mib=spec.memory.max_mib,
        vcpus=spec.vcpus,
        boot=_boot(spec),
        disks=_disks(spec),
        nics=_nics(spec),
        console=_console(spec, vnc_password_file),
        params=merged_params(spec, node_defaults),
        free_page_reporting=spec.memory.free_page_reporting,
        namespace=model.metadata.namespace or "default",
        firmware=values.Firmware(spec.firmware.value),
        cloud_init=_cloud_init(model, user_data),
    )
