"""containerd + runc for the real node, started by hand (no systemd) with its own dirs.

Why: the kubelet needs a CRI runtime, and the machine's containerd must not be touched (it may
not even run). This one has its own root, state and socket under the node's data dir, the
CNI config of the node, and the two settings this kind of VM needs: ``restrict_oom_score_adj``
(the capability bounding set lacks CAP_SYS_RESOURCE, so runc cannot write the sandbox's
negative oom_score_adj: every pod would fail with "can't get final child's PID from pipe")
and network namespaces mounted under the state dir (so teardown finds them all). Images come
from docker-archive tarballs imported with ``ctr`` (``kubehv.devenv.image``), no registry.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from kubehv.devenv.controlplane import ManagedProcess, log_tail

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
CNI_BIN_DIR = "/usr/lib/cni"


class ContainerdError(RuntimeError):
    """containerd failed to start or a ctr command failed; the message has the log tail."""


class Containerd:
    """One containerd under ``directory``; ``sandbox_image`` is the pause image's reference."""

    def __init__(
        self,
        directory: Path,
        *,
        cni_conf_dir: Path,
        sandbox_image: str,
        enter: tuple[str, ...] = (),
    ) -> None:
        """``enter``: a prefix that runs containerd inside another node's namespaces."""
        self.dir = directory
        self.enter = enter
        self.cni_conf_dir = cni_conf_dir
        self.sandbox_image = sandbox_image
        self.proc: ManagedProcess | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def config(self) -> str:
        d = self.dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{d / "containerd.sock.ttrpc"}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"

[{cri}]
  sandbox_image = "{self.sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{self.cni_conf_dir}"
  max_conf_num = 1
"""

    def start(self, timeout: float = 120.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(self.config())
        self.proc = ManagedProcess(
            "containerd",
            [*self.enter, "containerd", "--config", str(self.dir / "config.toml")],
            self.log,
        )
        self.proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise ContainerdError(f"containerd exited; {self.log}:\n{log_tail(self.log)}")
            if self.socket.exists() and self._ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise ContainerdError(f"containerd did not answer; {self.log}:\n{log_tail(self.log)}")

    def _ctr(
        self, *args: str, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def import_image(self, archive: Path) -> None:
        """Import a docker-archive tarball (unpacked for the overlayfs snapshotter)."""
        self._ctr("images", "import", str(archive))

    def images(self) -> list[str]:
        out = self._ctr("images", "list", "--quiet").stdout
        return [line for line in out.splitlines() if line.strip()]

    def kill_all(self) -> None:
        """SIGKILL every task and remove every container (what the kubelet left behind)."""
        if self.proc is None or not self.proc.alive():
            return
        tasks = self._ctr("tasks", "list", "--quiet", check=False).stdout.split()
        for task in tasks:
            self._ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
        for task in tasks:
            for _ in range(50):
                if self._ctr("tasks", "delete", "--force", task, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        for cid in self._ctr("containers", "list", "--quiet", check=False).stdout.split():
            self._ctr("containers", "delete", cid, check=False)

    def stop(self) -> None:
        with contextlib.suppress(ContainerdError, OSError, subprocess.TimeoutExpired):
            self.kill_all()
        if self.proc is not None:
            self.proc.stop(grace=10)
            self.proc = None
