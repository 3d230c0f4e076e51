"""The real cloud-init test guest (a Debian bookworm qcow2) as a typed value, built once.

Why: the workload tests and the bench boot a stock-style cloud image -- cloud-init,
openssh-server, qemu-guest-agent -- to prove apply -> address -> SSH for real.
``ensure_cloud_image`` runs tests/guest/build-cloud-image.sh (cached in the build cache under a
content hash of the recipe; several sessions may call it at once) and says where the image is,
its checksum and what its cold build cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubehv.devenv.guest import REPO_ROOT, GuestBuildError, run_build_script

BUILD_SCRIPT = REPO_ROOT / "tests" / "guest" / "build-cloud-image.sh"
USER = "debian"  # cloud-init's default user in Debian's cloud.cfg
MIN_MEMORY_MIB = 384


@dataclass(frozen=True)
class CloudImage:
    directory: Path
    path: Path
    sha256: str
    size_bytes: int
    build_seconds: int | None
    user: str = USER


def ensure_cloud_image(timeout: float = 1800.0) -> CloudImage:
    out = run_build_script(BUILD_SCRIPT, timeout)
    disk = out / "disk.qcow2"
    if not disk.is_file():
        raise GuestBuildError(f"{BUILD_SCRIPT} printed {out} but {disk} is missing")
    seconds = None
    for line in (out / "build.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "BUILD_SECONDS" and value.isdigit():
            seconds = int(value)
    return CloudImage(
        directory=out,
        path=disk,
        sha256=(out / "disk.sha256").read_text().strip(),
        size_bytes=disk.stat().st_size,
        build_seconds=seconds,
    )
