"""Kubernetes quantities ("128Mi", "1G", "0.5Gi") as used for memory in the kubehv API.

Why this module exists: manifests state memory as Kubernetes quantity strings, while drivers
speak mebibytes and bytes. This is the one parser, written to the same grammar the API server
enforces (the pattern below is also the CRD's), so that a value the server accepts is a value
the operator can read, and the same checks run in Python and in the server.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import pydantic

# The quantity grammar of k8s.io/apimachinery (signed), as controller-gen emits it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_SPLIT_RE = re.compile(r"^([+-]?[0-9.]+)(.*)$")

MIB = 2**20


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


def parse_decimal(value: str | int) -> Decimal:
    """The exact value of a quantity (``"1.5Ki"`` -> ``Decimal(1536)``)."""
    if isinstance(value, bool):
        raise QuantityError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    text = value.strip()
    if not _QUANTITY_RE.match(text):
        raise QuantityError(
            f"not a Kubernetes quantity: {value!r} (examples: 128Mi, 1Gi, 512M, 1073741824)"
        )
    match = _SPLIT_RE.match(text)
    if match is None:  # pragma: no cover - the pattern above already guarantees a match
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the pattern guarantees digits
        raise QuantityError(f"not a Kubernetes quantity: {value!r}") from exc
    if suffix in _BINARY:
        return amount * _BINARY[suffix]
    if suffix in _DECIMAL:
        return amount * _DECIMAL[suffix]
    # Exponent form: 1e3, 2E6
    return Decimal(f"{number}{suffix}")


def parse_quantity(value: str | int) -> int:
    """A quantity in bytes, rounded up to a whole byte as Kubernetes does (``"128Mi"`` ->
    134217728)."""
    exact = parse_decimal(value)
    whole = int(exact.to_integral_value(rounding="ROUND_CEILING"))
    return whole


def to_mib(value: str | int) -> int:
    """A quantity in whole mebibytes, rounded up (``"1Gi"`` -> 1024, ``"1M"`` -> 1)."""
    size = parse_quantity(value)
    return -(-size // MIB)


def format_mib(mib: int) -> str:
    """Mebibytes as the shortest exact quantity string (1024 -> ``"1Gi"``, 96 -> ``"96Mi"``)."""
    if mib != 0 and mib % 1024 == 0:
        return f"{mib // 1024}Gi"
    return f"{mib}Mi"


def format_bytes(size: int) -> str:
    """Bytes as the shortest exact binary quantity string (134217728 -> ``"128Mi"``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if size != 0 and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def _coerce(value: Any) -> Any:
    # The server stores x-kubernetes-int-or-string quantities as given: 134217728 or "128Mi".
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _check(value: str) -> str:
    parse_decimal(value)
    return value


QUANTITY_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
    "pattern": QUANTITY_PATTERN,
}

Quantity = Annotated[
    str,
    pydantic.BeforeValidator(_coerce),
    pydantic.AfterValidator(_check),
    pydantic.WithJsonSchema(QUANTITY_JSON_SCHEMA),
]
"""A Kubernetes quantity string; integers (bytes) are accepted and kept as their string."""
