"""The exactly-once fault matrix on real kvm guests (issue 11, Proof B): scenarios and runner.

Why: an instance must run exactly once whatever fails at whatever moment. Each scenario
boots one small TCG guest on its own lane (kvm_lanes.py), migrates it, hits one phase with
one fault, recovers, and checks from the hypervisors' side that the guest runs once, where the
VirtualInstance says (kvm_scenario.Run.settle). Phases are hit with a watch on the Migration
(Preparing, TargetReady, Finalizing: the moment they are written) and with the bandwidth cap
(Running early: a slow copy; Running completing: a faster copy that ends while the actor is
down or frozen). Lane-local scenarios run side by side, one per lane; those that kill the
controller, run two controller replicas or restart the API server touch every lane and run
alone afterwards. ``run_all`` runs the selection once; the tests (test_faults_kvm_matrix.py)
each assert one outcome, and tests/faults/conftest.py prints the table.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import kubernetes
from kvm_lanes import FREEZE_S, GRACE_S, LAUNCHER, FaultKvmCluster, FaultProc, Lane
from kvm_scenario import TERMINAL, Outcome, PhaseWatch, Run, Sampler, ScenarioFailed, phase_is

from kubehv.devenv.controlplane import free_port
from tests.fixtures.kube import fresh_namespace
from tests.fixtures.operator import wait_for

PHASES = ("Preparing", "TargetReady", "RunningEarly", "RunningCompletes", "Finalizing")
AGENT_FAULTS = ("kill-src", "kill-dst", "stop-src", "stop-dst")
BANDWIDTH = {"RunningEarly": 6, "RunningCompletes": 24}
"""MiB/s for a 128 MiB guest: ~20 s of copy to be hit early, ~5 s to complete while down."""
FAST = 48
DOWN_S = 5.0
"""How long a killed process stays dead (unless the scenario waits for the copy to end)."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    id: str
    fn: Callable[[Run, Scenario], None]
    mode: str = "live"
    phase: str = ""
    fault: str = ""
    cluster_wide: bool = False
    namespace_owned: bool = False
    """The scenario deletes its own namespace (no fresh_namespace teardown)."""


# --- the phase x fault scenarios ---------------------------------------------------------------


def _boot(run: Run, **spec: Any) -> str:
    run.guest(**spec)
    st = run.wait_vi(lambda s: s.get("phase") == "Running" and bool(s.get("nodeName")), "Running")
    run.booted = True
    return str(st["nodeName"])


def _victim(run: Run, fault: str, source: str) -> FaultProc:
    if fault == "kill-controller":
        return run.cluster.controller
    node = source if fault.endswith("-src") else run.lane.other(source)
    return run.lane.agents[node]


def _trigger(phase: str) -> Callable[[dict[str, Any]], bool]:
    if phase in ("RunningEarly", "RunningCompletes"):
        return phase_is("Running")
    return phase_is(phase)


def phase_fault(run: Run, sc: Scenario) -> None:
    source = _boot(run)
    target = run.lane.other(source)
    victim = _victim(run, sc.fault, source)
    freeze = sc.fault.startswith("stop-")
    completes = sc.phase == "RunningCompletes"

    def hit() -> None:
        if completes:  # a few seconds into the copy, so that it ends while the actor is down
            deadline = time.monotonic() + 3.0
            while (
                time.monotonic() < deadline
                and (run.mig_status().get("progress") or {}).get("percent", 0) < 40
            ):
                time.sleep(0.1)
        (victim.freeze if freeze else victim.kill)()

    watch = PhaseWatch(run, _trigger(sc.phase), hit).start()
    run.migrate(
        targetNode=target, mode=sc.mode, bandwidth=BANDWIDTH.get(sc.phase, FAST),
        completionTimeout=300,
    )  # fmt: skip
    try:
        _await(run, watch, f"phase {sc.phase}")
        run.outcome.hit = str(run.mig_status().get("phase") or "")
        started = time.monotonic()
        if completes:
            with contextlib.suppress(ScenarioFailed):
                run.wait(lambda: run.copy_done(source), "the copy to end", 60)
            run.note(f"copy ended while down: {run.copies()}")
        while time.monotonic() - started < (FREEZE_S if freeze else DOWN_S):
            time.sleep(0.2)
    finally:
        if freeze:
            victim.thaw()
        else:
            victim.start()
    run.settle()


