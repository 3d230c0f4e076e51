"""The kvm driver's parameters: per-instance hypervisor parameters and per-node settings.

Why this module exists: every parameter is declared exactly once, with its syntax check
(cluster side, no I/O) and its node check (agent side). Parameters that name host paths are
confined to a list of allowed directories so that a manifest cannot make QEMU read an
arbitrary file of the node (``/etc/shadow`` as a kernel, say). The allowed directories are a
node setting (``DriverConfig.params["allowed_dirs"]``); because Ganeti-style node checks are
class-level functions of the value only, the driver publishes its node's list here with
:func:`set_allowed_dirs` when it is constructed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from kubehv.drivers import errors, parameters, values
from kubehv.drivers.storage import errors as storage_errors

ACCELERATORS = ("auto", "kvm", "tcg")
DISK_CACHES = ("default", "none", "writeback", "writethrough", "directsync", "unsafe")


def _cache_dir() -> str:
    explicit = os.environ.get("KUBEHV_CACHE")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "kubehv")


def default_allowed_dirs() -> tuple[str, ...]:
    """Where host files named by parameters may live unless the node says otherwise."""
    return ("/var/lib/libvirt/images", _cache_dir())


_allowed_dirs: tuple[str, ...] = default_allowed_dirs()


def set_allowed_dirs(dirs: tuple[str, ...]) -> None:
    """Publish this node's allowed directories for the node checks (called by the driver)."""
    global _allowed_dirs  # noqa: PLW0603 - one node-wide setting, read by class-level checks
    _allowed_dirs = tuple(dirs)


def allowed_dirs() -> tuple[str, ...]:
    return _allowed_dirs


_under_allowed = parameters.path_under(allowed_dirs)

# Never allowed for a manifest's host paths, even inside an allowed directory: the agent's
# state directory (VNC password files of every instance) and the node-managed instance storage
# (other namespaces' overlays, the image cache). Published by the driver like the allowed list.
_forbidden_dirs: tuple[str, ...] = ()
_agent_vnc_dir: str | None = None


def set_forbidden_dirs(dirs: tuple[str, ...], agent_vnc_dir: str | None = None) -> None:
    """Publish the directories no manifest path may reach, and where the agent's files live."""
    global _forbidden_dirs, _agent_vnc_dir  # noqa: PLW0603 - node-wide, like _allowed_dirs
    _forbidden_dirs = tuple(os.path.normpath(d) for d in dirs if d)
    _agent_vnc_dir = os.path.normpath(agent_vnc_dir) if agent_vnc_dir else None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def is_forbidden(path: values.ParamValue) -> bool:
    """Inside the state directory or instance storage (by name or after resolving links)."""
    if not isinstance(path, str) or not path:
        return False
    real = os.path.realpath(path)
    return any(_inside(path, d) or _inside(real, d) for d in _forbidden_dirs)


def is_optional_path(value: values.ParamValue) -> bool:
    """Syntax: empty (not set) or an absolute, normalised path without metacharacters."""
    return value == "" or parameters.is_absolute_path(value)


def is_optional_allowed_file(value: values.ParamValue) -> bool:
    """Node: empty, or an existing regular file inside one of the allowed directories."""
    if value == "":
        return True
    return (
        _under_allowed(value)
        and isinstance(value, str)
        and not is_forbidden(value)
        and os.path.isfile(value)
    )


def is_allowed_file(path: str) -> bool:
    return is_optional_path(path) and path != "" and is_optional_allowed_file(path)


def is_allowed_path(path: str) -> bool:
    """For disks: files or block devices, inside the allowed directories."""
    return parameters.is_absolute_path(path) and _under_allowed(path) and not is_forbidden(path)


def _kvm_usable_on_node(value: values.ParamValue) -> bool:
    return value != "kvm" or os.path.exists("/dev/kvm")


# Control characters (XML 1.0 cannot carry most, and a kernel command line is one line)
# and the two non-characters XML forbids.
_CONTROL = re.compile("[\x00-\x1f\x7f\ufffe\uffff]")


def _printable(value: values.ParamValue) -> bool:
    return isinstance(value, str) and len(value) <= 4096 and not _CONTROL.search(value)


_P = parameters.Parameter
_PATH_MSG = "must be empty or an absolute, normalised path without special characters"
_NODE_PATH_MSG = "must name an existing file inside the allowed directories of this node"

