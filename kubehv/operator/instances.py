"""The agent's VirtualInstance reconciler: acts on :func:`instance_logic.decide`.

Why this module exists: it is the I/O half of the agent's instance handling. kopf events and
the node-wide watcher loop (Ganeti's watcher) both call :meth:`Reconciler.reconcile`; a
per-instance lock serialises them. Driver calls run in threads; status is written only when
it changed. The VNC password goes from its Secret to a 0600 file in the state directory and
nowhere else (not status, Events or logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from kubehv.drivers import errors, values
from kubehv.operator import (
    context,
    events,
    instance_logic,
    k8s,
    metrics,
    status,
    translate,
    workloads,
)

log = logging.getLogger(__name__)
L = instance_logic
Do = L.Do
MAX_STEPS = 6


class Reconciler:
    def __init__(self, ctx: context.AgentContext) -> None:
        self.ctx = ctx
        self.kube = ctx.kube
        self.driver = ctx.driver
        self.policy = ctx.settings.policy
        self.bodies: dict[str, dict[str, Any]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.history: dict[str, L.History] = {}
        self.last_error: dict[str, str] = {}

    # --- entry points --------------------------------------------------------------------

    async def on_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        uid = str((body.get("metadata") or {}).get("uid", ""))
        if event_type == "DELETED":
            self.bodies.pop(uid, None)
            self.history.pop(uid, None)
            self.locks.pop(uid, None)
            return
        self._remember(body)
        await self.reconcile(uid)

    async def resync(self) -> None:
        """The watcher: compare every known instance with the hypervisor, fix what drifted."""
        try:
            with metrics.timed_driver_call("get_all_instances_info"):
                infos = await k8s.call(self.driver.get_all_instances_info)
        except Exception as exc:
            log.warning("watcher cannot list instances: %s", exc)
            return
        by_name = {i.name: i for i in infos}
        now = time.time()
        phases: dict[str, int] = {}
        for uid, body in list(self.bodies.items()):
            view = L.View.of(body)
            phases[view.phase or "Pending"] = phases.get(view.phase or "Pending", 0) + 1
            observed = L.Observed(by_name.get(view.name))
            hist = self.history.setdefault(uid, L.History())
            action = L.decide(view, observed, hist, now, self.policy)
            stale = L.status_patch(view, L.desired_status(view, observed)) if observed.alive else {}
            expected_alive = view.phase in (L.RUNNING, L.PAUSED) and not observed.alive
            if action.do not in (Do.NOTHING, Do.WAIT) or expected_alive or _real(stale):
                await self.reconcile(uid)
        metrics.set_instance_phases(phases)

    # --- one instance --------------------------------------------------------------------

    def remember(self, body: Mapping[str, Any]) -> None:
        """Keep ``body`` (a patch response of another writer on this agent) if it is newer."""
        self._remember(body)

    def _remember(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        old = self.bodies.get(uid)
        if old is not None and _rv(old) > _rv(body):
            return  # we already hold a newer copy (our own patch response)
        self.bodies[uid] = dict(body)

    async def reconcile(self, uid: str) -> None:
        lock = self.locks.setdefault(uid, asyncio.Lock())
        async with lock:
            with metrics.timed_reconcile("VirtualInstance"):
                for _ in range(MAX_STEPS):
                    body = self.bodies.get(uid)
                    if body is None:
                        return
                    if not await self._step(uid, body):
                        return

    async def _observe(self, name: str) -> L.Observed:
        with metrics.timed_driver_call("get_instance_info"):
            return L.Observed(await k8s.call(self.driver.get_instance_info, name))

    async def _step(self, uid: str, body: dict[str, Any]) -> bool:
        """Do one action; True if another look is needed at once."""
        view = L.View.of(body)
        observed = await self._observe(view.name)
        hist = self.history.setdefault(uid, L.History())
        action = L.decide(view, observed, hist, time.time(), self.policy)
        if action.do is Do.NOTHING or action.do is Do.WAIT:
            if view.phase != "Migrating" and not view.deleting and view.has_finalizer:
                failed = view.phase == "Failed" and not observed.alive
                if (not failed and observed.info is not None) or view.run_state == L.STOPPED:
                    await self._write(body, L.desired_status(view, observed))
            return False
        log.info("instance %s: %s", _key(body), action.do)
        try:
            return await self._act(uid, body, view, observed, hist, action)
        except errors.HypervisorError as exc:
            await self._failed_action(body, view, action, exc)
            return False

    async def _act(  # noqa: PLR0917
        self,
        uid: str,
        body: dict[str, Any],
        view: L.View,
        observed: L.Observed,
        hist: L.History,
        action: L.Action,
    ) -> bool:
        drv = self.driver
        do = action.do
        if do is Do.ADD_FINALIZER:
            meta = body.get("metadata") or {}
            finalizers = [*(meta.get("finalizers") or []), k8s.FINALIZER]
            patch = {"metadata": {"finalizers": finalizers, "resourceVersion": _rv_str(body)}}
            try:
                result = await k8s.call(self.kube.patch_vi, *_ns_name(body), patch)
            except Exception as exc:
                if k8s.is_status(exc, 409, 404):
                    return False  # a newer version is on its way to us
                raise
            self._remember(result)
            return True
        if do is Do.FINALIZE:
            await self._finalize(body, view)
            return False
        if do in (Do.START, Do.RESTART):
            return await self._start(uid, body, view, observed, hist, restart=do is Do.RESTART)
        if do is Do.CRASH_LOOP:
            await k8s.call(self._cleanup, view.name)
            new = L.desired_status(
                view,
                L.Observed(None),
                phase="Failed",
                ready_reason=L.REASON_CRASH_LOOP,
                message=action.message,
            )
            await self._write(body, new)
            await self._event(body, L.REASON_CRASH_LOOP, action.message, events.WARNING)
            return False
        spec = self._spec(body)
        if do is Do.STOP:
            with metrics.timed_driver_call("shutdown_instance"):
                forced = await k8s.call(drv.shutdown_instance, spec, self.policy.stop_timeout_s)
            await k8s.call(self._cleanup, view.name)
            how = "forced off after the graceful timeout" if forced else "shut down"
            await self._event(body, "Stopped", f"instance {view.name} {how}")
        elif do is Do.CLEANUP:
            await k8s.call(self._cleanup, view.name)
        elif do is Do.PAUSE:
            with metrics.timed_driver_call("pause_instance"):
                await k8s.call(drv.pause_instance, spec)
            await self._event(body, "Paused", f"instance {view.name} paused")
        elif do is Do.RESUME:
            with metrics.timed_driver_call("resume_instance"):
                await k8s.call(drv.resume_instance, spec)
            await self._event(body, "Resumed", f"instance {view.name} resumed")
        elif do is Do.REBOOT:
            with metrics.timed_driver_call("reboot_instance"):
                await k8s.call(drv.reboot_instance, spec)
            await self._event(body, "Rebooted", f"instance {view.name} rebooted on request")
            new = L.desired_status(
                view, await self._observe(view.name), reboot_generation=view.spec_reboot_generation
            )
            await self._write(body, new)
            return True
        elif do is Do.BALLOON:
            assert action.memory_mib is not None
            with metrics.timed_driver_call("balloon_instance_memory"):
                await k8s.call(drv.balloon_instance_memory, spec, action.memory_mib)
            await self._event(
                body, "Ballooned", f"instance {view.name} memory set to {action.memory_mib} MiB"
            )
        self.last_error.pop(uid, None)
        await self._write(body, L.desired_status(view, await self._observe(view.name)))
        return True

    # --- start ---------------------------------------------------------------------------

    def _spec(
        self,
        body: Mapping[str, Any],
        password_file: str | None = None,
        user_data: str | None = None,
    ) -> values.InstanceSpec:
        return translate.instance_spec(body, self.ctx.node_defaults, password_file, user_data)

    async def _start(  # noqa: PLR0917
        self,
        uid: str,
        body: dict[str, Any],
        view: L.View,
        observed: L.Observed,
        hist: L.History,
        restart: bool,
    ) -> bool:
        cls = self.ctx.driver_cls
        try:
            password_file = await self._password_file(body)
            spec = self._spec(body, password_file, await workloads.user_data(self.kube, body))
            checked = cls.check_parameter_syntax(spec.params)
            cls.validate_parameters(spec.params)
            spec = dataclasses.replace(spec, params=checked)
        except (errors.ParameterError, errors.InvalidInstanceSpec, ValueError) as exc:
            reason = getattr(exc, "reason", "InvalidInstance")
            message = getattr(exc, "message", str(exc))
            cond = status.Condition("ParametersValid", False, reason, message)
            new = L.desired_status(
                view,
                observed,
                phase="Failed",
                ready_reason=reason,
                message=message,
                params_valid=cond,
            )
            await self._write(body, new)
            await self._event(body, reason, message, events.WARNING)
            return False
        valid = status.Condition("ParametersValid", True, "Valid", "parameters valid on this node")
        now = time.time()
        if observed.state is not None:
            await k8s.call(self._cleanup, view.name)  # a crashed leftover of the last run
        try:
            with metrics.timed_driver_call("start_instance"):
                await k8s.call(
                    self.driver.start_instance, spec, startup_paused=view.run_state == L.PAUSED
                )
        except errors.InstanceAlreadyRunning:
            pass
        except errors.HypervisorError as exc:
            hist.failed_starts += 1
            hist.restarts.append(now)
            give_up = not exc.retryable or hist.failed_starts >= self.policy.crash_limit
            new = L.desired_status(
                view,
                L.Observed(None),
                phase="Failed" if give_up else "Starting",
                ready_reason=exc.reason,
                message=exc.message,
                params_valid=valid,
            )
            await self._write(body, new)
            await self._event(body, exc.reason, exc.message, events.WARNING)
            return False
        hist.failed_starts = 0
        restart_count = None
        if restart:
            hist.restarts.append(now)
            restart_count = int(view.status.get("restartCount") or 0) + 1
        observed = await self._observe(view.name)
        console = await k8s.call(self._console, spec)
        new = L.desired_status(
            view,
            observed,
            params_valid=valid,
            restart_count=restart_count,
            reboot_generation=view.spec_reboot_generation,
            console=console,
        )
        await self._write(body, new)
        mem = observed.info.memory_mib if observed.info else 0
        if restart:
            await self._event(
                body,
                "Restarted",
                f"instance {view.name} was not running; restarted on node "
                f"{self.ctx.node_name} (restart {restart_count})",
                events.WARNING,
            )
        else:
            await self._event(
                body,
                "Started",
                f"instance {view.name} started on {self.ctx.node_name} with {mem} MiB",
            )
        return True

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

    def _password_path(self, body: Mapping[str, Any]) -> str:
        ns, name = _ns_name(body)
        return os.path.join(self.ctx.settings.state_dir, "vnc", f"{ns}.{name}.password")

    async def _password_file(self, body: Mapping[str, Any]) -> str | None:
        ref = translate.vnc_secret_ref(body.get("spec") or {})
        if ref is None:
            return None
        ns, _ = _ns_name(body)
        secret = await k8s.call(self.kube.read_secret_key, ns, ref[0], ref[1])
        if secret is None:
            raise errors.InvalidInstanceSpec(
                f"VNC password Secret {ref[0]!r} (key {ref[1]!r}) not found in namespace {ns}"
            )
        path = self._password_path(body)
        await k8s.call(_write_private, path, secret)
        return path

    # --- stop / delete -------------------------------------------------------------------

    def _cleanup(self, name: str) -> None:
        with metrics.timed_driver_call("cleanup_instance"):
            self.driver.cleanup_instance(name)

    async def _finalize(self, body: dict[str, Any], view: L.View) -> None:
        spec = self._spec(body)
        with metrics.timed_driver_call("shutdown_instance"):
            await k8s.call(self.driver.shutdown_instance, spec, self.policy.stop_timeout_s)
        await k8s.call(self._cleanup, view.name)
        info = await k8s.call(self.driver.get_instance_info, view.name)
        if info is not None and info.state.is_alive:
            raise errors.InstanceStopError(f"instance {view.name} is still running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._password_path(body))
        with metrics.timed_driver_call("release_instance_storage"):
            await k8s.call(self.driver.release_instance_storage, spec)
        meta = body.get("metadata") or {}
        finalizers = [f for f in meta.get("finalizers") or [] if f != k8s.FINALIZER]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": _rv_str(body)}}
        try:
            await k8s.call(self.kube.patch_vi, *_ns_name(body), patch)
        except Exception as exc:
            if not k8s.is_status(exc, 404, 409):
                raise
        await self._event(body, "Deleted", f"instance {view.name} stopped and removed")

    # --- writes --------------------------------------------------------------------------

    async def _write(self, body: dict[str, Any], desired: Mapping[str, Any]) -> None:
        view = L.View.of(body)
        patch = L.status_patch(view, desired)
        if not _real(patch):
            return
        try:
            result = await k8s.call(self.kube.patch_vi_status, *_ns_name(body), patch)
        except Exception as exc:
            if k8s.is_status(exc, 404):
                return
            raise
        self._remember(result)

    async def _failed_action(
        self, body: dict[str, Any], view: L.View, action: L.Action, exc: errors.HypervisorError
    ) -> None:
        uid = str((body.get("metadata") or {}).get("uid", ""))
        text = f"{action.do} failed: {exc.message}"
        log.warning("instance %s: %s", _key(body), text)
        if self.last_error.get(uid) == text:
            return
        self.last_error[uid] = text
        await self._event(body, exc.reason, text, events.WARNING)
        observed = await self._observe(view.name)
        await self._write(body, L.desired_status(view, observed, ready_reason=None, message=text))

    async def _event(
        self, body: Mapping[str, Any], reason: str, message: str, type_: str = events.NORMAL
    ) -> None:
        await events.apost(
            self.kube,
            body,
            reason,
            message,
            type_=type_,
            component=f"kubehv-agent/{self.ctx.node_name}",
        )


def _real(patch: Mapping[str, Any]) -> bool:
    """A patch that only refreshes lastTransitionTime-free equal data is no patch at all."""
    return bool(patch)


def _rv(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _rv_str(body: Mapping[str, Any]) -> str | None:
    rv = (body.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def _ns_name(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _key(body: Mapping[str, Any]) -> str:
    ns, name = _ns_name(body)
    return f"{ns}/{name}"


def _write_private(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
