"""Controller HA against the real API server: two replicas, the leader killed, the standby leads.

Why: the Deployment runs two controller replicas behind a livenessProbe and a PDB. A standby
that does not answer its probe is restarted forever and blocks node drains; a standby that
takes the Lease early (judging expiry on the holder's clock) runs the controller twice. Here
two real ``kubehv controller`` processes share a Lease on the session's kube-apiserver; the
leader is killed with SIGKILL (no release), and the test checks that the standby's
``/healthz`` answered 200 on every poll from start to takeover, that it took the Lease no
earlier than a lease duration after the last renewal it could have seen, and that it then
does the controller's work (places an instance). The elector's own rule — expiry judged on
the observer's clock, not the holder's timestamps — is checked with a skewed Lease.
"""

from __future__ import annotations

import datetime
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kubehv.devenv import controlplane as cpmod
from kubehv.operator import k8s, leader
from tests.fixtures.operator import GROUP, VERSION, VI, Proc, fake_vi_body, wait_for

pytestmark = pytest.mark.apiserver

LEASE_S = 10.0  # renew deadline 6.7 s, retry 1.3 s (client-go's proportions)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Replica:
    def __init__(self, cp: Any, lease: str, namespace: str, name: str, workdir: Path) -> None:
        import sys  # noqa: PLC0415

        self.name, self.port = name, cpmod.free_port()
        env = cp.env()
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            sys.executable, "-m", "kubehv.cli", "controller", "--kubeconfig", str(cp.kubeconfig),
            "--lease-name", lease, "--lease-namespace", namespace, "--identity", name,
            "--lease-duration", str(LEASE_S), "--health-port", str(self.port),
            "--check-interval", "1",
        ]  # fmt: skip
        self.proc = Proc(name, argv, workdir / f"{name}.log", env)

    def leading(self) -> bool:
        return http_status(self.port, "/leader") == 200


class HealthWatch:
    """Polls a replica's /healthz from its first 200 on; records every other answer."""

    def __init__(self, port: int) -> None:
        self.port, self.polls, self.failures = port, 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HealthWatch:
        wait_for(lambda: http_status(self.port, "/healthz") == 200, 60, "first /healthz")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            code = http_status(self.port, "/healthz")
            self.polls += 1
            if code != 200:
                self.failures.append((time.monotonic(), code))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def replicas(
    control_plane: Any, crds_installed: Any, namespace: str, tmp_path: Path
) -> Iterator[dict[str, Replica]]:
    lease = f"kubehv-ha-{uuid.uuid4().hex[:6]}"
    made = {n: Replica(control_plane, lease, namespace, n, tmp_path) for n in ("ctl-a", "ctl-b")}
    try:
        yield made
    finally:
        for replica in made.values():
            print(f"===== {replica.name}\n{replica.proc.tail(40)}")
            replica.proc.stop()


def scheduled_condition(custom: Any, ns: str, name: str) -> dict[str, Any] | None:
    vi = custom.get_namespaced_custom_object(GROUP, VERSION, ns, VI, name)
    for cond in (vi.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Scheduled":
            return dict(cond)
    return None


def test_standby_is_live_and_takes_over_after_the_leader_is_killed(
    control_plane: Any, namespace: str, replicas: dict[str, Replica]
) -> None:
    a, b = replicas["ctl-a"], replicas["ctl-b"]
    api = control_plane.api_client()
    coordination: Any = kubernetes.client.CoordinationV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    lease_name = a.proc.argv[a.proc.argv.index("--lease-name") + 1]
    try:
        a.proc.start()
        wait_for(a.leading, 60, "ctl-a to lead")
        b.proc.start()
        watch = HealthWatch(b.port).start()
        # The standby is live and ready, and stays a standby while the leader renews.
        assert http_status(b.port, "/readyz") == 200
        for _ in range(int(LEASE_S * 2 / 0.5)):
            assert not b.leading(), "the standby took the Lease from a live leader"
            time.sleep(0.5)
        assert a.proc.alive() and b.proc.alive()

        # The leader works: it places (here: finds no node for) a new instance.
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VI, fake_vi_body("before")
        )
        wait_for(lambda: scheduled_condition(custom, namespace, "before"), 60, "ctl-a placing")

        a.proc.kill()
        killed = time.monotonic()
        last = coordination.read_namespaced_lease(lease_name, namespace).spec
        assert last.holder_identity == "ctl-a"
        wait_for(b.leading, LEASE_S * 10, "ctl-b to take the Lease")
        took = time.monotonic() - killed
        watch.stop()

        now = coordination.read_namespaced_lease(lease_name, namespace).spec
        assert now.holder_identity == "ctl-b"
        assert now.lease_transitions == (last.lease_transitions or 0) + 1
        # Safety: never before a whole lease duration after the last renewal it saw.
        gap = (now.acquire_time - last.renew_time).total_seconds()
        assert gap >= LEASE_S - 0.01, f"took the Lease {gap:.2f}s after the last renewal"
        # Liveness: the standby answered every probe, before and during the takeover.
        assert watch.polls > 0
        assert watch.failures == [], f"/healthz failed on the standby: {watch.failures}"
        # It took over within the lease (plus its retry period and this machine's load).
        assert took < LEASE_S * 4, f"takeover took {took:.1f}s"
        print(f"takeover {took:.1f}s after kill -9; {watch.polls} /healthz polls, all 200")

        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VI, fake_vi_body("after"))
        cond = wait_for(lambda: scheduled_condition(custom, namespace, "after"), 60, "ctl-b")
        assert cond["reason"] in ("NoNodeFits", "Scheduled"), cond
        assert b.proc.alive()
    finally:
        api.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_expiry_is_judged_on_the_observers_clock(control_plane: Any, namespace: str) -> None:
    """A holder whose renewTime is far in the past (or future) by the observer's wall clock:
    the observer still waits a full lease duration of no change on its own clock."""
    api = control_plane.api_client()
    ours = k8s.load_api_client(str(control_plane.kubeconfig))  # the controller's own client
    coordination: Any = kubernetes.client.CoordinationV1Api(api)
    name = f"skew-{uuid.uuid4().hex[:6]}"
    now = datetime.datetime.now(datetime.UTC)
    try:
        for skew in (datetime.timedelta(hours=-1), datetime.timedelta(hours=1)):
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=name),
                spec=kubernetes.client.V1LeaseSpec(
                    holder_identity="other",
                    lease_duration_seconds=15,
                    acquire_time=now + skew,
                    renew_time=now + skew,
                    lease_transitions=4,
                ),
            )
            coordination.create_namespaced_lease(namespace, body)
            clock = FakeClock()
            elector = leader.Elector(ours, name, namespace, "me", leader.Timing(), clock=clock)
            assert not elector.try_acquire(), f"took a Lease renewed {skew} ago at first sight"
            clock.now += 14.0
            assert not elector.try_acquire(), "took it before a lease duration of no change"
            # The holder renews: the observer's wait starts again.
            lease = coordination.read_namespaced_lease(name, namespace)
            lease.spec.renew_time = now + skew + datetime.timedelta(seconds=1)
            coordination.replace_namespaced_lease(name, namespace, lease)
            clock.now += 14.0
            assert not elector.try_acquire(), "took it though the holder had just renewed"
            # 14 s after it *saw* the renewal: still not; 15.5 s after: yes.
            clock.now += 14.0
            assert not elector.try_acquire(), "took it before a lease duration since the renewal"
            clock.now += 1.5
            assert elector.try_acquire(), "did not take a Lease unchanged for 15.5 s"
            got = coordination.read_namespaced_lease(name, namespace).spec
            assert (got.holder_identity, got.lease_transitions) == ("me", 5)
            coordination.delete_namespaced_lease(name, namespace)
    finally:
        api.close()
        ours.close()


