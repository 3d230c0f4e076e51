"""End to end on real guests: kubectl apply -> boot -> balloon -> live Migration -> stop -> delete.

Why: each piece has its own tests; only this proves they compose. It checks what a person
would check: ``kubectl apply``/``wait``/``patch``/``delete``, the guest's serial console
(boot and alive markers), the balloon's ``actual`` size from ``virsh dommemstat``, ``virsh
list`` on each node, and the objects' statuses; never timings. The tests run in file order on
one guest (module-scoped cluster); ``state`` carries where the guest is between them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from kubehv.devenv import serial

if TYPE_CHECKING:
    from tests.e2e.conftest import KvmCluster

pytestmark = [pytest.mark.e2e, pytest.mark.real_libvirt, pytest.mark.apiserver]

VM = "e2e-vm"
T = TypeVar("T")
TERMINAL = ("Succeeded", "Failed", "Aborted")


def wait(
    what: str, probe: Callable[[], T | None], timeout: float = 180.0, interval: float = 0.3
) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
        time.sleep(interval)


def dom(namespace: str) -> str:
    """The libvirt domain of the VirtualInstance: ``<namespace>.<name>`` (translate.py)."""
    return f"{namespace}.{VM}"


def migration_manifest(name: str, namespace: str, target: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubehv.io/v1alpha1",
            "kind": "Migration",
            "metadata": {"name": name, "namespace": namespace},
            # 8 MiB/s: a 128 MiB guest takes several progress intervals to copy.
            "spec": {"instance": VM, "targetNode": target, "mode": "live", "bandwidth": 8},
        }
    )


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def _vi_status(cluster: KvmCluster, ns: str) -> dict[str, Any]:
    vi = cluster.get("virtualinstances", ns, VM) or {}
    return dict(vi.get("status") or {})


def _need(state: dict[str, Any], key: str) -> Any:
    if key not in state:
        pytest.fail(f"an earlier step did not complete (no {key!r})")
    return state[key]


def test_apply_boots_a_real_guest(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    cluster, ns = kvm_cluster, e2e_namespace
    cluster.kubectl("apply", "-f", "-", stdin=cluster.guest_manifest(ns, VM))
    started = time.monotonic()
    cluster.kubectl(
        "wait", "--for=condition=Ready", f"virtualinstance/{VM}", "-n", ns, "--timeout=180s"
    )
    state["ready_after_s"] = time.monotonic() - started  # reported, never asserted
    st = _vi_status(cluster, ns)
    assert st.get("phase") == "Running"
    node = st.get("nodeName")
    assert node in cluster.nodes, st
    serial.wait_for_marker(cluster.serial_log(node, dom(ns)), cluster.image.boot_marker)
    booted_after_s = time.monotonic() - started  # reported, never asserted
    assert dom(ns) in cluster.domains(node)
    other = next(n for n in cluster.nodes if n != node)
    assert dom(ns) not in cluster.domains(other, all_=True)
    state["node"] = node
    print(
        f"MEASURED apply->Ready {state['ready_after_s']:.1f}s, "
        f"apply->boot marker {booted_after_s:.1f}s on {node}"
    )


def test_memory_patch_moves_the_balloon(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    cluster, ns = kvm_cluster, e2e_namespace
    node = _need(state, "node")
    # The guest loads virtio_balloon at boot; wait until the balloon reports its full size.
    before = wait("balloon at 128 MiB", lambda: cluster.balloon_actual_kib(node, dom(ns)))
    assert before == 128 * 1024
    patch = {"spec": {"memory": {"min": "64Mi", "max": "96Mi"}}}
    cluster.kubectl(
        "patch", "virtualinstance", VM, "-n", ns, "--type=merge", "-p", json.dumps(patch)
    )
    after = wait(
        "balloon actual at 96 MiB",
        lambda: cluster.balloon_actual_kib(node, dom(ns)) == 96 * 1024,
        timeout=120,
    )
    assert after
    wait(
        "status.actualMemory 96Mi",
        lambda: _vi_status(cluster, ns).get("actualMemory") == "96Mi",
        timeout=60,
    )


def test_live_migration_succeeds_with_progress(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    cluster, ns = kvm_cluster, e2e_namespace
    source = _need(state, "node")
    target = next(n for n in cluster.nodes if n != source)
    source_log, target_log = (
        cluster.serial_log(source, dom(ns)),
        cluster.serial_log(target, dom(ns)),
    )
    alive_before = wait("alive markers on the source", lambda: serial.alive_counters(source_log))

    cluster.kubectl("apply", "-f", "-", stdin=migration_manifest("e2e-move", ns, target))
    started = time.monotonic()
    progress_seen: list[dict[str, Any]] = []

    def finished() -> str | None:
        mig = cluster.get("migrations", ns, "e2e-move") or {}
        st = mig.get("status") or {}
        if st.get("phase") == "Running" and st.get("progress"):
            progress_seen.append(st["progress"])
        return st.get("phase") if st.get("phase") in TERMINAL else None

    phase = wait("the migration to end", finished, timeout=240, interval=0.2)
    state["migration_s"] = time.monotonic() - started  # reported, never asserted
    mig_status = (cluster.get("migrations", ns, "e2e-move") or {}).get("status")
    assert phase == "Succeeded", mig_status
    print(f"MEASURED Migration apply->Succeeded {state['migration_s']:.1f}s")
    assert progress_seen, "status.progress never seen while Running"
    assert any(p.get("memoryProcessed", 0) > 0 for p in progress_seen), progress_seen
    assert all(p.get("memoryTotal", 0) > 0 for p in progress_seen), progress_seen

    # The guest runs on the target and is gone from the source, by virsh on each node.
    assert dom(ns) in cluster.domains(target)
    wait(
        "the domain gone from the source", lambda: dom(ns) not in cluster.domains(source, all_=True)
    )
    # Same guest, not a reboot: no boot marker on the target, alive counters go on past the
    # last one the source printed.
    last_on_source = max(serial.alive_counters(source_log) or alive_before)
    wait(
        "alive markers continuing on the target",
        lambda: any(n > last_on_source for n in serial.alive_counters(target_log)),
        timeout=120,
    )
    assert serial.count_marker(target_log, cluster.image.boot_marker) == 0
    wait("status.nodeName = target", lambda: _vi_status(cluster, ns).get("nodeName") == target)
    assert _vi_status(cluster, ns).get("phase") == "Running"
    state["node"] = target


def test_migration_to_unreachable_target_fails_and_guest_stays(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    """The target's agent is healthy, but the source cannot reach the target's libvirt."""
    cluster, ns = kvm_cluster, e2e_namespace
    source = _need(state, "node")
    target = next(n for n in cluster.nodes if n != source)
    original = cluster.nhv(target)["spec"]
    partition = {
        "spec": {
            "connectionURI": cluster.node_set.unreachable_uri,
            "migrationAddress": cluster.node_set.unreachable_address,
        }
    }
    cluster.kubectl("patch", "nodehypervisor", target, "--type=merge", "-p", json.dumps(partition))
    try:
        cluster.kubectl("apply", "-f", "-", stdin=migration_manifest("e2e-unreachable", ns, target))

        def finished() -> str | None:
            st = (cluster.get("migrations", ns, "e2e-unreachable") or {}).get("status") or {}
            return st.get("phase") if st.get("phase") in TERMINAL else None

        phase = wait("the migration to end", finished, timeout=240)
        mig_status = (cluster.get("migrations", ns, "e2e-unreachable") or {}).get("status")
        assert phase == "Failed", mig_status
        # Failed by the copy itself (the source's libvirt could not reach the target), not
        # refused up front by the scheduler.
        assert mig_status is not None
        assert mig_status.get("failureReason"), mig_status
        assert mig_status.get("sourceNode") == source, mig_status
        print(f"unreachable target: {mig_status['failureReason']}")
    finally:
        restore = {
            "spec": {
                "connectionURI": original["connectionURI"],
                "migrationAddress": original["migrationAddress"],
            }
        }
        cluster.kubectl(
            "patch", "nodehypervisor", target, "--type=merge", "-p", json.dumps(restore)
        )
    # Still running on the source, never defined on the target, and the object says so.
    assert dom(ns) in cluster.domains(source)
    assert dom(ns) not in cluster.domains(target, all_=True)
    log = cluster.serial_log(source, dom(ns))
    seen = max(serial.alive_counters(log))
    wait("the guest still alive on the source", lambda: max(serial.alive_counters(log)) > seen)
    wait(
        "the instance Running on the source",
        lambda: (
            _vi_status(cluster, ns).get("phase") == "Running"
            and _vi_status(cluster, ns).get("nodeName") == source
        ),
        timeout=60,
    )


def test_run_state_stopped_shuts_the_domain_down(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    cluster, ns = kvm_cluster, e2e_namespace
    node = _need(state, "node")
    patch = {"spec": {"runState": "Stopped"}}
    cluster.kubectl(
        "patch", "virtualinstance", VM, "-n", ns, "--type=merge", "-p", json.dumps(patch)
    )
    wait("the domain not running", lambda: dom(ns) not in cluster.domains(node), timeout=120)
    wait("phase Stopped", lambda: _vi_status(cluster, ns).get("phase") == "Stopped", timeout=60)
    assert all(dom(ns) not in cluster.domains(n) for n in cluster.nodes)


def test_delete_removes_domain_and_finalizers(
    kvm_cluster: KvmCluster, e2e_namespace: str, state: dict[str, Any]
) -> None:
    cluster, ns = kvm_cluster, e2e_namespace
    _need(state, "node")
    # kubectl delete waits until the object is gone: i.e. the agent's finalizer was removed.
    cluster.kubectl("delete", "virtualinstance", VM, "-n", ns, "--timeout=120s")
    assert cluster.get("virtualinstances", ns, VM) is None
    for node in cluster.nodes:
        assert dom(ns) not in cluster.domains(node, all_=True), node
