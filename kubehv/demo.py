"""``make demo``: a whole kubehv installation on this machine, from one command.

Why: a newcomer must get from a fresh clone to a VM reconciled by kubehv without a cluster.
``python -m kubehv.demo up`` starts the test harness's control plane (etcd + kube-apiserver),
installs the CRDs, picks a driver (kvm on a local libvirtd with the tiny test guest when QEMU
and libvirt can run here, else fake, and says why), starts the controller and one node agent
as processes, applies ``examples/``, waits for Ready, prints the state and the
``export KUBECONFIG=...`` line, then stays up until Ctrl-C, SIGTERM or
``python -m kubehv.demo down`` (which reads ``.demo/state.json``) and stops all it started.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from kubehv.devenv import binaries, controlplane, guest, libvirtd
from kubehv.drivers import errors as driver_errors
from kubehv.drivers import registry

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


# ---- state file: what `down` needs to find the processes ----------------------------------
def _process_record(pid: int) -> dict[str, Any]:
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def _same_process(record: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs (guards against pid reuse)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) < 1.0:
            return proc
    except (psutil.Error, KeyError, ValueError):
        pass
    return None


# ---- kvm: can real VMs run here? -------------------------------------------------------------
class KvmSetup:
    """What the kvm driver needs in the demo: a libvirtd URI and the test guest's boot files."""

    def __init__(
        self,
        uri: str,
        kernel: Path,
        initrd: Path,
        cmdline: str = "console=ttyS0",
        daemon: libvirtd.LocalLibvirtd | None = None,
    ) -> None:
        self.uri, self.kernel, self.initrd, self.cmdline = uri, kernel, initrd, cmdline
        self._daemon = daemon  # our lease on libvirtd: stopped only if we started it

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        self._daemon = None


