"""Where the API server is and who we are to it: a kubeconfig file or the pod's service account.

Why this module exists: the agent and the controller talk to the API without the
``kubernetes`` package (its import alone is ~34 MB of every generated model class, a third of
an agent's memory budget). This is the part of that package's ``config`` they used: the
current context of a kubeconfig (server, CA, client certificate, token or token file; inline
``*-data`` fields are written to private temporary files) or, without one, the in-cluster
service account. Bound service-account tokens rotate on disk (the kubelet rewrites the file):
:meth:`Credentials.bearer` re-reads a token file at most every ``TOKEN_REREAD_S`` (client-go
re-reads every minute) and whenever :meth:`Credentials.refresh` is called after a 401.

Exec and auth-provider plugins are not supported (kubehv runs with a service account or a
certificate); a kubeconfig that needs one is refused with a message saying so.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 60.0


class ConfigError(Exception):
    """No usable kubeconfig or service account (the message says what is missing)."""


@dataclasses.dataclass
class Credentials:
    server: str
    ca_file: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    _read_at: float = dataclasses.field(default=-1e18, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def bearer(self) -> str | None:
        """The token to send now (a token file is re-read once it is a minute old)."""
        if self.token_file and time.monotonic() - self._read_at > TOKEN_REREAD_S:
            self.refresh()
        return self.token

    def refresh(self) -> None:
        """Re-read the token file (after a 401: the kubelet may have rotated it)."""
        if not self.token_file:
            return
        with self._lock:
            self.token = Path(self.token_file).read_text(encoding="utf-8").strip() or None
            self._read_at = time.monotonic()


def _private_file(data: str, suffix: str) -> str:
    """Decoded ``*-data`` content in a 0600 temporary file, removed at exit."""
    fd, path = tempfile.mkstemp(prefix="kubehv-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64decode(data))
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    return path


def _path(value: str | None, base: Path) -> str | None:
    """A kubeconfig path, relative ones taken from the kubeconfig's folder (as kubectl does)."""
    if not value:
        return None
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _named(items: list[dict[str, Any]] | None, name: str, kind: str, source: str) -> dict[str, Any]:
    for kubeconfig_entry in items or []:
        if kubeconfig_entry.get("name") == name:
            return dict(kubeconfig_entry.get(kind) or {})
    raise ConfigError(f"{source}: no {kind} named {name!r}")


def from_kubeconfig(path: str, context: str | None = None) -> Credentials:
    """The current (or named) context of one kubeconfig file."""
    source = Path(os.path.expanduser(path))
    config = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    context_name = context or config.get("current-context")
    if not context_name:
        raise ConfigError(f"{source}: no current-context")
    kube_context = _named(config.get("contexts"), context_name, "context", str(source))
    cluster = _named(
        config.get("clusters"), kube_context.get("cluster", ""), "cluster", str(source)
    )
    user = _named(config.get("users"), kube_context.get("user", ""), "user", str(source))
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(f"{source}: exec/auth-provider users are not supported by kubehv")
    base = source.parent
    ca, cert, key = (
        cluster.get("certificate-authority-data"),
        user.get("client-certificate-data"),
        user.get("client-key-data"),
    )
    ca_path, cert_path, key_path = (
        _path(cluster.get("certificate-authority"), base),
        _path(user.get("client-certificate"), base),
        _path(user.get("client-key"), base),
    )
    creds = Credentials(
        server=str(cluster.get("server") or "").rstrip("/"),
        ca_file=_private_file(ca, ".ca") if ca else ca_path,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_file=_private_file(cert, ".crt") if cert else cert_path,
        key_file=_private_file(key, ".key") if key else key_path,
        token=user.get("token"),
        token_file=_path(user.get("tokenFile"), base),
        namespace=kube_context.get("namespace"),
    )  # fmt: skip
    if not creds.server:
        raise ConfigError(f"{source}: the cluster has no server")
    if creds.token_file and not creds.token:
        creds.refresh()
    return creds


def in_cluster(sa_dir: Path = SA_DIR, environ: dict[str, str] | None = None) -> Credentials:
    """The pod's service account: ``KUBERNETES_SERVICE_HOST``/``_PORT``, token, CA."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token = sa_dir / "token"
    if not host or not port or not token.exists():
        raise ConfigError("not in a cluster: no KUBERNETES_SERVICE_HOST/PORT or no token file")
    host = f"[{host}]" if ":" in host else host
    ns = sa_dir / "namespace"
    ca = sa_dir / "ca.crt"
    creds = Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(ca) if ca.exists() else None,
        token_file=str(token),
        namespace=ns.read_text(encoding="utf-8").strip() if ns.exists() else None,
    )
    creds.refresh()
    return creds


def load(kubeconfig: str | None = None) -> Credentials:
    """As the ``kubernetes`` client did: the path given, else ``KUBECONFIG`` (its first
    file), else ``~/.kube/config``, else the in-cluster service account."""
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    env = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if env:
        return from_kubeconfig(env[0])
    home = Path(os.path.expanduser("~/.kube/config"))
    if home.exists():
        return from_kubeconfig(str(home))
    return in_cluster()
