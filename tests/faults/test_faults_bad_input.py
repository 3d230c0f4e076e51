"""Bad input at scale: generated VirtualInstances and Migrations through the real API server.

Why: every field of a VirtualInstance or Migration is tenant input that ends up in driver
calls and, for kvm, in domain XML run by root. Property-based generation (hypothesis) mixes
valid-ish and invalid quantities, names, wrong types, huge numbers and XML metacharacters.
Each object must be either refused at admission (CRD schema, CEL or the controller's
webhook) with a message, or be handled to an explained state: Running/Stopped/Paused, or a
condition with a reason and a message. The controller and agents must not crash, and for
kvm-type specs the libvirt driver's domain XML must parse and carry every string as data
(no injected elements). A fixed number of examples, no deadline: the API server sets the pace.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import Any

import fault_helpers as fh
import kubernetes
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kubehv.drivers import errors
from kubehv.drivers.libvirt import domxml
from kubehv.drivers.libvirt import params as hvparams
from kubehv.drivers.libvirt.driver import LibvirtHypervisor
from kubehv.operator import translate
from tests.fixtures.operator import GROUP, VERSION, OperatorCluster, wait_for

pytestmark = pytest.mark.apiserver

KUBEHV_NS = "{" + domxml.NAMESPACE + "}"

fault_cluster = fh.cluster_fixture("fbad")

NASTY = ["<", ">", "&", "'", '"', "]]>", "<qemu:commandline/>", "\n", "${x}", ";", "\x00", "é"]
nasty_text = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=6)), max_size=4).map(
    "".join
)
quantity = st.one_of(
    st.sampled_from(["64Mi", "128Mi", "256Mi", "1Gi", "0", "-1Mi", "1e3", "1.5Gi", "abc", ""]),
    st.sampled_from(["99999999999Ti", "1Ei", "0.5Ki", "10m"]),
    st.integers(min_value=-(2**63), max_value=2**63),
)
huge_int = st.one_of(st.integers(-5, 300), st.sampled_from([2**31, 2**53, 2**63 - 1, -(2**63)]))
param_value = st.one_of(
    nasty_text, huge_int, st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
param_key = st.one_of(
    st.sampled_from([
        "migration_duration_s", "fail_start", "crash_after_s", "kernel_args", "machine_type",
        "cpu_model", "accelerator", "kernel_path", "disk_cache", "unknown_param",
    ]),
    nasty_text.filter(bool),
)  # fmt: skip


def maybe(draw: Any, good: Any, bad: Any) -> Any:
    """Mostly a valid value, one time in four a bad one: keeps half the objects admissible."""
    return draw(bad) if draw(st.integers(0, 3)) == 0 else draw(good)


@st.composite
def vi_specs(draw: Any) -> tuple[str, dict[str, Any]]:
    bad_name = st.sampled_from(["Bad_Name", "x" * 300, "-dash", "a<b"])
    name = f"{maybe(draw, st.just('h'), bad_name)}-{uuid.uuid4().hex[:8]}"
    hypervisor = maybe(draw, st.sampled_from(["fake", "kvm"]), st.sampled_from(["xen<&>", ""]))
    low = maybe(draw, st.sampled_from(["64Mi", "128Mi", "256Mi"]), quantity)
    high = maybe(draw, st.sampled_from(["256Mi", "512Mi", "1Gi", "100Gi"]), quantity)
    spec: dict[str, Any] = {
        "hypervisor": hypervisor,
        "memory": {"min": low, "max": high},
        "vcpus": maybe(draw, st.integers(1, 4), st.one_of(huge_int, st.just("2"), st.just(1.5))),
        "runState": maybe(
            draw, st.sampled_from(["Running", "Running", "Stopped", "Paused"]), st.just("Bogus")
        ),
    }
    good_params: Any
    if draw(st.booleans()):
        if hypervisor == "kvm":
            good_params = st.fixed_dictionaries({}, optional={
                "kernel_args": nasty_text, "machine_type": st.sampled_from(["pc", "q35"]),
                "disk_cache": st.sampled_from(hvparams.DISK_CACHES),
                "accelerator": st.just("tcg"), "cpu_model": nasty_text,
            })  # fmt: skip
        else:
            good_params = st.fixed_dictionaries({}, optional={
                "migration_duration_s": st.floats(0, 1), "fail_start": st.booleans(),
                "crash_after_s": st.integers(1, 5),
            })  # fmt: skip
        spec["hypervisorParameters"] = maybe(
            draw, good_params, st.dictionaries(param_key, param_value, max_size=3)
        )
    if draw(st.booleans()):
        spec["boot"] = {"kernel": maybe(draw, st.just("/var/lib/kubehv/vmlinuz"), nasty_text),
                        "cmdline": draw(nasty_text)}  # fmt: skip
    if draw(st.booleans()):
        mac = maybe(draw, st.just("52:54:00:12:34:56"), nasty_text)
        kind = draw(st.sampled_from(["user", "bridge", "x"]))
        spec["nics"] = [{"type": kind, "source": draw(nasty_text), "mac": mac}]
    return name, spec


def explained(vi: dict[str, Any]) -> bool:
    status = vi.get("status") or {}
    phase = status.get("phase") or ""
    if phase in ("Running", "Stopped", "Paused"):
        return True
    told = [
        c for c in status.get("conditions") or []
        if c.get("status") == "False" and c.get("reason") and c.get("message")
    ]  # fmt: skip
    return phase in ("Failed", "Pending", "") and bool(told)


def check_domain_xml(body: dict[str, Any]) -> None:
    """kvm specs: the domain XML parses, round-trips, and carries every string as data."""
    try:
        spec = translate.instance_spec(body)
        LibvirtHypervisor.check_instance_spec(spec)
        params = hvparams.instance_params(spec)
    except (errors.HypervisorError, ValueError):
        return  # refused before any XML is built: nothing can be injected
    settings_ = domxml.DomainSettings(
        domain_type="qemu", serial_log_dir="/nonexistent", startup_memory_mib=spec.memory_min_mib
    )
    text = domxml.build(spec, params, settings_)
    root = ET.fromstring(text)
    assert root.tag == "domain" and root.findtext("name") == spec.name
    assert domxml.canonical(domxml.to_text(domxml.parse(text))) == domxml.canonical(text)
    tags = {el.tag for el in root.iter()}
    foreign = {t for t in tags if t.startswith("{") and not t.startswith(KUBEHV_NS)}
    assert not foreign and not any("commandline" in t for t in tags), tags
    if spec.boot is not None:
        assert root.findtext("os/cmdline") in (spec.boot.cmdline, None, "")


def _create(c: OperatorCluster, namespace: str, plural: str, body: dict[str, Any]) -> Any:
    try:
        return c.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    except kubernetes.client.ApiException as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.body)
        assert exc.body and "message" in str(exc.body), exc.body
        return None
    except ValueError as exc:  # the client refuses to send it (e.g. an invalid float)
        assert str(exc)
        return None


@settings(
    max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(case=vi_specs())
def test_generated_instances_rejected_or_explained(
    fault_cluster: OperatorCluster, case: tuple[str, dict[str, Any]]
) -> None:
    c = fault_cluster
    namespace = fh.shared_namespace(c, "fbad-vi")
    name, spec = case
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip
    created = _create(c, namespace, "virtualinstances", body)
    event("refused at admission" if created is None else "admitted")
    if created is None:
        return
    if created["spec"].get("hypervisor") == "kvm":
        check_domain_xml(created)
    vi = c.wait_vi(namespace, name, explained, 60, f"{name} explained")
    event(f"admitted, then {(vi.get('status') or {}).get('phase') or 'no phase'}")
    c.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "virtualinstances", name)


@st.composite
def migration_specs(draw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "instance": maybe(draw, st.sampled_from(["anchor", "ghost"]), nasty_text),
    }
    if draw(st.booleans()):
        spec["targetNode"] = maybe(draw, st.just("nowhere"), nasty_text)
    good = {
        "mode": st.sampled_from(["live", "non-live"]),
        "bandwidth": st.integers(1, 2**31),
        "maxDowntime": st.integers(1, 10_000),
        "completionTimeout": st.integers(1, 3600),
    }
    for key, values_ in good.items():
        if draw(st.booleans()):
            spec[key] = maybe(draw, values_, st.one_of(huge_int, nasty_text))
    return spec


@settings(
    max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(spec=migration_specs())
def test_generated_migrations_rejected_or_terminal(
    fault_cluster: OperatorCluster, spec: dict[str, Any]
) -> None:
    c = fault_cluster
    namespace = fh.shared_namespace(c, "fbad-mig")
    if c.get_vi(namespace, "anchor") is None:
        c.create_vi(namespace, "anchor")
    c.wait_phase(namespace, "anchor", "Running")
    name = f"m-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Migration",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip
    created = _create(c, namespace, "migrations", body)
    event("refused at admission" if created is None else "admitted")
    if created is None:
        return

    def terminal() -> dict[str, Any] | None:
        m = fh.get_migration(c, namespace, name)
        st_ = m.get("status") or {}
        return m if st_.get("phase") in ("Succeeded", "Failed", "Aborted") else None

    m = wait_for(terminal, 90, f"Migration {name} terminal")
    assert m is not None
    event(f"admitted, then {m['status']['phase']}")
    if m["status"]["phase"] != "Succeeded":
        assert m["status"].get("failureReason"), m["status"]
    # Whatever the outcome, the instance is handed back: Running again, not left Migrating.
    try:
        c.wait_phase(namespace, "anchor", "Running", timeout=60)
    except AssertionError as exc:
        migs = c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "migrations")
        brief = [(i["metadata"]["name"], i["spec"], i.get("status")) for i in migs["items"]]
        raise AssertionError(f"{exc}\nmigrations: {brief}") from exc


def test_zz_no_process_crashed(fault_cluster: OperatorCluster) -> None:
    """After all of the above: every process is alive and no log holds a traceback."""
    for proc in [fault_cluster.controller, *fault_cluster.agents.values()]:
        assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
        text = proc.log.read_text(errors="replace")
        assert "Traceback" not in text, f"{proc.name} logged a traceback:\n{proc.tail(120)}"
