"""One serialised owner per instance on a node: every driver action on it goes through here.

Why this module exists: an instance runs exactly once only if, on each node, one actor
decides and acts for it at a time. The owner of an instance gathers the typed inputs of
:func:`owner_logic.decide` (the VirtualInstance and its open Migration, from the watch cache
or a fresh GET/LIST, what the hypervisor reports, the node's journal, the drain flag), asks
for one act, performs it (:mod:`instances`, :mod:`migration_source`,
:mod:`migration_target`), and asks again until there is nothing to do. VirtualInstance
events, Migration events, the drain and the watcher only *poke* the owner; none of them
calls the driver itself.

Serialisation: one asyncio task per instance at most (:meth:`Owner.poke` marks the owner
dirty when it is busy; it runs again when done), so a long act (a migration copy) never
blocks other instances, and nothing else acts on that instance meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pydantic

from kubehv import api
from kubehv.api import constants
from kubehv.api import virtualinstance as vim
from kubehv.drivers import values
from kubehv.operator import (
    context,
    fresh_reads,
    instance_logic,
    instances,
    journal,
    k8s,
    metrics,
    migration_source,
    migration_target,
)
from kubehv.operator import migration_logic as ml
from kubehv.operator import owner_logic as ol

log = logging.getLogger(__name__)
Act = ol.Act
MAX_STEPS = 8


@dataclasses.dataclass
class _Slot:
    running: bool = False
    dirty: bool = False


@dataclasses.dataclass
class _Look:
    """One look at an instance: the decision's inputs and the bodies they came from."""

    inputs: ol.Inputs
    migration: ml.MigrationView | None


def key_of(namespace: str | None, name: str | None) -> str:
    return f"{namespace or ''}/{name or ''}"


def _rv(obj: api.VirtualInstance | api.Migration) -> int:
    try:
        return int(obj.metadata.resource_version or 0)
    except ValueError:
        return 0


Model = TypeVar("Model", api.VirtualInstance, api.Migration)
T = TypeVar("T")


def parse(kind: type[Model], body: Mapping[str, Any]) -> Model | None:
    """The edge: a raw object from a watch event, GET or LIST becomes a typed model once
    (a malformed one is logged and skipped, never crashes the agent)."""
    try:
        return kind.model_validate(body)
    except pydantic.ValidationError as exc:
        log.warning("cannot read a %s (%s); not acting on it", kind.KIND, exc)
        return None


