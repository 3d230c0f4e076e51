"""Real guests: start overhead and migration ratio, each next to the same work done directly.

Why interleaved: one operator run, then one direct run, and so on, so a slow patch of the
shared machine hurts both sides alike. The direct side is the driver itself, called the way
the agent calls it (``translate.instance_spec`` of the same VirtualInstance, the same checked
parameters), so both start the very same domain XML.

Start: the agent reports Running right after ``start_instance`` returns and it has read the
instance's info and console (kubehv.operator.instances ``_start``); the direct floor times
those same three calls. The guest's boot marker on its serial console is timed on both sides
for context (the guest boots no faster because of us).

Migration: the direct floor is the driver's whole migration protocol between the same two
netns libvirt nodes (migration_info, accept_instance, migrate_instance, both finalizes);
the ``migrate_instance`` call alone is reported too.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common
from kubehv.devenv import serial
from kubehv.devenv.guest import GuestImage
from kubehv.drivers import base, values
from kubehv.drivers import registry as driver_registry
from kubehv.operator import translate
from tests.e2e import conftest as e2e

ROOT_NODE = "bench-kvm"


@dataclasses.dataclass
class RootNode:
    """The machine's own libvirtd, shaped like a netns LibvirtNode for KvmCluster."""

    name: str = ROOT_NODE
    uri: str = "qemu:///system"
    address: str = "127.0.0.1"

    def host_path(self, path: str) -> str:
        return path


def vi_body(name: str, ns: str, image: GuestImage, node: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hypervisor": "kvm",
        "runState": "Running",
        "memory": {"min": "128Mi", "max": "128Mi"},
        "vcpus": 1,
        "boot": {"kernel": image.kernel, "initrd": image.initrd, "cmdline": image.cmdline},
        "hypervisorParameters": {"accelerator": "tcg"},
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": f"{common.GROUP}/{common.VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4())},
        "spec": spec,
    }


def driver_for(
    node: Any, image: GuestImage, state: Path, **settings: values.ParamValue
) -> base.BaseHypervisor:
    return driver_registry.create_driver(
        "kvm",
        values.DriverConfig(
            node_name=node.name,
            uri=node.uri,
            state_dir=str(state),
            params={
                "serial_log_dir": serial.DEFAULT_SERIAL_LOG_DIR,
                "allowed_dirs": str(Path(image.kernel).parent),
                **settings,
            },
        ),
    )


def driver_spec(drv: base.BaseHypervisor, body: dict[str, Any]) -> values.InstanceSpec:
    """What the agent hands the driver for this body (instances.Reconciler._start)."""
    spec = translate.instance_spec(body, {}, None)
    checked = type(drv).check_parameter_syntax(spec.params)
    type(drv).validate_parameters(spec.params)
    return dataclasses.replace(spec, params=checked)


def _serial(node: Any, instance: str) -> str:
    return str(node.host_path(serial.serial_log_path(instance)))


def _wait(what: str, probe: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _vi_gone(cluster: Any, ns: str, name: str) -> bool:
    return cluster.get("virtualinstances", ns, name) is None


# --- start overhead --------------------------------------------------------------------------


def run_start(cp: Any, image: GuestImage, runs: int) -> dict[str, Any]:
    workdir = common.workdir("start")
    node = RootNode()
    cluster = e2e.KvmCluster(cp, [node], image, workdir)  # type: ignore[arg-type]
    drv = driver_for(node, image, workdir / "direct")
    ns = f"bench-start-{uuid.uuid4().hex[:5]}"
    direct_ns = f"benchdirect{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    out: dict[str, list[float]] = {
        "op": [],
        "op_boot": [],
        "op_placed": [],
        "direct": [],
        "direct_boot": [],
    }
    spec: values.InstanceSpec | None = None
    try:
        cluster.start()
        with common.Watcher(cluster.api, ns, "virtualinstances", common.phase_is("Running")) as w:
            for i in range(runs):
                # the operator
                name = f"s{i}-{uuid.uuid4().hex[:4]}"
                body = vi_body(name, ns, image, ROOT_NODE)
                del body["metadata"]["uid"]
                t0 = time.time()
                cluster.custom.create_namespaced_custom_object(
                    common.GROUP, common.VERSION, ns, "virtualinstances", body
                )
                seen = w.wait([name], 120)[name]
                serial.wait_for_marker(_serial(node, f"{ns}.{name}"), image.boot_marker)
                out["op"].append(seen - t0)
                out["op_placed"].append((w.placed_at(name) or seen) - t0)
                out["op_boot"].append(time.time() - t0)
                cluster.custom.delete_namespaced_custom_object(
                    common.GROUP, common.VERSION, ns, "virtualinstances", name
                )
                _wait(f"{name} deleted", lambda n=name: _vi_gone(cluster, ns, n))
                # the driver directly
                body = vi_body(f"d{i}-{uuid.uuid4().hex[:4]}", direct_ns, image, None)
                spec = driver_spec(drv, body)
                t0 = time.time()
                drv.start_instance(spec)
                drv.get_instance_info(spec.name)
                drv.get_instance_console(spec)
                out["direct"].append(time.time() - t0)
                serial.wait_for_marker(_serial(node, spec.name), image.boot_marker)
                out["direct_boot"].append(time.time() - t0)
                drv.stop_instance(spec, force=True)
                drv.cleanup_instance(spec.name)
        return out
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        if spec is not None:
            drv.stop_instance(spec, force=True)
        cp.kubectl("delete", "virtualinstances", "--all", "-n", ns, "--timeout=60s", check=False)
        cluster.stop()


