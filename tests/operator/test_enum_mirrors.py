"""Every value the API accepts has its twin in the driver contract.

Why: the drivers may not import the API models (import-linter), so the enums a disk, a NIC
and the firmware are described with exist twice, ``kubehv.api`` (what the CRD schema and the
webhook admit) and ``kubehv.drivers.values`` (what drivers are given); ``operator/translate.py``
maps one onto the other by value. A value added to the API and forgotten in the driver
contract would pass admission and then fail every start of that instance; this test fails
first.
"""

from __future__ import annotations

import enum

import pytest

from kubehv.api import virtualinstance as vim
from kubehv.api import workloads as wl
from kubehv.drivers import values

PAIRS: list[tuple[type[enum.StrEnum], type[enum.StrEnum]]] = [
    (wl.DiskType, values.DiskKind),
    (wl.DiskFormat, values.DiskFormat),
    (wl.DiskBus, values.DiskBus),
    (wl.DeletePolicy, values.DeletePolicy),
    (wl.Firmware, values.Firmware),
    (vim.NicType, values.NicKind),
    (vim.NicModel, values.NicModel),
]


@pytest.mark.parametrize(("admitted", "driven"), PAIRS, ids=[a.__name__ for a, _ in PAIRS])
def test_every_admitted_value_reaches_the_driver(
    admitted: type[enum.StrEnum], driven: type[enum.StrEnum]
) -> None:
    missing = {m.value for m in admitted} - {m.value for m in driven}
    assert not missing, (
        f"{admitted.__name__} admits {sorted(missing)}; {driven.__name__} lacks them"
    )
