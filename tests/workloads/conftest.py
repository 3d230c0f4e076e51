"""Workload fixtures: a loopback HTTP image server and images made with the real qemu-img.

Why: the image cache's rules (checksum, size limit, one download for concurrent starts, no
partial file ever used) are only proven against a real HTTP server and real qcow2 files, so
the tests serve real files from ``127.0.0.1`` and count the requests the server saw.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubehv.devenv.cloudimage import CloudImage, ensure_cloud_image
from kubehv.devenv.guest import GuestBuildError
from tests.e2e.conftest import e2e_namespace, kvm_cluster  # noqa: F401 - fixtures used here
from tests.fixtures.real import missing_real_part


class ImageServer:
    """Serves files from ``root`` on loopback; ``/truncated/NAME`` promises more than it sends,
    ``/slow/NAME`` sends at ``SLOW_BYTES_S`` (a download long enough to show its progress)."""

    SLOW_BYTES_S = 48 << 20

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.delay_s = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                truncated = self.path.startswith("/truncated/")
                slow = self.path.startswith("/slow/")
                name = self.path.removeprefix("/truncated/").removeprefix("/slow/").lstrip("/")
                path = server.root / name
                if not path.is_file():
                    self.send_error(404, "no such image")
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + (4096 if truncated else 0)))
                self.end_headers()
                if server.delay_s:
                    threading.Event().wait(server.delay_s)
                step = server.SLOW_BYTES_S // 4 if slow else len(data) or 1
                try:
                    for at in range(0, len(data), step):
                        self.wfile.write(data[at : at + step])
                        self.wfile.flush()
                        if slow:
                            threading.Event().wait(0.25)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a size limit hit): what it may do

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}/{name}"

    def start(self) -> ImageServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[ImageServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = ImageServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> str:
    if shutil.which("qemu-img") is None:
        missing_real_part("qemu-img", "qemu-utils is not installed")
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def make_qcow2(path: Path, size: str = "16M", *options: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), size)
    return path


@pytest.fixture(scope="session")
def cloud_image() -> CloudImage:
    for tool in ("debootstrap", "mkfs.ext4", "syslinux", "mcopy", "sfdisk", "qemu-img"):
        if shutil.which(tool) is None:
            missing_real_part("cloud test image", f"{tool} is not installed (make apt)")
    try:
        return ensure_cloud_image()
    except GuestBuildError as exc:
        missing_real_part("cloud test image", str(exc))
