"""Where the control plane's binaries (kube-apiserver, etcd) come from.

Why: no package on this machine ships kube-apiserver, so the project builds it once from the
Go module proxy (``hack/controlplane/build.sh``) and caches it outside the clone, keyed by
version. Users who already have envtest assets point ``KUBEBUILDER_ASSETS`` at them, the
convention controller-runtime made familiar. This module is the single place that knows the
pinned versions and the lookup order, so the tests, ``make demo`` and the bench agree.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

# The pinned versions (must match the defaults in hack/controlplane/build.sh).
KUBERNETES_VERSION = "v1.32.4"
ETCD_VERSION = "v3.5.17"

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "controlplane" / "build.sh"


class BinariesUnavailable(RuntimeError):
    """The binaries could not be found nor built; the message says what was tried."""


@dataclasses.dataclass(frozen=True)
class ControlPlaneBinaries:
    """Paths of the two binaries the control plane runs."""

    directory: Path
    kube_apiserver: Path
    etcd: Path


def cache_dir() -> Path:
    """The cache the build script writes to (same rule as the script)."""
    explicit = os.environ.get("KUBEHV_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubehv"


def cached_dir() -> Path:
    """Where the pinned build lives in the cache (whether built yet or not)."""
    return cache_dir() / "controlplane" / f"k8s-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def _from_dir(directory: Path) -> ControlPlaneBinaries | None:
    apiserver, etcd = directory / "kube-apiserver", directory / "etcd"
    if os.access(apiserver, os.X_OK) and os.access(etcd, os.X_OK):
        return ControlPlaneBinaries(directory, apiserver, etcd)
    return None


def find(build: bool = True, timeout: float = 3600.0) -> ControlPlaneBinaries:
    """Return the binaries: ``KUBEBUILDER_ASSETS``, else the cache, else build (if ``build``).

    Building takes minutes (about 4 on two cores with a warm Go module cache); the build
    script prints its own progress lines on stderr, which are passed through.
    """
    tried: list[str] = []
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found = _from_dir(Path(assets))
        if found:
            return found
        tried.append(f"KUBEBUILDER_ASSETS={assets} lacks executable kube-apiserver and etcd")
    found = _from_dir(cached_dir())
    if found:
        return found
    tried.append(f"no cached build in {cached_dir()}")
    if not build:
        raise BinariesUnavailable("; ".join(tried))
    if not BUILD_SCRIPT.is_file():
        tried.append(f"build script {BUILD_SCRIPT} missing")
        raise BinariesUnavailable("; ".join(tried))
    env = dict(os.environ)
    env.setdefault("KUBEHV_K8S_VERSION", KUBERNETES_VERSION)
    env.setdefault("KUBEHV_ETCD_VERSION", ETCD_VERSION)
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=None,  # progress lines go straight to the user
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinariesUnavailable("; ".join([*tried, f"build failed: {exc}"])) from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tried.append(f"{BUILD_SCRIPT} exited {proc.returncode}")
        raise BinariesUnavailable("; ".join(tried))
    found = _from_dir(Path(lines[-1]))
    if found is None:
        tried.append(f"build printed {lines[-1]!r} which lacks the binaries")
        raise BinariesUnavailable("; ".join(tried))
    return found


@dataclasses.dataclass(frozen=True)
class NodeBinaries:
    """The real node's binaries (``build.sh --node``) and the sandbox's ``pause``."""

    directory: Path
    kubelet: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kube_proxy: Path
    pause: Path


NODE_NAMES = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "pause")


def node_cached_dir() -> Path:
    return cache_dir() / "node" / f"k8s-{KUBERNETES_VERSION}"


def _node_from_dir(directory: Path) -> NodeBinaries | None:
    paths = [directory / n for n in NODE_NAMES]
    if all(os.access(p, os.X_OK) for p in paths):
        return NodeBinaries(directory, *paths)
    return None


def find_node(build: bool = True, timeout: float = 3600.0) -> NodeBinaries:
    """The node's binaries: ``KUBEBUILDER_ASSETS``, else the cache, else ``build.sh --node``."""
    for candidate in (os.environ.get("KUBEBUILDER_ASSETS"), str(node_cached_dir())):
        found = _node_from_dir(Path(candidate)) if candidate else None
        if found:
            return found
    if not build:
        raise BinariesUnavailable(f"no node binaries in KUBEBUILDER_ASSETS or {node_cached_dir()}")
    env = dict(os.environ, KUBEHV_K8S_VERSION=KUBERNETES_VERSION)
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--node"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinariesUnavailable(f"{BUILD_SCRIPT} --node failed: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    found = _node_from_dir(Path(lines[-1])) if proc.returncode == 0 and lines else None
    if found is None:
        raise BinariesUnavailable(f"{BUILD_SCRIPT} --node exited {proc.returncode}")
    return found
