"""E2E fixtures: the kvm driver on two libvirt nodes, agents + controller as processes.

Why: issue 4's end-to-end proof needs every real part at once. The pieces come from their
owners' fixtures (tests.fixtures.libvirt: ``libvirt_nodes``, ``guest_image``;
tests.fixtures.operator: ``OperatorCluster``); this file only composes them. When a piece is
missing the tests skip, and fail under KUBEHV_REQUIRE_REAL=1 (tests.fixtures.real).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures import operator as operator_fixtures
from tests.fixtures.real import missing_real_part


@pytest.fixture
def kvm_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    factory = getattr(operator_fixtures, "kvm_operator_cluster", None)
    if factory is None:
        missing_real_part(
            "kvm operator cluster",
            "tests.fixtures.operator has no kvm_operator_cluster(libvirt_nodes, ...) yet",
        )
    try:
        nodes = request.getfixturevalue("libvirt_nodes")
        image = request.getfixturevalue("guest_image")
    except pytest.FixtureLookupError as exc:
        missing_real_part("libvirt nodes", str(exc))
    with factory(request, nodes, image) as cluster:
        yield cluster
