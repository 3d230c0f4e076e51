"""The in-cluster webhook's serving certificate: made, renewed and handed to the web server.

Why this module exists: the API server calls the validating webhook through the Service
``kubehv-webhook`` over TLS, so every controller replica needs a certificate for
``<service>.<namespace>.svc`` that the API server trusts (the ValidatingWebhookConfiguration's
``caBundle``). Two ways, chosen by ``KUBEHV_WEBHOOK_CERTS``:

* ``self`` (manifests/base): the controller keeps the Secret itself. The Secret holds a CA
  (10 years) and a serving certificate signed by it (90 days). A missing, unreadable or
  wrong-named certificate, or one with less than a third of its lifetime left, is replaced;
  the CA is kept while it is valid, so renewing the serving certificate never changes the
  ``caBundle`` and no replica serves a certificate the API server does not trust. Writes are
  guarded by resourceVersion: when two replicas race, one wins and the other adopts its
  certificate.
* ``secret`` (the cert-manager component): cert-manager writes the Secret and injects the
  ``caBundle``; the controller only reads.

Either way each replica copies the pair to files that kopf's ``WebhookServer`` watches and
reloads, and re-checks every ``check_interval_s``. The pure parts (making and judging
certificates) take the time as an argument and are unit-tested; :class:`Keeper` does the I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubehv.operator import rest

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVING_DAYS = 90
RENEW_FRACTION = 1 / 3  # renew when less than this part of the lifetime is left
TLS_CRT, TLS_KEY, CA_CRT, CA_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"


@dataclasses.dataclass(frozen=True, slots=True)
class CertSettings:
    secret: str
    namespace: str
    service: str
    configuration: str
    mode: str  # "self" or "secret"
    directory: Path
    extra_sans: tuple[str, ...] = ()
    check_interval_s: float = 60.0

    @property
    def names(self) -> tuple[str, ...]:
        svc, ns = self.service, self.namespace
        base = (svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local")
        return base + self.extra_sans

    @classmethod
    def from_env(cls, env: Mapping[str, str], directory: Path) -> CertSettings | None:
        """The settings the Deployment gives in its environment; None outside a cluster."""
        secret = env.get("KUBEHV_WEBHOOK_SECRET", "")
        if not secret:
            return None
        mode = env.get("KUBEHV_WEBHOOK_CERTS", "self")
        if mode not in ("self", "secret"):
            raise ValueError(f"KUBEHV_WEBHOOK_CERTS must be 'self' or 'secret', not {mode!r}")
        sans = tuple(s for s in env.get("KUBEHV_WEBHOOK_EXTRA_SANS", "").split(",") if s)
        return cls(
            secret=secret,
            namespace=env.get("POD_NAMESPACE", "kubehv-system"),
            service=env.get("KUBEHV_WEBHOOK_SERVICE", "kubehv-webhook"),
            configuration=env.get("KUBEHV_WEBHOOK_CONFIGURATION", "kubehv"),
            mode=mode,
            directory=directory,
            extra_sans=sans,
            check_interval_s=float(env.get("KUBEHV_WEBHOOK_CHECK_INTERVAL", "60")),
        )


# --- pure: make and judge certificates ---------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def make_ca(now: datetime.datetime, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubehv webhook CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_serving(
    ca_pem: bytes, ca_key_pem: bytes, names: tuple[str, ...], now: datetime.datetime,
    days: int = SERVING_DAYS,
) -> tuple[bytes, bytes]:  # fmt: skip
    """(certificate PEM, key PEM) for ``names``, signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the webhook CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return "is not valid yet"
    if end - now < (end - start) * RENEW_FRACTION:
        return f"expires {end:%Y-%m-%d %H:%M} (less than a third of its lifetime left)"
    return None


def ca_problem(
    ca_pem: bytes | None, ca_key_pem: bytes | None, now: datetime.datetime
) -> str | None:
    """Why the CA cannot sign (a new one is needed), or None."""
    if not ca_pem or not ca_key_pem:
        return "no CA yet"
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError as exc:
        return f"the CA cannot be read: {exc}"
    why = _fresh(ca, now)
    return f"the CA {why}" if why else None


