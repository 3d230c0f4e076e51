"""The tiny test guest (Debian cloud kernel + busybox initramfs) as a typed value.

Why: every real-libvirt, e2e and fault test boots the same small guest by direct kernel boot;
``ensure_guest`` builds it once with tests/guest/build-guest.sh (cached per kernel version and
script contents) and says where its files are and which serial markers it prints.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kubehv.devenv.serial import ALIVE_MARKER, BOOT_MARKER

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "guest" / "build-guest.sh"
# console=ttyS0: markers go to the serial log; quiet: kernel chatter is slow on an emulated
# UART under TCG; panic=-1: a guest that panics reboots at once instead of hanging.
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"
MIN_MEMORY_MIB = 96  # the kernel + initramfs boot reliably from here on


class GuestBuildError(RuntimeError):
    """The guest could not be built (no apt, no busybox-static, ...); the message says why."""


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initrd: str
    cmdline: str = DEFAULT_CMDLINE
    boot_marker: str = BOOT_MARKER
    alive_marker: str = ALIVE_MARKER
    min_memory_mib: int = MIN_MEMORY_MIB


def cache_dir() -> Path:
    return Path(os.environ.get("KUBEHV_CACHE") or Path.home() / ".cache" / "kubehv")


def run_build_script(script: Path, timeout: float) -> Path:
    """Run a cached build script of tests/guest/ and return the folder it printed last."""
    env = dict(os.environ, KUBEHV_CACHE=str(cache_dir()))
    try:
        proc = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"{script} failed: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{script} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def ensure_guest(timeout: float = 600.0) -> GuestImage:
    """Build the guest if not cached yet and return it (safe from concurrent sessions)."""
    out = run_build_script(BUILD_SCRIPT, timeout)
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    for f in (kernel, initrd):
        if not f.is_file():
            raise GuestBuildError(f"{BUILD_SCRIPT} printed {out} but {f} is missing")
    return GuestImage(kernel=str(kernel), initrd=str(initrd))
