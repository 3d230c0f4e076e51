"""The instance acts of the owner: start, stop, pause, reboot, balloon, evict, finalize.

Why this module exists: it is the I/O half of the owner's instance decisions
(:mod:`owner_logic`). The owner (:mod:`owner`) calls :meth:`InstanceActs.act` with one
decided act, under its per-instance serialisation; driver calls run in threads, status is
written only when it changed. The VNC password goes from its Secret (through the agent's
:mod:`secret_source`: the controller's hand-over in a cluster) to a 0600 file in the state
directory and nowhere else (not status, Events or logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubehv import api
from kubehv.api import constants
from kubehv.api import virtualinstance as vim
from kubehv.drivers import errors, values
from kubehv.operator import (
    context,
    events,
    instance_logic,
    k8s,
    metrics,
    secret_source,
    status,
    translate,
    workloads,
)
from kubehv.operator import owner_logic as ol

log = logging.getLogger(__name__)
IL = instance_logic
Act = ol.Act

REASON_EVICTED = "NodeDrained"
CLAIM_BEFORE_START = frozenset(
    {vim.Phase.STOPPED, vim.Phase.FAILED, vim.Phase.EVICTED, vim.Phase.PENDING}
)
"""Phases another writer may move the instance away from: a start claims them first."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """The instance an act is about (the typed model, as last read)."""

    vi: api.VirtualInstance

    @property
    def name(self) -> str:
        """The hypervisor-level name."""
        return ol.hypervisor_name(self.vi.metadata.namespace or "", self.vi.metadata.name or "")

    @property
    def namespace(self) -> str:
        return self.vi.metadata.namespace or ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.vi.metadata.name}"


class InstanceActs:
    def __init__(
        self, ctx: context.AgentContext, remember: Callable[[Mapping[str, Any]], None]
    ) -> None:
        self.ctx = ctx
        self.kube = ctx.kube
        self.driver = ctx.driver
        self.policy = ctx.settings.policy
        self.remember = remember
        self.last_error: dict[str, str] = {}

    # --- entry points --------------------------------------------------------------------

    async def observe(self, name: str) -> IL.Observed:
        with metrics.timed_driver_call("get_instance_info"):
            return IL.Observed(await k8s.call(self.driver.get_instance_info, name))

    async def refresh(self, subject: Subject, observed: IL.Observed) -> None:
        """NOTHING/WAIT: keep the agent-owned status true to the hypervisor."""
        vi = subject.vi
        st = vi.status
        if (
            st.phase is vim.Phase.MIGRATING
            or ol.deleting(vi)
            or not ol.has_finalizer(vi)
            or (st.phase in (vim.Phase.EVICTED, vim.Phase.UNKNOWN) and observed.info is None)
        ):
            return
        failed = st.phase is vim.Phase.FAILED and not observed.alive
        if (not failed and observed.info is not None) or vi.spec.run_state.value == IL.STOPPED:
            await self.write(subject, IL.desired_status(vi, observed))

    async def act(
        self, subject: Subject, observed: IL.Observed, hist: IL.History, action: ol.Action
    ) -> bool:
        """Do one instance act; True if the owner should look again at once."""
        log.info("instance %s: %s", subject.key, action.act)
        try:
            return await self._act(subject, observed, hist, action)
        except errors.HypervisorError as exc:
            await self._failed_action(subject, action, exc)
            return False

    async def _act(
        self, subject: Subject, observed: IL.Observed, hist: IL.History, action: ol.Action
    ) -> bool:
        drv, vi, name, act = self.driver, subject.vi, subject.name, action.act
        if act is Act.ADD_FINALIZER:
            return await self._set_finalizer(subject, add=True)
        if act is Act.FINALIZE:
            await self._finalize(subject)
            return False
        if act in (Act.START, Act.RESTART):
            return await self._start(subject, observed, hist, restart=act is Act.RESTART)
        if act in (Act.CRASH_LOOP, Act.MARK_LOST):
            await k8s.call(self._cleanup, name)
            reason = IL.REASON_CRASH_LOOP if act is Act.CRASH_LOOP else ol.REASON_LOST
            new = IL.desired_status(
                vi, IL.Observed(None), phase="Failed", ready_reason=reason, message=action.message
            )
            await self.write(subject, new)
            await self._event(subject, reason, action.message, events.WARNING)
            return False
        if act is Act.EVICT:
            return await self._evict(subject, action)
        if act is Act.RELEASE_MIGRATING:
            return await self._release_migrating(subject, observed)
        spec = self._spec(subject.vi)
        if act is Act.STOP:
            with metrics.timed_driver_call("shutdown_instance"):
                forced = await k8s.call(drv.shutdown_instance, spec, self.policy.stop_timeout_s)
            await k8s.call(self._cleanup, name)
            how = "forced off after the graceful timeout" if forced else "shut down"
            await self._event(subject, "Stopped", f"instance {name} {how}")
        elif act is Act.CLEANUP:
            await k8s.call(self._cleanup, name)
        elif act is Act.PAUSE:
            with metrics.timed_driver_call("pause_instance"):
                await k8s.call(drv.pause_instance, spec)
            await self._event(subject, "Paused", f"instance {name} paused")
        elif act is Act.RESUME:
            with metrics.timed_driver_call("resume_instance"):
                await k8s.call(drv.resume_instance, spec)
            await self._event(subject, "Resumed", f"instance {name} resumed")
        elif act is Act.REBOOT:
            with metrics.timed_driver_call("reboot_instance"):
                await k8s.call(drv.reboot_instance, spec)
            await self._event(subject, "Rebooted", f"instance {name} rebooted on request")
            new = IL.desired_status(
                vi, await self.observe(name), reboot_generation=vi.spec.reboot_generation
            )
            await self.write(subject, new)
            return True
        elif act is Act.BALLOON:
            assert action.memory_mib is not None
            with metrics.timed_driver_call("balloon_instance_memory"):
                await k8s.call(drv.balloon_instance_memory, spec, action.memory_mib)
            await self._event(
                subject, "Ballooned", f"instance {name} memory set to {action.memory_mib} MiB"
            )
        else:
            raise ValueError(f"not an instance act: {act}")
        self.last_error.pop(subject.key, None)
        await self.write(subject, IL.desired_status(vi, await self.observe(name)))
        return True

    # --- start ---------------------------------------------------------------------------

    def _spec(
        self,
        vi: api.VirtualInstance,
        password_file: str | None = None,
        user_data: str | None = None,
    ) -> values.InstanceSpec:
        return translate.instance_spec(vi, self.ctx.node_defaults, password_file, user_data)

    async def _start(
        self, subject: Subject, observed: IL.Observed, hist: IL.History, restart: bool
    ) -> bool:
        cls = self.ctx.driver_cls
        vi, name = subject.vi, subject.name
        try:
            password_file = await self._password_file(subject)
            user_data = await workloads.user_data(self.ctx.secrets, subject.vi)
            spec = self._spec(subject.vi, password_file, user_data)
            checked = cls.check_parameter_syntax(spec.params)
            cls.validate_parameters(spec.params)
            spec = dataclasses.replace(spec, params=checked)
        except (errors.ParameterError, errors.InvalidInstanceSpec, ValueError) as exc:
            reason = getattr(exc, "reason", "InvalidInstance")
            message = getattr(exc, "message", str(exc))
            cond = status.Condition("ParametersValid", False, reason, message)
            new = IL.desired_status(
                vi,
                observed,
                phase="Failed",
                ready_reason=reason,
                message=message,
                params_valid=cond,
            )
            await self.write(subject, new)
            await self._event(subject, reason, message, events.WARNING)
            return False
        valid = status.Condition("ParametersValid", True, "Valid", "parameters valid on this node")
        if vi.status.phase in CLAIM_BEFORE_START:
            # Another writer (the drain re-placing a stopped instance) may act on this phase:
            # claim the instance with a guarded write before the irreversible start.
            try:
                result = await self._guarded(subject, {"phase": "Starting"})
            except k8s.Conflict:
                return True  # changed meanwhile: the owner reads again and decides again
            self.remember(result)
            subject = Subject(api.VirtualInstance.model_validate(result))
            vi = subject.vi
        now = time.time()
        if observed.state is not None:
            await k8s.call(self._cleanup, name)  # a crashed leftover of the last run
        images = workloads.ImageFetch(self.kube, self.driver, vi, self.remember)
        try:
            await images.run(spec)  # downloads shown in ImagesReady before the start
            with metrics.timed_driver_call("start_instance"):
                await k8s.call(
                    self.driver.start_instance,
                    spec,
                    startup_paused=vi.spec.run_state is vim.RunState.PAUSED,
                    on_slow=lambda what: self._still_waiting(Subject(images.vi), what),
                )
        except errors.InstanceAlreadyRunning:
            pass
        except errors.HypervisorError as exc:
            subject = Subject(images.vi)
            vi = subject.vi
            hist.failed_starts += 1
            hist.restarts.append(now)
            give_up = not exc.retryable or hist.failed_starts >= self.policy.crash_limit
            new = IL.desired_status(
                vi,
                IL.Observed(None),
                phase="Failed" if give_up else "Starting",
                ready_reason=exc.reason,
                message=exc.message,
                params_valid=valid,
            )
            await self.write(subject, new)
            await self._event(subject, exc.reason, exc.message, events.WARNING)
            return False
        subject = Subject(images.vi)
        vi = subject.vi
        hist.failed_starts = 0
        restart_count = None
        if restart:
            hist.restarts.append(now)
            restart_count = int(vi.status.restart_count or 0) + 1
        observed = await self.observe(name)
        console = await k8s.call(self._console, spec)
        new = IL.desired_status(
            vi,
            observed,
            params_valid=valid,
            restart_count=restart_count,
            reboot_generation=vi.spec.reboot_generation,
            console=console,
        )
        # The Event first, then the status that shows the result: whoever sees Running can
        # already read why.
        mem = observed.info.memory_mib if observed.info else 0
        node = self.ctx.node_name
        if restart:
            await self._event(
                subject,
                "Restarted",
                f"instance {name} was not running; restarted on node {node} "
                f"(restart {restart_count})",
                events.WARNING,
            )
        else:
            await self._event(
                subject, "Started", f"instance {name} started on {node} with {mem} MiB"
            )
        await self.write(subject, new)
        return True

    async def _still_waiting(self, subject: Subject, what: str) -> None:
        """A driver call that has not returned: say so in Ready, not nothing (the owner
        keeps waiting; the result, when it comes, writes the status as usual)."""
        message = (
            f"{what.rsplit('.', 1)[-1]} has not returned after {k8s.SLOW_CALL_S:.0f} s; the agent "
            f"on node {self.ctx.node_name} keeps waiting for the hypervisor (its log shows "
            "where the call waits)"
        )
        new = IL.desired_status(
            subject.vi,
            IL.Observed(None),
            phase="Starting",
            ready_reason="HypervisorNotResponding",
            message=message,
        )
        # The Event first: whoever sees the condition can already read it in the Events too.
        await self._event(subject, "HypervisorNotResponding", message, events.WARNING)
        await self.write(subject, new)

    def _console(self, spec: values.InstanceSpec) -> str:
        """The console endpoint as one line (never a password)."""
        try:
            info = self.driver.get_instance_console(spec)
        except errors.HypervisorError:
            return ""
        if info.host and info.port:
            return f"{info.kind}://{info.host}:{info.port}"
        if info.command:
            return " ".join(info.command)
        return f"{info.kind}: {info.message}" if info.message else str(info.kind)

    def _password_path(self, subject: Subject) -> str:
        return os.path.join(
            self.ctx.settings.state_dir,
            "vnc",
            f"{subject.namespace}.{subject.vi.metadata.name}.password",
        )

    async def _password_file(self, subject: Subject) -> str | None:
        ref = subject.vi.spec.console.vnc.password_secret_ref
        if not subject.vi.spec.console.vnc.enabled or ref is None:
            return None
        ns = subject.namespace
        try:
            secret = await self.ctx.secrets.read_secret_key(ns, ref.name, ref.key)
        except secret_source.SecretRefused as exc:
            raise errors.InvalidInstanceSpec(
                f"cannot read the VNC password (Secret {ref.name!r} in namespace {ns}): {exc}"
            ) from exc
        if secret is None:
            raise errors.InvalidInstanceSpec(
                f"VNC password Secret {ref.name!r} (key {ref.key!r}) not found in namespace {ns}"
            )
        path = self._password_path(subject)
        await k8s.call(_write_private, path, secret)
        return path

    # --- drain, migration leftovers ------------------------------------------------------

    async def _evict(self, subject: Subject, action: ol.Action) -> bool:
        """Drain, evictionPolicy Stop: shut the guest down, THEN write phase Evicted (guarded).

        Evicted is what lets the controller re-place the instance, so it is written only once
        the domain is gone (I1: the re-placed copy must never overlap this one; a guest that
        ignores the power button is forced off after the stop timeout first). Until then
        nothing else acts here: the owner is serialised and, while the node drains, decides
        EVICT again (a no-op shutdown, then the write) after a crash or a conflict.
        """
        spec = self._spec(subject.vi)
        with metrics.timed_driver_call("shutdown_instance"):
            await k8s.call(self.driver.shutdown_instance, spec, self.policy.stop_timeout_s)
        await k8s.call(self._cleanup, subject.name)
        cond = status.Condition("Evicted", True, REASON_EVICTED, action.message)
        new = {
            "phase": "Evicted",
            "conditions": status.merge_model_conditions(subject.vi.status.conditions, [cond]),
        }
        try:
            result = await self._guarded(subject, new)
        except k8s.Conflict:
            return True  # changed meanwhile: decide again on the newer object
        self.remember(result)
        await self._event(subject, "Evicted", f"instance {subject.name} stopped: {action.message}")
        return False

    async def _release_migrating(self, subject: Subject, observed: IL.Observed) -> bool:
        """Phase Migrating and no Migration owns it: show what the hypervisor says."""
        alive = observed.alive
        reason = "MigrationGone"
        message = "no Migration owns the instance any more"
        cond = status.Condition("Migrating", False, reason, message)
        new: dict[str, Any] = {
            "phase": IL.phase_for(subject.vi, observed) if alive else "Failed",
            "conditions": status.merge_model_conditions(subject.vi.status.conditions, [cond]),
        }
        if not alive:
            ready = status.Condition(
                "Ready",
                False,
                ol.REASON_MIGRATED_AWAY,
                f"instance {subject.name} is not on node {self.ctx.node_name} after a migration "
                "ended without a record; it is not restarted because it may run on the target. "
                "Check the other nodes, then change the spec to start it",
            )
            new["conditions"] = status.merge_model_conditions(
                subject.vi.status.conditions, [cond, ready]
            )
            new["observedGeneration"] = subject.vi.metadata.generation or 0
        try:
            result = await self._guarded(subject, new)
        except k8s.Conflict:
            return True
        self.remember(result)
        return True

    # --- stop / delete -------------------------------------------------------------------

    def _cleanup(self, name: str) -> None:
        with metrics.timed_driver_call("cleanup_instance"):
            self.driver.cleanup_instance(name)

    async def _set_finalizer(self, subject: Subject, add: bool) -> bool:
        current = list(subject.vi.metadata.finalizers)
        finalizers = (
            [*current, constants.INSTANCE_FINALIZER]
            if add
            else [f for f in current if f != constants.INSTANCE_FINALIZER]
        )
        rv = subject.vi.metadata.resource_version
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": rv}}
        try:
            result = await k8s.call(
                self.kube.patch_vi, subject.namespace, subject.vi.metadata.name, patch
            )
        except (k8s.Conflict, k8s.NotFound):
            return False  # a newer version is on its way to us
        if add:
            self.remember(result)
        return True

    async def _finalize(self, subject: Subject) -> None:
        spec = self._spec(subject.vi)
        with metrics.timed_driver_call("shutdown_instance"):
            await k8s.call(self.driver.shutdown_instance, spec, self.policy.stop_timeout_s)
        await k8s.call(self._cleanup, subject.name)
        info = await k8s.call(self.driver.get_instance_info, subject.name)
        if info is not None and info.state.is_alive:
            raise errors.InstanceStopError(f"instance {subject.name} is still running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._password_path(subject))
        with metrics.timed_driver_call("release_instance_storage"):
            await k8s.call(self.driver.release_instance_storage, spec)
        await self._set_finalizer(subject, add=False)
        await self._event(subject, "Deleted", f"instance {subject.name} stopped and removed")

    # --- writes --------------------------------------------------------------------------

    async def write(self, subject: Subject, desired: Mapping[str, Any]) -> None:
        patch = IL.status_patch(subject.vi, desired)
        if not patch:
            return
        try:
            result = await k8s.call(
                self.kube.patch_vi_status, subject.namespace, subject.vi.metadata.name, patch
            )
        except k8s.NotFound:
            return
        self.remember(result)

    async def _guarded(self, subject: Subject, status_patch: Mapping[str, Any]) -> dict[str, Any]:
        """A status write that loses (:class:`k8s.Conflict`) to any write since our read."""
        meta = subject.vi.metadata
        return await k8s.call(
            self.kube.patch_vi_status,
            subject.namespace,
            meta.name or "",
            status_patch,
            meta.resource_version,
        )

    async def _failed_action(
        self, subject: Subject, action: ol.Action, exc: errors.HypervisorError
    ) -> None:
        text = f"{action.act} failed: {exc.message}"
        log.warning("instance %s: %s", subject.key, text)
        if self.last_error.get(subject.key) == text:
            return
        self.last_error[subject.key] = text
        await self._event(subject, exc.reason, text, events.WARNING)
        observed = await self.observe(subject.name)
        await self.write(subject, IL.desired_status(subject.vi, observed, message=text))

    async def _event(
        self, subject: Subject, reason: str, message: str, type_: str = events.NORMAL
    ) -> None:
        await events.apost(
            self.kube,
            subject.vi,
            reason,
            message,
            type_=type_,
            component=f"kubehv-agent/{self.ctx.node_name}",
        )


def _write_private(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
