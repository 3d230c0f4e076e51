"""A real Kubernetes control plane (etcd + kube-apiserver) started as local processes.

Why: every operator test and ``make demo`` need a real API server, and there is no Docker
engine here for kind. Like controller-runtime's envtest, this starts etcd and kube-apiserver
on free loopback ports with TLS generated in Python, RBAC on (the admin identity is in
``system:masters``, so RBAC tests are real for other identities), a static token file, and a
kubeconfig. No controller-manager runs: the ``default`` namespace is ensured by hand.
Processes run in their own process group, log to files in the data dir, die with the
creating process (``setpriv --pdeathsig``) and are stopped at interpreter exit, so no
orphans stay behind even on Ctrl-C.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

from kubehv.devenv import binaries, certs, kubeaccess

KUBECTL = kubeaccess.KUBECTL
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
READY_TIMEOUT = 180.0  # generous: two cores shared with many concurrent test runs
ADMIN_USER = "kubehv-admin"


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or to answer; the message carries the log tail."""


KubectlError = kubeaccess.KubectlError


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the kernel picks it at random)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process in its own session/process group, logging to a file.

    With ``die_with_parent`` the child gets SIGKILL when the thread that started it exits
    (Linux parent-death signal): start it from the main thread or a thread that lives as
    long as the process should."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        die_with_parent: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.die_with_parent, self.env, self.cwd = die_with_parent, env, cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = self.argv
        setpriv = shutil.which("setpriv")
        if self.die_with_parent and setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with self.log.open("ab") as out:
            out.write(f"--- starting {self.name}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it; always reaps the child."""
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)
        # The group may hold stragglers even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=grace)
        self.popen = None


def _enables_sa(args: list[str]) -> bool:
    return any(a.startswith("--enable-admission-plugins=") and "ServiceAccount" in a for a in args)


