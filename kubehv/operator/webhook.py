"""The validating admission webhook: the driver's cluster-side checks at the API's door.

Why this module exists: a VirtualInstance with an unknown or malformed hypervisor parameter
should be refused by ``kubectl apply`` with the driver's own message, not accepted and
failed later on a node. :func:`problems` is the pure check (driver class lookup,
``check_instance_spec``, which includes ``check_parameter_syntax``); :func:`register` wires it
into kopf (``kopf.on.validate``). Node-side checks (files present, KVM usable) stay in the
agent: the webhook does no I/O. :func:`self_signed` makes a certificate for a webhook
server on loopback (tests, the demo) with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubehv.drivers import errors
from kubehv.drivers import registry as driver_registry
from kubehv.operator import k8s, translate


def problems(vi: Mapping[str, Any]) -> str | None:
    """Why this VirtualInstance is refused, or ``None`` if it passes the driver's checks."""
    spec = vi.get("spec") or {}
    hypervisor = str(spec.get("hypervisor") or "kvm")
    try:
        cls = driver_registry.get_driver_class(hypervisor)
    except errors.UnknownDriver as exc:
        return exc.message
    try:
        instance = translate.instance_spec(vi)
        cls.check_instance_spec(instance)
    except errors.HypervisorError as exc:
        return exc.message
    except ValueError as exc:
        return str(exc)
    return None


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.validate(
        k8s.GROUP,
        k8s.VI_PLURAL,
        registry=registry,
        id="virtualinstance",
        operations=["CREATE", "UPDATE"],
    )
    def validate_vi(body: kopf.Body, **_: Any) -> None:
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        why = problems(dict(body))
        if why:
            raise kopf.AdmissionError(why, code=422)


def self_signed(directory: str, host: str) -> tuple[str, str, bytes]:
    """(certfile, keyfile, cert PEM) for ``host`` (an IP or a DNS name), valid a year."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    certfile = os.path.join(directory, "webhook.crt")
    keyfile = os.path.join(directory, "webhook.key")
    with open(certfile, "wb") as fh:
        fh.write(pem)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certfile, keyfile, pem
