"""The agent's NodeHypervisor: create it if missing, then publish status on every heartbeat.

Why this module exists: the controller places instances from what nodes report here
(memory, readiness, capabilities), and notices a dead agent by a stale ``lastHeartbeat``.
:func:`build_status` is pure; :class:`Publisher` does the I/O (driver calls in threads).
Orphans (domains this driver did not create) are listed, never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from kubehv import api
from kubehv.api import metadata
from kubehv.drivers import base, values
from kubehv.operator import context, k8s, metrics, status

log = logging.getLogger(__name__)

DRIVER_VERSION = "kubehv-0.1.0"


def nhv_body(
    node: str, hypervisor: str, uri: str | None, migration_address: str | None
) -> api.NodeHypervisor:
    """The NodeHypervisor an agent creates for its node when none exists."""
    return api.NodeHypervisor(
        metadata=metadata.ObjectMeta(name=node),
        spec=api.NodeHypervisorSpec(
            node_name=node,
            hypervisor=hypervisor,
            connection_uri=uri or None,
            migration_address=migration_address or None,
        ),
    )


def build_status(  # noqa: PLR0917
    current: api.NodeHypervisorStatus,
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
    conditions = status.merge_model_conditions(
        current.conditions,
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


def ensure_node(kube: k8s.Kube, wanted: api.NodeHypervisor) -> api.NodeHypervisor:
    """Get this node's NodeHypervisor, creating ``wanted`` when missing (blocking)."""
    name = wanted.metadata.name or ""
    existing = kube.get_node(name)
    if existing is not None:
        return api.NodeHypervisor.model_validate(existing)
    try:
        return api.NodeHypervisor.model_validate(kube.create_node(wanted.to_dict()))
    except Exception as exc:
        if k8s.is_status(exc, 409):
            again = kube.get_node(name)
            if again is not None:
                return api.NodeHypervisor.model_validate(again)
        raise


class Publisher:
    def __init__(
        self,
        ctx: context.AgentContext,
        known_instances: Callable[[], set[str]] = set,
    ) -> None:
        self.ctx = ctx
        self.current: api.NodeHypervisor | None = None
        self.known_instances = known_instances
        """Hypervisor names kubehv has a reason to run here; any other of its domains is
        an orphan too (for example a guest left behind by a force-deleted instance)."""

    def _collect(self) -> tuple[values.NodeInfo, values.VerifyResult, int, list[str]]:
        drv = self.ctx.driver
        with metrics.timed_driver_call("get_node_info"):
            info = drv.get_node_info()
        with metrics.timed_driver_call("verify"):
            verify = drv.verify()
        with metrics.timed_driver_call("list_instances"):
            ours = drv.list_instances()
        with metrics.timed_driver_call("list_foreign_instances"):
            orphans = drv.list_foreign_instances()
        known = self.known_instances()
        orphans = sorted({*orphans, *(name for name in ours if name not in known)})
        return info, verify, len(ours), orphans

    def beat(self) -> None:
        """One heartbeat (blocking): read the node, write status, refresh the defaults."""
        node = self.ctx.node_name
        if self.current is None:
            body = self.ctx.kube.get_node(node)
            if body is None:
                raise k8s.NotFound(f"NodeHypervisor {node}")
            self.current = api.NodeHypervisor.model_validate(body)
        info, verify, count, orphans = self._collect()
        generation = self.current.metadata.generation or 0
        current = self.current.status
        new = build_status(
            current,
            info,
            verify,
            type(self.ctx.driver).CAPABILITIES,
            count,
            orphans,
            generation,
            status.now_iso(),
        )
        wire = current.model_dump(mode="json", by_alias=True, exclude_none=True)
        result = self.ctx.kube.patch_node_status(node, status.changed_fields(wire, new))
        self.current = api.NodeHypervisor.model_validate(result)
        self.ctx.node_defaults = dict(self.current.spec.default_parameters)

    async def run_forever(self) -> None:
        while True:
            try:
                await k8s.call(self.beat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.current = None  # re-read next time (it may have been deleted)
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
