"""The agent's auto-balloon loop: gathers the policy's inputs, applies its targets.

Why this module exists: :mod:`balloon_policy` decides, this module does the I/O around it,
once per ``balloon_interval_s``: which of this node's instances are auto-ballooned
(``spec.autoBalloon.enabled`` without a fixed ``target``, phase Running), their balloon
statistics from the driver, the node's free memory and PSI, the NodeHypervisor's
``guestMemoryCap``; then one ``balloon_instance_memory`` per guest whose target moved, run by
that instance's owner (:meth:`owner.Owner.alone`), so a balloon move never races a start,
stop or migration step of the same instance. Every move is visible: ``status.actualMemory`` and
``status.guestUsedMemory`` (the owner and this loop), an Event on moves of at least
``Knobs.large_move_mib``, and per-guest gauges ``kubehv_balloon_*_mib``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import prometheus_client

from kubehv import api
from kubehv.api import quantity
from kubehv.drivers import errors, values
from kubehv.operator import balloon_policy as policy
from kubehv.operator import context, events, k8s, memory_node, metrics, translate
from kubehv.operator import owner as owner_mod

log = logging.getLogger(__name__)

NHV_REFRESH_S = 10.0
USED_REPORT_STEP_MIB = 8  # guestUsedMemory is rewritten only when it moved this much

ACTUAL = prometheus_client.Gauge(
    "kubehv_balloon_actual_mib",
    "Memory an auto-ballooned guest has (balloon size), MiB.",
    ["instance"],
    registry=metrics.REGISTRY,
)
TARGET = prometheus_client.Gauge(
    "kubehv_balloon_target_mib",
    "Balloon target the policy picked for an auto-ballooned guest, MiB.",
    ["instance"],
    registry=metrics.REGISTRY,
)
USED = prometheus_client.Gauge(
    "kubehv_balloon_guest_used_mib",
    "Memory an auto-ballooned guest uses (actual - usable), MiB.",
    ["instance"],
    registry=metrics.REGISTRY,
)
MOVES = prometheus_client.Counter(
    "kubehv_balloon_moves",
    "Balloon moves made by the auto-balloon loop, by direction (grow, shrink) and result.",
    ["direction", "result"],
    registry=metrics.REGISTRY,
)
PRESSURE = prometheus_client.Gauge(
    "kubehv_balloon_node_pressure",
    "1 while the auto-balloon policy sees memory pressure on this node.",
    registry=metrics.REGISTRY,
)


def auto_ballooned(vi: api.VirtualInstance, node: str) -> bool:
    """Whether the loop, not a fixed target, drives this instance's balloon now."""
    spec, st = vi.spec, vi.status
    return (
        spec.auto_balloon.enabled
        and spec.auto_balloon.target is None
        and spec.run_state is api.virtualinstance.RunState.RUNNING
        and st.node_name == node
        and st.phase is api.virtualinstance.Phase.RUNNING
        and not vi.metadata.deletion_timestamp
    )


