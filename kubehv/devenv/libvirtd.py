"""The machine's own libvirtd (``qemu:///system``), made usable without systemd.

Why: the real-libvirt tests, the e2e tests and ``make demo`` need a running libvirtd and this
machine (like CI's) has no systemd to start one, nor the Debian packages that ship its config.
``LocalLibvirtd`` prepares what the Debian build needs (folders, the ``libvirt-qemu`` user, the
``kvm`` group, a qemu.conf running QEMU as root without cgroups), starts ``virtlogd`` and
``libvirtd`` if they are not already answering, and waits until ``virsh`` gets an answer.

Several test sessions may do this at once: a file lock in /run serialises start, stop and
restart, and each user takes a lease (a file named by its pid), so the daemon this process
started is stopped only when no other live process still uses it. A libvirtd someone else
started is never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SYSTEM_URI = "qemu:///system"
STATE_DIR = Path("/run/kubehv-libvirtd")
READY_TIMEOUT = 90.0  # generous: two cores shared by many concurrent test sessions
MANAGED_MARK = "# managed by kubehv.devenv"

# Folders the Debian build of libvirtd needs and does not create itself.
LIBVIRT_DIRS = (
    "/var/log/libvirt",
    "/var/log/libvirt/qemu",
    "/var/lib/libvirt",
    "/var/lib/libvirt/qemu",
    "/var/cache/libvirt",
    "/run/libvirt",
    "/etc/libvirt",
)

# QEMU as root (the test guest's kernel lives under /root/.cache) and no cgroups: the cgroup
# folders of two daemons on one machine (root namespace + netns nodes) would collide during a
# migration, since both name a domain's cgroup after its id and name.
QEMU_CONF = f"""{MANAGED_MARK}
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
"""


class LibvirtdError(RuntimeError):
    """libvirtd could not be prepared, started or reached; the message says why."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid_alive(pid) else None


