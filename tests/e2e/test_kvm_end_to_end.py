"""End to end on real guests: kubectl apply -> boot -> balloon -> live Migration -> stop -> delete.

Checks what a person would check: the serial marker, ``kubectl wait``, the balloon's actual
memory, ``virsh`` on each node, and the statuses; never timings.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def kubectl(cluster: Any, *args: str, stdin: str | None = None) -> str:
    out: str = cluster.kubectl(*args, input=stdin)
    return out


def vi_manifest(name: str, namespace: str, image: Any, memory: tuple[int, int]) -> str:
    return json.dumps(
        {
            "apiVersion": "kubehv.io/v1alpha1",
            "kind": "VirtualInstance",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "hypervisor": "kvm",
                "memory": {"min": f"{memory[0]}Mi", "max": f"{memory[1]}Mi"},
                "vcpus": 1,
                "runState": "Running",
                "boot": {
                    "kernel": str(image.kernel),
                    "initrd": str(image.initrd),
                    "cmdline": "console=ttyS0",
                },
                "params": {"accelerator": "tcg"},
            },
        }
    )


def status(cluster: Any, kind: str, namespace: str, name: str) -> dict[str, Any]:
    body = json.loads(kubectl(cluster, "get", kind, name, "-n", namespace, "-o", "json"))
    result: dict[str, Any] = body.get("status") or {}
    return result


def wait(what: str, probe: Any, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_vm_lifecycle_and_live_migration(kvm_cluster: Any, namespace: str) -> None:
    cluster = kvm_cluster
    image = cluster.guest_image
    kubectl(cluster, "apply", "-f", "-", stdin=vi_manifest("e2e-vm", namespace, image, (64, 128)))
    kubectl(
        cluster,
        "wait",
        "--for=condition=Ready",
        "virtualinstance/e2e-vm",
        "-n",
        namespace,
        "--timeout=180s",
    )
    source = status(cluster, "virtualinstance", namespace, "e2e-vm")["nodeName"]
    node = cluster.libvirt_nodes[source]
    assert cluster.wait_for_serial_marker(source, "e2e-vm")

    # balloon
    kubectl(
        cluster,
        "patch",
        "virtualinstance",
        "e2e-vm",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"memory": {"min": "64Mi", "max": "96Mi"}}}),
    )
    wait(
        "balloon to 96 MiB", lambda: cluster.guest_actual_memory_kib(source, "e2e-vm") <= 96 * 1024
    )

    # live migration with progress
    target = next(n for n in cluster.libvirt_nodes if n != source)
    mig = {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "Migration",
        "metadata": {"name": "e2e-mig", "namespace": namespace},
        "spec": {"instance": "e2e-vm", "targetNode": target, "mode": "live", "bandwidth": 20},
    }
    kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(mig))
    progress_seen: list[Any] = []

    def done() -> str | None:
        st = status(cluster, "migration", namespace, "e2e-mig")
        if st.get("phase") == "Running" and st.get("progress"):
            progress_seen.append(st["progress"])
        return st.get("phase") if st.get("phase") in ("Succeeded", "Failed", "Aborted") else None

    assert wait("migration to finish", done, 300) == "Succeeded"
    assert progress_seen
    assert "e2e-vm" in cluster.libvirt_nodes[target].virsh("list", "--name")
    assert "e2e-vm" not in node.virsh("list", "--all", "--name")

    # migration to an unreachable target fails; the guest stays where it is
    cluster.make_unreachable(source)
    try:
        mig["metadata"]["name"] = "e2e-mig-bad"
        mig["spec"]["targetNode"] = source
        kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(mig))

        def bad_done() -> str | None:
            ph = status(cluster, "migration", namespace, "e2e-mig-bad").get("phase")
            return ph if ph in ("Succeeded", "Failed", "Aborted") else None

        assert wait("bad migration to end", bad_done, 300) == "Failed"
        assert "e2e-vm" in cluster.libvirt_nodes[target].virsh("list", "--name")
    finally:
        cluster.make_reachable(source)

    # stop, then delete
    kubectl(
        cluster,
        "patch",
        "virtualinstance",
        "e2e-vm",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"runState": "Stopped"}}),
    )
    wait(
        "domain shut off",
        lambda: "e2e-vm" not in cluster.libvirt_nodes[target].virsh("list", "--name"),
    )
    kubectl(cluster, "delete", "virtualinstance", "e2e-vm", "-n", namespace, "--timeout=120s")
    assert "e2e-vm" not in cluster.libvirt_nodes[target].virsh("list", "--all", "--name")
