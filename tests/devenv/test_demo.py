"""``make demo`` (kubehv.demo): the parts that can be checked without the operator running.

Why: the demo is the README's first command; its failure must be clear and must leave no
process behind, ``down`` must stop what a crashed ``up`` left, and the examples must be
adapted to the one local node and the chosen driver.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from kubehv import demo
from kubehv.devenv import controlplane, demoprocs


@pytest.fixture
def demo_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / ".demo")
    monkeypatch.setattr(demo, "STATE_FILE", tmp_path / ".demo" / "state.json")
    monkeypatch.setattr(demo, "CRDS_DIR", tmp_path / "crds")
    monkeypatch.setattr(demo, "EXAMPLES_DIR", tmp_path / "examples")
    return tmp_path


def _processes_mentioning(text: str) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(text in arg for arg in (p.info["cmdline"] or []))
    ]


def test_adapt_example_targets_this_node_driver_and_guest() -> None:
    vi: dict[str, Any] = {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "VirtualInstance",
        "metadata": {"name": "web"},
        "spec": {"hypervisor": "kvm", "nodeName": "node-a", "boot": {"kernel": "/k"}},
    }
    kvm = demo.KvmSetup("qemu:///system", Path("/g/vmlinuz"), Path("/g/initrd.img"), "c=1")
    out = demo.adapt_example(vi, "kvm", "here", kvm)
    assert out["spec"]["nodeName"] == "here"
    assert out["spec"]["boot"] == {
        "kernel": "/g/vmlinuz",
        "initrd": "/g/initrd.img",
        "cmdline": "c=1",
    }
    fake = demo.adapt_example(vi, "fake", "here", None)
    assert fake["spec"]["hypervisor"] == "fake"
    assert fake["spec"]["boot"] == {"kernel": "/k"}
    assert vi["spec"]["nodeName"] == "node-a"  # the input is not modified
    nhv: dict[str, Any] = {
        "kind": "NodeHypervisor",
        "metadata": {"name": "node-a"},
        "spec": {"nodeName": "x"},
    }
    nhv["spec"]["migrationAddress"] = "10.200.0.1"
    mine = demo.adapt_example(nhv, "kvm", "here", kvm, connection_uri="qemu:///system")
    assert mine["metadata"]["name"] == "here"  # the node the demo's agent registered
    assert mine["spec"] == {
        "nodeName": "here",
        "hypervisor": "kvm",
        "connectionURI": "qemu:///system",
    }
    # Two nodes: the example names the first node's own migration address (it may be
    # applied before that node's agent registers it, and the agent keeps what exists).
    two = demo.adapt_example(
        nhv, "kvm", "n0", kvm, connection_uri="qemu+tcp://10.200.3.11/system",
        migration_address="10.200.3.11",
    )  # fmt: skip
    assert two["spec"]["migrationAddress"] == "10.200.3.11"
    assert nhv["metadata"]["name"] == "node-a"  # the input is not modified
    other = {"kind": "Migration", "spec": {"instance": "web"}}
    assert demo.adapt_example(other, "fake", "here", None) == other


@pytest.mark.apiserver
def test_up_without_crds_fails_clearly_and_leaves_nothing(
    control_plane: controlplane.ControlPlane,  # ensures the binaries exist (else skip/fail)
    demo_dirs: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(["up", "--driver", "fake", "--exit-when-ready"]) == 1
    err = capsys.readouterr().err
    assert "control plane ready" in err
    assert f"no CRDs in {demo_dirs / 'crds'}" in err
    assert not (demo_dirs / ".demo" / "state.json").exists()
    assert _processes_mentioning(str(demo_dirs)) == []


def test_down_stops_what_a_crashed_up_left(demo_dirs: Path) -> None:
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state = {
            "up": {"pid": 999999999, "create_time": 0},
            "data_dir": str(demo_dirs / ".demo" / "controlplane"),
            "processes": {"agent": demoprocs.process_record(leftover.pid)},
        }
        (demo_dirs / ".demo" / "controlplane").mkdir(parents=True)
        (demo_dirs / ".demo" / "state.json").write_text(json.dumps(state))
        assert demo.main(["down"]) == 0
        assert leftover.wait(timeout=30) is not None
        assert not (demo_dirs / ".demo" / "state.json").exists()
        assert not (demo_dirs / ".demo" / "controlplane").exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_down_without_a_demo_says_so(demo_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["down"]) == 0
    assert "no demo is running" in capsys.readouterr().err


# Stand-ins for `kubehv controller` / `kubehv agent`, so that the demo's own orchestration
# (control plane, CRDs, processes, examples, Ready wait, state file, down) is tested against
# the real control plane; the agent stand-in marks every VirtualInstance Ready through the
# real API. The end-to-end demo with the real operator belongs to the e2e suite.
_CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: virtualinstances.kubehv.io}
spec:
  group: kubehv.io
  scope: Namespaced
  names: {plural: virtualinstances, singular: virtualinstance, kind: VirtualInstance,
          shortNames: [vi]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""
_EXAMPLES = """
apiVersion: kubehv.io/v1alpha1
kind: VirtualInstance
metadata: {name: tiny}
spec: {hypervisor: kvm, runState: Running, nodeName: node-a}
---
apiVersion: kubehv.io/v1alpha1
kind: Migration
metadata: {name: move-tiny}
spec: {instance: tiny}
"""


def _stand_in_agent(status: dict[str, Any]) -> str:
    """A script that writes ``status`` onto every VirtualInstance, as an agent would."""
    return f"""
