"""Draining a node: every instance leaves it according to its evictionPolicy.

Why this module exists: ``NodeHypervisor.spec.drain: true`` (set by ``kubehv drain NODE``)
is an operational request, not GitOps spec; it turns into ordinary Migrations so that the
Migration protocol (limits, version checks, failure handling, abort) is the only way VMs move:

* ``LiveMigrate`` -> a live Migration, ``Migrate`` -> a non-live Migration, created by the
  controller with a deterministic name (``drain-<instance>``) and the label
  ``kubehv.io/drain=<node>``; the controller's parallel limits queue them.
* ``Stop`` -> the owner of the instance on the node stops the VM (only it can), after
  marking the instance Evicted; the controller then clears ``status.nodeName`` so placement
  starts it cold elsewhere.
* an instance that runs nowhere (Stopped, Failed, Evicted) needs no migration whatever its
  policy: the controller clears ``status.nodeName`` (guarded by resourceVersion) and
  placement re-places it (a Stopped one stays stopped on its new node) -- unless its disks
  exist only on this node (image or blank disks not declared shared): only a migration of
  the running guest carries them along, so it stays and the Drained message names it.

Progress is the NodeHypervisor condition ``Drained`` (False with what is left, then True).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from kubehv import api
from kubehv.api import conditions, constants
from kubehv.operator import k8s, status
from kubehv.operator import migration_logic as ml
from kubehv.operator import migration_scheduling as sched

log = logging.getLogger(__name__)

COND_DRAINED = "Drained"
PHASE_EVICTED = "Evicted"
NOT_RUNNING = frozenset({PHASE_EVICTED, "Stopped", "Failed"})
"""Phases in which no guest runs on the node: the instance is re-placed, not migrated."""
RESYNC_INTERVAL_S = 3.0


def drain_migration_name(instance: str, node: str) -> str:
    digest = hashlib.sha256(f"{node}/{instance}".encode()).hexdigest()[:6]
    return f"drain-{instance[:50]}-{digest}"


def drain_migration(instance: sched.InstanceFacts, node: str) -> dict[str, Any]:
    """The Migration that evicts ``instance`` from ``node`` (policy LiveMigrate or Migrate)."""
    return {
        "apiVersion": f"{constants.GROUP}/{constants.VERSION}",
        "kind": "Migration",
        "metadata": {
            "name": drain_migration_name(instance.name, node),
            "namespace": instance.namespace,
            "labels": {constants.DRAIN_LABEL: node},
        },
        "spec": {
            "instance": instance.name,
            "mode": "non-live" if instance.eviction_policy == "Migrate" else "live",
        },
    }


def plan(
    node: str, instances: Sequence[sched.InstanceFacts], migrations: Sequence[ml.MigrationView]
) -> tuple[list[sched.InstanceFacts], list[sched.InstanceFacts], str]:
    """(instances needing a Migration, Evicted instances to re-place, Drained message)."""
    on_node = [i for i in instances if i.node_name == node]
    busy = {(m.namespace, m.instance) for m in migrations if m.occupies_instance}
    to_migrate: list[sched.InstanceFacts] = []
    to_replace: list[sched.InstanceFacts] = []
    waiting_stop: list[str] = []
    pinned: list[str] = []
    disks_here: list[str] = []
    failed: list[str] = []
    by_name = {(m.namespace, m.name): m for m in migrations}
    for inst in on_node:
        if (inst.namespace, inst.name) in busy:
            continue
        if inst.phase in NOT_RUNNING and inst.local_disks:
            disks_here.append(inst.name)  # re-placing it would leave its disks behind
            continue
        if inst.phase in NOT_RUNNING:
            to_replace.append(inst)  # nothing runs: no migration needed, place it elsewhere
            continue
        if inst.eviction_policy == "Stop":
            waiting_stop.append(inst.name)
            continue
        if inst.pin == node:
            pinned.append(inst.name)  # a Migration could only fail: say what it waits for
            continue
        existing = by_name.get((inst.namespace, drain_migration_name(inst.name, node)))
        if existing is not None and existing.phase in ml.UNSUCCESSFUL:
            failed.append(f"{inst.name} ({existing.failure_reason})")
            continue
        to_migrate.append(inst)
    if not on_node:
        return [], [], ""
    parts = [f"{len(on_node)} instance(s) left on {node}"]
    if waiting_stop:
        parts.append("stopping: " + ", ".join(sorted(waiting_stop)))
    if pinned:
        parts.append(
            f"pinned to {node} by spec.nodeName (unpin or stop them): " + ", ".join(sorted(pinned))
        )
    if disks_here:
        parts.append(
            f"not running, with disks only on {node}, so not re-placed (start them with "
            "evictionPolicy LiveMigrate or Migrate and the drain migrates them with their "
            "disks; evicted ones start here again when the drain ends; or delete them): "
            + ", ".join(sorted(disks_here))
        )
    if failed:
        parts.append("migration failed: " + "; ".join(sorted(failed)))
    return to_migrate, to_replace, "; ".join(parts)


class DrainController:
    def __init__(self, ctx: Any) -> None:
        self.store = k8s.Kube(ctx.api_client)

    async def reconcile_node(self, body: Mapping[str, Any]) -> None:
        model = api.NodeHypervisor.model_validate(body)
        node = sched.NodeFacts.of(model)
        if not node.drain:
            if conditions.get_condition(model.status.conditions, COND_DRAINED) is not None:
                await self._set_drained(model, None)
            return
        instances = [
            api.VirtualInstance.model_validate(b)
            for b in await k8s.call(
                self.store.list_instances, f"{constants.FIELD_VI_NODE}={node.name}"
            )
        ]
        migrations = [
            ml.MigrationView.from_body(b) for b in await k8s.call(self.store.list_migrations)
        ]
        to_migrate, to_replace, message = plan(
            node.name, [sched.InstanceFacts.of(i) for i in instances], migrations
        )
        for inst in to_migrate:
            try:
                await k8s.call(
                    self.store.create_migration, inst.namespace, drain_migration(inst, node.name)
                )
                log.info("drain %s: created Migration for %s", node.name, inst.name)
            except k8s.Conflict:
                pass  # exists already
            except Exception as exc:  # e.g. 403 in a terminating namespace: the others still count
                log.warning(
                    "drain %s: cannot create Migration for %s: %s", node.name, inst.name, exc
                )
        for inst in to_replace:
            try:
                await self._replace(inst, node.name)
            except Exception as exc:  # one instance must not stop the others
                log.warning("drain %s: cannot re-place %s: %s", node.name, inst.name, exc)
        await self._set_drained(model, message)

    async def _replace(self, inst: sched.InstanceFacts, node: str) -> None:
        """Clear ``status.nodeName`` of an instance that runs nowhere (guarded), so that
        placement puts it on another node."""
        body = await k8s.call(self.store.get_instance, inst.namespace, inst.name)
        if body is None:
            return
        vi = api.VirtualInstance.model_validate(body)
        phase = vi.status.phase.value if vi.status.phase else ""
        if vi.status.node_name != node or phase not in NOT_RUNNING:
            return  # moved or started meanwhile: the next pass looks again
        cond = status.Condition("Evicted", True, "NodeDrained", f"stopped on {node}")
        new = {
            "nodeName": None,
            "phase": "Pending",
            "conditions": status.merge_model_conditions(vi.status.conditions, [cond]),
        }
        with contextlib.suppress(k8s.Conflict):
            await k8s.call(self.store.patch_instance_status, vi, new)

    async def _set_drained(self, node: api.NodeHypervisor, message: str | None) -> None:
        """message None: not draining (condition removed); "" drained; else what is left."""
        existing = node.status.conditions
        current = conditions.get_condition(existing, COND_DRAINED)
        if message is None:
            kept = [c for c in existing if c.type != COND_DRAINED]
            conds = [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in kept]
        else:
            done = message == ""
            text = "no instances left" if done else message
            if (
                current is not None
                and (current.status is conditions.ConditionStatus.TRUE) == done
                and current.message == text
            ):
                return
            cond = status.Condition(COND_DRAINED, done, "Drained" if done else "Draining", text)
            conds = status.merge_model_conditions(existing, [cond])
        await k8s.call(
            self.store.patch_node_status, node.metadata.name or "", {"conditions": conds}
        )

    async def resync(self) -> None:
        try:
            nodes = [
                api.NodeHypervisor.model_validate(n) for n in await k8s.call(self.store.list_nodes)
            ]
        except Exception as exc:
            log.warning("cannot list nodes: %s", exc)
            return
        for node in nodes:
            if node.spec.drain:
                try:
                    await self.reconcile_node(node.to_dict())
                except Exception:
                    log.exception("drain of %s failed; will retry", node.metadata.name)


def register(registry: kopf.OperatorRegistry, ctx: Any) -> None:
    """Controller side: watch NodeHypervisors for spec.drain."""
    drain = DrainController(ctx)

    @kopf.on.event(constants.GROUP, "nodehypervisors", registry=registry, id="drain-controller")
    async def on_node(body: kopf.Body, **_: Any) -> None:
        await drain.reconcile_node(dict(body))

    _periodic(registry, "drain-controller", drain.resync)


def _periodic(registry: kopf.OperatorRegistry, name: str, fn: Any) -> None:
    tasks: list[asyncio.Task[None]] = []

    async def loop() -> None:
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
            try:
                await fn()
            except Exception:
                log.exception("%s resync failed", name)

    @kopf.on.startup(registry=registry, id=f"{name}-start")
    async def start(**_: Any) -> None:
        tasks.append(asyncio.create_task(loop()))

    @kopf.on.cleanup(registry=registry, id=f"{name}-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