def _await(run: Run, watch: PhaseWatch, what: str, timeout: float = 180) -> None:
    """Wait for the watch to fire; fail with the phases seen and the Migration's reason."""
    if not watch.wait(timeout):
        why = run.mig_status().get("failureReason")
        raise ScenarioFailed(f"{what} never seen; phases {watch.seen}: {why}")


# --- abort, delete ---------------------------------------------------------------------------


def abort_racing_completion(run: Run, sc: Scenario) -> None:
    source = _boot(run)

    def abort() -> None:
        run.patch("migrations", run.mig, {"metadata": {"annotations": {"kubehv.io/abort": "true"}}})

    def nearly_done(body: dict[str, Any]) -> bool:
        st = body.get("status") or {}
        return st.get("phase") == "Finalizing" or (
            st.get("phase") == "Running" and (st.get("progress") or {}).get("percent", 0) >= 85
        )

    watch = PhaseWatch(run, nearly_done, abort).start()
    run.migrate(targetNode=run.lane.other(source), bandwidth=24)
    _await(run, watch, "near completion")
    run.outcome.hit = str(run.mig_status().get("phase") or "")
    run.settle()


def delete_instance_mid_migration(run: Run, sc: Scenario) -> None:
    source = _boot(run)

    def delete() -> None:
        run.custom.delete_namespaced_custom_object(
            "kubehv.io", "v1alpha1", run.ns, "virtualinstances", run.vm
        )

    watch = PhaseWatch(run, phase_is("Running"), delete).start()
    run.migrate(targetNode=run.lane.other(source), bandwidth=12)
    _await(run, watch, "phase Running", 180)
    run.outcome.hit = str(run.mig_status().get("phase") or "")
    _all_gone(run, "the instance deleted mid-migration")


def _all_gone(run: Run, what: str) -> None:
    last: dict[str, Any] = {}

    def gone() -> bool:
        last.update(vi=run.vi_status() or None, mig=run.migration() or None, dom=run.copies())
        return not (last["vi"] or last["dom"]) and (
            last["mig"] is None or (last["mig"].get("status") or {}).get("phase") in TERMINAL
        )

    try:
        run.wait(gone, what, 120)
    except ScenarioFailed:
        mig = last.get("mig") or {}
        raise ScenarioFailed(
            f"{what}: after 120 s VI {last.get('vi')}, domain copies {last.get('dom')}, "
            f"Migration {(mig.get('status') or {}).get('phase')} finalizers "
            f"{(mig.get('metadata') or {}).get('finalizers')}"
        ) from None
    run.outcome.lost = 0


def delete_namespace_mid_migration(run: Run, sc: Scenario) -> None:
    """Delete the namespace while the copy runs, doing what the namespace controller does.

    This control plane has no kube-controller-manager, so the namespace's content is deleted
    the way its namespace controller deletes it (every object, then wait, then finalize the
    namespace); what is checked is kubehv's part: no domain left, no finalizer that hangs.
    """
    source = _boot(run)
    core = kubernetes.client.CoreV1Api(run.client)

    def delete() -> None:
        core.delete_namespace(run.ns)
        for plural in ("virtualinstances", "migrations"):
            run.custom.delete_collection_namespaced_custom_object(
                "kubehv.io", "v1alpha1", run.ns, plural
            )

    watch = PhaseWatch(run, phase_is("Running"), delete).start()
    run.migrate(targetNode=run.lane.other(source), bandwidth=12)
    _await(run, watch, "phase Running", 180)
    run.outcome.hit = str(run.mig_status().get("phase") or "")

    def empty() -> bool:
        return not run.vi() and not run.migration() and not run.copies()

    try:
        run.wait(empty, "the namespace emptied", 120)
    except ScenarioFailed:
        mig = run.migration()
        raise ScenarioFailed(
            f"namespace not emptied in 120 s: VI {bool(run.vi())}, copies {run.copies()}, "
            f"Migration {(mig.get('status') or {}).get('phase')} finalizers "
            f"{(mig.get('metadata') or {}).get('finalizers')}"
        ) from None
    body = kubernetes.client.V1Namespace(
        metadata=kubernetes.client.V1ObjectMeta(name=run.ns),
        spec=kubernetes.client.V1NamespaceSpec(finalizers=[]),
    )
    core.replace_namespace_finalize(run.ns, body)
    run.wait(lambda: _ns_gone(core, run.ns), "the namespace gone", 60)


