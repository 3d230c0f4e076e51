"""``make demo``: a whole kubehv installation on this machine, from one command.

Why: a newcomer must get from a fresh clone to a VM reconciled by kubehv without a cluster.
``python -m kubehv.demo up`` starts the test harness's control plane (etcd + kube-apiserver),
installs the CRDs, picks a driver (kvm with the tiny test guest when QEMU and libvirt can run
here, else fake, and says why) and the nodes (two netns libvirt nodes where the machine can,
so a live migration really runs: ``kubehv.devenv.demonodes``), starts the controller and one
agent per node as processes, applies ``examples/`` (the Migration once its instance runs),
waits for Ready and Succeeded, prints the state, the ``export KUBECONFIG=...`` line and three
commands to try next, then stays up until Ctrl-C, SIGTERM or ``python -m kubehv.demo down``
(which reads ``.demo/state.json``) and stops all it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubehv.devenv import binaries, controlplane
from kubehv.devenv.demoexamples import adapt_example
from kubehv.devenv.demonodes import DemoNode, KvmSetup, prepare_kvm
from kubehv.devenv.demoprocs import process_record as _process_record
from kubehv.devenv.demoprocs import same_process as _same_process
from kubehv.devenv.demoprocs import wait_gone as _wait_gone

__all__ = ["DemoNode", "KvmSetup", "adapt_example", "main", "prepare_kvm"]

REPO_ROOT = binaries.REPO_ROOT
DEMO_DIR = REPO_ROOT / ".demo"
STATE_FILE = DEMO_DIR / "state.json"
CRDS_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and what to do."""


class _Stop(Exception):
    """Raised from the SIGTERM handler to unwind into the cleanup."""


def progress(message: str) -> None:
    print(f"kubehv demo: {message}", file=sys.stderr, flush=True)


def _yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml"))


