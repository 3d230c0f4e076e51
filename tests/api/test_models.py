"""The pydantic models read the examples, apply the documented defaults and round-trip."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from kubehv import api
from kubehv.api import migration as mig
from kubehv.api import virtualinstance as vi
from tests.api import manifests as m

MODELS: dict[str, type[pydantic.BaseModel]] = {
    "VirtualInstance": api.VirtualInstance,
    "Migration": api.Migration,
    "NodeHypervisor": api.NodeHypervisor,
}


@pytest.mark.parametrize("path", m.example_files(), ids=lambda p: p.name)
def test_every_example_parses(path: Any) -> None:
    doc = m.load_example(path.name)
    obj = MODELS[doc["kind"]].model_validate(doc)
    assert obj.model_dump(by_alias=True)["metadata"]["name"] == doc["metadata"]["name"]


def test_examples_cover_every_kind() -> None:
    kinds = {m.load_example(p.name)["kind"] for p in m.example_files()}
    assert kinds == set(MODELS)
    hypervisors = {
        m.load_example(p.name)["spec"].get("hypervisor")
        for p in m.example_files()
        if m.load_example(p.name)["kind"] == "VirtualInstance"
    }
    assert {"fake", "kvm"} <= hypervisors


def test_virtualinstance_defaults() -> None:
    obj = api.VirtualInstance.model_validate(m.vi())
    spec = obj.spec
    assert spec.run_state is vi.RunState.RUNNING
    assert spec.vcpus == 1
    assert spec.eviction_policy is vi.EvictionPolicy.LIVE_MIGRATE
    assert spec.console.serial is True
    assert spec.console.vnc.enabled is False
    assert spec.auto_balloon.enabled is False
    assert spec.reboot_generation == 0
    assert (spec.memory.min_mib, spec.memory.max_mib) == (64, 128)
    assert obj.status.phase is None
    assert obj.status.conditions == []


def test_snake_case_and_camel_case_both_accepted() -> None:
    spec = api.VirtualInstanceSpec(
        memory=vi.MemorySpec(min="64Mi", max="128Mi"), run_state=vi.RunState.PAUSED
    )
    assert spec.to_dict()["runState"] == "Paused"
    again = api.VirtualInstanceSpec.model_validate(spec.to_dict())
    assert again == spec


def test_integer_quantity_is_kept_as_string() -> None:
    obj = api.VirtualInstance.model_validate(m.vi(memory={"min": 67108864, "max": "128Mi"}))
    assert obj.spec.memory.min == "67108864"
    assert obj.spec.memory.min_mib == 64


def test_hypervisor_parameters_keep_their_types() -> None:
    obj = api.VirtualInstance.model_validate(
        m.vi(hypervisorParameters={"accel": "tcg", "cpu_shares": 512, "acpi": True})
    )
    assert obj.spec.hypervisor_parameters == {"accel": "tcg", "cpu_shares": 512, "acpi": True}
    assert type(obj.spec.hypervisor_parameters["acpi"]) is bool


def test_status_round_trip_and_unknown_status_fields_ignored() -> None:
    doc = m.vi()
    doc["status"] = {
        "phase": "Running",
        "nodeName": "node-a",
        "actualMemory": "96Mi",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Up"}],
        "somethingNew": 1,
    }
    obj = api.VirtualInstance.model_validate(doc)
    assert obj.status.phase is vi.Phase.RUNNING
    assert vi.Phase.RUNNING not in vi.CONTROLLER_PHASES
    out = obj.to_dict()
    assert out["status"]["nodeName"] == "node-a"
    assert "somethingNew" not in out["status"]


def test_metadata_keeps_unknown_keys() -> None:
    doc = m.vi()
    doc["metadata"].update({"managedFields": [{"manager": "x"}], "labels": {"a": "b"}})
    obj = api.VirtualInstance.model_validate(doc)
    assert obj.metadata.labels == {"a": "b"}
    assert obj.to_dict()["metadata"]["managedFields"] == [{"manager": "x"}]


def test_migration_defaults_and_terminal_phases() -> None:
    obj = api.Migration.model_validate(m.mig())
    assert obj.spec.mode is mig.Mode.LIVE
    assert obj.spec.completion_timeout == 600
    assert obj.spec.allow_unsafe_version_pair is False
    assert mig.Phase.ABORTED in mig.TERMINAL_PHASES
    assert mig.Phase.RUNNING not in mig.TERMINAL_PHASES


def test_nodehypervisor_connection_uri_alias() -> None:
    obj = api.NodeHypervisor.model_validate(m.nhv(connectionURI="qemu:///system"))
    assert obj.spec.connection_uri == "qemu:///system"
    assert obj.spec.schedulable is True
    assert obj.spec.drain is False
    assert obj.to_dict()["spec"]["connectionURI"] == "qemu:///system"


def test_spec_refuses_unknown_python_fields() -> None:
    with pytest.raises(pydantic.ValidationError, match="colour"):
        api.MigrationSpec.model_validate({"instance": "x", "colour": "blue"})