def _ns_gone(core: Any, name: str) -> bool:
    try:
        core.read_namespace(name)
    except kubernetes.client.ApiException as exc:
        return bool(exc.status == 404)
    return False


# --- drains ------------------------------------------------------------------------------------


def _qemu_pids(domain: str) -> list[int]:
    out = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    pattern = re.compile(r"-name\s+guest=" + re.escape(domain) + r"(,|\s|$)")
    return [
        int(line.split(None, 1)[0])
        for line in out.splitlines()
        if "qemu-system" in line and pattern.search(line)
    ]


def _make_failed(run: Run) -> None:
    """Crash the guest's QEMU until the agent gives up (crash limit 2): phase Failed."""
    for _ in range(6):
        st = run.vi_status()
        if st.get("phase") == "Failed":
            return
        count = st.get("restartCount") or 0
        pids = run.wait(lambda: _qemu_pids(run.domain), "the guest's QEMU", 60)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        def moved(s: dict[str, Any], before: int = count) -> bool:
            return s.get("phase") == "Failed" or (s.get("restartCount") or 0) > before

        run.wait_vi(moved, "a restart or phase Failed", 90)
    run.wait_vi(lambda s: s.get("phase") == "Failed", "phase Failed", 60)


def _drained(run: Run, node: str) -> dict[str, Any]:
    with run.cluster.api() as custom:
        body = custom.get_cluster_custom_object("kubehv.io", "v1alpha1", "nodehypervisors", node)
    conds = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == "Drained"), {})


def _set_drain(run: Run, node: str, on: bool) -> None:
    with run.cluster.api() as custom:
        custom.patch_cluster_custom_object(
            "kubehv.io", "v1alpha1", "nodehypervisors", node, {"spec": {"drain": on}}
        )


def drain(run: Run, sc: Scenario) -> None:
    """Drain the guest's node; the drain completes, or Drained says what it waits for."""
    kind = sc.phase
    spec: dict[str, Any] = {}
    if kind == "Stopped":
        spec = {"runState": "Stopped"}
    elif kind == "Paused":
        spec = {"runState": "Paused"}
    elif kind == "Pinned":
        spec = {"nodeName": run.lane.names[0]}
    elif kind == "StopPolicy":
        spec = {"evictionPolicy": "Stop"}
    run.guest(**spec)
    want = {"Stopped": "Stopped", "Paused": "Paused"}.get(kind, "Running")
    st = run.wait_vi(lambda s: s.get("phase") == want and bool(s.get("nodeName")), f"phase {want}")
    node = str(st["nodeName"])
    if kind == "Failed":
        _make_failed(run)
    _set_drain(run, node, True)
    try:
        last: dict[str, Any] = {}

        def answered() -> bool:
            cond = _drained(run, node)
            last.update(cond)
            if cond.get("status") == "True":
                return True
            return bool(cond) and run.vm in str(cond.get("message")) and _stable(run, node, cond)

        try:
            run.wait(answered, "Drained True, or False naming what it waits for", 150)
        except ScenarioFailed:
            raise ScenarioFailed(f"drain of {kind}: Drained is {last}") from None
        run.outcome.hit = f"Drained={last.get('status')}"
        run.note(f"Drained {last.get('status')}: {str(last.get('message'))[:100]}")
        failed = [
            m for m in _lane_migrations(run) if (m.get("status") or {}).get("phase") == "Failed"
        ]
        if failed:
            reason = (failed[0].get("status") or {}).get("failureReason")
            raise ScenarioFailed(f"drain of {kind} made a failed Migration: {reason}")
        states = run.copies()
        if last.get("status") == "True" and run.libvirt_of(node) in states:
            raise ScenarioFailed(f"Drained True but the guest is still on {node}: {states}")
        if kind in ("Running", "StopPolicy", "Paused"):
            expect = "paused" if kind == "Paused" else "running"
            run.settle(expect_state=expect, need_migration=False)
        elif kind == "Pinned":  # spec.nodeName pins it: a drain may not move it away
            run.settle(need_migration=False)
            where = run.vi_status().get("nodeName")
            if where != node:
                raise ScenarioFailed(f"the drain moved an instance pinned to {node} to {where}")
        elif kind in ("Stopped", "Failed"):
            running = [n for n, s in states.items() if s == "running"]
            if running:
                raise ScenarioFailed(f"a {kind} instance runs after the drain: {states}")
    finally:
        _set_drain(run, node, False)