PARAMETERS: dict[str, parameters.Parameter] = {
    p.name: p
    for p in (
        _P(
            "accelerator",
            str,
            "kvm (hardware), tcg (emulation) or auto (kvm only if probed usable, else tcg)",
            default="auto",
            choices=ACCELERATORS,
            node_check=_kvm_usable_on_node,
            node_message="kvm needs /dev/kvm on the node",
        ),
        _P(
            "machine_type",
            str,
            "QEMU machine type (e.g. pc, q35, pc-i440fx-7.2)",
            default="pc",
            syntax_check=parameters.matches(r"[a-z0-9][a-z0-9._-]{0,63}"),
            syntax_message="must be a QEMU machine type name",
        ),
        _P(
            "cpu_model",
            str,
            "guest CPU: empty (QEMU default), host-model, host-passthrough or a model name",
            default="",
            syntax_check=parameters.matches(
                r"|host-model|host-passthrough|[A-Za-z0-9][\w.-]{0,63}"
            ),
            syntax_message="must be empty, host-model, host-passthrough or a CPU model name",
        ),
        _P(
            "kernel_path",
            str,
            "kernel for direct boot when the instance gives none (host path)",
            default="",
            syntax_check=is_optional_path,
            syntax_message=_PATH_MSG,
            node_check=is_optional_allowed_file,
            node_message=_NODE_PATH_MSG,
        ),
        _P(
            "initrd_path",
            str,
            "initrd for direct boot when the instance gives none (host path)",
            default="",
            syntax_check=is_optional_path,
            syntax_message=_PATH_MSG,
            node_check=is_optional_allowed_file,
            node_message=_NODE_PATH_MSG,
        ),
        _P(
            "kernel_args",
            str,
            "kernel command line when the instance gives none",
            default="",
            syntax_check=_printable,
            syntax_message="must be at most 4096 printable characters",
        ),
        _P(
            "vnc_password_file",
            str,
            "file holding the VNC password when the instance names none (host path)",
            default="",
            syntax_check=is_optional_path,
            syntax_message=_PATH_MSG,
            node_check=is_optional_allowed_file,
            node_message=_NODE_PATH_MSG,
        ),
        _P(
            "disk_cache",
            str,
            "QEMU disk cache mode for all disks",
            default="default",
            choices=DISK_CACHES,
        ),
        _P(
            "balloon_stats_period_s",
            int,
            "how often the balloon driver reports guest memory statistics (0: never)",
            default=2,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of seconds",
        ),
        _P(
            "reboot_acpi_timeout_s",
            int,
            "seconds to wait for the guest to honour an ACPI reboot before a hard reset",
            default=30,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of seconds",
        ),
        _P(
            "migration_bandwidth_mib_s",
            int,
            "default migration bandwidth limit in MiB/s (0: unlimited)",
            default=0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of MiB/s",
        ),
        _P(
            "migration_downtime_ms",
            int,
            "default maximum downtime of a live migration in ms (0: libvirt's default)",
            default=0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of milliseconds",
        ),
    )
}

# Node settings (DriverConfig.params): how this node runs the driver, not what an instance wants.
NODE_SETTINGS: dict[str, parameters.Parameter] = {
    p.name: p
    for p in (
        _P(
            "serial_log_dir",
            str,
            "directory (as seen by libvirtd) where each guest's serial output is logged",
            default="/var/log/libvirt/qemu",
            syntax_check=parameters.is_absolute_path,
            syntax_message="must be an absolute, normalised path",
        ),
        _P(
            "allowed_dirs",
            str,
            "colon-separated directories that host paths in parameters and specs must be under",
            default=":".join(default_allowed_dirs()),
            syntax_check=lambda v: (
                isinstance(v, str)
                and all(parameters.is_absolute_path(d) for d in v.split(":") if d)
            ),
            syntax_message="must be absolute paths separated by ':'",
        ),
        _P(
            "storage_dir",
            str,
            "directory (as seen by libvirtd/QEMU) holding the image cache and the disks the "
            "node makes for instances (instances/<namespace>/<name>/)",
            default="/var/lib/kubehv/storage",
            syntax_check=parameters.is_absolute_path,
            syntax_message="must be an absolute, normalised path",
        ),
        _P(
            "storage_dir_agent",
            str,
            "the same directory as the agent reaches it, when that differs (empty: storage_dir)",
            default="",
            syntax_check=is_optional_path,
            syntax_message=_PATH_MSG,
        ),
        _P(
            "image_max_size_mib",
            int,
            "largest image download the node accepts, in MiB",
            default=20480,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of MiB",
        ),
        _P(
            "uefi_loader",
            str,
            "UEFI firmware code for firmware: uefi (Debian's OVMF)",
            default="/usr/share/OVMF/OVMF_CODE_4M.fd",
            syntax_check=parameters.is_absolute_path,
            syntax_message="must be an absolute, normalised path",
        ),
        _P(
            "uefi_vars_template",
            str,
            "UEFI variable store template copied for each firmware: uefi instance",
            default="/usr/share/OVMF/OVMF_VARS_4M.fd",
            syntax_check=parameters.is_absolute_path,
            syntax_message="must be an absolute, normalised path",
        ),
        _P(
            "nat_network",
            str,
            "libvirt network that 'type: network' NICs without a source join; the driver "
            "creates it (NAT + DHCP, node-local) when missing",
            default="kubehv",
            syntax_check=parameters.matches(r"[A-Za-z0-9_.-]{1,64}"),
            syntax_message="must be a network name",
        ),
        _P(
            "nat_bridge",
            str,
            "host bridge device of the NAT network",
            default="kubehv0",
            syntax_check=parameters.matches(r"[A-Za-z0-9_.-]{1,15}"),
            syntax_message="must be an interface name of at most 15 characters",
        ),
        _P(
            "nat_cidr",
            str,
            "subnet of the NAT network (the node takes the first address, DHCP the rest)",
            default="192.168.150.0/24",
            syntax_check=parameters.matches(r"\d{1,3}(\.\d{1,3}){3}/(1[6-9]|2[0-9])"),
            syntax_message="must be an IPv4 subnet such as 192.168.150.0/24 (/16 to /29)",
        ),
    )
}