class Demo:
    """The running demo: the control plane plus the kubehv processes, all owned here."""

    def __init__(self, driver: str, wait_timeout: float) -> None:
        self.requested_driver = driver
        self.wait_timeout = wait_timeout
        self.node_name = socket.gethostname()
        self.cp = controlplane.ControlPlane(DEMO_DIR / "controlplane", remove_data=True)
        self.procs: dict[str, controlplane.ManagedProcess] = {}
        self.kvm: KvmSetup | None = None
        self.driver = "fake"
        self.nodes: list[DemoNode] = []
        self.migrations: list[dict[str, Any]] = []

    def write_state(self) -> None:
        state = {
            "up": _process_record(os.getpid()),
            "kubeconfig": str(self.cp.kubeconfig),
            "data_dir": str(self.cp.dir),
            "driver": self.driver,
            "nodes": [n.name for n in self.nodes],
            "processes": {
                name: _process_record(pid)
                for name, pid in [
                    *self.cp.pids().items(),
                    *((n, p.pid) for n, p in self.procs.items() if p.pid and p.alive()),
                ]
            },
        }
        STATE_FILE.write_text(json.dumps(state, indent=2))

    # ---- steps ----------------------------------------------------------------------------
    def start_control_plane(self) -> None:
        progress(
            f"control plane: kube-apiserver {binaries.KUBERNETES_VERSION} + etcd "
            f"{binaries.ETCD_VERSION} (built once and cached if missing: several minutes)"
        )
        bins = binaries.find()
        self.cp = controlplane.ControlPlane(DEMO_DIR / "controlplane", remove_data=True, bins=bins)
        self.cp.start()
        self.write_state()
        progress(f"control plane ready at {self.cp.url} in {self.cp.start_seconds:.1f}s")

    def install_crds(self) -> None:
        files = _yaml_files(CRDS_DIR)
        if not files:
            raise DemoError(
                f"no CRDs in {CRDS_DIR}: generate them with `make crds` "
                "(`python -m kubehv.cli crds --output-dir crds`) and try again"
            )
        progress(f"installing {len(files)} CRD file(s) from {CRDS_DIR}")
        self.cp.kubectl("apply", "--server-side", "-f", str(CRDS_DIR))
        self.cp.wait_established()

    def choose_driver(self) -> None:
        if self.requested_driver == "fake":
            self.driver = "fake"
            progress("driver: fake (asked for with --driver fake)")
            return
        progress("checking whether real VMs can run here (libvirtd + QEMU + the test guest)")
        setup, why = prepare_kvm(progress)
        if setup is None:
            if self.requested_driver == "kvm":
                raise DemoError(f"--driver kvm asked for, but kvm cannot run here: {why}")
            self.driver = "fake"
            progress(f"driver: fake, because kvm cannot run here: {why}")
            return
        self.kvm, self.driver = setup, "kvm"
        progress(f"driver: kvm ({why})")

    def _cli_command(self, sub: str) -> list[str]:
        module = REPO_ROOT / "kubehv" / "cli" / f"{sub}.py"
        if not module.is_file():
            raise DemoError(
                f"`kubehv {sub}` does not exist yet ({module} missing): the operator "
                "is not finished in this tree"
            )
        return [sys.executable, "-m", "kubehv.cli", sub]

    def _flags(self, sub: str) -> set[str]:
        """The long options ``kubehv <sub> --help`` lists (so optional flags adapt)."""
        out = subprocess.run(
            [*self._cli_command(sub), "--help"],
            capture_output=True,
            text=True,
            env=self.cp.env(),
            timeout=60,
            check=False,
        ).stdout
        return {w.rstrip(",=") for w in out.split() if w.startswith("--")}

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = DEMO_DIR / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = controlplane.ManagedProcess(name, argv, log, env=self.cp.env(), cwd=REPO_ROOT)
        proc.start()
        self.procs[name] = proc
        self.write_state()
        progress(f"started {name} (pid {proc.pid}), log {log}")

    def start_operator(self) -> None:
        controller = self._cli_command("controller")
        cflags, aflags = self._flags("controller"), self._flags("agent")
        if "--kubeconfig" in cflags:
            controller += ["--kubeconfig", str(self.cp.kubeconfig)]
        self._spawn("controller", controller)
        if self.kvm is not None:
            self.nodes = self.kvm.nodes(self.node_name)
        else:
            self.nodes = [DemoNode(self.node_name, f"fake://{DEMO_DIR / 'agent-state'}")]
        for node in self.nodes:
            name = "agent" if len(self.nodes) == 1 else f"agent-{node.name}"
            self._spawn(name, self._agent_argv(node, aflags))

    def _agent_argv(self, node: DemoNode, aflags: set[str]) -> list[str]:
        agent = self._cli_command("agent")
        agent += ["--node-name", node.name, "--hypervisor", self.driver]
        if "--kubeconfig" in aflags:
            agent += ["--kubeconfig", str(self.cp.kubeconfig)]
        # The agent's own state (fake instances, VNC password files) stays in .demo/, not in
        # /var/lib/kubehv, so `down` leaves nothing behind outside the checkout.
        state_dir = DEMO_DIR / ("agent-state" if len(self.nodes) == 1 else f"state-{node.name}")
        state_dir.mkdir(parents=True, exist_ok=True)
        if "--state-dir" in aflags:
            agent += ["--state-dir", str(state_dir)]
        for flag in ("--connection-uri", "--uri", "--libvirt-uri"):
            if flag in aflags:
                agent += [flag, node.uri]
                break
        if node.migration_address and "--migration-address" in aflags:
            agent += ["--migration-address", node.migration_address]
        return agent

    def apply_examples(self) -> list[tuple[str, str]]:
        """Apply examples/ (adapted to this node and driver); return the VIs to wait for."""
        files = _yaml_files(EXAMPLES_DIR)
        if not files:
            raise DemoError(f"no examples in {EXAMPLES_DIR}: nothing to show")
        docs: list[dict[str, Any]] = []
        for f in files:
            docs += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        # A Migration needs a second node and a running instance: applied after Ready.
        self.migrations = [d for d in docs if d.get("kind") == "Migration"]
        first = self.nodes[0]
        docs = [
            adapt_example(
                d,
                self.driver,
                first.name,
                self.kvm,
                connection_uri=first.uri,
                migration_address=first.migration_address,
            )
            for d in docs
        ]
        docs = [d for d in docs if d.get("kind") != "Migration"]
        if self.migrations and len(self.nodes) < 2:
            progress(f"skipping {len(self.migrations)} Migration example(s): one node only")
            self.migrations = []
        progress(f"applying {len(docs)} object(s) from {EXAMPLES_DIR}")
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        return [
            (d["metadata"].get("namespace", "default"), d["metadata"]["name"])
            for d in docs
            if d.get("kind") == "VirtualInstance"
            and d.get("spec", {}).get("runState", "Running") == "Running"
        ]

    def wait_ready(self, instances: list[tuple[str, str]]) -> None:
        """Wait for each instance's Ready condition; stop at once, saying why, if one fails."""
        for ns, name in instances:
            progress(f"waiting for VirtualInstance {ns}/{name} to be Ready ({self.driver})")
            deadline = time.monotonic() + self.wait_timeout
            said = ""
            while True:
                status = self._vi_status(ns, name)
                conds = {c.get("type"): c for c in status.get("conditions") or []}
                if (conds.get("Ready") or {}).get("status") == "True":
                    break
                phase = str(status.get("phase") or "Pending")
                why = "; ".join(
                    f"{t}: {c.get('message')}"
                    for t, c in conds.items()
                    if c.get("status") != "True" and c.get("message")
                )
                if phase == "Failed":
                    raise DemoError(
                        f"{ns}/{name} failed: {why or 'no reason given'}; see the logs in "
                        f"{DEMO_DIR / 'logs'}"
                    )
                line = f"{ns}/{name}: {phase}" + (f" ({why})" if why else "")
                if line != said and phase != "Pending":
                    progress(line)
                    said = line
                self.check_children()
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"{ns}/{name} not Ready within {self.wait_timeout:.0f}s ({line}); "
                        f"see the logs in {DEMO_DIR / 'logs'}"
                    )
                time.sleep(0.5)
        self._wait_node_counts(len(instances))

    def run_migrations(self) -> None:
        """Apply the Migration examples and follow each to its end (the headline, for real)."""
        for doc in self.migrations:
            meta = doc.setdefault("metadata", {})
            ns, name = meta.setdefault("namespace", "default"), meta["name"]
            progress(f"live-migrating {doc['spec']['instance']}: Migration {ns}/{name}")
            self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
            deadline, said = time.monotonic() + self.wait_timeout, ""
            while True:
                proc = self.cp.kubectl("get", "mig", name, "-n", ns, "-o", "json", check=False)
                status = (json.loads(proc.stdout).get("status") or {}) if proc.stdout else {}
                phase = str(status.get("phase") or "Pending")
                why = status.get("failureReason") or ""
                if phase != said:
                    progress(f"Migration {ns}/{name}: {phase} {why}".rstrip())
                    said = phase
                if phase in ("Failed", "Aborted"):
                    raise DemoError(f"Migration {ns}/{name} {phase}: {why or 'no reason given'}")
                if phase == "Succeeded":
                    break
                self.check_children()
                if time.monotonic() > deadline:
                    raise DemoError(f"Migration {ns}/{name} not done in {self.wait_timeout:.0f}s")
                time.sleep(0.5)

    def _vi_status(self, ns: str, name: str) -> dict[str, Any]:
        proc = self.cp.kubectl("get", "virtualinstance", name, "-n", ns, "-o", "json", check=False)
        if proc.returncode != 0:
            return {}
        status: dict[str, Any] = json.loads(proc.stdout).get("status") or {}
        return status

    def _wait_node_counts(self, expected: int, timeout: float = 15.0) -> None:
        """Let the node's next heartbeat count the new instances, so the table agrees."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.cp.kubectl("get", "nhv", "-o", "json", check=False)
            if proc.returncode != 0:
                return  # nothing to agree with
            items = json.loads(proc.stdout).get("items") or []
            total = sum(int((i.get("status") or {}).get("instanceCount") or 0) for i in items)
            if total >= expected:
                return
            time.sleep(0.5)

    def check_children(self) -> None:
        dead = [n for n, p in self.procs.items() if not p.alive()]
        dead += [n for n in ("etcd", "kube-apiserver") if n not in self.cp.pids()]
        if dead:
            raise DemoError(f"{', '.join(dead)} exited; see the logs in {DEMO_DIR / 'logs'}")

    def show(self) -> None:
        out = self.cp.kubectl("get", "vi,mig,nhv", "--all-namespaces", check=False)
        if out.returncode != 0:  # a kind is not served: show the others one by one
            for kind in ("vi", "mig", "nhv"):
                one = self.cp.kubectl("get", kind, "--all-namespaces", check=False)
                print(one.stdout + one.stderr, flush=True)
        else:
            print(out.stdout + out.stderr, flush=True)
        if len(self.nodes) > 1:
            where = self.cp.kubectl(
                "get", "vi", "demo-kvm", "-o", "jsonpath={.status.nodeName}", check=False
            ).stdout.strip()
            other = where or self.nodes[0].name
            print(
                "Try next (after the exports below; kubehv is in .venv/bin):\n"
                "  kubehv migrate demo-kvm --wait        # live migration with progress\n"
                f"  kubehv drain {other} --wait            # move every instance off a node\n"
                "  kubectl patch vi demo-kvm --type merge "
                '-p \'{"spec":{"autoBalloon":{"enabled":true,"target":"96Mi"}}}\'  # balloon\n',
                flush=True,
            )
        print(f"export KUBECONFIG={self.cp.kubeconfig}", flush=True)
        kubectl = shutil.which("kubectl")
        if kubectl and Path(kubectl).parent == binaries.cached_dir():
            # No kubectl of the user's own: the one hack/controlplane/build.sh built.
            print(f'export PATH="$PATH:{binaries.cached_dir()}"', flush=True)
        progress(
            f"running with the {self.driver} driver on {len(self.nodes)} node(s); "
            "Ctrl-C or `make demo-down` stops everything"
        )

    def delete_instances(self) -> None:
        """Delete every VirtualInstance while the agent still runs, so that it stops the VMs.

        Stopping the agent alone would leave the QEMU processes of a kvm demo running: an
        agent's shutdown deliberately leaves guests alone (an agent upgrade must not kill
        VMs). Deleting the objects makes the agent destroy the domains and drop its finalizer.
        """
        agents = [p for n, p in self.procs.items() if n.startswith("agent") and p.alive()]
        if not agents or "kube-apiserver" not in self.cp.pids():
            return
        progress("deleting the VirtualInstances (their agent stops the VMs)")
        proc = self.cp.kubectl(
            "delete", "vi", "--all", "--all-namespaces", "--wait=true", "--timeout=90s",
            check=False, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            progress(f"could not delete every VirtualInstance: {proc.stderr.strip()}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # best effort: processes are stopped regardless
            self.delete_instances()
        for name in [n for n in self.procs if n.startswith("agent")] + ["controller"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()
        if self.kvm is not None:
            self.kvm.stop()
            self.kvm = None
        self.cp.stop()
        with contextlib.suppress(FileNotFoundError):
            STATE_FILE.unlink()


def up(args: argparse.Namespace) -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if _same_process(state.get("up", {})):
            progress(f"a demo is already running (pid {state['up']['pid']}); `make demo-down`")
            return 1
        down_from_state(state)  # leftovers of a demo that did not stop cleanly
    demo = Demo(args.driver, args.wait_timeout)

    def on_term(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    try:
        demo.start_control_plane()
        demo.install_crds()
        demo.choose_driver()
        demo.write_state()
        demo.start_operator()
        demo.wait_ready(demo.apply_examples())
        demo.run_migrations()
        demo.show()
        if args.exit_when_ready:
            return 0
        while True:
            time.sleep(1.0)
            demo.check_children()
    except (KeyboardInterrupt, _Stop):
        progress("stopping")
        return 0
    except (DemoError, controlplane.ControlPlaneError, binaries.BinariesUnavailable) as exc:
        progress(f"FAILED: {exc}")
        return 1
    except controlplane.KubectlError as exc:
        progress(f"FAILED: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        demo.stop()
        progress("stopped every process the demo started")


def down_from_state(state: dict[str, Any]) -> None:
    main = _same_process(state.get("up", {}))
    if main is not None:
        progress(f"asking the demo (pid {main.pid}) to stop")
        main.terminate()
        _wait_gone(main, timeout=150)
    for name, record in state.get("processes", {}).items():
        proc = _same_process(record)
        if proc is None:
            continue
        progress(f"stopping leftover {name} (pid {proc.pid})")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        if not _wait_gone(proc, timeout=15):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    data_dir = state.get("data_dir")
    if data_dir and Path(data_dir).is_relative_to(DEMO_DIR):
        shutil.rmtree(data_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        STATE_FILE.unlink()


def down(args: argparse.Namespace) -> int:
    if not STATE_FILE.exists():
        progress("no demo is running (no .demo/state.json)")
        return 0
    down_from_state(json.loads(STATE_FILE.read_text()))
    progress("demo stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubehv.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the demo and stay up until Ctrl-C")
    p_up.add_argument("--driver", choices=["auto", "kvm", "fake"], default="auto")
    p_up.add_argument("--wait-timeout", type=float, default=300.0)
    p_up.add_argument(
        "--exit-when-ready", action="store_true", help="stop everything once Ready (for tests)"
    )
    sub.add_parser("down", help="stop a running demo")
    args = parser.parse_args(argv)
    return up(args) if args.command == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