import json, subprocess, sys, time
print("agent stand-in", sys.argv, flush=True)
patch = json.dumps({{"status": {json.dumps(status)}}})
while True:
    out = subprocess.run(["kubectl", "get", "vi", "-A", "-o", "json"],
                         capture_output=True, text=True).stdout
    for it in json.loads(out or '{{"items": []}}')["items"]:
        m = it["metadata"]
        subprocess.run(["kubectl", "patch", "vi", m["name"], "-n", m["namespace"],
                        "--subresource=status", "--type=merge", "-p", patch],
                       capture_output=True)
    time.sleep(0.5)
"""


_AGENT = _stand_in_agent({"conditions": [{"type": "Ready", "status": "True"}]})
_RUNNER = """
import sys
from pathlib import Path
from kubehv import demo
t = Path(sys.argv[1])
demo.DEMO_DIR, demo.STATE_FILE = t / ".demo", t / ".demo" / "state.json"
demo.CRDS_DIR, demo.EXAMPLES_DIR = t / "crds", t / "examples"
demo.Demo._cli_command = lambda self, sub: (
    [sys.executable, str(t / "agent.py")] if sub == "agent" else ["sleep", "3600"])
demo.Demo._flags = lambda self, sub: set()
sys.exit(demo.main(sys.argv[2:]))
"""


def _lines_until_export(up: subprocess.Popen[str]) -> list[str]:
    """``demo up``'s output up to and including its ``export KUBECONFIG=`` line."""
    assert up.stdout is not None
    seen: list[str] = []
    for line in up.stdout:
        seen.append(line)
        if line.startswith("export KUBECONFIG="):
            break
    return seen


def _demo_tree(tmp_path: Path, agent: str) -> list[str]:
    """CRDs, examples, a stand-in agent and the runner in ``tmp_path``; the runner's argv."""
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "vi.yaml").write_text(_CRDS)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "vi.yaml").write_text(_EXAMPLES)
    (tmp_path / "agent.py").write_text(agent)
    (tmp_path / "runner.py").write_text(_RUNNER)
    return [sys.executable, str(tmp_path / "runner.py"), str(tmp_path)]


@pytest.mark.apiserver
def test_up_reaches_ready_and_down_stops_everything(
    control_plane: controlplane.ControlPlane, tmp_path: Path
) -> None:
    runner = _demo_tree(tmp_path, _AGENT)
    up = subprocess.Popen(
        [*runner, "up", "--driver", "fake"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=demo.REPO_ROOT,
    )
    try:
        seen = _lines_until_export(up)
        text = "".join(seen)
        kubeconfig = tmp_path / ".demo" / "controlplane" / "kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in text, text
        assert "driver: fake (asked for with --driver fake)" in text
        assert "skipping 1 Migration example(s)" in text
        assert any(line.split()[:2] == ["default", "tiny"] for line in seen), text
        state = json.loads((tmp_path / ".demo" / "state.json").read_text())
        nodes = state["nodes"]
        # Two netns kvm nodes where the machine can (root, libvirt), else the machine itself.
        agents = {"agent"} if len(nodes) == 1 else {f"agent-{n}" for n in nodes}
        assert set(state["processes"]) == {"etcd", "kube-apiserver", "controller", *agents}
        pids = [r["pid"] for r in state["processes"].values()] + [up.pid]
        # The example was adapted to the demo's node and driver.
        vi = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "vi", "tiny", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(vi)["spec"]["hypervisor"] == "fake"
        assert json.loads(vi)["spec"]["nodeName"] == socket.gethostname()

        down = subprocess.run(
            [*runner, "down"], capture_output=True, text=True, timeout=180, check=False
        )
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=60) == 0
        for pid in pids:
            assert not psutil.pid_exists(pid), f"pid {pid} survived `down`"
        assert not (tmp_path / ".demo" / "state.json").exists()
        assert not (tmp_path / ".demo" / "controlplane").exists()
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(timeout=60)