# --- migration -------------------------------------------------------------------------------


def migration_body(name: str, ns: str, vm: str, target: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{common.GROUP}/{common.VERSION}",
        "kind": "Migration",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"instance": vm, "targetNode": target, "mode": "live"},
    }


def _terminal(obj: Any) -> bool:
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Aborted")


def run_migration(cp: Any, image: GuestImage, nodes: Any, runs: int) -> dict[str, Any]:
    workdir = common.workdir("migration")
    node_list = list(nodes)
    cluster = e2e.KvmCluster(cp, nodes, image, workdir)
    drivers = [driver_for(n, image, workdir / f"direct-{n.name}") for n in node_list]
    ns = f"bench-mig-{uuid.uuid4().hex[:5]}"
    cp.kubectl("create", "namespace", ns)
    out: dict[str, Any] = {"op": [], "direct": [], "direct_migrate_call": [], "failed": []}
    direct_spec: values.InstanceSpec | None = None
    where = 0
    try:
        cluster.start()
        vm = "mvm"
        # Not pinned (spec.nodeName): a pinned instance is not migrated (the scheduler
        # refuses it); the controller places it on either node, the runs alternate from there.
        body = vi_body(vm, ns, image, None)
        del body["metadata"]["uid"]
        cluster.custom.create_namespaced_custom_object(
            common.GROUP, common.VERSION, ns, "virtualinstances", body
        )
        _wait("the VI Running", lambda: (cluster.get("virtualinstances", ns, vm) or {}).get(
            "status", {}).get("phase") == "Running")  # fmt: skip
        landed = (cluster.get("virtualinstances", ns, vm) or {})["status"]["nodeName"]
        op_at = [n.name for n in node_list].index(landed)
        serial.wait_for_marker(_serial(node_list[op_at], f"{ns}.{vm}"), image.boot_marker)
        direct_spec = driver_spec(drivers[0], vi_body("dmig", "benchdirect", image, None))
        drivers[0].start_instance(direct_spec)
        serial.wait_for_marker(_serial(node_list[0], direct_spec.name), image.boot_marker)
        with common.Watcher(cluster.api, ns, "migrations", _terminal) as w:
            for i in range(runs):
                target = node_list[1 - op_at]
                mig = f"m{i}"
                t0 = time.time()
                cluster.custom.create_namespaced_custom_object(
                    common.GROUP, common.VERSION, ns, "migrations",
                    migration_body(mig, ns, vm, target.name),
                )  # fmt: skip
                t1 = w.wait([mig], 300)[mig]
                phase = (w.last[mig].get("status") or {}).get("phase")
                if phase != "Succeeded":
                    out["failed"].append({mig: w.last[mig].get("status")})
                else:
                    out["op"].append(t1 - t0)
                    op_at = 1 - op_at

                def placed(target: Any = target) -> bool:
                    st = (cluster.get("virtualinstances", ns, vm) or {}).get("status") or {}
                    return st.get("nodeName") == target.name and st.get("phase") == "Running"

                if phase == "Succeeded":
                    _wait("the VI Running on the target", placed)
                # the driver directly, same two nodes
                src, dst = drivers[where], drivers[1 - where]
                dst_node = node_list[1 - where]
                t0 = time.time()
                info = src.migration_info(direct_spec)
                dst.accept_instance(direct_spec, info, dst_node.address)
                t_call = time.time()
                src.migrate_instance(
                    direct_spec,
                    values.MigrationTarget(dst_node.name, dst_node.address, dst_node.uri),
                    live=True,
                )
                t_done = time.time()
                dst.finalize_migration_dst(direct_spec, info, True)
                src.finalize_migration_source(direct_spec, True, True)
                out["direct"].append(time.time() - t0)
                out["direct_migrate_call"].append(t_done - t_call)
                where = 1 - where
        return out
    except BaseException:
        print(cluster.logs(30))
        raise
    finally:
        if direct_spec is not None:
            for drv in drivers:
                try:
                    drv.stop_instance(direct_spec, force=True)
                    drv.cleanup_instance(direct_spec.name)
                except Exception as exc:
                    print(f"bench: could not clean up {direct_spec.name}: {exc}")
        try:
            cluster.kubectl("delete", "virtualinstances", "--all", "-n", ns, "--wait=true",
                            "--timeout=60s")  # fmt: skip
        except Exception as exc:
            print(f"bench: could not delete the bench VIs: {exc}")
        cluster.stop()
