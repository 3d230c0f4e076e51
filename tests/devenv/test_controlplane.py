"""The control-plane harness against the real etcd + kube-apiserver it starts.

Why: every operator test and ``make demo`` stand on this harness; these tests pin what they
rely on (TLS + client certificate + token auth, RBAC refusing strangers, kubectl and the
Python client working from the kubeconfig, data surviving an apiserver restart, and no
process left behind).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client as k8s

from kubehv.devenv import binaries, controlplane
from tests.fixtures.real import missing_real_part

pytestmark = pytest.mark.apiserver
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_readyz_is_ok(control_plane: controlplane.ControlPlane) -> None:
    status, body = control_plane.request("GET", "/readyz")
    assert (status, body) == (200, b"ok")


def test_version_is_the_pinned_one(control_plane: controlplane.ControlPlane) -> None:
    status, body = control_plane.request("GET", "/version")
    assert status == 200
    assert json.loads(body)["gitVersion"] == binaries.KUBERNETES_VERSION


def test_default_namespace_exists(k8s_api: Any) -> None:
    ns = k8s.CoreV1Api(k8s_api).read_namespace("default")
    assert ns.status is not None
    assert ns.status.phase == "Active"


def test_kubectl_works_with_the_kubeconfig(control_plane: controlplane.ControlPlane) -> None:
    out = control_plane.kubectl("get", "namespace", "default", "-o", "json").stdout
    assert json.loads(out)["metadata"]["name"] == "default"
    who = control_plane.kubectl("auth", "whoami", "-o", "json").stdout
    user = json.loads(who)["status"]["userInfo"]
    assert user["username"] == controlplane.ADMIN_USER
    assert "system:masters" in user["groups"]


def test_kubectl_failure_raises_with_stderr(control_plane: controlplane.ControlPlane) -> None:
    with pytest.raises(controlplane.KubectlError) as err:
        control_plane.kubectl("get", "configmap", "does-not-exist-" + uuid.uuid4().hex[:8])
    assert "NotFound" in str(err.value)


def test_configmap_roundtrip_through_python_client(k8s_api: Any) -> None:
    core = k8s.CoreV1Api(k8s_api)
    name = "cp-test-" + uuid.uuid4().hex[:8]
    body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data={"answer": "42"})
    core.create_namespaced_config_map("default", body)
    try:
        assert core.read_namespaced_config_map(name, "default").data == {"answer": "42"}
    finally:
        core.delete_namespaced_config_map(name, "default")


def test_unauthenticated_request_is_refused(control_plane: controlplane.ControlPlane) -> None:
    status, _ = control_plane.request("GET", "/api/v1/namespaces", auth="none")
    assert status in (401, 403)


def test_static_token_authenticates(control_plane: controlplane.ControlPlane) -> None:
    status, body = control_plane.request("GET", "/api/v1/namespaces/default", auth="token")
    assert status == 200
    assert json.loads(body)["metadata"]["name"] == "default"


def test_metrics_expose_request_counters(control_plane: controlplane.ControlPlane) -> None:
    assert "apiserver_request_total{" in control_plane.metrics_text()


def test_restart_apiserver_keeps_data(control_plane: controlplane.ControlPlane) -> None:
    name = "cp-restart-" + uuid.uuid4().hex[:8]
    control_plane.kubectl("create", "configmap", name, "--from-literal=kept=yes")
    old_pid = control_plane.pids()["kube-apiserver"]
    try:
        control_plane.restart_apiserver()
        assert control_plane.pids()["kube-apiserver"] != old_pid
        assert not psutil.pid_exists(old_pid)
        out = control_plane.kubectl("get", "configmap", name, "-o", "json").stdout
        assert json.loads(out)["data"] == {"kept": "yes"}
    finally:
        control_plane.kubectl("delete", "configmap", name, "--ignore-not-found")


def test_stop_leaves_no_processes_and_no_data(control_plane: controlplane.ControlPlane) -> None:
    # A second, private control plane: the session one must stay up for the others.
    cp = controlplane.ControlPlane().start()
    pids = cp.pids()
    data_dir = cp.dir
    assert set(pids) == {"etcd", "kube-apiserver"}
    assert cp.url != control_plane.url
    cp.stop()
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid), f"{name} (pid {pid}) survived stop()"
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(data_dir) in arg for arg in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
    assert not data_dir.exists()


def test_startup_failure_reports_the_log_tail(tmp_path: Any) -> None:
    try:
        bins = binaries.find(build=False)
    except binaries.BinariesUnavailable as exc:
        missing_real_part("etcd", str(exc))
    broken = binaries.ControlPlaneBinaries(tmp_path, tmp_path / "kube-apiserver", bins.etcd)
    script = tmp_path / "kube-apiserver"
    script.write_text("#!/bin/sh\necho 'deliberately broken apiserver' >&2\nexit 3\n")
    script.chmod(0o755)
    cp = controlplane.ControlPlane(bins=broken)
    with pytest.raises(controlplane.ControlPlaneError) as err:
        cp.start()
    assert "deliberately broken apiserver" in str(err.value)
    assert "exited with code 3" in str(err.value)
    assert cp.pids() == {}
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(cp.dir) in arg for arg in (p.info["cmdline"] or []))
    ]
    assert leftovers == []


# The child resets SIGINT to Python's default: a runner that starts jobs with SIGINT ignored
# (a background job of a non-interactive shell) must not change what Ctrl-C is tested as.
_CHILD = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from kubehv.devenv import controlplane
cp = controlplane.ControlPlane().start()
print(json.dumps({"pids": cp.pids(), "dir": str(cp.dir)}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_owner_interrupted_or_killed_leaves_no_orphans(
    control_plane: controlplane.ControlPlane, sig: signal.Signals
) -> None:
    # SIGINT = Ctrl-C (atexit stops the processes); SIGKILL = no cleanup code runs at all
    # (the children die through their parent-death signal).
    owner = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        pids: dict[str, int] = info["pids"]
        assert set(pids) == {"etcd", "kube-apiserver"}
        owner.send_signal(sig)
        owner.wait(timeout=60)
        procs = []
        for pid in pids.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        _gone, alive = psutil.wait_procs(procs, timeout=60)
        assert alive == [], f"orphans after {sig.name}: {alive}"
        if sig == signal.SIGINT:  # atexit ran: the temporary data dir is gone too
            assert not Path(info["dir"]).exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if "info" in locals():
            shutil.rmtree(info["dir"], ignore_errors=True)