def _stable(run: Run, node: str, cond: dict[str, Any]) -> bool:
    """The same Drained=False message for 10 s: a wait, not progress."""
    time.sleep(10)
    again = _drained(run, node)
    return again.get("status") == cond.get("status") and again.get("message") == cond.get("message")


def _lane_migrations(run: Run) -> list[dict[str, Any]]:
    got = run.custom.list_namespaced_custom_object("kubehv.io", "v1alpha1", run.ns, "migrations")
    return list(got.get("items") or [])


# --- the controller and the API server -------------------------------------------------------


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except Exception:
        return 0


def _lease_holder(run: Run) -> str:
    coord = kubernetes.client.CoordinationV1Api(run.client)
    try:
        lease = coord.read_namespaced_lease(run.cluster.lease, "default")
    except kubernetes.client.ApiException:
        return ""
    return str((lease.spec.holder_identity if lease.spec else "") or "")


def two_replicas(run: Run, sc: Scenario) -> None:
    """Two controller replicas; the leader killed mid-migration; the standby takes over.

    Both must answer /healthz all along (a standby that does not is restarted by its
    livenessProbe forever); the standby must hold the Lease and finish the work.
    """
    cluster = run.cluster
    old = cluster.controllers[0]
    old.stop()
    ports = [free_port(), free_port()]
    tag = uuid.uuid4().hex[:4]
    replicas = [cluster.new_controller(f"replica-{i}-{tag}", p) for i, p in enumerate(ports)]
    cluster.controllers[:] = replicas
    for proc in replicas:
        proc.start()
    try:
        _leader_killed(run, replicas, ports)
    finally:  # one controller again for the scenarios after this one
        alive = [p for p in replicas if p.alive()] or replicas[:1]
        for extra in alive[1:]:
            extra.stop()
        cluster.controllers[:] = alive[:1]


