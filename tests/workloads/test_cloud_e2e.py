"""Issue 12's "done when": a stock-style cloud image, cloud-init, SSH, storage migration.

Why: only the whole path proves it -- the real operator (controller + one agent per netns
libvirt node, as processes) downloads the image from a loopback HTTP server into the node's
cache, makes the instance's overlay and cloud-init seed, the real Debian guest's cloud-init
installs the test's SSH key, the node's NAT network hands out an address that the agent
publishes in ``status.interfaces``, and a live migration copies the overlay to the other
node while the guest keeps running. Then stop/start and delete. The error cases each end as
a condition with a reason a person understands and leave no file on either node.

SSH runs inside the node's network namespace: the NAT network is node-local by design.
Timings are printed (``-s``) for the record, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubehv.devenv.cloudimage import CloudImage
from kubehv.operator.drain import drain_migration_name
from tests.e2e.conftest import NODE_STORAGE, KvmCluster
from tests.fixtures.kube import fresh_namespace
from tests.fixtures.operator import wait_for
from tests.workloads.conftest import ImageServer, make_qcow2, sha256

pytestmark = [pytest.mark.e2e, pytest.mark.real_libvirt]

BOOT_TIMEOUT_S = 1200.0  # a full Debian with systemd and cloud-init under TCG, on a busy box


@pytest.fixture(scope="module")
def served(
    cloud_image: CloudImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("served")
    os.symlink(cloud_image.path, root / "debian.qcow2")
    server = ImageServer(root).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ns(kvm_cluster: KvmCluster) -> Iterator[str]:
    with fresh_namespace(kvm_cluster.control_plane, f"wl-{uuid.uuid4().hex[:6]}") as name:
        yield name


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def _vi(ns: str, name: str, node: str | None, disks: list[dict[str, Any]], **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "kubehv.io/v1alpha1",
            "kind": "VirtualInstance",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "hypervisor": "kvm",
                **({"nodeName": node} if node else {}),
                "memory": {"min": "512Mi", "max": "512Mi"},
                "disks": disks,
                "hypervisorParameters": {"accelerator": "tcg"},
                **spec,
            },
        }
    )


def _storage_files(cluster: KvmCluster, ns: str, name: str) -> list[str]:
    found = []
    for node in cluster.nodes.values():
        folder = Path(node.host_path(f"{NODE_STORAGE}/instances/{ns}/{name}"))
        if folder.exists():
            found += [f"{node.name}:{p}" for p in folder.iterdir()]
        images = Path(node.host_path(f"{NODE_STORAGE}/images"))
        if images.exists():
            found += [f"{node.name}:{p}" for p in images.glob(".*.part")]
    return found


def _phase(cluster: KvmCluster, ns: str, name: str) -> str:
    vi = cluster.get("virtualinstances", ns, name) or {}
    return str((vi.get("status") or {}).get("phase") or "")


class TestRefusals:
    """Each bad input: a condition with a reason a person understands, nothing left behind."""

    def _expect(
        self, cluster: KvmCluster, ns: str, name: str, manifest: str, reason: str, cond: str
    ) -> dict[str, Any]:
        cluster.kubectl("apply", "-f", "-", stdin=manifest)

        def found() -> dict[str, Any] | None:
            vi = cluster.get("virtualinstances", ns, name) or {}
            conds = (vi.get("status") or {}).get("conditions") or []
            return next(
                (c for c in conds if c.get("type") == cond and c.get("reason") == reason), None
            )

        got = wait_for(found, 240, f"{name}: {cond} reason {reason}", interval=1)
        assert _storage_files(cluster, ns, name) == []
        return got

    def test_wrong_sha256(self, kvm_cluster: KvmCluster, ns: str, served: ImageServer) -> None:
        """Served slowly: the download's progress shows in ImagesReady before the refusal."""
        node = next(iter(kvm_cluster.nodes))
        disk = {"image": {"url": served.url("debian.qcow2", "/slow"), "sha256": "0" * 64}}
        kvm_cluster.kubectl("apply", "-f", "-", stdin=_vi(ns, "badsum", node, [disk]))
        seen: list[str] = []

        def images_condition() -> dict[str, Any] | None:
            vi = kvm_cluster.get("virtualinstances", ns, "badsum") or {}
            conds = (vi.get("status") or {}).get("conditions") or []
            cond = next((c for c in conds if c.get("type") == "ImagesReady"), None)
            if cond is not None and cond.get("reason") == "Downloading":
                seen.append(cond["message"])
            return cond if cond is not None and cond.get("reason") != "Downloading" else None

        final = wait_for(images_condition, 240, "badsum: ImagesReady settles", interval=0.3)
        assert seen and "MiB (" in seen[0] and "downloading http://127.0.0.1:" in seen[0], seen
        assert final["status"] == "False" and final["reason"] == "ImageChecksumMismatch"
        got = self._expect(kvm_cluster, ns, "badsum", _vi(ns, "badsum", node, [disk]),
                           "ImageChecksumMismatch", "Ready")  # fmt: skip
        assert "not the 0000" in got["message"] and "was not used" in got["message"]

    def test_unreachable_url(self, kvm_cluster: KvmCluster, ns: str) -> None:
        node = next(iter(kvm_cluster.nodes))
        disk = {"image": {"url": "http://127.0.0.1:9/none.qcow2", "sha256": "a" * 64}}
        got = self._expect(kvm_cluster, ns, "unreach", _vi(ns, "unreach", node, [disk]),
                           "ImageDownloadFailed", "Ready")  # fmt: skip
        assert "cannot download the image http://127.0.0.1:9/none.qcow2" in got["message"]

    def test_image_larger_than_disk(
        self, kvm_cluster: KvmCluster, ns: str, served: ImageServer, cloud_image: CloudImage
    ) -> None:
        node = next(iter(kvm_cluster.nodes))
        url, digest = served.url("debian.qcow2"), cloud_image.sha256
        disk = {"image": {"url": url, "sha256": digest, "size": "64Mi"}}
        got = self._expect(kvm_cluster, ns, "small", _vi(ns, "small", node, [disk]),
                           "ImageTooLarge", "Ready")  # fmt: skip
        assert "larger than the disk size" in got["message"]

    def test_external_backing_file(
        self, kvm_cluster: KvmCluster, ns: str, served: ImageServer
    ) -> None:
        node = next(iter(kvm_cluster.nodes))
        bad = make_qcow2(served.root / "evil.qcow2", "16M", "-b", "/etc/shadow", "-F", "raw", "-u")
        disk = {"image": {"url": served.url("evil.qcow2"), "sha256": sha256(bad)}}
        got = self._expect(kvm_cluster, ns, "evil", _vi(ns, "evil", node, [disk]),
                           "ImageRefused", "Ready")  # fmt: skip
        assert "external backing file" in got["message"]

    def test_another_namespaces_disk(self, kvm_cluster: KvmCluster, ns: str) -> None:
        node = next(iter(kvm_cluster.nodes))
        disk = {"path": f"{NODE_STORAGE}/instances/other-team/db/root.qcow2", "format": "qcow2"}
        got = self._expect(kvm_cluster, ns, "thief", _vi(ns, "thief", node, [disk]),
                           "DiskPathForbidden", "Ready")  # fmt: skip
        assert "inside storage this node manages" in got["message"]

    def test_missing_secret(self, kvm_cluster: KvmCluster, ns: str, served: ImageServer) -> None:
        node = next(iter(kvm_cluster.nodes))
        disk = {"blank": {"size": "16Mi"}}
        secret_ref = {"userDataSecretRef": {"name": "gone", "key": "userdata"}}
        manifest = _vi(ns, "nosecret", node, [disk], cloudInit=secret_ref)
        got = self._expect(
            kvm_cluster, ns, "nosecret", manifest, "SecretNotFound", "ParametersValid"
        )
        assert "Secret 'gone'" in got["message"] and "not found" in got["message"]


