"""Where an agent reads the Secret keys its instances name: the controller, or the API itself.

Why this module exists: the shipped agent has no RBAC on Secrets. Its instances' Secrets (a
VNC password, cloud-init user data) are handed over by the controller
(:mod:`secret_handover`), which checks that the instance is bound to the asking node.
Every reader in the agent goes through one :class:`SecretSource`, with the contract of
``k8s.Kube.read_secret_key``: the key's bytes, ``None`` when the Secret or the key does not
exist, :class:`SecretRefused` (why, for the instance's condition) when the source says no.

Two sources, chosen by the agent's settings (``--secrets``), never one falling back on the
other:

- ``controller`` (manifests/base): ``POST /secrets`` to the controller's HTTPS server behind
  the webhook Service, authenticated by the pod's projected ServiceAccount token (audience
  :data:`secret_policy.AUDIENCE`, re-read on every request: the kubelet rotates it). The
  server is verified against the CA of the ValidatingWebhookConfiguration it serves (the
  controller keeps that caBundle, or cert-manager injects it); its name is the Service's DNS
  name, even when the URL is the Service's cluster IP (no cluster DNS needed).
- ``api``: the agent's own credentials read the Secret (the local devenv and tests, agents
  as processes with an admin kubeconfig). Under the shipped RBAC this is refused, and the
  refusal says to use ``controller``.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import ssl
import threading
import urllib.parse
from typing import Protocol

import pydantic

from kubehv.operator import k8s, secret_policy, settings

TIMEOUT_S = 10.0


class SecretRefused(Exception):
    """The source will not give this key to this agent; the message says why."""


class SecretSourceUnavailable(Exception):
    """The source could not be asked (controller unreachable, no token yet): try again."""


class SecretSource(Protocol):
    async def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None: ...


class ApiSource:
    """The agent's own API credentials read the Secret (``--secrets=api``)."""

    def __init__(self, kube: k8s.Kube) -> None:
        self.kube = kube

    async def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        try:
            return await k8s.call(self.kube.read_secret_key, namespace, name, key)
        except Exception as exc:
            if k8s.is_status(exc, 403):
                raise SecretRefused(
                    f"the agent's own credentials may not read Secret {namespace}/{name} "
                    "(forbidden by RBAC); the shipped agent reads Secrets through the "
                    "controller (--secrets=controller)"
                ) from exc
            raise


class _Connection(http.client.HTTPSConnection):
    """HTTPS to an address, verifying the certificate for another name (the Service's)."""

    def __init__(self, host: str, port: int | None, context: ssl.SSLContext, name: str) -> None:
        super().__init__(host, port, timeout=TIMEOUT_S, context=context)
        self._name, self._ctx = name, context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._ctx.wrap_socket(self.sock, server_hostname=self._name)


class ControllerSource:
    """Ask the controller's hand-over endpoint (``--secrets=controller``)."""

    def __init__(self, kube: k8s.Kube, cfg: settings.SecretSettings) -> None:
        self.kube, self.cfg = kube, cfg
        url = urllib.parse.urlsplit(cfg.url)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"--secrets-url must be an https:// URL, not {cfg.url!r}")
        self.host, self.port = url.hostname, url.port or 443
        self.path = url.path or secret_policy.PATH
        self.server_name = cfg.server_name or url.hostname
        self._ca: bytes | None = None
        self._lock = threading.Lock()

    async def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        return await k8s.call(self._read, secret_policy.SecretKey(namespace, name, key))

    def _read(self, wanted: secret_policy.SecretKey) -> bytes | None:
        if "$(" in self.cfg.url:
            raise SecretSourceUnavailable(
                f"--secrets-url {self.cfg.url} was not expanded: the controller's Service did "
                "not exist when this pod started; restart the agent pod"
            )
        try:
            code, answer = self._post(wanted, self._ca_context())
        except ssl.SSLCertVerificationError:
            with self._lock:
                self._ca = None  # the CA changed (a new install): read it again, once
            code, answer = self._post(wanted, self._ca_context())
        where = f"Secret {wanted}"
        if code == 200 and answer.data is not None:
            return base64.b64decode(answer.data)
        reason = answer.reason or f"HTTP {code}"
        if code == 404:
            return None
        if code in (401, 403):
            raise SecretRefused(f"the controller refused to hand over {where}: {reason}")
        raise SecretSourceUnavailable(f"the controller could not hand over {where}: {reason}")

    def _ca_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ca is None:
                self._ca = self.kube.read_webhook_ca_bundle(self.cfg.ca_from)
            ca = self._ca
        if not ca:
            raise SecretSourceUnavailable(
                f"no caBundle yet in ValidatingWebhookConfiguration {self.cfg.ca_from} "
                "(the controller writes it at start)"
            )
        ctx = ssl.create_default_context(cadata=ca.decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _token(self) -> str:
        try:
            with open(self.cfg.token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise SecretSourceUnavailable(
                f"cannot read the hand-over token {self.cfg.token_file}: {exc.strerror}"
            ) from exc

    def _post(
        self, wanted: secret_policy.SecretKey, ctx: ssl.SSLContext
    ) -> tuple[int, secret_policy.Answer]:
        body = json.dumps(dataclasses.asdict(wanted)).encode()
        headers = {
            "Authorization": f"Bearer {self._token()}",
            "Content-Type": "application/json",
        }
        conn = _Connection(self.host, self.port, ctx, self.server_name)
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(1 << 20)
        except ssl.SSLCertVerificationError:
            raise
        except OSError as exc:
            raise SecretSourceUnavailable(
                f"the controller at {self.cfg.url} did not answer: {exc}"
            ) from exc
        finally:
            conn.close()
        try:
            return resp.status, secret_policy.Answer.model_validate_json(raw or b"{}")
        except pydantic.ValidationError:
            return resp.status, secret_policy.Answer(reason=f"HTTP {resp.status}, not JSON")


def from_settings(kube: k8s.Kube, cfg: settings.SecretSettings) -> SecretSource:
    if cfg.source == "controller":
        return ControllerSource(kube, cfg)
    if cfg.source == "api":
        return ApiSource(kube)
    raise ValueError(f"--secrets must be 'controller' or 'api', not {cfg.source!r}")
