"""The project's container image, built from the Dockerfile's recipe without a Docker engine.

Why: the real node (``kubehv.devenv.kubenode``) runs the shipped manifests, so it needs the
``kubehv`` image, and no Docker engine or registry runs here. The image is assembled from
three layers, each cached by what it is made of so a code change rebuilds only the last:

1. ``os``: a Debian bookworm minbase rootfs (``debootstrap``) with python3 and libvirt0 (the
   Dockerfile's runtime stage: python 3.11, libvirt0 and virsh, no compiler) and the
   non-root user 65532;
2. ``wheels``: exactly the pinned set of ``requirements.lock`` (the Dockerfile's ``pip wheel
   -r requirements.lock``), installed under ``/usr/local``; keyed by the lock's content hash;
3. ``kubehv``: the package itself (``pip install --no-deps .``), keyed by the source hash.

The layers are packed as a docker-archive tarball (``manifest.json`` + config + layer tars)
that ``ctr images import`` reads; containerd stores ``kubehv:dev`` as
``docker.io/library/kubehv:dev``. The sandbox (pause) image is built the same way from the
static ``pause`` of ``hack/controlplane/build.sh --node``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kubehv.devenv import binaries

SUITE = "bookworm"
MIRROR = os.environ.get("KUBEHV_DEBIAN_MIRROR", "http://deb.debian.org/debian")
OS_PACKAGES = ("python3", "libvirt0", "libvirt-clients", "ca-certificates")
HOST_PYTHON = "/usr/bin/python3"  # Debian's 3.11, the same interpreter the rootfs gets
IMAGE_REF = "kubehv:dev"
PAUSE_REF = "kubehv-pause:3.10"
NON_ROOT = 65532
# Left out of the os layer: runtime mounts and apt's caches.
_SKIP_TOP = ("dev", "proc", "sys", "run", "tmp")
_SKIP_PREFIX = ("var/cache/apt/", "var/lib/apt/lists/", "var/log/", "usr/share/doc/")


class ImageBuildError(RuntimeError):
    """A layer could not be built; the message carries the failing command's output."""


@dataclass(frozen=True)
class ImageArchive:
    """A docker-archive tarball and the reference it is tagged with."""

    path: Path
    ref: str


def cache_dir() -> Path:
    return binaries.cache_dir() / "image"


def _run(argv: list[str], timeout: float = 1800.0, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-3000:]
        raise ImageBuildError(f"{' '.join(argv[:4])}... exited {proc.returncode}:\n{out}")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder per layer at a time across sessions (the others then reuse it)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / f"{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _source_hash() -> str:
    root = binaries.REPO_ROOT
    files = [root / "pyproject.toml", root / "README.md"]
    files += sorted((root / "kubehv").rglob("*.py"))
    files += sorted((root / "kubehv").rglob("*.typed"))
    return _digest(*(str(f.relative_to(root)).encode() + f.read_bytes() for f in files))


def _lock_hash() -> str:
    return _digest((binaries.REPO_ROOT / "requirements.lock").read_bytes())


# ---- layer 1: the Debian rootfs ------------------------------------------------------------
def os_layer() -> Path:
    """A tar of the debootstrap'd rootfs (cached by suite and package list)."""
    key = _digest(SUITE.encode(), ",".join(OS_PACKAGES).encode())
    out = cache_dir() / f"os-{key}.tar"
    with _locked("os"):
        if out.is_file():
            return out
        if not shutil.which("debootstrap"):
            raise ImageBuildError("debootstrap is missing: run `make apt` (hack/bootstrap-apt.sh)")
        root = Path(tempfile.mkdtemp(prefix="kubehv-rootfs-", dir=cache_dir()))
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(OS_PACKAGES)}",
                    SUITE,
                    str(root),
                    MIRROR,
                ]
            )
            with (root / "etc/passwd").open("a") as fh:
                fh.write(f"kubehv:x:{NON_ROOT}:{NON_ROOT}::/nonexistent:/usr/sbin/nologin\n")
            with (root / "etc/group").open("a") as fh:
                fh.write(f"kubehv:x:{NON_ROOT}:\n")
            _pack(root, out, skip_os_noise=True)
            _drop_others("os-*.tar", out)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