def _ssh(
    cluster: KvmCluster, node: str, key: Path, ip: str, command: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        *cluster.nodes[node].nsenter_argv(), "ssh", "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
        f"debian@{ip}", command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _ssh_ok(cluster: KvmCluster, node: str, key: Path, ip: str, command: str) -> str:
    def attempt() -> tuple[str] | None:
        proc = _ssh(cluster, node, key, ip, command)
        return (proc.stdout,) if proc.returncode == 0 else None  # a tuple: "" is an answer too

    what = f"ssh debian@{ip} on {node}: {command}"
    return wait_for(attempt, BOOT_TIMEOUT_S, what, interval=5)[0]


@pytest.mark.timeout(3600)  # three boots of a full Debian under TCG on a shared machine
def test_cloud_image_ssh_migrate_restart_delete(
    kvm_cluster: KvmCluster, ns: str, served: ImageServer, cloud_image: CloudImage, ssh_key: Path
) -> None:
    name = "debian"
    disk = {
        "name": "root",
        "image": {"url": served.url("debian.qcow2"), "sha256": cloud_image.sha256, "size": "2Gi"},
    }
    public_key = ssh_key.with_suffix(".pub").read_text().strip()
    # Not pinned (spec.nodeName): a pinned instance may not migrate. The scheduler places it.
    manifest = _vi(
        ns, name, None, [disk], nics=[{"type": "network"}],
        cloudInit={"sshAuthorizedKeys": [public_key]}, evictionPolicy="Migrate",
    )  # fmt: skip
    t0 = time.monotonic()
    kvm_cluster.kubectl("apply", "-f", "-", stdin=manifest)
    kvm_cluster.kubectl(
        "wait", "-n", ns, f"vi/{name}", "--for=jsonpath={.status.interfaces[0].ipAddresses[0]}",
        f"--timeout={int(BOOT_TIMEOUT_S)}s", timeout=BOOT_TIMEOUT_S + 30,
    )  # fmt: skip
    t_ip = time.monotonic() - t0
    vi = kvm_cluster.get("virtualinstances", ns, name) or {}
    ip = vi["status"]["interfaces"][0]["ipAddresses"][0]
    first = vi["status"]["nodeName"]
    second = next(n for n in kvm_cluster.nodes if n != first)
    wide = kvm_cluster.kubectl("get", "vi", "-n", ns, name, "-o", "wide")
    assert ip in wide
    _ssh_ok(kvm_cluster, first, ssh_key, ip, "true")
    t_ssh = time.monotonic() - t0
    print(f"\nMEASURED cloud image apply -> address {t_ip:.0f} s, -> SSH ready {t_ssh:.0f} s")
    write = "echo kubehv-was-here > marker && sync && cut -d' ' -f1 /proc/uptime"
    out = _ssh_ok(kvm_cluster, first, ssh_key, ip, write)
    uptime_before = float(out.strip())
    overlay = Path(
        kvm_cluster.nodes[first].host_path(f"{NODE_STORAGE}/instances/{ns}/{name}/root.qcow2")
    )
    assert overlay.is_file()

    # Live migration with storage copy.
    t1 = time.monotonic()
    kvm_cluster.kubectl("create", "-n", ns, "-f", "-", stdin=json.dumps({
        "apiVersion": "kubehv.io/v1alpha1", "kind": "Migration",
        "metadata": {"name": "move", "namespace": ns},
        "spec": {"instance": name, "targetNode": second, "mode": "live"},
    }))  # fmt: skip

    def migration_ended() -> dict[str, Any] | None:
        st = (kvm_cluster.get("migrations", ns, "move") or {}).get("status") or {}
        moved = any(
            c.get("type") == "InstanceMoved" and c.get("status") == "True"
            for c in st.get("conditions") or []
        )
        return st if moved or st.get("phase") in ("Failed", "Aborted") else None

    ended = wait_for(migration_ended, 900, "Migration move InstanceMoved or ended", interval=1)
    print(
        f"MEASURED storage live migration: {time.monotonic() - t1:.0f} s, {ended.get('progress')}"
    )
    assert ended.get("phase") not in ("Failed", "Aborted"), ended
    wait_for(
        lambda: (
            (kvm_cluster.get("migrations", ns, "move") or {}).get("status", {}).get("phase")
            == "Succeeded"
        ),
        300,
        "Migration move Succeeded",
        interval=1,
    )
    assert second in kvm_cluster.domains(second)[0] or any(
        name in d for d in kvm_cluster.domains(second)
    )
    assert not overlay.exists()  # the source's copy went with the guest
    moved = Path(
        kvm_cluster.nodes[second].host_path(f"{NODE_STORAGE}/instances/{ns}/{name}/root.qcow2")
    )
    assert moved.is_file()
    out = _ssh_ok(kvm_cluster, second, ssh_key, ip, "cat marker && cut -d' ' -f1 /proc/uptime")
    marker, uptime_after = out.split()
    assert marker == "kubehv-was-here"
    assert float(uptime_after) > uptime_before  # the same boot: never rebooted

    # A drain of the new node: evictionPolicy Migrate is a non-live Migration, the disk
    # moves back too (the guest is paused for the copy, never rebooted).
    kvm_cluster.kubectl(
        "patch", "nodehypervisor", second, "--type=merge", "-p", '{"spec":{"drain":true}}'
    )  # fmt: skip
    t2 = time.monotonic()

    def drained() -> dict[str, Any] | None:
        drain = drain_migration_name(name, second)
        st = (kvm_cluster.get("migrations", ns, drain) or {}).get("status") or {}
        if st.get("phase") in ("Failed", "Aborted"):
            return st
        vi = (kvm_cluster.get("virtualinstances", ns, name) or {}).get("status") or {}
        ok = st.get("phase") == "Succeeded" and vi.get("nodeName") == first
        return st if ok and vi.get("phase") == "Running" else None

    ended = wait_for(drained, 900, f"drain of {second}: {name} back on {first}", interval=1)
    print(f"MEASURED drain (non-live migration with storage copy): {time.monotonic() - t2:.0f} s")
    assert ended.get("phase") == "Succeeded", ended
    kvm_cluster.kubectl(
        "patch", "nodehypervisor", second, "--type=merge", "-p", '{"spec":{"drain":false}}'
    )  # fmt: skip
    assert overlay.is_file() and not moved.exists()
    out = _ssh_ok(kvm_cluster, first, ssh_key, ip, "cat marker && cut -d' ' -f1 /proc/uptime")
    marker, uptime_back = out.split()
    assert marker == "kubehv-was-here"
    assert float(uptime_back) > float(uptime_after)  # still the same boot

    # Stop and start: the overlay (and the file in it) stays.
    kvm_cluster.kubectl(
        "patch", "vi", "-n", ns, name, "--type=merge", "-p", '{"spec":{"runState":"Stopped"}}'
    )
    wait_for(lambda: _phase(kvm_cluster, ns, name) == "Stopped", 300, "stopped", interval=1)
    assert overlay.is_file()
    kvm_cluster.kubectl(
        "patch", "vi", "-n", ns, name, "--type=merge", "-p", '{"spec":{"runState":"Running"}}'
    )
    kvm_cluster.kubectl(
        "wait", "-n", ns, f"vi/{name}", "--for=jsonpath={.status.interfaces[0].ipAddresses[0]}",
        f"--timeout={int(BOOT_TIMEOUT_S)}s", timeout=BOOT_TIMEOUT_S + 30,
    )  # fmt: skip
    vi = kvm_cluster.get("virtualinstances", ns, name) or {}
    assert vi["status"]["interfaces"][0]["ipAddresses"][0] == ip  # its MAC, so its lease, stayed
    out = _ssh_ok(kvm_cluster, first, ssh_key, ip, "cat marker && cut -d' ' -f1 /proc/uptime")
    marker, uptime_new = out.split()
    assert marker == "kubehv-was-here"
    assert float(uptime_new) < float(uptime_back)  # this one did boot again

    # Delete: the overlay and the seed are gone.
    kvm_cluster.kubectl("delete", "vi", "-n", ns, name, "--timeout=300s", timeout=330)
    assert _storage_files(kvm_cluster, ns, name) == []
