"""Quantities are read as the API server reads them (binary, decimal and exponent suffixes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubehv.api import quantity


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("128Mi", 128 * 2**20),
        ("1Gi", 2**30),
        ("1.5Gi", 3 * 2**29),
        ("512M", 512 * 10**6),
        ("1k", 1000),
        ("1e3", 1000),
        ("2E6", 2_000_000),
        ("134217728", 134217728),
        (134217728, 134217728),
        ("100m", 1),  # a fraction of a byte rounds up, as Kubernetes does
        (".5Ki", 512),
    ],
)
def test_parse_quantity(text: str | int, size: int) -> None:
    assert quantity.parse_quantity(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12MB", "1.2.3", "Mi", "1 Gi", "--1"])
def test_parse_quantity_refuses_garbage(text: str) -> None:
    with pytest.raises(quantity.QuantityError):
        quantity.parse_quantity(text)


def test_bool_is_not_a_quantity() -> None:
    with pytest.raises(quantity.QuantityError):
        quantity.parse_quantity(True)


@pytest.mark.parametrize(
    ("text", "mib"), [("128Mi", 128), ("1Gi", 1024), ("1M", 1), ("1", 1), ("64Mi", 64)]
)
def test_to_mib_rounds_up(text: str, mib: int) -> None:
    assert quantity.to_mib(text) == mib


@given(st.integers(min_value=0, max_value=2**40))
def test_format_bytes_round_trips(size: int) -> None:
    assert quantity.parse_quantity(quantity.format_bytes(size)) == size


@given(st.integers(min_value=0, max_value=2**30))
def test_format_mib_round_trips(mib: int) -> None:
    assert quantity.to_mib(quantity.format_mib(mib)) == mib
