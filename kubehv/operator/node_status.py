"""The agent's NodeHypervisor: create it if missing, then publish status on every heartbeat.

Why this module exists: the controller places instances from what nodes report here
(memory, readiness, capabilities), and notices a dead agent by a stale ``lastHeartbeat``.
:func:`build_status` is pure; :class:`Publisher` does the I/O (driver calls in threads).
Orphans (domains this driver did not create) are listed, never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kubehv.drivers import base, values
from kubehv.operator import context, k8s, metrics, status

log = logging.getLogger(__name__)

DRIVER_VERSION = "kubehv-0.1.0"


def nhv_body(
    node: str, hypervisor: str, uri: str | None, migration_address: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "hypervisor": hypervisor}
    if uri:
        spec["connectionURI"] = uri
    if migration_address:
        spec["migrationAddress"] = migration_address
    return {
        "apiVersion": f"{k8s.GROUP}/{k8s.VERSION}",
        "kind": "NodeHypervisor",
        "metadata": {"name": node},
        "spec": spec,
    }


def build_status(  # noqa: PLR0917
    current: Mapping[str, Any],
    info: values.NodeInfo,
    verify: values.VerifyResult,
    caps: values.Capabilities,
    instance_count: int,
    orphans: Sequence[str],
    generation: int,
    now: str,
) -> dict[str, Any]:
    """The agent-owned NodeHypervisor status (every field but the controller's)."""
    problems = list(verify.problems)
    conditions = status.merge_conditions(
        current.get("conditions") or [],
        [
            status.Condition("Ready", True, "AgentReady", "the node agent is running"),
            status.Condition(
                "Verified",
                verify.ok,
                "Verified" if verify.ok else "VerifyFailed",
                base.BaseHypervisor.format_verify_results(problems) or "hypervisor verified",
            ),
        ],
        generation,
        now,
    )
    return {
        "memoryTotal": info.memory_total_mib,
        "memoryFree": info.memory_free_mib,
        "memoryDom0": info.memory_dom0_mib,
        "cpuTotal": info.cpu_total,
        "cpuNodes": info.cpu_nodes,
        "cpuSockets": info.cpu_sockets,
        "instanceCount": instance_count,
        "orphans": sorted(orphans),
        "verify": {"ok": verify.ok, "problems": problems},
        "canMigrate": caps.can_migrate,
        "capabilities": caps.as_dict(),
        "driverVersion": DRIVER_VERSION,
        "hypervisorVersion": info.hypervisor_version,
        "lastHeartbeat": now,
        "conditions": conditions,
        "observedGeneration": generation,
    }


def ensure_node(kube: k8s.Kube, body: Mapping[str, Any]) -> dict[str, Any]:
    """Get this node's NodeHypervisor, creating it from ``body`` when missing (blocking)."""
    name = body["metadata"]["name"]
    existing = kube.get_nhv(name)
    if existing is not None:
        return existing
    try:
        return kube.create_nhv(body)
    except Exception as exc:
        if k8s.is_status(exc, 409):
            again = kube.get_nhv(name)
            if again is not None:
                return again
        raise


class Publisher:
    def __init__(self, ctx: context.AgentContext) -> None:
        self.ctx = ctx
        self.current: dict[str, Any] = {}

    def _collect(self) -> tuple[values.NodeInfo, values.VerifyResult, int, list[str]]:
        drv = self.ctx.driver
        with metrics.timed_driver_call("get_node_info"):
            info = drv.get_node_info()
        with metrics.timed_driver_call("verify"):
            verify = drv.verify()
        with metrics.timed_driver_call("list_instances"):
            count = len(drv.list_instances())
        with metrics.timed_driver_call("list_foreign_instances"):
            orphans = drv.list_foreign_instances()
        return info, verify, count, orphans

    def beat(self) -> None:
        """One heartbeat (blocking): read the node, write status, refresh the defaults."""
        node = self.ctx.node_name
        if not self.current:
            self.current = self.ctx.kube.get_nhv(node) or {}
        info, verify, count, orphans = self._collect()
        generation = int((self.current.get("metadata") or {}).get("generation") or 0)
        new = build_status(
            self.current.get("status") or {},
            info,
            verify,
            type(self.ctx.driver).CAPABILITIES,
            count,
            orphans,
            generation,
            status.now_iso(),
        )
        patch = status.changed_fields(self.current.get("status") or {}, new)
        result = self.ctx.kube.patch_nhv_status(node, patch)
        self.current = result if isinstance(result, dict) else {}
        spec = self.current.get("spec") or {}
        self.ctx.node_defaults = dict(spec.get("defaultParameters") or {})

    async def run_forever(self) -> None:
        while True:
            try:
                await k8s.call(self.beat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.current = {}  # re-read next time (it may have been deleted)
                log.warning("heartbeat of node %s failed: %s", self.ctx.node_name, exc)
                if k8s.is_status(exc, 404):
                    await self._recreate()
            await asyncio.sleep(self.ctx.settings.heartbeat_interval_s)

    async def _recreate(self) -> None:
        s = self.ctx.settings
        uri = s.advertise_uri or s.connection_uri
        body = nhv_body(s.node_name, s.hypervisor, uri, s.migration_address)
        try:
            await k8s.call(ensure_node, self.ctx.kube, body)
        except Exception as exc:
            log.warning("cannot recreate NodeHypervisor %s: %s", s.node_name, exc)
