"""The driver contract suite run against the fake driver, with a second fake node as peer.

Why: the fake driver stands in for a real hypervisor in every operator test, so it must pass
exactly the contract the libvirt driver passes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubehv.drivers import fake, values
from tests.drivers import contract, contract_migration


def fake_node(path: Path, name: str, **params: values.ParamValue) -> fake.FakeHypervisor:
    config = values.DriverConfig(node_name=name, state_dir=str(path), params=params)
    return fake.FakeHypervisor(config)


def fake_spec(name: str, **overrides: Any) -> values.InstanceSpec:
    defaults: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "memory_min_mib": 128,
        "memory_max_mib": 256,
        "vcpus": 2,
        "params": {},
    }
    return values.InstanceSpec(name=name, **contract.merge_overrides(defaults, overrides))


@pytest.fixture
def contract_env(tmp_path: Path) -> Iterator[contract.ContractEnv]:
    source = fake_node(tmp_path / "node-a", "node-a", memory_total_mib=8192)
    target = fake_node(tmp_path / "node-b", "node-b", memory_total_mib=8192)
    yield contract.ContractEnv(
        driver=source,
        make_spec=fake_spec,
        peer=contract.Peer(driver=target, target=target.migration_target()),
        wait_stopped_timeout_s=10.0,
        settle_timeout_s=10.0,
        observe_boots=lambda spec: source.boot_count(spec.name),
        slow_migration={"params": {"migration_duration_s": 1.0}},
        unreachable_target=values.MigrationTarget(
            node="node-gone", address="192.0.2.1", uri=f"fake://{tmp_path}/no-such-node"
        ),
    )


class TestFakeContract(contract_migration.MigrationContract):
    pass