def _leader_killed(run: Run, replicas: list[FaultProc], ports: list[int]) -> None:
    cluster = run.cluster
    holder = wait_for(lambda: _lease_holder(run), 90, "a replica holding the Lease", 0.5)
    leader = next(p for p in replicas if p.name == holder)
    standby = next(p for p in replicas if p is not leader)
    health = f"http://127.0.0.1:{ports[replicas.index(standby)]}/healthz"
    leader_health = f"http://127.0.0.1:{ports[replicas.index(leader)]}/healthz"
    # The probe itself must work: the leader answers.
    run.wait(lambda: _get(leader_health) == 200, "the leader's /healthz", 60)
    problems: list[str] = []  # a probe failure is reported after the takeover is checked
    try:
        run.wait(lambda: _get(health) == 200, "the standby's /healthz", 60)
    except ScenarioFailed:
        problems.append(
            f"standby {standby.name} never answered /healthz (its livenessProbe would restart it)"
        )
    source = _boot(run)
    watch = PhaseWatch(run, phase_is("Running"), leader.kill).start()
    run.migrate(targetNode=run.lane.other(source), bandwidth=12)
    _await(run, watch, "phase Running", 180)
    run.outcome.hit = str(run.mig_status().get("phase") or "")
    misses = 0

    def taken_over() -> bool:
        nonlocal misses
        misses = misses + 1 if _get(health) != 200 else 0
        if misses >= 3 and not problems:
            problems.append(f"standby {standby.name} failed /healthz 3 times in a row")
        return _lease_holder(run) == standby.name

    run.wait(taken_over, "the standby holding the Lease", 120)
    cluster.controllers[:] = [standby]
    run.settle()
    # The new leader acts: the instance is placed back and moves once more.
    run.mig = "mig-after"
    run.migrate(targetNode=run.lane.other(run.vi_status()["nodeName"]), bandwidth=FAST)
    run.settle()
    if problems:
        raise ScenarioFailed("; ".join(problems) + " (the takeover itself worked)")


def apiserver_restart(run: Run, sc: Scenario) -> None:
    source = _boot(run)
    cp = run.cluster.control_plane

    # From the launcher thread: the new kube-apiserver is bound to the thread starting it.
    watch = PhaseWatch(run, phase_is("Running"), lambda: LAUNCHER.call(cp.restart_apiserver))
    watch.start()
    run.migrate(targetNode=run.lane.other(source), bandwidth=12)
    _await(run, watch, "phase Running", 240)
    _supervise_controller(run)
    run.outcome.hit = str(run.mig_status().get("phase") or "")
    run.settle()
    _supervise_controller(run)
    dead = [a.name for lane in run.cluster.lanes for a in lane.agents.values() if not a.alive()]
    if dead:
        raise ScenarioFailed(f"agents died across the API server restart: {dead}")


def _supervise_controller(run: Run) -> None:
    """The Deployment's part: restart a controller that exited (crash-only on lease loss)."""
    for proc in run.cluster.controllers:
        p = proc.proc
        if p is not None and p.popen is not None and p.popen.poll() is not None:
            run.note(f"{proc.name} exited {p.popen.returncode}; restarted")
            proc.proc = None
            proc.start()


# --- the list ------------------------------------------------------------------------------------


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for phase in PHASES:
        for fault in AGENT_FAULTS:
            out.append(Scenario(f"live-{phase}-{fault}", phase_fault, "live", phase, fault))
    # Non-live differs while the copy runs (the guest is paused on the source meanwhile).
    for phase in ("RunningEarly", "RunningCompletes"):
        for fault in AGENT_FAULTS:
            out.append(Scenario(f"nonlive-{phase}-{fault}", phase_fault, "non-live", phase, fault))
    out.append(Scenario("abort-racing-completion", abort_racing_completion))
    out.append(Scenario("delete-instance-mid-migration", delete_instance_mid_migration))
    out.append(
        Scenario(
            "delete-namespace-mid-migration", delete_namespace_mid_migration, namespace_owned=True
        )
    )
    for kind in ("Stopped", "Paused", "Failed", "Pinned", "StopPolicy"):
        out.append(Scenario(f"drain-{kind}", drain, phase=kind))
    for phase in PHASES:
        out.append(
            Scenario(
                f"live-{phase}-kill-controller", phase_fault, "live", phase, "kill-controller",
                cluster_wide=True,
            )
        )  # fmt: skip
    out.append(Scenario("two-replicas-leader-killed", two_replicas, cluster_wide=True))
    out.append(Scenario("apiserver-restart-mid-migration", apiserver_restart, cluster_wide=True))
    return out


SCENARIOS = {s.id: s for s in scenarios()}
RESULTS: dict[str, Outcome] = {}
"""Filled by run_all; read by the tests and by the summary table (tests/faults/conftest.py)."""
WALL: dict[str, float] = {}