# ---- layer 2: the pinned wheels ------------------------------------------------------------
def wheels_layer() -> Path:
    """A tar of /usr/local holding exactly requirements.lock (cached by the lock's hash)."""
    key = _lock_hash()
    out = cache_dir() / f"wheels-{key}.tar"
    with _locked("wheels"):
        if out.is_file():
            return out
        work = Path(tempfile.mkdtemp(prefix="kubehv-wheels-", dir=cache_dir()))
        try:
            lock = binaries.REPO_ROOT / "requirements.lock"
            _run([HOST_PYTHON, "-m", "pip", "wheel", "-q", "-w", str(work / "w"), "-r", str(lock)])
            _pip_install(
                work / "root", "--no-index", "--find-links", str(work / "w"), "-r", str(lock)
            )
            _pack(work / "root", out)
            _drop_others("wheels-*.tar", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


# ---- layer 3: kubehv itself ------------------------------------------------------------------
def kubehv_layer() -> Path:
    """A tar of the kubehv package under /usr/local (cached by the source's hash)."""
    out = cache_dir() / f"kubehv-{_source_hash()}.tar"
    with _locked("kubehv"):
        if out.is_file():
            return out
        work = Path(tempfile.mkdtemp(prefix="kubehv-pkg-", dir=cache_dir()))
        try:
            src = work / "src"
            shutil.copytree(binaries.REPO_ROOT / "kubehv", src / "kubehv")
            for f in ("pyproject.toml", "README.md"):
                shutil.copy2(binaries.REPO_ROOT / f, src / f)
            _pip_install(work / "root", "--no-deps", str(src))
            _pack(work / "root", out)
            _drop_others("kubehv-*.tar", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _drop_others(pattern: str, keep: Path) -> None:
    """One cached layer of each kind is enough: a new lock or package list replaces it."""
    for old in cache_dir().glob(pattern):
        if old != keep:
            old.unlink(missing_ok=True)


def _pip_install(root: Path, *args: str) -> None:
    # Debian's pip maps --prefix=/usr to /usr/local/lib/python3.11/dist-packages and
    # /usr/local/bin, which the rootfs's python3 (the same Debian build) has on sys.path.
    _run(
        [
            *(HOST_PYTHON, "-m", "pip", "install", "-q", "--no-compile", "--root", str(root)),
            *("--prefix", "/usr", "--no-warn-script-location", *args),
        ],
        env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"},
    )


def _pack(root: Path, out: Path, *, skip_os_noise: bool = False) -> None:
    """Tar ``root`` as an image layer: root-relative names, owners and modes kept."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name
        if skip_os_noise:
            top, _, rest = name.partition("/")
            if top in _SKIP_TOP and rest:
                return None
            if any(name.startswith(p) for p in _SKIP_PREFIX):
                return None
        if info.ischr() or info.isblk() or info.isfifo():
            return None
        return info

    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    tmp.rename(out)


# ---- the archive ----------------------------------------------------------------------------
def _layer_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def docker_archive(
    layers: list[Path], ref: str, out: Path, config: dict[str, object]
) -> ImageArchive:
    """Write a docker-archive tarball (what `docker save` writes) of ``layers`` tagged ``ref``."""
    diff_ids = [_layer_digest(p) for p in layers]
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [{"created_by": f"kubehv.devenv.image layer {p.name}"} for p in layers],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [ref],
            "Layers": [f"{d}/layer.tar" for d in diff_ids],
        }
    ]
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, data in (
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for digest, layer in zip(diff_ids, layers, strict=True):
            tar.add(layer, arcname=f"{digest}/layer.tar")
    tmp.rename(out)
    return ImageArchive(out, ref)


def kubehv_image() -> ImageArchive:
    """The kubehv image as in the Dockerfile: entrypoint ``kubehv``, user 65532.

    The archive is cached too (named after its layers), so a warm start only imports it."""
    layers = [os_layer(), wheels_layer(), kubehv_layer()]
    out = cache_dir() / f"image-{_digest(*(p.name.encode() for p in layers))}.tar"
    config: dict[str, object] = {
        "Entrypoint": ["/usr/local/bin/kubehv"],
        "Cmd": ["--help"],
        "User": f"{NON_ROOT}:{NON_ROOT}",
        "Env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
        ],
        "ExposedPorts": {"9100/tcp": {}, "8081/tcp": {}, "9443/tcp": {}},
    }
    with _locked("image"):
        if out.is_file():
            return ImageArchive(out, IMAGE_REF)
        archive = docker_archive(layers, IMAGE_REF, out, config)
        _drop_others("image-*.tar", out)
    return archive


def pause_image(pause_binary: Path, out_dir: Path) -> ImageArchive:
    """The sandbox image: one static binary that sleeps and reaps (build.sh --node)."""
    root = out_dir / "pause-root"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pause_binary, root / "pause")
    layer = out_dir / "pause-layer.tar"
    _pack(root, layer)
    config: dict[str, object] = {"Entrypoint": ["/pause"], "User": "65535:65535"}
    return docker_archive([layer], PAUSE_REF, out_dir / "pause-image.tar", config)