class Owner:
    """The owners of all instances on this node (one serialised run per instance)."""

    def __init__(self, ctx: context.AgentContext) -> None:
        self.ctx = ctx
        self.node = ctx.node_name
        self.kube = ctx.kube
        self.driver = ctx.driver
        self.state_dir = ctx.settings.state_dir
        self.policy = ctx.settings.policy
        self.vis: dict[str, api.VirtualInstance] = {}
        """This node's VirtualInstances (the field-selected watch), by namespace/name."""
        self.migrations: dict[str, api.Migration] = {}
        """Migrations in which this node has a role, by namespace/instance."""
        self.history: dict[str, instance_logic.History] = {}
        self.slots: dict[str, _Slot] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.instance_acts = instances.InstanceActs(ctx, self.remember_body)
        self.source = migration_source.SourceRole(ctx)
        self.target = migration_target.TargetRole(ctx)
        # The fence's shared reads: every owner re-reading at the same moment shares one
        # LIST of the namespace's Migrations and one GET of this node's NodeHypervisor, each
        # begun after all of them asked (fresh_reads).
        self.migration_reads = fresh_reads.Coalesced(self._list_namespace_migrations)
        self.drain_reads = fresh_reads.Coalesced(self._get_drain)

    # --- what pokes the owner ------------------------------------------------------------

    def remember(self, vi: api.VirtualInstance) -> None:
        key = key_of(vi.metadata.namespace, vi.metadata.name)
        if vi.status.node_name != self.node:
            self.vis.pop(key, None)  # not (or no longer) ours
            return
        old = self.vis.get(key)
        if old is not None and _rv(old) > _rv(vi):
            return  # we already hold a newer copy (our own patch response)
        self.vis[key] = vi

    def remember_body(self, body: Mapping[str, Any]) -> None:
        vi = parse(api.VirtualInstance, body)
        if vi is not None:
            self.remember(vi)

    async def on_instance_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        vi = parse(api.VirtualInstance, body)
        if vi is None:
            return
        key = key_of(vi.metadata.namespace, vi.metadata.name)
        if event_type == "DELETED":
            self.vis.pop(key, None)  # gone, or moved to another node
            self.history.pop(key, None)
            if key in self.migrations:
                self.poke(key)
            return
        self.remember(vi)
        self.poke(key)

    async def on_migration_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        mig = parse(api.Migration, body)
        if mig is None:
            return
        key = key_of(mig.metadata.namespace, mig.spec.instance)
        old = self.migrations.get(key)
        same = old is not None and old.metadata.uid == mig.metadata.uid
        if event_type == "DELETED":
            if same:
                self.migrations.pop(key, None)
        elif old is None or not same or _rv(mig) >= _rv(old):
            self.migrations[key] = mig
        self.poke(key)

    def poke(self, key: str) -> None:
        """Have the owner of ``key`` look again (now, or right after its current run)."""
        slot = self.slots.setdefault(key, _Slot())
        slot.dirty = True
        if slot.running:
            return
        slot.running = True
        task = asyncio.create_task(self._drive(key, slot), name=f"owner {key}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drive(self, key: str, slot: _Slot) -> None:
        try:
            while slot.dirty:
                slot.dirty = False
                try:
                    with metrics.timed_reconcile("VirtualInstance"):
                        await self._run(key)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("owner of %s failed; the watcher looks again", key)
        finally:
            slot.running = False

    async def alone(self, key: str, act: Callable[[], Awaitable[T]]) -> T:
        """Run ``act`` as the owner of ``key``: after any current run, before the next one.

        For loops outside the owner's decision (automatic ballooning) that need one driver
        action on one instance: nothing else acts on the instance meanwhile.
        """
        slot = self.slots.setdefault(key, _Slot())
        while slot.running:
            await asyncio.sleep(0.05)
        slot.running = True
        try:
            return await act()
        finally:
            slot.running = False
            if slot.dirty:
                slot.dirty = False
                self.poke(key)

    def busy(self, key: str) -> bool:
        """The owner of ``key`` is acting now (a loop may skip the instance this round)."""
        slot = self.slots.get(key)
        return slot is not None and slot.running

    def instances(self) -> dict[str, api.VirtualInstance]:
        """This node's VirtualInstances as last seen, by ``namespace/name`` (a copy)."""
        return dict(self.vis)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- one run -------------------------------------------------------------------------

    async def _run(self, key: str) -> None:
        fresh = key not in self.vis
        for _ in range(MAX_STEPS):
            look = await self._look(key, fresh)
            if look is None:
                return
            action = ol.decide(look.inputs)
            fresh = False
            if action.act is Act.REREAD:
                fresh = True
                continue
            if action.act not in (Act.NOTHING, Act.WAIT):
                log.info("owner of %s on %s: %s %s", key, self.node, action.act, action.message)
            if not await self._perform(key, look, action):
                return
            if action.act in ol.MIGRATION_ACTS or action.act is Act.CLEAR_JOURNAL:
                fresh = True  # the Migration moved on: decide on what the server says now

    async def _look(self, key: str, fresh: bool) -> _Look | None:
        namespace, name = key.split("/", 1)
        hv_name = ol.hypervisor_name(namespace, name)
        vi: api.VirtualInstance | None
        if fresh:
            body = await k8s.call(self.kube.get_instance, namespace, name)
            vi = parse(api.VirtualInstance, body) if body is not None else None
            if body is not None and vi is None:
                return None  # unreadable: never act on a guess
            if vi is not None:
                self.remember(vi)
            found = await self.migration_reads.get(namespace)
            migrations = [m for m in found if m.spec.instance == name]
            self.draining = await self._read_drain()
        else:
            vi = self.vis.get(key)
            cached = self.migrations.get(key)
            migrations = [cached] if cached is not None else []
        mig = ol.open_migration(migrations, namespace, name, self.node)
        if fresh:
            if mig is None:
                self.migrations.pop(key, None)
            else:
                self.migrations[key] = mig
        with metrics.timed_driver_call("get_instance_info"):
            domain = await k8s.call(self.driver.get_instance_info, hv_name)
        entry = await k8s.call(journal.load, self.state_dir, hv_name)
        inputs = self._inputs(key, vi, fresh, mig, domain, entry)
        view = ml.MigrationView.of(mig) if mig is not None else None
        return _Look(inputs, view)

    def _inputs(  # noqa: PLR0917 - the decision's inputs, named once
        self,
        key: str,
        vi: api.VirtualInstance | None,
        fresh: bool,
        mig: api.Migration | None,
        domain: values.InstanceInfo | None,
        entry: journal.Entry | None,
    ) -> ol.Inputs:
        return ol.Inputs(
            node=self.node,
            instance=vi,
            fresh=fresh,
            migration=mig,
            domain=domain,
            journal=entry,
            node_draining=self.draining,
            history=self.history.setdefault(key, instance_logic.History()),
            now=time.time(),
            policy=self.policy,
        )

    async def _perform(self, key: str, look: _Look, action: ol.Action) -> bool:
        """Do ``action``; True if the owner should look again at once."""
        act = action.act
        inputs, view = look.inputs, look.migration
        hv_name = ol.hypervisor_name(*key.split("/", 1))
        if act in ol.MIGRATION_ACTS:
            try:
                await self._migration_act(act, view, hv_name, action.message)
            except (k8s.Conflict, k8s.NotFound):
                log.debug("%s: the Migration changed under us; deciding again", key)
            return True
        if act is Act.CLEAR_JOURNAL:
            await k8s.call(journal.clear, self.state_dir, hv_name)
            return True
        if inputs.instance is None:
            return False
        subject = instances.Subject(inputs.instance)
        observed = instance_logic.Observed(inputs.domain)
        if act in (Act.NOTHING, Act.WAIT):
            if inputs.instance.status.node_name == self.node and inputs.migration is None:
                await self.instance_acts.refresh(subject, observed)
            return False
        return await self.instance_acts.act(subject, observed, inputs.history, action)

    async def _migration_act(
        self, act: Act, view: ml.MigrationView | None, hv_name: str, message: str
    ) -> None:
        if view is None:
            if act is Act.CLEANUP_TARGET:  # a journal entry with no Migration left
                await self.target.cleanup(None, hv_name)
            return
        by_view: dict[Act, Callable[[ml.MigrationView], Awaitable[None]]] = {
            Act.PREPARE: self.source.prepare,
            Act.MIGRATE: self.source.migrate,
            Act.TRACK_COPY: self.source.track_copy,
            Act.FINALIZE_SOURCE: self.source.finalize,
            Act.CLEANUP_SOURCE: self.source.cleanup,
            Act.ACCEPT: self.target.accept,
            Act.FINALIZE_TARGET: self.target.finalize,
        }
        if act in by_view:
            await by_view[act](view)
        elif act is Act.CLEANUP_TARGET:
            await self.target.cleanup(view, hv_name)
        elif act is Act.TAKE_OVER:
            await self.target.take_over(view, message)
        elif act is Act.FAIL_NOT_ARRIVED:
            await self.target.not_arrived(view, message)
        elif act is Act.ABANDON:
            if ml.role_of(view, self.node) is ml.Role.SOURCE:
                await self.source.abandon(view, message)
            else:
                await self.target.abandon(view, hv_name, message)

    # --- the watcher (Ganeti's): compare everything with the hypervisor ------------------

    async def resync(self) -> None:
        """Poke every instance this node has anything to do with; one failure skips one."""
        try:
            self.draining = await self._read_drain()
        except Exception as exc:
            log.warning("watcher cannot read NodeHypervisor %s: %s", self.node, exc)
        await self._refresh_migrations()
        keys = set(self.vis) | set(self.migrations)
        for entry in await k8s.call(journal.load_all, self.state_dir):
            if entry.vi:
                keys.add(entry.vi)
        phases: dict[str, int] = {}
        for cached in self.vis.values():
            phase = cached.status.phase.value if cached.status.phase else "Pending"
            phases[phase] = phases.get(phase, 0) + 1
        metrics.set_instance_phases(phases)
        try:
            with metrics.timed_driver_call("get_all_instances_info"):
                infos = await k8s.call(self.driver.get_all_instances_info)
        except Exception as exc:
            log.warning("watcher cannot list instances: %s", exc)
            return
        by_name = {i.name: i for i in infos}
        busy = set(self.migrations) | {k for k in keys if k not in self.vis}
        for key in sorted(keys):
            try:
                if key in busy or self._drifted(key, by_name):
                    self.poke(key)
            except Exception:
                log.exception("watcher: cannot look at %s; the others go on", key)

    def _drifted(self, key: str, by_name: Mapping[str, Any]) -> bool:
        """A cheap look on cached inputs: is there anything to do or to report?"""
        vi = self.vis.get(key)
        if vi is None:
            return True
        namespace, name = key.split("/", 1)
        domain = by_name.get(ol.hypervisor_name(namespace, name))
        inputs = self._inputs(key, vi, False, None, domain, None)
        if ol.decide(inputs).act not in (Act.NOTHING, Act.WAIT):
            return True
        observed = instance_logic.Observed(domain)
        if vi.status.phase in (vim.Phase.RUNNING, vim.Phase.PAUSED) and not observed.alive:
            return True
        return observed.alive and bool(
            instance_logic.status_patch(vi, instance_logic.desired_status(vi, observed))
        )

    async def _refresh_migrations(self) -> None:
        seen: dict[str, api.Migration] = {}
        for field in (constants.FIELD_MIG_SOURCE, constants.FIELD_MIG_TARGET):
            try:
                items = await k8s.call(self.kube.list_migrations, f"{field}={self.node}")
            except Exception as exc:
                log.warning("cannot list migrations (%s): %s", field, exc)
                return
            for item in items:
                mig = parse(api.Migration, item)
                if mig is None:
                    continue
                if not ml.MigrationView.of(mig).settled:
                    seen[key_of(mig.metadata.namespace, mig.spec.instance)] = mig
        self.migrations = seen

    async def _read_drain(self) -> bool:
        """The node's drain flag, read fresh (shared with every owner asking meanwhile)."""
        return await self.drain_reads.get()

    async def _get_drain(self, _: object) -> bool:
        body = await k8s.call(self.kube.get_node, self.node)
        node = api.NodeHypervisor.model_validate(body) if body is not None else None
        return node is not None and node.spec.drain

    async def _list_namespace_migrations(self, namespace: object) -> list[api.Migration]:
        """Every Migration of ``namespace`` (parsed once; each owner keeps its instance's)."""
        found = await k8s.call(self.kube.list_migrations, "", str(namespace))
        return [m for m in (parse(api.Migration, b) for b in found) if m is not None]

    def known_instances(self) -> set[str]:
        """Hypervisor names of instances kubehv has a reason to run here (orphan check)."""
        names = {ol.hypervisor_name(*key.split("/", 1)) for key in self.vis}
        names |= {ol.hypervisor_name(*key.split("/", 1)) for key in self.migrations}
        return names
