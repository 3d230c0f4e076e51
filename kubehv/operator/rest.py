"""A thin, synchronous Kubernetes REST client: JSON over urllib3, nothing generated.

Why this module exists: the agent and the controller make a handful of kinds of calls (get,
list, create, replace, merge-patch on a few paths), and the ``kubernetes`` package that made
them cost ~34 MB of imports per process. This client sends exactly those requests with the
credentials of :mod:`kubeconfig` (TLS with the cluster's CA, client certificate or bearer
token), a (connect, read) timeout on every call, and turns every non-2xx answer into
:class:`ApiError` carrying ``status`` (and the API's ``Status`` message), with
:class:`NotFound` (404) and :class:`Conflict` (409) as the subclasses callers catch. A 401 is
retried once after re-reading a rotating service-account token. Bodies are plain dicts in
and out, as the API sends them. It is thread-safe (urllib3's pool); async callers run it in
a worker thread (:func:`kubehv.operator.k8s.call`).
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

import urllib3

from kubehv.operator import kubeconfig

Timeout = float | tuple[float, float]

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer: ``status`` is the HTTP code, ``reason`` the API's reason word."""

    status = 0

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.reason = reason


class NotFound(ApiError):
    """The object is gone (HTTP 404)."""

    status = 404


class Conflict(ApiError):
    """Someone else wrote first (HTTP 409): re-read and decide again."""

    status = 409


def _error(status: int, data: bytes, method: str, path: str) -> ApiError:
    reason, message = "", data[:500].decode("utf-8", "replace")
    try:
        status_doc = json.loads(data)
        if isinstance(status_doc, dict):
            reason = str(status_doc.get("reason") or "")
            message = str(status_doc.get("message") or message)
    except ValueError:
        pass
    cls = {404: NotFound, 409: Conflict}.get(status, ApiError)
    return cls(f"{method} {path}: {status} {reason}: {message}", status, reason)


def _ssl_context(creds: kubeconfig.Credentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=creds.ca_file)
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds.cert_file:
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
    return ctx


class Client:
    """One API server, one identity, one connection pool."""

    def __init__(
        self,
        creds: kubeconfig.Credentials,
        pool_size: int = 8,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.creds = creds
        self.headers = dict(headers or {})  # sent on every call (tests: Impersonate-User)
        self.server = creds.server
        # Only connection failures are retried (nothing reached the server); a read timeout
        # of a write is never retried blindly: its effect is unknown, the caller re-reads.
        retries = urllib3.Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0)
        kwargs: dict[str, Any] = {"maxsize": pool_size, "retries": retries}
        if self.server.startswith("https:"):
            kwargs["ssl_context"] = _ssl_context(creds)
        self.pool = urllib3.PoolManager(**kwargs)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Timeout = (5.0, 30.0),
    ) -> dict[str, Any]:
        """One call; the decoded JSON answer (``{}`` when empty). Raises :class:`ApiError`."""
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v != ""})
        data = None if body is None else json.dumps(body).encode()
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        for attempt in (1, 2):
            headers = {"Accept": "application/json", "User-Agent": "kubehv", **self.headers}
            if data is not None:
                headers["Content-Type"] = content_type
            token = self.creds.bearer()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            resp = self.pool.request(
                method,
                url,
                body=data,
                headers=headers,
                timeout=urllib3.Timeout(connect=connect, read=read),
                redirect=False,
            )
            if resp.status == 401 and attempt == 1 and self.creds.token_file:
                self.creds.refresh()  # a bound token rotated under us: once more
                continue
            break
        if not 200 <= resp.status < 300:
            raise _error(resp.status, resp.data, method, path)
        if not resp.data:
            return {}
        result: dict[str, Any] = json.loads(resp.data)
        return result

    # --- the verbs kubehv uses ---------------------------------------------------------------

    def get(self, path: str, timeout: Timeout = (5.0, 30.0)) -> dict[str, Any]:
        return self.request("GET", path, timeout=timeout)

    def list(self, path: str, timeout: Timeout = (5.0, 30.0), **query: str) -> list[dict[str, Any]]:
        return list(self.request("GET", path, query=query, timeout=timeout).get("items") or [])

    def create(
        self, path: str, body: Mapping[str, Any], timeout: Timeout = (5.0, 30.0)
    ) -> dict[str, Any]:
        return self.request("POST", path, body=dict(body), timeout=timeout)

    def replace(
        self, path: str, body: Mapping[str, Any], timeout: Timeout = (5.0, 30.0)
    ) -> dict[str, Any]:
        return self.request("PUT", path, body=dict(body), timeout=timeout)

    def merge_patch(
        self, path: str, body: Mapping[str, Any], timeout: Timeout = (5.0, 30.0)
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", path, body=dict(body), content_type=MERGE_PATCH, timeout=timeout
        )

    def delete(self, path: str, timeout: Timeout = (5.0, 30.0)) -> dict[str, Any]:
        return self.request("DELETE", path, timeout=timeout)

    def close(self) -> None:
        self.pool.clear()


def connect(kubeconfig_path: str | None = None) -> Client:
    """A client for a kubeconfig path, ``KUBECONFIG``, ``~/.kube/config`` or the pod's
    service account (:func:`kubeconfig.load`)."""
    return Client(kubeconfig.load(kubeconfig_path))


def path(  # noqa: PLR0917 (the REST path's own order: group, version, plural, name)
    group: str, version: str, plural: str, name: str = "", namespace: str | None = None,
    sub: str = "",
) -> str:  # fmt: skip
    """The REST path of a collection or object (``group`` "" is the core API)."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{urllib.parse.quote(namespace, safe='')}"
    base += f"/{plural}"
    if name:
        base += f"/{urllib.parse.quote(name, safe='')}"
    if sub:
        base += f"/{sub}"
    return base