class BalloonLoop:
    """One per agent; reads the owner's instances and acts through the owner."""

    def __init__(
        self,
        ctx: context.AgentContext,
        owner: owner_mod.Owner,
        knobs: policy.Knobs | None = None,
    ) -> None:
        self.ctx = ctx
        self.owner = owner
        self.knobs = knobs or policy.Knobs()
        self.states: dict[str, policy.GuestState] = {}
        self.cap_mib: int | None = None
        self.nhv_read_at = 0.0
        self.reported_used: dict[str, int] = {}

    async def run_forever(self) -> None:
        interval = self.ctx.settings.balloon_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("balloon pass failed; will try again")

    async def _refresh_cap(self) -> None:
        now = time.monotonic()
        if now - self.nhv_read_at < NHV_REFRESH_S:
            return
        body = await k8s.call(self.ctx.kube.get_node, self.ctx.node_name)
        self.nhv_read_at = now
        if body is not None:
            nhv = api.NodeHypervisor.model_validate(body)
            self.cap_mib = translate.to_mib(nhv.spec.guest_memory_cap)

    async def tick(self) -> policy.Outcome | None:
        """One pass: read, decide, apply. Returns the policy's outcome (None: nothing to do)."""
        drv = self.ctx.driver
        bodies = {
            key: vi
            for key, vi in self.owner.instances().items()
            if auto_ballooned(vi, self.ctx.node_name)
        }
        if not bodies and not self.states:
            return None  # nothing auto-ballooned here: no driver or API calls at all
        await self._refresh_cap()
        with metrics.timed_driver_call("get_all_instances_info"):
            infos = await k8s.call(drv.get_all_instances_info)
        names = {key: translate.instance_name(vi) for key, vi in bodies.items()}
        auto_names = set(names.values())
        fixed = sum(i.memory_mib for i in infos if i.name not in auto_names)
        guests: list[policy.Guest] = []
        by_name: dict[str, str] = {}
        for key, vi in bodies.items():
            stats = await self._stats(names[key])
            if stats is None:
                continue
            mem = vi.spec.memory
            guests.append(policy.Guest(names[key], mem.min_mib, mem.max_mib, stats))
            by_name[names[key]] = key
        self._forget(set(by_name))
        if not guests:
            PRESSURE.set(0)
            return None
        node = await self._node(fixed)
        outcome = policy.decide(guests, node, self.states, time.time(), self.knobs)
        PRESSURE.set(1 if outcome.pressure else 0)
        for g in guests:
            target = outcome.targets[g.name]
            self.states[g.name] = target.state
            ACTUAL.labels(instance=g.name).set(g.stats.actual_mib)
            TARGET.labels(instance=g.name).set(target.target_mib)
            if g.stats.used_mib is not None:
                USED.labels(instance=g.name).set(g.stats.used_mib)
        # Shrinks first: growth was granted from the memory they give back.
        order = sorted(guests, key=lambda g: outcome.targets[g.name].move_mib)
        for g in order:
            key = by_name[g.name]
            target = outcome.targets[g.name]
            if target.move_mib:
                await self._move(key, target)
            await self._report_used(key, g.stats)
        return outcome

    async def _stats(self, name: str) -> values.MemoryStats | None:
        try:
            with metrics.timed_driver_call("get_instance_memory_stats"):
                return await k8s.call(self.ctx.driver.get_instance_memory_stats, name)
        except errors.HypervisorError as exc:
            log.debug("no balloon stats for %s: %s", name, exc)
            return None

    async def _node(self, fixed_mib: int) -> policy.Node:
        local = await k8s.call(memory_node.read)
        with metrics.timed_driver_call("get_node_info"):
            info = await k8s.call(self.ctx.driver.get_node_info)
        available = info.memory_free_mib
        if local.mem_available_mib is not None and self.ctx.driver.NAME != "fake":
            available = min(available, local.mem_available_mib)
        return policy.Node(
            mem_available_mib=available,
            psi_some_avg10=local.psi_some_avg10 if self.ctx.driver.NAME != "fake" else None,
            cap_mib=self.cap_mib,
            fixed_guests_mib=fixed_mib,
        )

    def _forget(self, live: set[str]) -> None:
        for name in list(self.states):
            if name not in live:
                self.states.pop(name, None)
                for gauge in (ACTUAL, TARGET, USED):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)

    async def _move(self, key: str, target: policy.Target) -> None:
        if self.owner.busy(key):
            return  # its owner is acting on it (start, stop, migration...): next pass
        await self.owner.alone(key, lambda: self._balloon(key, target))

    async def _balloon(self, key: str, target: policy.Target) -> None:
        vi = self.owner.instances().get(key)
        if vi is None or not auto_ballooned(vi, self.ctx.node_name):
            return  # it changed while we decided: next pass
        spec = translate.instance_spec(vi, self.ctx.node_defaults)
        direction = "grow" if target.move_mib > 0 else "shrink"
        try:
            with metrics.timed_driver_call("balloon_instance_memory"):
                await k8s.call(self.ctx.driver.balloon_instance_memory, spec, target.target_mib)
        except errors.HypervisorError as exc:
            MOVES.labels(direction=direction, result="error").inc()
            log.warning("balloon %s to %s MiB failed: %s", spec.name, target.target_mib, exc)
            return
        MOVES.labels(direction=direction, result="ok").inc()
        log.info(
            "balloon %s: %s -> %s MiB (%s)",
            spec.name,
            target.actual_mib,
            target.target_mib,
            target.why,
        )
        if abs(target.move_mib) >= self.knobs.large_move_mib:
            await events.apost(
                self.ctx.kube,
                vi,
                "Ballooned",
                f"auto-balloon moved {spec.name} from {target.actual_mib} MiB to "
                f"{target.target_mib} MiB ({target.why})",
                component=f"kubehv-agent/{self.ctx.node_name}",
            )

    async def _report_used(self, key: str, stats: values.MemoryStats) -> None:
        """Keep ``status.guestUsedMemory`` current, writing it only when it moved."""
        vi = self.owner.instances().get(key)
        used = stats.used_mib
        if vi is None or used is None:
            return
        last = self.reported_used.get(key)
        if last is not None and abs(last - used) < USED_REPORT_STEP_MIB:
            return
        wanted = quantity.format_mib(used)
        if vi.status.guest_used_memory == wanted:
            self.reported_used[key] = used
            return
        ns, name = vi.metadata.namespace or "", vi.metadata.name or ""
        try:
            result = await k8s.call(
                self.ctx.kube.patch_vi_status, ns, name, {"guestUsedMemory": wanted}
            )
        except Exception as exc:
            if not k8s.is_status(exc, 404):
                log.warning("cannot report guest memory of %s/%s: %s", ns, name, exc)
            return
        self.reported_used[key] = used
        self.owner.remember_body(result)  # keep the owner's copy fresh