def kill_and_wait(pid: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal ``pid`` and wait for it to go; SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def run(
    argv: Sequence[str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LibvirtdError(
            f"{' '.join(argv)} exited {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def virsh_answers(uri: str, timeout: float = 15.0) -> bool:
    try:
        return run(["virsh", "-c", uri, "version"], timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LibvirtdError(
            f"missing programs {missing}: install the Debian packages with hack/bootstrap-apt.sh"
        )


def ensure_accounts() -> None:
    """The ``kvm`` group and ``libvirt-qemu`` user+group the Debian QEMU driver insists on."""
    if run(["getent", "group", "kvm"]).returncode != 0:
        run(["groupadd", "--system", "kvm"], check=False)
    if run(["getent", "group", "libvirt-qemu"]).returncode != 0:
        run(["groupadd", "--system", "libvirt-qemu"], check=False)
    if run(["getent", "passwd", "libvirt-qemu"]).returncode != 0:
        run(
            [
                "useradd",
                "--system",
                "--gid",
                "libvirt-qemu",
                "--groups",
                "kvm",
                "--home-dir",
                "/var/lib/libvirt",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ],
            check=False,
        )
    for what, name in (("group", "kvm"), ("group", "libvirt-qemu"), ("passwd", "libvirt-qemu")):
        if run(["getent", what, name]).returncode != 0:
            raise LibvirtdError(f"could not create the system {what} entry {name!r}")


def write_managed(path: Path, text: str) -> None:
    """Write a config file unless a person wrote their own there (no kubehv mark)."""
    if path.exists() and MANAGED_MARK not in path.read_text(errors="replace"):
        return
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def prepare_host() -> None:
    if os.geteuid() != 0:
        raise LibvirtdError("starting the system libvirtd needs root")
    require_tools("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64")
    for d in LIBVIRT_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)
    ensure_accounts()
    write_managed(Path("/etc/libvirt/qemu.conf"), QEMU_CONF)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_until(uri: str, timeout: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not virsh_answers(uri):
        if time.monotonic() > deadline:
            raise LibvirtdError(
                f"{what} did not answer on {uri} within {timeout:.0f}s; {tail(log)}"
            )
        time.sleep(0.2)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"log tail of {path}:\n" + "\n".join(text)


class LocalLibvirtd:
    """The root namespace's libvirtd at ``qemu:///system``: started if needed, shared safely."""

    uri = SYSTEM_URI
    log_dir = Path("/var/log/libvirt/qemu")
    pidfile = Path("/run/libvirtd.pid")
    virtlogd_pidfile = Path("/run/virtlogd.pid")
    daemon_log = Path("/var/log/libvirt/libvirtd.log")

    def __init__(self) -> None:
        self.started_by_us = False
        self._lease = STATE_DIR / "leases" / f"{os.getpid()}-{id(self):x}"
        self._lock = STATE_DIR / "lock"
        self._ours_mark = STATE_DIR / "started-by-kubehv"

    def is_running(self) -> bool:
        return virsh_answers(self.uri)

    def ensure(self) -> LocalLibvirtd:
        """Make libvirtd answer on ``qemu:///system``, starting it if nobody runs one."""
        with file_lock(self._lock):
            self._lease.parent.mkdir(parents=True, exist_ok=True)
            self._lease.write_text(str(os.getpid()))
            if self.is_running():
                return self
            prepare_host()
            self._start_locked()
            self.started_by_us = True
            self._ours_mark.write_text(str(os.getpid()))
        return self

    start = ensure

    def _start_locked(self) -> None:
        env = dict(os.environ)
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{self.daemon_log}"
        if read_pid(self.virtlogd_pidfile) is None:
            run(["virtlogd", "-d", "-p", str(self.virtlogd_pidfile)], check=True)
        old = read_pid(self.pidfile)
        if old is not None:
            # A libvirtd that does not answer (hung or half started): replace it.
            kill_and_wait(old)
        proc = subprocess.run(
            ["libvirtd", "-d", "-p", str(self.pidfile)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise LibvirtdError(
                f"libvirtd -d exited {proc.returncode}: {proc.stderr.strip()}; "
                f"{tail(self.daemon_log)}"
            )
        wait_until(self.uri, READY_TIMEOUT, self.daemon_log, "libvirtd")

    def restart(self, hard: bool = False) -> None:
        """Kill libvirtd (SIGTERM, or SIGKILL if ``hard``) and start it again.

        Running guests survive: QEMU processes are not libvirtd's children once it restarts.
        """
        with file_lock(self._lock):
            prepare_host()
            pid = read_pid(self.pidfile)
            if pid is not None:
                kill_and_wait(pid, signal.SIGKILL if hard else signal.SIGTERM)
            self._start_locked()

    def kill(self) -> None:
        """Stop libvirtd without starting it again (for tests of an unreachable daemon)."""
        with file_lock(self._lock):
            pid = read_pid(self.pidfile)
            if pid is not None:
                kill_and_wait(pid)

    def _other_users(self) -> list[int]:
        users = []
        for lease in (STATE_DIR / "leases").glob("*"):
            owner = lease.name.split("-", 1)[0]
            if lease == self._lease or not owner.isdigit():
                continue
            if pid_alive(int(owner)):
                users.append(int(owner))
            else:
                lease.unlink(missing_ok=True)
        return users

    def stop(self) -> None:
        """Give up our lease; stop the daemons only if we started them and nobody else uses them."""
        with file_lock(self._lock):
            self._lease.unlink(missing_ok=True)
            if not self._ours_mark.exists() or self._other_users():
                return
            if not self.started_by_us:
                # Started by an earlier kubehv session that is gone: stop only if ours to stop.
                return
            if list_domains(self.uri):
                # Someone's guests still run: leave the daemon to them.
                return
            for pidfile in (self.pidfile, self.virtlogd_pidfile):
                pid = read_pid(pidfile)
                if pid is not None:
                    kill_and_wait(pid)
            self._ours_mark.unlink(missing_ok=True)
            self.started_by_us = False


def list_domains(uri: str) -> list[str]:
    proc = run(["virsh", "-c", uri, "list", "--name"])
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]