class ControlPlane(kubeaccess.KubeAccess):
    """etcd + kube-apiserver on loopback. Use as a context manager or call start()/stop().

    ``data_dir``: where certificates, etcd data, logs and the kubeconfig go. If None, a
    temporary directory is created and removed by :meth:`stop`; a given directory is kept
    unless ``remove_data=True``.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        remove_data: bool | None = None,
        bins: binaries.ControlPlaneBinaries | None = None,
        die_with_parent: bool = True,
        etcd_fsync: bool = False,
        extra_args: list[str] | None = None,
        extra_ips: tuple[str, ...] = (),
    ) -> None:
        self._given_dir = data_dir
        self._remove_data = (data_dir is None) if remove_data is None else remove_data
        self._bins = bins
        self._die_with_parent = die_with_parent
        self._etcd_fsync = etcd_fsync
        # kube-apiserver flags appended last (the last of a repeated flag wins): what a real
        # node needs (kubehv.devenv.kubenode); extra_ips go into the serving certificate.
        self._extra_args = list(extra_args or [])
        self._extra_ips = extra_ips
        self.dir: Path = Path()
        self.token = secrets.token_hex(16)
        self.etcd_port = 0
        self.etcd_peer_port = 0
        self.port = 0
        self.start_seconds = 0.0
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None
        self._certs: certs.ControlPlaneCerts | None = None
        self._started = False

    # ---- public properties -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def certs(self) -> certs.ControlPlaneCerts:
        if self._certs is None:
            raise ControlPlaneError("control plane not started")
        return self._certs

    @property
    def logs(self) -> dict[str, Path]:
        return {"etcd": self.dir / "logs" / "etcd.log", "kube-apiserver": self._apiserver_log}

    @property
    def _apiserver_log(self) -> Path:
        return self.dir / "logs" / "kube-apiserver.log"

    def pids(self) -> dict[str, int]:
        """Process ids (each the leader of its own process group) of the running parts."""
        out: dict[str, int] = {}
        for name, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
            if proc is not None and proc.pid is not None and proc.alive():
                out[name] = proc.pid
        return out

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> ControlPlane:
        """Start etcd and kube-apiserver and wait until ready; retries on a port race."""
        if self._started:
            return self
        began = time.monotonic()
        bins = self._bins or binaries.find()
        if self._given_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="kubehv-cp-"))
        else:
            self.dir = self._given_dir
            self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        atexit.register(self.stop)
        self._started = True
        try:
            self._certs = certs.generate(
                self.dir / "pki", admin_user=ADMIN_USER, extra_ips=self._extra_ips
            )
            (self.dir / "tokens.csv").write_text(
                f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
            )
            (self.dir / "tokens.csv").chmod(0o600)
            last: ControlPlaneError | None = None
            for _ in range(attempts):
                self.etcd_port, self.etcd_peer_port, self.port = (
                    free_port(),
                    free_port(),
                    free_port(),
                )
                try:
                    self._start_etcd(bins)
                    self._start_apiserver(bins)
                    break
                except ControlPlaneError as exc:
                    last = exc
                    self._stop_processes()
                    if "address already in use" not in str(exc):
                        raise
            else:
                assert last is not None
                raise last
            self._write_kubeconfig()
            self._ensure_namespace("default")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop both processes (TERM, then KILL), reap them, remove a temporary data dir."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        self._stop_processes()
        if self._remove_data:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and etcd; wait ready."""
        if self._apiserver is None:
            raise ControlPlaneError("control plane not started")
        self._apiserver.stop()
        self._apiserver.start()
        self._wait_apiserver_ready(self._apiserver)

    def kill_apiserver(self) -> None:
        """SIGKILL kube-apiserver (fault tests); :meth:`start_apiserver` brings it back."""
        if self._apiserver and self._apiserver.popen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._apiserver.popen.pid, signal.SIGKILL)
            self._apiserver.stop(grace=5)

    def start_apiserver(self) -> None:
        if self._apiserver is None:
            raise ControlPlaneError("control plane not started")
        if not self._apiserver.alive():
            self._apiserver.start()
        self._wait_apiserver_ready(self._apiserver)

    def _stop_processes(self) -> None:
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                proc.stop()
        self._apiserver = self._etcd = None

    # ---- the two processes ------------------------------------------------------------------
    def _start_etcd(self, bins: binaries.ControlPlaneBinaries) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        argv = [
            str(bins.etcd),
            "--name=default",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--log-level=warn",
        ]
        if not self._etcd_fsync:
            argv.append("--unsafe-no-fsync")
        self._etcd = ManagedProcess(
            "etcd", argv, self.dir / "logs" / "etcd.log", die_with_parent=self._die_with_parent
        )
        self._etcd.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive(self._etcd)
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as resp:  # noqa: S310
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise self._failure(self._etcd, "etcd did not become healthy")

    def _start_apiserver(self, bins: binaries.ControlPlaneBinaries) -> None:
        c = self.certs
        argv = [
            str(bins.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={c.serving_cert}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_cert}",
            f"--token-auth-file={self.dir / 'tokens.csv'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            "--authorization-mode=RBAC",
            # No controller-manager creates ServiceAccounts or their tokens here (the real
            # node runs one, and passes --enable-admission-plugins=ServiceAccount instead).
            *(
                []
                if _enables_sa(self._extra_args)
                else ["--disable-admission-plugins=ServiceAccount"]
            ),
            "--enable-priority-and-fairness=false",
            "--allow-privileged=true",
            f"--cert-dir={self.dir / 'pki'}",
            "--profiling=false",
            "--v=1",
            *self._extra_args,
        ]
        self._apiserver = ManagedProcess(
            "kube-apiserver", argv, self._apiserver_log, die_with_parent=self._die_with_parent
        )
        self._apiserver.start()
        self._wait_apiserver_ready(self._apiserver)

    def _wait_apiserver_ready(self, proc: ManagedProcess) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(proc)
            try:
                status, body = self.request("GET", "/readyz", timeout=5)
                if status == 200:
                    return
                last = f"/readyz {status}: {body[-300:]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise self._failure(proc, f"kube-apiserver not ready in {READY_TIMEOUT:.0f}s ({last})")

    def _check_alive(self, proc: ManagedProcess) -> None:
        if not proc.alive():
            code = proc.popen.returncode if proc.popen else None
            raise self._failure(proc, f"{proc.name} exited with code {code}")

    def _failure(self, proc: ManagedProcess, what: str) -> ControlPlaneError:
        return ControlPlaneError(f"{what}; log {proc.log} ends with:\n{log_tail(proc.log)}")

    # ---- clients ---------------------------------------------------------------------------------
    def _ssl_context(self, client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        if client_cert:
            ctx.load_cert_chain(str(self.certs.admin_cert), str(self.certs.admin_key))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: Literal["cert", "token", "none"] = "cert",
        timeout: float = 30.0,
    ) -> tuple[int, bytes]:
        """One raw HTTPS request to kube-apiserver; returns (status, body). Errors are
        returned as their status, not raised; connection failures raise OSError."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth == "token":
            headers["Authorization"] = f"Bearer {self.token}"
        # Always https://127.0.0.1:<port>: no user-supplied scheme reaches urlopen.
        url = self.url + path
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        ctx = self._ssl_context(client_cert=auth == "cert")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def metrics_text(self) -> str:
        """The Prometheus text of kube-apiserver's /metrics (apiserver_request_total etc.)."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise ControlPlaneError(f"/metrics returned {status}: {body[:300]!r}")
        return body.decode()

    def _ensure_namespace(self, name: str) -> None:
        status, _ = self.request("GET", f"/api/v1/namespaces/{name}")
        if status == 200:
            return
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        status, body = self.request("POST", "/api/v1/namespaces", ns)
        if status not in (201, 409):
            raise ControlPlaneError(f"cannot create namespace {name}: {status} {body[:300]!r}")

    def _write_kubeconfig(self) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        c = self.certs
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubehv",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": b64(c.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate-data": b64(c.admin_cert),
                        "client-key-data": b64(c.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "kubehv", "context": {"cluster": "kubehv", "user": ADMIN_USER}}],
            "current-context": "kubehv",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)