def test_timing_refuses_a_renew_deadline_not_below_the_lease() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        leader.Timing(lease_duration_s=15, renew_deadline_s=15, retry_period_s=2)
    timing = leader.Timing.for_lease(6)
    assert timing.retry_period_s < timing.renew_deadline_s < timing.lease_duration_s
    assert timing.request_timeout_s < timing.renew_deadline_s


def test_webhook_answers_from_the_standby_across_a_leader_change(
    control_plane: Any, crds_installed: Any, namespace: str, tmp_path: Path
) -> None:
    """In a cluster every replica serves the webhook, leader or not: the configuration here
    points at the standby (a Service would at both), which refuses a bad instance before it
    leads, while the leader dies, and after it took over."""
    from tests.ship.test_webhook_in_cluster import InClusterWebhook  # noqa: PLC0415

    lease = f"kubehv-hook-{uuid.uuid4().hex[:6]}"
    hook = InClusterWebhook(control_plane, namespace, "self", tmp_path)  # serves on hook.port
    base = [a for a in hook.controller.argv if a != "--no-leader-election"]
    base = base[: base.index("--webhook-port")]
    health = {"a": cpmod.free_port(), "b": cpmod.free_port()}
    webhook = {"a": cpmod.free_port(), "b": hook.port}

    def replica(name: str) -> Proc:
        argv = [
            *base, "--webhook-port", str(webhook[name]), "--lease-name", lease,
            "--lease-namespace", namespace, "--identity", f"hook-{name}",
            "--lease-duration", str(LEASE_S), "--health-port", str(health[name]),
        ]  # fmt: skip
        # The Deployment's KUBEHV_WEBHOOK_* environment, the same for both replicas.
        return Proc(f"hook-{name}", argv, tmp_path / f"hook-{name}.log", hook.controller.env)

    procs = {name: replica(name) for name in ("a", "b")}
    try:
        hook.create_secret()
        hook.create_configuration()
        procs["a"].start()
        wait_for(lambda: http_status(health["a"], "/leader") == 200, 60, "a to lead")
        procs["b"].start()

        def refused_by_the_webhook() -> str | None:
            refusal = hook.refuses_bad_instance()
            return refusal if "unknown parameter 'no_such_param'" in refusal else None

        wait_for(refused_by_the_webhook, 90, "the standby's webhook to refuse")
        assert http_status(health["b"], "/leader") == 503, "b should still be the standby"
        assert http_status(health["b"], "/readyz") == 200

        procs["a"].kill()
        refusals = 0
        # A hang guard, not a timing claim: the Lease expires after LEASE_S; give it many.
        deadline = time.monotonic() + 12 * LEASE_S
        while http_status(health["b"], "/leader") != 200:
            assert "unknown parameter" in hook.refuses_bad_instance(), "the webhook stopped"
            refusals += 1
            assert time.monotonic() < deadline, "b never took the Lease"
        assert "unknown parameter" in hook.refuses_bad_instance()
        print(f"{refusals} refusals by the standby's webhook during the takeover")
    finally:
        for proc in procs.values():
            print(proc.tail(40))
            proc.stop()
        hook.close()
