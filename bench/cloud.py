"""Cloud image figures: apply -> SSH-ready, and storage migration, each next to libvirt alone.

Why interleaved and why these floors: one operator run, then one direct run, so a slow patch
of the shared machine hurts both alike. The direct side is the kvm driver called the way the
agent calls it (same translated spec, same node storage settings): it downloads the same image
into the same kind of cache, makes the overlay and seed, and starts the same domain XML; then
the same address polling and the same SSH probe. Storage migration: the operator's Migration
(apply -> Succeeded) against the driver's own protocol between the same two nodes, whose
``migrate_instance`` is the raw libvirt call (migrateToURI3 with an incremental storage copy),
reported alone too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common, kvm
from kubehv.devenv.cloudimage import CloudImage
from kubehv.devenv.guest import GuestImage
from kubehv.drivers import base, values
from tests.e2e import conftest as e2e
from tests.fixtures.operator import wait_for
from tests.workloads.conftest import ImageServer

BOOT_TIMEOUT_S = 1500.0


def vi_body(name: str, ns: str, *, url: str, image: CloudImage, key: str) -> dict[str, Any]:
    """Not pinned (spec.nodeName): a pinned instance may not migrate."""
    disk = {"name": "root", "image": {"url": url, "sha256": image.sha256, "size": "2Gi"}}
    return {
        "apiVersion": f"{common.GROUP}/{common.VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hypervisor": "kvm",
            "memory": {"min": "512Mi", "max": "512Mi"},
            "disks": [disk],
            "nics": [{"type": "network"}],
            "cloudInit": {"sshAuthorizedKeys": [key]},
            "hypervisorParameters": {"accelerator": "tcg"},
        },
    }


def driver_for(node: Any, guest: GuestImage, state: Path) -> base.BaseHypervisor:
    """The driver as the e2e agents run it: node-local storage reached through the node."""
    storage = {
        "storage_dir": e2e.NODE_STORAGE,
        "storage_dir_agent": node.host_path(e2e.NODE_STORAGE),
    }
    return kvm.driver_for(node, guest, state, **storage)


def driver_spec(drv: base.BaseHypervisor, body: dict[str, Any]) -> values.InstanceSpec:
    body = {**body, "metadata": {**body["metadata"], "uid": str(uuid.uuid4())}}
    return kvm.driver_spec(drv, body)


def _until(what: str, probe: Any, timeout: float = BOOT_TIMEOUT_S, every: float = 1.0) -> Any:
    return wait_for(probe, timeout, what, interval=every)


def ssh_ok(node: Any, key: Path, ip: str) -> bool:
    argv = [
        *node.nsenter_argv(), "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR", f"debian@{ip}", "true",
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0


def _vi_ip(cluster: Any, ns: str, name: str) -> str | None:
    st = (cluster.get("virtualinstances", ns, name) or {}).get("status") or {}
    for nic in st.get("interfaces") or []:
        for ip in nic.get("ipAddresses") or []:
            return str(ip)
    return None


def _vi_node(cluster: Any, ns: str, name: str) -> str:
    st = (cluster.get("virtualinstances", ns, name) or {}).get("status") or {}
    return str(st.get("nodeName") or "")


def _moved(cluster: Any, ns: str, name: str) -> bool:
    """InstanceMoved=True; a failed Migration raises (no 20-minute wait for nothing)."""
    st = (cluster.get("migrations", ns, name) or {}).get("status") or {}
    if st.get("phase") in ("Failed", "Aborted"):
        raise RuntimeError(f"bench Migration {name} {st.get('phase')}: {st.get('failureReason')}")
    return any(
        c.get("type") == "InstanceMoved" and c.get("status") == "True"
        for c in st.get("conditions") or []
    )


def _driver_ip(drv: base.BaseHypervisor, name: str) -> str | None:
    for nic in drv.get_instance_interfaces(name):
        if nic.ip_addresses:
            return nic.ip_addresses[0]
    return None


def run(cp: Any, guest: GuestImage, image: CloudImage, nodes: Any, runs: int) -> dict[str, Any]:
    workdir = common.workdir("cloud")
    node_list = list(nodes)
    first = node_list[0]
    by_name = {n.name: n for n in node_list}
    cluster = e2e.KvmCluster(cp, nodes, guest, workdir)
    drivers = [driver_for(n, guest, workdir / f"direct-{n.name}") for n in node_list]
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = key.with_suffix(".pub").read_text().strip()
    served = workdir / "served"
    served.mkdir()
    os.symlink(image.path, served / "debian.qcow2")
    server = ImageServer(served).start()
    url = server.url("debian.qcow2")
    ns = f"bench-cloud-{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    out: dict[str, Any] = {"op_ssh": [], "op_ip": [], "direct_ssh": [], "direct_ip": []}
    started: list[tuple[base.BaseHypervisor, values.InstanceSpec]] = []
    try:
        cluster.start()
        for i in range(runs):
            name = f"c{i}"
            t0 = time.monotonic()
            body = vi_body(name, ns, url=url, image=image, key=public)
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(body))
            ip = _until("an address", lambda n=name: _vi_ip(cluster, ns, n))
            out["op_ip"].append(time.monotonic() - t0)
            home = by_name[_vi_node(cluster, ns, name)]
            _until("SSH", lambda ip=ip, home=home: ssh_ok(home, key, ip), every=3)
            out["op_ssh"].append(time.monotonic() - t0)
            last = i == runs - 1
            if not last:
                cluster.kubectl("delete", "vi", "-n", ns, name, "--timeout=300s", timeout=330)
            spec = driver_spec(
                drivers[0],
                vi_body(f"d{i}", "benchdirect", url=url, image=image, key=public),
            )
            t0 = time.monotonic()
            drivers[0].start_instance(spec)
            started.append((drivers[0], spec))
            ip = _until("an address", lambda s=spec: _driver_ip(drivers[0], s.name))
            out["direct_ip"].append(time.monotonic() - t0)
            _until("SSH", lambda ip=ip: ssh_ok(first, key, ip), every=3)
            out["direct_ssh"].append(time.monotonic() - t0)
            if not last:
                drivers[0].stop_instance(spec, force=True)
                drivers[0].cleanup_instance(spec.name)
                drivers[0].release_instance_storage(spec)
                started.remove((drivers[0], spec))
        # Storage migration of the last pair: the operator's, then the driver's own.
        vm, spec = f"c{runs - 1}", started[-1][1]
        away = next(n for n in node_list if n.name != _vi_node(cluster, ns, vm))
        t0 = time.monotonic()
        cluster.custom.create_namespaced_custom_object(
            common.GROUP,
            common.VERSION,
            ns,
            "migrations",
            kvm.migration_body("move", ns, vm, away.name),
        )
        _until("the operator's storage migration", lambda: _moved(cluster, ns, "move"), 1200, 0.2)
        out["op_migration"] = time.monotonic() - t0
        second = node_list[1]
        src, dst = drivers
        t0 = time.monotonic()
        info = src.migration_info(spec)
        dst.accept_instance(spec, info, second.address)
        t_call = time.monotonic()
        src.migrate_instance(
            spec, values.MigrationTarget(second.name, second.address, second.uri), live=True
        )
        out["direct_migrate_call"] = time.monotonic() - t_call
        dst.finalize_migration_dst(spec, info, True)
        src.finalize_migration_source(spec, True, True)
        out["direct_migration"] = time.monotonic() - t0
        started[-1] = (dst, spec)
        return out
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        for drv, spec in started:
            try:
                drv.stop_instance(spec, force=True)
                drv.cleanup_instance(spec.name)
                drv.release_instance_storage(spec)
            except Exception as exc:
                print(f"bench: could not clean up {spec.name}: {exc}")
        cp.kubectl("delete", "virtualinstances", "--all", "-n", ns, "--timeout=300s", check=False)
        cluster.stop()
        server.stop()
