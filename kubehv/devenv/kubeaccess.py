"""Talking to a Kubernetes API server through a kubeconfig: kubectl, a client, an environment.

Why this module exists: the tests and the demo reach the API server the same way whether it
is the local etcd + kube-apiserver pair (:mod:`kubehv.devenv.controlplane`) or a cluster that
already exists (kind, or any cluster named by ``$KUBECONFIG``, as envtest's
USE_EXISTING_CLUSTER does). :class:`KubeAccess` is that shared part; :class:`ExistingCluster`
is the whole of the existing-cluster case: nothing to start or stop, and the operations only
a local control plane can do (restart the API server, read its processes) refuse clearly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubehv.devenv import binaries

USE_EXISTING_ENV = "KUBEHV_USE_EXISTING_CLUSTER"


def _kubectl() -> str:
    """kubectl on PATH, else the one hack/controlplane/build.sh builds next to the API server
    (Debian 12 ships no recent kubectl)."""
    found = shutil.which("kubectl")
    if found:
        return found
    built = binaries.cached_dir() / "kubectl"
    return str(built) if os.access(built, os.X_OK) else "kubectl"


KUBECTL = _kubectl()


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; str() includes its stderr (CalledProcessError's does not)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


class NotLocal(RuntimeError):
    """Asked an existing cluster for something only the local control plane can do."""


def use_existing_cluster() -> bool:
    """True when ``KUBEHV_USE_EXISTING_CLUSTER`` asks for the cluster in ``$KUBECONFIG``."""
    return os.environ.get(USE_EXISTING_ENV, "").strip().lower() in ("1", "true", "yes")


class KubeAccess:
    """kubectl, a Python client and an environment for the API server of ``kubeconfig``."""

    @property
    def kubeconfig(self) -> Path:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """A copy of os.environ with KUBECONFIG pointing at this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; text output captured."""
        argv = [KUBECTL, f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def wait_established(self, names: list[str] | None = None, timeout: float = 120.0) -> None:
        """Wait until the CRDs ``names`` (all CRDs when None) are Established.

        Polls ``kubectl get`` rather than ``kubectl wait``: right after a CRD is created the
        API server may not have written any condition yet, and ``kubectl wait`` then fails at
        once ("status.conditions accessor error: <nil>") instead of waiting.
        """
        targets = [f"crd/{n}" for n in names] if names else ["crd"]
        template = (
            '{range .items[*]}{.metadata.name}={range .status.conditions[?(@.type=="Established")]}'
            '{.status}{end}{"\\n"}{end}'
        )
        deadline = time.monotonic() + timeout
        while True:
            proc = self.kubectl(
                "get", *targets, "-o", f"jsonpath={template}", "--ignore-not-found", check=False
            )
            rows = [line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line]
            pending = [name for name, state in rows if state != "True"]
            found = {name for name, _ in rows}
            missing = [n for n in names or [] if n not in found]
            if proc.returncode == 0 and rows and not pending and not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"CRDs not Established after {timeout:.0f} s: "
                    f"{', '.join(pending + missing) or proc.stderr.strip() or 'none found'}"
                )
            time.sleep(0.3)

    def api_client(self) -> k8s_client.ApiClient:
        """A new ``kubernetes.client.ApiClient`` configured from the kubeconfig."""
        api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        return api


class ExistingCluster(KubeAccess):
    """A cluster somebody else runs, named by a kubeconfig (its current context)."""

    def __init__(self, kubeconfig: Path) -> None:
        if not kubeconfig.is_file():
            raise FileNotFoundError(f"{USE_EXISTING_ENV}=1 but kubeconfig {kubeconfig} is missing")
        self._kubeconfig = kubeconfig

    @classmethod
    def from_env(cls) -> ExistingCluster:
        """The first file of ``$KUBECONFIG``, else ``~/.kube/config``."""
        paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        return cls(Path(paths[0]) if paths else Path.home() / ".kube" / "config")

    @property
    def kubeconfig(self) -> Path:
        return self._kubeconfig

    @property
    def url(self) -> str:
        """The server of the kubeconfig's current context."""
        config = yaml.safe_load(self._kubeconfig.read_text()) or {}
        current = config.get("current-context")
        context: dict[str, Any] = next(
            (c["context"] for c in config.get("contexts") or [] if c.get("name") == current), {}
        )
        cluster: dict[str, Any] = next(
            (
                c["cluster"]
                for c in config.get("clusters") or []
                if c.get("name") == context.get("cluster")
            ),
            {},
        )
        return str(cluster.get("server", ""))

    def stop(self) -> None:
        """Nothing to stop: the cluster is not ours."""

    def restart_apiserver(self) -> None:
        raise NotLocal("an existing cluster's API server cannot be restarted by the tests")

    def pids(self) -> dict[str, int]:
        raise NotLocal("an existing cluster's processes are not visible to the tests")