@dataclasses.dataclass(frozen=True, slots=True)
class NodeSettings:
    serial_log_dir: str
    allowed_dirs: tuple[str, ...]
    storage_dir: str = "/var/lib/kubehv/storage"
    storage_dir_agent: str = ""
    image_max_size_mib: int = 20480
    uefi_loader: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    uefi_vars_template: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    nat_network: str = "kubehv"
    nat_bridge: str = "kubehv0"
    nat_cidr: str = "192.168.150.0/24"


def node_settings(config_params: Mapping[str, values.ParamValue]) -> NodeSettings:
    """Parse the driver's node settings; raises :class:`errors.ParameterError`."""
    checked = parameters.check_syntax(NODE_SETTINGS, config_params)
    return NodeSettings(
        serial_log_dir=str(checked["serial_log_dir"]),
        allowed_dirs=tuple(d for d in str(checked["allowed_dirs"]).split(":") if d),
        storage_dir=str(checked["storage_dir"]),
        storage_dir_agent=str(checked["storage_dir_agent"]),
        image_max_size_mib=int(checked["image_max_size_mib"]),
        uefi_loader=str(checked["uefi_loader"]),
        uefi_vars_template=str(checked["uefi_vars_template"]),
        nat_network=str(checked["nat_network"]),
        nat_bridge=str(checked["nat_bridge"]),
        nat_cidr=str(checked["nat_cidr"]),
    )


def instance_params(spec: values.InstanceSpec) -> dict[str, values.ParamValue]:
    """The instance's parameters with defaults filled in (syntax-checked again: cheap)."""
    return parameters.check_syntax(PARAMETERS, spec.params)


def check_instance_on_node(spec: values.InstanceSpec) -> None:
    """Node side, before start: parameter node checks and every host path of the spec."""
    params = instance_params(spec)
    parameters.check_on_node(PARAMETERS, params)
    problems: list[str] = []
    dirs = ", ".join(allowed_dirs()) or "(none)"
    files: list[tuple[str, str | None]] = []
    if spec.boot is not None:
        files += [("kernel", spec.boot.kernel), ("initrd", spec.boot.initrd)]
    vnc_file = spec.console.vnc_password_file
    if vnc_file is not None and not (
        # The agent's own copy of this instance's Secret: trusted where the agent keeps it.
        _agent_vnc_dir is not None
        and _inside(os.path.normpath(vnc_file), _agent_vnc_dir)
        and os.path.isfile(vnc_file)
    ):
        files.append(("VNC password file", vnc_file))
    for label, path in files:
        if path is not None and not is_allowed_file(path):
            problems.append(
                f"{label} {path!r} must be an existing file inside the allowed directories ({dirs})"
            )
    for disk in spec.disks:
        if disk.source is not values.DiskSource.HOST_PATH:
            continue
        if is_forbidden(disk.path):
            raise storage_errors.DiskPathForbidden(
                f"disk {disk.path!r} lies inside storage this node manages (instances' own "
                "disks, the image cache, the agent's state); no manifest may name it"
            )
        if not is_allowed_path(disk.path):
            problems.append(
                f"disk {disk.path!r} must exist inside the allowed directories ({dirs})"
            )
    if problems:
        raise errors.NodeParameterError(problems)


_LISTEN = re.compile(r"[0-9A-Za-z.:-]{1,64}")
_UID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_spec_strings(spec: values.InstanceSpec) -> None:
    """No I/O: strings that reach the domain XML must be representable in XML 1.0.

    ElementTree escapes ``<``, ``&`` and quotes, but XML 1.0 has no way to carry control
    characters; they are refused here rather than written into a document libvirt would reject.
    """
    problems: list[str] = []
    if spec.boot is not None and not _printable(spec.boot.cmdline):
        problems.append("kernel command line must be at most 4096 printable characters")
    if not _UID.fullmatch(spec.uid):
        problems.append(
            f"instance uid {spec.uid!r} must be 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    if spec.console.vnc and not _LISTEN.fullmatch(spec.console.vnc_listen):
        problems.append(f"VNC listen address {spec.console.vnc_listen!r} must be an IP address")
    if spec.console.vnc_port is not None and not 5900 <= spec.console.vnc_port <= 65535:
        problems.append(f"VNC port {spec.console.vnc_port} must be between 5900 and 65535")
    if spec.console.vnc_password_file is not None and not parameters.is_absolute_path(
        spec.console.vnc_password_file
    ):
        problems.append(
            f"VNC password file {spec.console.vnc_password_file!r} must be an absolute, "
            "normalised path"
        )
    if problems:
        raise errors.InvalidInstanceSpec("; ".join(problems))
