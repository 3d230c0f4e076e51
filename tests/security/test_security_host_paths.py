"""Parameters and spec fields that name host paths are confined to the node's allowed dirs.

Why: a VirtualInstance is written by a tenant, but the kvm driver hands its kernel, initrd,
disk and VNC password paths to QEMU running as root on the node. Without confinement a
manifest could boot ``/etc/shadow`` as a kernel or attach the node's root disk. The node
check (Ganeti's ``ValidateParameters``) must refuse any path outside the allowed
directories, including through ``..`` and symlinks, with a message naming the directories.
The VirtualInstance goes through the operator's own translation, exactly as an agent does.
(RBAC per component, by impersonation, is covered by tests/ship/test_rbac.py.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubehv.drivers import errors
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from kubehv.operator import translate


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[Path]:
    """One allowed directory holding a kernel, an initrd and a disk; restored afterwards."""
    root = tmp_path / "allowed"
    root.mkdir()
    for name in ("vmlinuz", "initrd.img", "disk.raw"):
        (root / name).write_bytes(b"\0" * 16)
    before = hvparams.allowed_dirs()
    hvparams.set_allowed_dirs((str(root),))
    try:
        yield root
    finally:
        hvparams.set_allowed_dirs(before)


def vi(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "tenant-vm", "namespace": "tenant", "uid": "u-1"},
        "spec": {"hypervisor": "kvm", "memory": {"min": "64Mi", "max": "128Mi"}, **spec},
    }


def refusal(body: dict[str, Any]) -> str:
    spec = translate.instance_spec(body)
    with pytest.raises(errors.ParameterError) as info:
        hvparams.check_instance_on_node(spec)
    return str(info.value)


def test_paths_inside_allowed_dirs_are_accepted(allowed: Path) -> None:
    body = vi(
        boot={"kernel": str(allowed / "vmlinuz"), "initrd": str(allowed / "initrd.img")},
        disks=[{"path": str(allowed / "disk.raw")}],
        hypervisorParameters={"kernel_path": str(allowed / "vmlinuz")},
    )
    hvparams.check_instance_on_node(translate.instance_spec(body))


@pytest.mark.parametrize(
    "field",
    ["boot.kernel", "boot.initrd", "disk"],
)
def test_spec_path_outside_is_refused(allowed: Path, field: str) -> None:
    kernel, initrd = str(allowed / "vmlinuz"), str(allowed / "initrd.img")
    disks = [{"path": str(allowed / "disk.raw")}]
    if field == "boot.kernel":
        kernel = "/etc/passwd"
    elif field == "boot.initrd":
        initrd = "/etc/passwd"
    else:
        disks = [{"path": "/dev/sda", "type": "block"}]
    message = refusal(vi(boot={"kernel": kernel, "initrd": initrd}, disks=disks))
    assert "allowed directories" in message and str(allowed) in message, message


def test_traversal_and_symlinks_do_not_escape(allowed: Path) -> None:
    link = allowed / "innocent-kernel"
    os.symlink("/etc/passwd", link)
    for path in (str(link), f"{allowed}/../../../../etc/passwd"):
        message = refusal(vi(boot={"kernel": path}))
        assert "allowed directories" in message, (path, message)


@pytest.mark.parametrize("param", ["kernel_path", "initrd_path", "vnc_password_file"])
def test_hypervisor_parameter_outside_is_refused(allowed: Path, param: str) -> None:
    LibvirtHypervisor.validate_parameters({param: str(allowed / "vmlinuz")})
    with pytest.raises(errors.ParameterError) as info:
        LibvirtHypervisor.validate_parameters({param: "/etc/shadow"})
    assert param in str(info.value) and "allowed directories" in str(info.value)
    # Relative paths and metacharacters are refused by syntax, before any I/O.
    for bad in ("etc/shadow", "/var/lib/kubehv/x;rm -rf /", "/var/lib/kubehv/../../etc/shadow"):
        with pytest.raises(errors.ParameterError):
            LibvirtHypervisor.check_parameter_syntax({param: bad})