def run_one(cluster: FaultKvmCluster, lane: Lane, sampler: Sampler, sc: Scenario) -> Outcome:
    outcome = Outcome(sc.id)
    started = time.monotonic()
    prefix = f"fm-{sc.id[:40].lower()}".rstrip("-")
    with contextlib.ExitStack() as stack:
        if sc.namespace_owned:
            ns = f"{prefix[:50]}-{uuid.uuid4().hex[:5]}"
            cluster.control_plane.kubectl("create", "namespace", ns)
        else:
            ns = stack.enter_context(
                fresh_namespace(cluster.control_plane, f"{prefix[:50]}-{uuid.uuid4().hex[:5]}")
            )
        run = Run(cluster, lane, sampler, outcome, ns)
        stack.callback(run.close)
        try:
            sc.fn(run, sc)
            if not sc.namespace_owned and sc.fn not in (delete_instance_mid_migration,):
                run.finish()
            outcome.passed = True
        except ScenarioFailed as exc:
            outcome.detail = str(exc)
        except Exception as exc:
            outcome.detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
        finally:
            _after(run, cluster, lane, outcome)
        if run.notes:
            outcome.detail = (outcome.detail + " | " if outcome.detail else "") + "; ".join(
                run.notes
            )
    outcome.seconds = time.monotonic() - started
    return outcome


def _after(run: Run, cluster: FaultKvmCluster, lane: Lane, outcome: Outcome) -> None:
    """Score the end state and leave the lane clean and whole for the next scenario."""
    if (
        run.domain in run.sampler.doubles
        or len([s for s in run.copies().values() if s == "running"]) > 1
    ):
        outcome.double_runs = 1
    for proc in [*lane.agents.values(), *cluster.controllers]:
        if proc.frozen:
            proc.thaw()
        if not proc.alive():
            proc.start()
    if not outcome.passed:
        want_running = outcome.scenario.startswith(("live-", "nonlive-", "abort", "two-", "api"))
        if want_running and run.booted and not [s for s in run.copies().values() if s == "running"]:
            outcome.lost = 1
        outcome.detail += "\n" + cluster.logs(40, only=[*lane.agents.values(), cluster.controller])
    run.sampler.forget(run.domain)
    cluster.scrub(run.domain)


def run_all(cluster: FaultKvmCluster, selected: list[str]) -> dict[str, Outcome]:
    """Run the selected scenarios: lane-local ones side by side, then the cluster-wide ones."""
    started = time.monotonic()
    sampler = Sampler(cluster).start()
    local = [SCENARIOS[s] for s in selected if not SCENARIOS[s].cluster_wide]
    wide = [SCENARIOS[s] for s in selected if SCENARIOS[s].cluster_wide]
    free: list[Lane] = list(cluster.lanes)
    lock = threading.Condition()

    def on_a_lane(sc: Scenario) -> Outcome:
        with lock:
            lock.wait_for(lambda: bool(free))
            lane = free.pop(0)
        try:
            return run_one(cluster, lane, sampler, sc)
        finally:
            with lock:
                free.append(lane)
                lock.notify()

    try:
        with concurrent.futures.ThreadPoolExecutor(len(cluster.lanes)) as pool:
            for outcome in pool.map(on_a_lane, local):
                RESULTS[outcome.scenario] = outcome
        for sc in wide:
            RESULTS[sc.id] = run_one(cluster, cluster.lanes[0], sampler, sc)
    finally:
        sampler.stop()
        WALL["matrix"] = time.monotonic() - started
        report = os.environ.get("KUBEHV_FAULT_REPORT")
        if report:  # every outcome in full, for a person reading a run afterwards
            with open(report, "w") as out:
                json.dump([dataclasses.asdict(o) for o in RESULTS.values()], out, indent=1)
    return RESULTS


def grace_note() -> str:
    return f"heartbeat grace {GRACE_S:.0f} s, freeze {FREEZE_S:.0f} s, down {DOWN_S:.0f} s"
