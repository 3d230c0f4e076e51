"""TLS material for the local control plane, generated in Python with ``cryptography``.

Why: kube-apiserver serves only TLS and needs a service-account signing key; tests need an
admin identity the server trusts. Generating these in-process (no openssl, no cfssl) keeps
the harness self-contained and fast. ECDSA P-256 keys: quick to generate, accepted by
kube-apiserver for serving, client authentication and service-account tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
DEFAULT_SANS_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
DEFAULT_SANS_IP = ("127.0.0.1", "10.0.0.1")


@dataclasses.dataclass(frozen=True)
class ControlPlaneCerts:
    """Paths of the PEM files written by :func:`generate`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path  # private key: --service-account-signing-key-file
    sa_pub: Path  # public key: --service-account-key-file


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    usage: x509.ObjectIdentifier | None,
    is_ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not is_ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def generate(
    directory: Path,
    *,
    admin_user: str = "kubehv-admin",
    admin_group: str = "system:masters",
    extra_dns: tuple[str, ...] = (),
    extra_ips: tuple[str, ...] = (),
) -> ControlPlaneCerts:
    """Write a CA, the apiserver serving pair, an admin client pair and the SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = ControlPlaneCerts(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    ca_key = _key()
    ca_name = _name("kubehv-devenv-ca")
    ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, usage=None, is_ca=True)
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (*DEFAULT_SANS_DNS, *extra_dns)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (*DEFAULT_SANS_IP, *extra_ips)]
    serving_key = _key()
    serving = _issue(
        _name("kube-apiserver"),
        serving_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )
    _write_key(paths.serving_key, serving_key)
    _write_cert(paths.serving_cert, serving)

    admin_key = _key()
    admin = _issue(
        _name(admin_user, admin_group),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    _write_key(paths.admin_key, admin_key)
    _write_cert(paths.admin_cert, admin)

    sa_key = _key()
    _write_key(paths.sa_key, sa_key)
    paths.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return paths
