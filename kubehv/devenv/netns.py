"""Extra libvirt "nodes" on one machine: a libvirtd per network + mount namespace.

Why: live migration needs two libvirt hosts that each believe they are a separate machine
(own address, own ``/run/libvirt`` and ``/var/lib/libvirt``, own host UUID), and the tests have
one machine. A ``LibvirtNode`` is a network namespace with a veth on a per-session bridge
(``10.200.N.0/24``, the bridge holding ``10.200.N.1`` in the root namespace) plus a mount
namespace in which the libvirt folders are bind-mounted from a per-node folder on the host.
Its libvirtd listens on plain TCP (no auth) on the node address only, so ``virsh`` and the
driver reach it from the root namespace as ``qemu+tcp://<address>/system``.

Concurrency: each ``NodeSet`` claims a free ``N`` (a file per subnet under /run, holding the
owner's pid, under a lock); names of namespaces, bridge and veths derive from ``N``, so test
sessions running at once never collide. A subnet whose owner died is cleaned up (processes
killed, namespaces deleted) before it is reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from kubehv.devenv.libvirtd import (
    QEMU_CONF,
    READY_TIMEOUT,
    LibvirtdError,
    file_lock,
    kill_and_wait,
    list_domains,
    prepare_host,
    read_pid,
    run,
    tail,
    virsh_answers,
)

STATE_DIR = Path("/run/kubehv-netns")
BASE_DIR = Path("/tmp/kubehv-nodes")
SUBNET_PREFIX = "10.200"
FIRST_NODE_HOST = 11  # node i gets 10.200.N.(11 + i)
UNREACHABLE_HOST = 254  # an address on the subnet no node ever gets
UNREACHABLE_PORT = 16599  # nothing listens there on the bridge address

# Folders private to each node (inside the node -> <node dir>/<key> on the host).
NODE_DIRS = {
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
    "/etc/libvirt": "etc",
}


class NodeError(LibvirtdError):
    """A netns node could not be created, started or cleaned; the message says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = run(["ip", *args])
    if check and proc.returncode != 0:
        raise NodeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def kill_netns(name: str) -> None:
    """Kill every process in netns ``name`` (daemons, QEMU, holders) and delete it."""
    if not netns_exists(name):
        return
    for _ in range(3):
        pids = [
            int(p) for p in ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()
        ]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            kill_and_wait(pid, timeout=10.0)
    ip("netns", "del", name, check=False)