_AGENT_FAILING = _stand_in_agent(
    {
        "phase": "Failed",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "StartFailed",
             "message": "qemu: cannot open /dev/kvm"}
        ],
    }
)  # fmt: skip


@pytest.mark.apiserver
def test_up_stops_at_once_with_the_reason_when_an_instance_fails(
    control_plane: controlplane.ControlPlane, tmp_path: Path
) -> None:
    runner = _demo_tree(tmp_path, _AGENT_FAILING)
    # The default wait is minutes: failing within this test's timeout means it did not wait.
    up = subprocess.run(
        [*runner, "up", "--driver", "fake"], capture_output=True, text=True, timeout=120,
        cwd=demo.REPO_ROOT, check=False,
    )  # fmt: skip
    out = up.stdout + up.stderr
    assert up.returncode != 0, out
    assert "default/tiny failed: Ready: qemu: cannot open /dev/kvm" in out, out
    assert not (tmp_path / ".demo" / "state.json").exists(), "a failed up must stop everything"


_REAL_RUNNER = """
import sys
from pathlib import Path
from kubehv import demo
t = Path(sys.argv[1])
demo.DEMO_DIR, demo.STATE_FILE = t / ".demo", t / ".demo" / "state.json"
sys.exit(demo.main(sys.argv[2:]))
"""


def _libvirt_domains() -> list[str]:
    proc = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.apiserver
def test_up_with_the_real_operator_reaches_ready_and_down_leaves_nothing(
    control_plane: controlplane.ControlPlane, tmp_path: Path
) -> None:
    """`make demo` as a user runs it: real controller and agent, the repo's CRDs and examples.

    The driver is the demo's own choice (kvm with real guests where libvirt runs, else fake);
    ``control_plane`` is requested only so that this skips where no apiserver can run.
    """
    (tmp_path / "runner.py").write_text(_REAL_RUNNER)
    runner = [sys.executable, str(tmp_path / "runner.py"), str(tmp_path)]
    up = subprocess.Popen(
        [*runner, "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        seen = _lines_until_export(up)
        text = "".join(seen)
        kubeconfig = tmp_path / ".demo" / "controlplane" / "kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in text, text
        state = json.loads((tmp_path / ".demo" / "state.json").read_text())
        nodes = state["nodes"]
        # Two netns kvm nodes where the machine can (root, libvirt), else the machine itself.
        agents = {"agent"} if len(nodes) == 1 else {f"agent-{n}" for n in nodes}
        assert set(state["processes"]) == {"etcd", "kube-apiserver", "controller", *agents}
        pids = [r["pid"] for r in state["processes"].values()] + [up.pid]
        # Every example VirtualInstance was made Ready by the real agent on this node.
        out = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "vi", "-A", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        items = json.loads(out)["items"]
        assert {i["metadata"]["name"] for i in items} == {"demo-fake", "demo-kvm"}
        for item in items:
            assert item["status"]["phase"] == "Running", item["status"]
            assert item["status"]["nodeName"] in nodes, item["status"]
        # The NodeHypervisor example became this node's (no second, never-Ready node).
        nhvs = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "nhv", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert sorted(n["metadata"]["name"] for n in json.loads(nhvs)["items"]) == sorted(nodes)
        domains = ["default.demo-fake", "default.demo-kvm"]
        if len(nodes) == 1:
            assert nodes == [socket.gethostname()]
            if state["driver"] == "kvm":
                assert set(domains) <= set(_libvirt_domains())
        else:
            # The headline ran: the Migration example moved demo-kvm to the other node.
            assert state["driver"] == "kvm"
            migs = subprocess.run(
                ["kubectl", f"--kubeconfig={kubeconfig}", "get", "mig", "-A", "-o", "json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            phases = [m["status"]["phase"] for m in json.loads(migs)["items"]]
            assert phases == ["Succeeded"], phases
            assert "kubehv migrate demo-kvm --wait" in text

        down = subprocess.run(
            [*runner, "down"], capture_output=True, text=True, timeout=180, check=False
        )
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=120) == 0
        for pid in pids:
            assert not psutil.pid_exists(pid), f"pid {pid} survived `down`"
        assert not set(domains) & set(_libvirt_domains()), "the demo's VMs survived `down`"
        netns_left = subprocess.run(
            ["ip", "netns", "list"], check=True, capture_output=True, text=True
        )
        assert not any(n in netns_left.stdout for n in nodes if len(nodes) > 1)
        assert not (tmp_path / ".demo" / "state.json").exists()
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(timeout=120)