def serving_problem(
    cert_pem: bytes | None, ca_pem: bytes | None, names: tuple[str, ...], now: datetime.datetime
) -> str | None:
    """Why the serving certificate must be replaced, or None if it is good for a while."""
    if not cert_pem:
        return "no serving certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        return f"the serving certificate cannot be read: {exc}"
    why = _fresh(cert, now)
    if why:
        return f"the serving certificate {why}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the serving certificate names no host"
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    missing = [n for n in names if n not in have]
    if missing:
        return f"the serving certificate does not name {', '.join(missing)}"
    if ca_pem:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        except (ValueError, TypeError, InvalidSignature) as exc:
            return f"the serving certificate is not signed by the CA ({type(exc).__name__})"
    return None


def renewed(
    data: Mapping[str, bytes], names: tuple[str, ...], now: datetime.datetime
) -> tuple[dict[str, bytes], str] | None:
    """New Secret data and why, when ``data`` is not good enough; None when it is."""
    ca, ca_key = data.get(CA_CRT), data.get(CA_KEY)
    why_ca = ca_problem(ca, ca_key, now)
    if why_ca:
        ca, ca_key = make_ca(now)
    assert ca is not None and ca_key is not None
    why = why_ca or serving_problem(data.get(TLS_CRT), ca, names, now)
    if why is None and not data.get(TLS_KEY):
        why = "no serving key"
    if why is None:
        return None
    cert, key = make_serving(ca, ca_key, names, now)
    return {TLS_CRT: cert, TLS_KEY: key, CA_CRT: ca, CA_KEY: ca_key}, why


def decode(secret_data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret_data or {}).items() if v}


def encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}


# --- I/O: the Secret, the webhook configuration, the files --------------------------------------


class Keeper:
    """One replica's certificate keeper (see the module docstring)."""

    def __init__(self, settings: CertSettings, api: rest.Client) -> None:
        self.settings = settings
        self.api = api
        settings.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def certfile(self) -> Path:
        return self.settings.directory / TLS_CRT

    @property
    def keyfile(self) -> Path:
        return self.settings.directory / TLS_KEY

    def sync(self, now: datetime.datetime | None = None) -> bool:
        """One pass; True when the files changed. Raises if no usable pair can be had."""
        now = now or datetime.datetime.now(datetime.UTC)
        s = self.settings
        for _ in range(5):
            secret_path = rest.path("", "v1", "secrets", s.secret, s.namespace)
            secret = self.api.get(secret_path)
            data = decode(secret.get("data"))
            if s.mode == "self":
                change = renewed(data, s.names, now)
                if change is not None:
                    new, why = change
                    secret["data"] = encode(new)  # resourceVersion kept: a race is a 409
                    try:
                        self.api.replace(secret_path, secret)
                    except rest.Conflict:
                        continue  # another replica renewed it first: adopt theirs
                    log.info("webhook certificate renewed in Secret %s: %s", s.secret, why)
                    data = new
                self._ensure_ca_bundle(data[CA_CRT])
            elif not data.get(TLS_CRT) or not data.get(TLS_KEY):
                raise RuntimeError(f"Secret {s.namespace}/{s.secret} has no tls.crt/tls.key yet")
            return self._write_files(data[TLS_CRT], data[TLS_KEY])
        raise RuntimeError(f"Secret {s.namespace}/{s.secret} kept changing under us")

    def _write_files(self, cert: bytes, key: bytes) -> bool:
        if (
            self.certfile.exists()
            and self.keyfile.exists()
            and self.certfile.read_bytes() == cert
            and self.keyfile.read_bytes() == key
        ):
            return False
        # Key first, then certificate: kopf reloads when either changes and reads both.
        write_private(self.keyfile, key)
        write_private(self.certfile, cert)
        return True

    def _ensure_ca_bundle(self, ca: bytes) -> None:
        want = base64.b64encode(ca).decode("ascii")
        for _ in range(5):
            conf_path = rest.path(
                "admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
                self.settings.configuration,
            )  # fmt: skip
            conf = self.api.get(conf_path)
            hooks = conf.get("webhooks") or []
            stale = [h for h in hooks if (h.get("clientConfig") or {}).get("caBundle") != want]
            if not stale:
                return
            for hook in stale:
                hook.setdefault("clientConfig", {})["caBundle"] = want
            try:
                self.api.replace(conf_path, conf)
                log.info("caBundle of %s set to the webhook CA", self.settings.configuration)
                return
            except rest.Conflict:
                continue


def write_private(path: Path, content: bytes) -> None:
    """Write ``content`` readable by the owner only, replacing ``path`` atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    os.replace(tmp, path)