class LibvirtNode:
    """One extra libvirt host: its own netns, mount namespace, virtlogd and libvirtd."""

    def __init__(self, name: str, address: str, bridge: str, veth: str, base_dir: Path) -> None:
        self.name = name
        self.address = address
        self.bridge = bridge
        self.veth = veth
        self.dir = base_dir
        self.host_uuid = str(uuid.uuid4())
        self._holder: subprocess.Popen[str] | None = None

    # -- what tests use -------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def migration_uri(self) -> str:
        """Where QEMU on this node listens for an incoming migration."""
        return f"tcp://{self.address}"

    @property
    def log_dir(self) -> Path:
        """The host path of this node's /var/log/libvirt/qemu (QEMU and serial logs)."""
        return Path(self.host_path("/var/log/libvirt/qemu"))

    def host_path(self, path_inside_node: str) -> str:
        """Map a path as this node's processes see it to the same file seen from the host."""
        p = os.path.normpath(path_inside_node)
        for inside, key in NODE_DIRS.items():
            if p == inside or p.startswith(inside + "/"):
                return str(self.dir / key) + p[len(inside) :]
        return p

    def virsh(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c <this node's tcp uri> ARGS`` from the root namespace."""
        return run(["virsh", "-c", self.uri, *args], timeout=timeout)

    def nsenter_argv(self) -> list[str]:
        """Prefix that runs a command inside this node (its netns and mount namespace)."""
        if self._holder is None or self._holder.poll() is not None:
            raise NodeError(f"node {self.name} is not started")
        return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--"]

    def is_running(self) -> bool:
        return virsh_answers(self.uri)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Create the namespaces (if needed) and start virtlogd and libvirtd."""
        self.create_namespaces()
        self.start_daemons()

    def create_namespaces(self) -> None:
        """Network + mount namespace, veth, per-node folders (no-op while they exist).

        Call from a long-lived thread: the holder process dies with the thread that made it.
        """
        if self._holder is None or self._holder.poll() is not None:
            self._make_network()
            self._make_dirs()
            self._start_holder()

    def restart(self, hard: bool = False) -> None:
        """Kill this node's libvirtd (SIGKILL if ``hard``) and start it again; guests survive."""
        self.kill_libvirtd(hard=hard)
        self.start_daemons()

    def kill_libvirtd(self, hard: bool = False) -> None:
        """Stop only libvirtd: the node becomes unreachable, its guests keep running."""
        pid = read_pid(Path(self.host_path("/run/libvirt/libvirtd.pid")))
        if pid is not None:
            kill_and_wait(pid, signal.SIGKILL if hard else signal.SIGTERM)

    def stop(self) -> None:
        """Destroy its guests, stop its daemons, delete its namespaces, veth and folder."""
        if self.is_running():
            for dom in list_domains(self.uri):
                self.virsh("destroy", dom, timeout=30)
        for pidfile in ("/run/libvirt/libvirtd.pid", "/run/libvirt/virtlogd.pid"):
            pid = read_pid(Path(self.host_path(pidfile)))
            if pid is not None:
                kill_and_wait(pid)
        if self._holder is not None:
            if self._holder.poll() is None:
                self._holder.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=10)
            if self._holder.poll() is None:
                self._holder.kill()
                self._holder.wait()
            for pipe in (self._holder.stdout, self._holder.stderr):
                if pipe is not None:
                    pipe.close()
            self._holder = None
        kill_netns(self.name)  # whatever is left (QEMU that outlived libvirtd)
        ip("link", "del", self.veth, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- parts ----------------------------------------------------------------------------
    def _make_network(self) -> None:
        kill_netns(self.name)
        ip("link", "del", self.veth, check=False)
        ip("netns", "add", self.name)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        ip("link", "set", self.veth, "master", self.bridge)
        ip("link", "set", self.veth, "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", "eth0")
        ip("-n", self.name, "link", "set", "eth0", "up")

    def _make_dirs(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for key in NODE_DIRS.values():
            (self.dir / key).mkdir(parents=True, exist_ok=True)
        for sub in ("lib/qemu", "log/qemu", "run/qemu"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        etc = self.dir / "etc"
        (etc / "libvirtd.conf").write_text(
            "listen_tcp = 1\n"
            "listen_tls = 0\n"
            'auth_tcp = "none"\n'
            f'listen_addr = "{self.address}"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            'unix_sock_group = "root"\n'
        )
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "virtlogd.conf").write_text("")

    def _start_holder(self) -> None:
        """A process that owns the node's mount namespace (so it outlives daemon restarts)."""
        binds = " && ".join(
            f"mount --bind {self.dir / key} {inside}" for inside, key in NODE_DIRS.items()
        )
        script = f"{binds} && echo ready && exec sleep infinity"
        # The holder dies with this process (pdeathsig); daemons left behind by a killed
        # session are removed when the next session claims the subnet.
        die_with_parent = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        self._holder = subprocess.Popen(
            [
                *die_with_parent,
                "ip",
                "netns",
                "exec",
                self.name,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline().strip()
        if line != "ready":
            err = self._holder.stderr.read() if self._holder.stderr else ""
            self._holder.kill()
            self._holder.wait()
            self._holder = None
            raise NodeError(f"node {self.name}: mount namespace setup failed: {err.strip()}")
        # ``ip netns exec`` execs unshare, which execs sh, which execs sleep: one pid throughout.

    def start_daemons(self) -> None:
        """Start virtlogd and libvirtd inside the node if not running; wait for an answer."""
        enter = self.nsenter_argv()
        virtlogd_pid = Path(self.host_path("/run/libvirt/virtlogd.pid"))
        if read_pid(virtlogd_pid) is None:
            run([*enter, "virtlogd", "-d", "-p", "/run/libvirt/virtlogd.pid"], check=True)
        if read_pid(Path(self.host_path("/run/libvirt/libvirtd.pid"))) is None:
            env = dict(os.environ, LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log")
            proc = subprocess.run(
                [
                    *enter,
                    "libvirtd",
                    "-d",
                    "--listen",
                    "-p",
                    "/run/libvirt/libvirtd.pid",
                    "-f",
                    "/etc/libvirt/libvirtd.conf",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if proc.returncode != 0:
                raise NodeError(
                    f"node {self.name}: libvirtd exited {proc.returncode}: {proc.stderr.strip()}"
                )
        log = Path(self.host_path("/var/log/libvirt/libvirtd.log"))
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.is_running():
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node {self.name}: libvirtd never answered on {self.uri}; {tail(log)}"
                )
            time.sleep(0.2)


class NodeSet:
    """N libvirt nodes on a private bridge; a context manager that removes all of it."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.subnet_index: int | None = None
        self.nodes: list[LibvirtNode] = []

    # -- names derived from the subnet index ------------------------------------------------
    @property
    def _n(self) -> int:
        if self.subnet_index is None:
            raise NodeError("NodeSet not started")
        return self.subnet_index

    @property
    def bridge(self) -> str:
        return f"khvbr{self._n}"

    @property
    def bridge_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self._n}.1"

    @property
    def base_dir(self) -> Path:
        return BASE_DIR / f"s{self._n}"

    @property
    def unreachable_address(self) -> str:
        """An address on the nodes' subnet that no host has (connections time out)."""
        return f"{SUBNET_PREFIX}.{self._n}.{UNREACHABLE_HOST}"

    @property
    def unreachable_uri(self) -> str:
        """A libvirt URI nothing answers (connection refused at once on the bridge address)."""
        return f"qemu+tcp://{self.bridge_address}:{UNREACHABLE_PORT}/system"

    def __getitem__(self, i: int) -> LibvirtNode:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[LibvirtNode]:
        return iter(self.nodes)

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> NodeSet:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise NodeError("netns nodes need root")
        prepare_host()  # the mount points must exist in the root filesystem
        self._claim_subnet()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(self.count):
                self.nodes.append(
                    LibvirtNode(
                        name=f"khv{self._n}-n{i}",
                        address=f"{SUBNET_PREFIX}.{self._n}.{FIRST_NODE_HOST + i}",
                        bridge=self.bridge,
                        veth=f"khv{self._n}v{i}",
                        base_dir=self.base_dir / f"n{i}",
                    )
                )
            for node in self.nodes:
                node.create_namespaces()  # on this thread: see create_namespaces
            # libvirtd takes seconds to initialise: start the daemons side by side.
            with ThreadPoolExecutor(max_workers=self.count) as pool:
                for future in [pool.submit(node.start_daemons) for node in self.nodes]:
                    future.result()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.subnet_index is None:
            return
        errors: list[str] = []
        for node in self.nodes:
            try:
                node.stop()
            except (LibvirtdError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{node.name}: {exc}")
        self.nodes = []
        _remove_subnet(self._n)
        self.subnet_index = None
        if errors:
            raise NodeError("cleanup of netns nodes failed: " + "; ".join(errors))

    def _claim_subnet(self) -> None:
        with file_lock(STATE_DIR / "lock"):
            used = run(["ip", "-o", "-4", "addr", "show"]).stdout
            for n in range(1, 255):
                claim = STATE_DIR / f"subnet-{n}"
                owner = read_pid(claim)
                if owner is not None:
                    continue
                if claim.exists():
                    _remove_subnet(n)  # left over by a session that died
                if f" {SUBNET_PREFIX}.{n}." in used:
                    continue
                claim.write_text(str(os.getpid()))
                self.subnet_index = n
                return
        raise NodeError(f"no free /24 in {SUBNET_PREFIX}.0.0/16 for netns nodes")


def _remove_subnet(n: int) -> None:
    """Remove everything a NodeSet with subnet index ``n`` may have left behind."""
    for name in (
        [p.name for p in Path("/run/netns").glob(f"khv{n}-n*")]
        if Path("/run/netns").exists()
        else []
    ):
        kill_netns(name)
    ip("link", "del", f"khvbr{n}", check=False)
    shutil.rmtree(BASE_DIR / f"s{n}", ignore_errors=True)
    (STATE_DIR / f"subnet-{n}").unlink(missing_ok=True)
