"""One fault scenario on one lane: its guest, its Migration, its fault, and what it proved.

Why: every scenario of the real-kvm matrix (kvm_matrix.py) does the same things around its
fault: boot a guest on its lane, start a Migration, hit a phase, recover, then check the
promise of issue 11 from the outside: the guest runs exactly once (both libvirtds asked
directly, and ``virsh list``), the VirtualInstance names where it runs and is Running, the
Migration is terminal with a reason. This module holds those shared steps; the scenarios
themselves are in kvm_matrix.py.

``Outcome`` is what the summary table prints: passed, double-runs (two running copies seen,
by the sampler or at the end), lost (an instance that should run has no running copy).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
from kvm_lanes import FaultKvmCluster, Lane

from tests.e2e.conftest import guest_body
from tests.fixtures.operator import GROUP, VERSION, get_object, wait_for

TERMINAL = ("Succeeded", "Failed", "Aborted")
SETTLE_S = 180.0
"""How long recovery may take before a scenario counts as failed (generous: never timed)."""
DOUBLE_GIVE_UP_S = 45.0
"""Two running copies this long after the Migration ended: a double run, stop waiting."""


@dataclasses.dataclass
class Outcome:
    scenario: str
    passed: bool = False
    double_runs: int = 0
    lost: int = 0
    hit: str = ""
    """The Migration phase read right after the fault hit (the phase aimed at is in the id)."""
    detail: str = ""
    seconds: float = 0.0


class Sampler:
    """Samples both libvirtds every ``interval`` s for every registered domain.

    A double run is two copies in state *running* seen in two samples in a row (a live
    migration's hand-over pauses the source before it resumes the target, so one sample
    can never honestly show two; two in a row rule out a sample that straddles it).
    """

    def __init__(self, cluster: FaultKvmCluster, interval: float = 0.5) -> None:
        self.cluster, self.interval = cluster, interval
        self._lock = threading.Lock()
        self._domains: dict[str, int] = {}
        self._streak: dict[str, int] = {}
        self.doubles: dict[str, list[dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="double-run-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def watch(self, domain: str) -> None:
        with self._lock:
            self._domains[domain] = 1

    def forget(self, domain: str) -> None:
        with self._lock:
            self._domains.pop(domain, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                domains = list(self._domains)
            for domain in domains:
                try:
                    states = self.cluster.domain_states(domain)
                except Exception:  # a libvirtd being restarted: sample again later
                    continue
                running = [n for n, s in states.items() if s == "running"]
                streak = self._streak.get(domain, 0) + 1 if len(running) > 1 else 0
                self._streak[domain] = streak
                if streak >= 2:
                    self.doubles.setdefault(domain, []).append(states)


class Run:
    """The context of one scenario: its lane, namespace, guest and Migration."""

    def __init__(
        self, cluster: FaultKvmCluster, lane: Lane, sampler: Sampler, outcome: Outcome, ns: str
    ) -> None:
        self.cluster, self.lane, self.sampler, self.outcome = cluster, lane, sampler, outcome
        self.ns = ns
        # Unique across namespaces too: a same-named instance elsewhere must not matter, but
        # that is a scenario of its own, not a condition of every scenario.
        self.vm = f"vm-{ns.rsplit('-', 1)[-1]}"
        self.domain = f"{ns}.{self.vm}"
        self.mig = "mig"
        self.client: Any = cluster.control_plane.api_client()
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.client)
        self.notes: list[str] = []
        self.booted = False

    def note(self, text: str) -> None:
        self.notes.append(text)

    # --- objects -------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], Any], attempts: int = 120) -> Any:
        """API calls ride out an API server restart (connection refused for a few seconds)."""
        for i in range(attempts):
            try:
                return fn()
            except kubernetes.client.ApiException as exc:
                if exc.status not in (0, 500, 502, 503, 504) or i == attempts - 1:
                    raise
            except Exception:
                if i == attempts - 1:
                    raise
                self.client.close()
                self.client = self.cluster.control_plane.api_client()
                self.custom = kubernetes.client.CustomObjectsApi(self.client)
            time.sleep(1.0)
        raise AssertionError("unreachable")

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._retry(
            lambda: get_object(self.custom, self.ns, plural, name)
        )
        return result

    def vi(self) -> dict[str, Any]:
        return self.get("virtualinstances", self.vm) or {}

    def vi_status(self) -> dict[str, Any]:
        return dict(self.vi().get("status") or {})

    def migration(self) -> dict[str, Any]:
        return self.get("migrations", self.mig) or {}

    def mig_status(self) -> dict[str, Any]:
        return dict(self.migration().get("status") or {})

    def create(self, plural: str, body: dict[str, Any]) -> None:
        self._retry(
            lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.ns, plural, body
            )
        )

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        self._retry(
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.ns, plural, name, patch
            )
        )

    def guest(self, **spec: Any) -> None:
        """Create the scenario's kvm guest on its lane (``spec`` on top of the test guest)."""
        lane = {"faults.kubehv.io/lane": str(self.lane.index)}
        body = guest_body(self.cluster.image, self.vm, nodeSelector=lane, **spec)
        self.sampler.watch(self.domain)
        self.create("virtualinstances", body)

    def wait_vi(
        self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 240.0
    ) -> dict[str, Any]:
        got: dict[str, Any] = self.wait(
            lambda: (st := self.vi_status()) and check(st) and st, what, timeout
        )
        return got

    def migrate(self, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Migration",
            "metadata": {"name": self.mig},
            "spec": {"instance": self.vm, **spec},
        }
        self.create("migrations", body)

    def wait(self, probe: Callable[[], Any], what: str, timeout: float) -> Any:
        try:
            return wait_for(probe, timeout, f"{what} ({int(timeout)} s)", 0.3)
        except ScenarioFailed:
            raise
        except AssertionError as exc:
            raise ScenarioFailed(str(exc)) from None

    # --- the truth from the hypervisors ------------------------------------------------------
    def copies(self) -> dict[str, str]:
        """libvirt node -> state of each active copy of the guest."""
        return self.cluster.domain_states(self.domain)

    def lane_node_of(self, libvirt_node: str) -> str:
        return next(n for n, lv in self.lane.libvirt.items() if lv.name == libvirt_node)

    def libvirt_of(self, lane_node: str | None) -> str | None:
        node = self.lane.libvirt.get(lane_node or "")
        return node.name if node else None

    def copy_done(self, source: str) -> bool:
        """The memory copy is over: the guest runs on the target, or only on the source again."""
        states = self.copies()
        src = self.libvirt_of(source)
        running = [n for n, s in states.items() if s == "running"]
        if running and running != [src]:
            return True  # arrived (and resumed) on the target
        return src in states and len(states) == 1  # cancelled: the target copy is gone

    def check_exactly_once(self, expect_state: str = "running") -> str:
        """'' when the guest runs exactly once where the VI says and the VI agrees; else why."""
        states = self.copies()
        st = self.vi_status()
        where = self.libvirt_of(st.get("nodeName"))
        want_phase = {"running": "Running", "paused": "Paused"}[expect_state]
        if len(states) != 1:
            vi = f"{st.get('nodeName')}/{st.get('phase')}"
            return f"{len(states)} active copies {states}; VI {vi}"
        ((node, state),) = states.items()
        if state != expect_state:
            return f"the only copy is {state} on {node}; VI {st.get('phase')}"
        if where != node:
            return f"guest on {node} but VI names {st.get('nodeName')} ({where})"
        if st.get("phase") != want_phase:
            return f"VI phase {st.get('phase')} (want {want_phase}) message {st.get('message')!r}"
        return ""

    def settle(self, expect_state: str = "running", need_migration: bool = True) -> None:
        """Wait until the promise holds after recovery; fail with the last reason it did not."""
        last = {"why": ""}

        def ok() -> bool:
            if need_migration:
                m = self.mig_status()
                phase = m.get("phase")
                if phase not in TERMINAL:
                    last["why"] = f"Migration phase {phase}"
                    return False
                if phase != "Succeeded" and not m.get("failureReason"):
                    last["why"] = f"Migration {phase} without failureReason"
                    return False
            last["why"] = self.check_exactly_once(expect_state)
            return not last["why"]

        ended: list[float] = []

        def ok_or_doomed() -> bool:
            good = ok()
            m = self.mig_status()
            if not good and (m.get("phase") in TERMINAL or not need_migration):
                running = [n for n, s in self.copies().items() if s == "running"]
                if len(running) > 1:  # two copies after the end: nothing will undo that
                    ended.append(time.monotonic())
                    if ended[-1] - ended[0] > DOUBLE_GIVE_UP_S:
                        raise ScenarioFailed(
                            f"two running copies {int(DOUBLE_GIVE_UP_S)} s after the end: "
                            f"{last['why']}; Migration {m.get('phase')}: {m.get('failureReason')}"
                        )
            return good

        try:
            self.wait(ok_or_doomed, "recovery", SETTLE_S)
        except ScenarioFailed as exc:
            if "two running copies" in str(exc):
                raise
            m = self.mig_status()
            raise ScenarioFailed(
                f"not settled after {int(SETTLE_S)} s: {last['why']}; Migration "
                f"{m.get('phase')}: {m.get('failureReason')}"
            ) from None
        running = self.cluster.virsh_running(self.domain)
        if len(running) != 1:
            raise ScenarioFailed(f"virsh list shows the guest on {running}")
        mig = self.mig_status() if need_migration else {}
        if mig:
            self.note(f"{mig.get('phase')}: {(mig.get('failureReason') or '')[:90]}")

    def finish(self) -> None:
        """Delete the guest, check no domain is left anywhere, score double runs and losses."""
        doubles = self.sampler.doubles.get(self.domain)
        if doubles:
            self.outcome.double_runs = 1
            self.note(f"two running copies seen: {doubles[0]}")
        try:
            self._retry(
                lambda: self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.ns, "virtualinstances", self.vm
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        gone = True
        try:
            self.wait(lambda: self.vi() == {} and not self.copies(), "the guest deleted", 90)
        except ScenarioFailed:
            gone = False
        self.sampler.forget(self.domain)
        left = self.cluster.scrub(self.domain)
        if not gone or left:
            raise ScenarioFailed(
                f"after deleting the VirtualInstance: object gone {self.vi() == {}}, "
                f"domain left on {left}"
            )

    def close(self) -> None:
        self.client.close()


class ScenarioFailed(AssertionError):
    pass


class PhaseWatch:
    """Watches the scenario's Migration; runs ``action`` on the first event ``when`` accepts.

    A watch, not polling: Preparing and TargetReady last one driver call each, and only a
    watch sees every phase written. ``seen`` lists the phases in order.
    """

    def __init__(
        self, run: Run, when: Callable[[dict[str, Any]], bool], action: Callable[[], None]
    ) -> None:
        self.run, self.when, self.action = run, when, action
        self.seen: list[str] = []
        self.fired = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> PhaseWatch:
        self._thread.start()
        return self

    def _events(self, client: Any) -> Iterator[dict[str, Any]]:
        custom = kubernetes.client.CustomObjectsApi(client)
        watch: Any = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        for event in watch.stream(
            custom.list_namespaced_custom_object, GROUP, VERSION, self.run.ns, "migrations",
            field_selector=f"metadata.name={self.run.mig}", timeout_seconds=10,
        ):  # fmt: skip
            yield event["object"]

    def _loop(self) -> None:
        client = self.run.cluster.control_plane.api_client()
        try:
            while not self.done.is_set():
                try:
                    for body in self._events(client):
                        phase = (body.get("status") or {}).get("phase") or "Pending"
                        if not self.seen or self.seen[-1] != phase:
                            self.seen.append(phase)
                        if self.when(body):
                            self.action()
                            self.fired.set()
                            return
                        if phase in TERMINAL:
                            return
                except Exception:  # the API server restarting: watch again
                    time.sleep(0.5)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()
            client.close()

    def wait(self, timeout: float) -> bool:
        self.done.wait(timeout)
        self.done.set()
        if self.error is not None:
            raise self.error
        return self.fired.is_set()


def phase_is(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: (body.get("status") or {}).get("phase") == phase