def prepare_kvm(report: Callable[[str], None]) -> tuple[KvmSetup | None, str]:
    """Decide whether the kvm driver can run here; (setup, reason) or (None, why not)."""
    missing = [b for b in ("qemu-system-x86_64", "libvirtd", "virsh") if not shutil.which(b)]
    if missing:
        return None, f"not installed: {', '.join(missing)}"
    if importlib.util.find_spec("libvirt") is None:
        return None, "the libvirt Python binding is not installed"
    try:
        registry.get_driver_class("kvm")
    except driver_errors.UnknownDriver as exc:
        return None, f"the kvm driver does not load: {exc}"
    report("libvirtd: using the running one or starting it (no systemd here)")
    daemon = libvirtd.LocalLibvirtd()
    try:
        daemon.ensure()
    except (libvirtd.LibvirtdError, OSError, subprocess.SubprocessError) as exc:
        daemon.stop()
        return None, f"libvirtd cannot be started: {exc}"
    report("test guest: Debian cloud kernel + busybox initramfs (built once, then cached)")
    try:
        image = guest.ensure_guest()
    except guest.GuestBuildError as exc:
        daemon.stop()
        return None, f"the test guest cannot be built: {exc}"
    started = "started by the demo" if daemon.started_by_us else "already running"
    setup = KvmSetup(
        daemon.uri, Path(image.kernel), Path(image.initrd), image.cmdline, daemon=daemon
    )
    return setup, f"libvirtd at {daemon.uri} ({started}), guest kernel {image.kernel}"


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

    def write_state(self) -> None:
        state = {
            "up": _process_record(os.getpid()),
            "kubeconfig": str(self.cp.kubeconfig),
            "data_dir": str(self.cp.dir),
            "driver": self.driver,
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
        self.cp.kubectl(
            "wait", "--for=condition=Established", "crd", "--all", "--timeout=120s", timeout=150
        )

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
        agent = self._cli_command("agent")
        cflags, aflags = self._flags("controller"), self._flags("agent")
        if "--kubeconfig" in cflags:
            controller += ["--kubeconfig", str(self.cp.kubeconfig)]
        self._spawn("controller", controller)
        agent += ["--node-name", self.node_name, "--hypervisor", self.driver]
        if "--kubeconfig" in aflags:
            agent += ["--kubeconfig", str(self.cp.kubeconfig)]
        # The agent's own state (fake instances, VNC password files) stays in .demo/, not in
        # /var/lib/kubehv, so `down` leaves nothing behind outside the checkout.
        state_dir = DEMO_DIR / "agent-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        if "--state-dir" in aflags:
            agent += ["--state-dir", str(state_dir)]
        for flag in ("--connection-uri", "--uri", "--libvirt-uri"):
            if flag in aflags:
                agent += [flag, self.connection_uri(state_dir)]
                break
        self._spawn("agent", agent)

    def connection_uri(self, state_dir: Path) -> str:
        return self.kvm.uri if self.kvm is not None else f"fake://{state_dir}"

    def apply_examples(self) -> list[tuple[str, str]]:
        """Apply examples/ (adapted to this node and driver); return the VIs to wait for."""
        files = _yaml_files(EXAMPLES_DIR)
        if not files:
            raise DemoError(f"no examples in {EXAMPLES_DIR}: nothing to show")
        docs: list[dict[str, Any]] = []
        for f in files:
            docs += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        # A Migration needs a second node; the demo has one, so those are shown, not applied.
        skipped = [d for d in docs if d.get("kind") == "Migration"]
        uri = self.connection_uri(DEMO_DIR / "agent-state")
        docs = [adapt_example(d, self.driver, self.node_name, self.kvm, uri) for d in docs]
        docs = [d for d in docs if d.get("kind") != "Migration"]
        if skipped:
            progress(f"skipping {len(skipped)} Migration example(s): the demo has one node")
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
        print(f"export KUBECONFIG={self.cp.kubeconfig}", flush=True)
        kubectl = shutil.which("kubectl")
        if kubectl and Path(kubectl).parent == binaries.cached_dir():
            # No kubectl of the user's own: the one hack/controlplane/build.sh built.
            print(f'export PATH="$PATH:{binaries.cached_dir()}"', flush=True)
        progress(
            f"running with the {self.driver} driver; Ctrl-C or `make demo-down` stops everything"
        )

    def delete_instances(self) -> None:
        """Delete every VirtualInstance while the agent still runs, so that it stops the VMs.

        Stopping the agent alone would leave the QEMU processes of a kvm demo running: an
        agent's shutdown deliberately leaves guests alone (an agent upgrade must not kill
        VMs). Deleting the objects makes the agent destroy the domains and drop its finalizer.
        """
        agent = self.procs.get("agent")
        if agent is None or not agent.alive() or "kube-apiserver" not in self.cp.pids():
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
        for name in ("agent", "controller"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()
        if self.kvm is not None:
            self.kvm.stop()
            self.kvm = None
        self.cp.stop()
        with contextlib.suppress(FileNotFoundError):
            STATE_FILE.unlink()


def adapt_example(
    doc: dict[str, Any],
    driver: str,
    node: str,
    kvm: KvmSetup | None,
    connection_uri: str | None = None,
) -> dict[str, Any]:
    """An example as the demo applies it: on this driver, on this node, booting the guest.

    The NodeHypervisor example describes a node called ``node-a``; the demo's one node is
    this machine, whose agent has already registered it: the example becomes that object
    (same name, driver and URI), so applying it adds its labels instead of a second node
    that no agent serves and that would never be Ready.
    """
    if doc.get("kind") == "NodeHypervisor":
        doc = json.loads(json.dumps(doc))
        doc.setdefault("metadata", {})["name"] = node
        spec = doc.setdefault("spec", {})
        spec["nodeName"] = node
        spec["hypervisor"] = driver
        if connection_uri:
            spec["connectionURI"] = connection_uri
        spec.pop("migrationAddress", None)  # one node: nothing to migrate to
        return doc
    if doc.get("kind") != "VirtualInstance":
        return doc
    doc = json.loads(json.dumps(doc))  # a deep copy
    spec = doc.setdefault("spec", {})
    spec["hypervisor"] = driver
    for key in ("nodeName", "node"):
        if key in spec:
            spec[key] = node
    if kvm is not None:
        boot = spec.setdefault("boot", {})
        boot["kernel"] = str(kvm.kernel)
        boot["initrd"] = str(kvm.initrd)
        boot["cmdline"] = kvm.cmdline
    return doc


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


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait until ``proc`` has exited; a zombie counts as exited.

    ``psutil.Process.wait`` on a process that is not our child polls for the pid, and a
    zombie keeps its pid until its parent reaps it: when ``up`` runs under a parent that
    waits for it only after ``down`` returns (a test, a supervisor), waiting for the pid
    would always take the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


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
