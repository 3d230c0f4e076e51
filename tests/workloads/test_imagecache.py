"""The per-node image cache against a real loopback HTTP server.

Why: each rule of the cache is a promise to users -- an image is downloaded once however many
instances start from it at once, bytes with the wrong checksum are never used, an oversized,
truncated or unreachable download leaves nothing behind, and an image naming an external
backing file is refused. Every test looks at the server's request log and the cache folder.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from kubehv.drivers import values
from kubehv.drivers.storage import errors, imagecache
from tests.workloads.conftest import ImageServer, make_qcow2, sha256


def _cache(tmp_path: Path, max_bytes: int = 1 << 30) -> imagecache.ImageCache:
    return imagecache.ImageCache(str(tmp_path / "cache"), max_bytes, timeout_s=10)


def _files(cache: imagecache.ImageCache) -> list[str]:
    """What the cache folder holds apart from lock files."""
    if not os.path.isdir(cache.directory):
        return []
    return sorted(f for f in os.listdir(cache.directory) if not f.endswith(".lock"))


def test_download_once_verified_and_reused(tmp_path: Path, image_server: ImageServer) -> None:
    image = make_qcow2(image_server.root / "base.qcow2", "32M")
    cache = _cache(tmp_path)
    ref = values.ImageRef(image_server.url("base.qcow2"), sha256(image))
    seen: list[int] = []
    got = cache.ensure(ref, progress=lambda done, _total: seen.append(done))
    assert got.path == cache.path_of(ref.sha256)
    assert got.format is values.DiskFormat.QCOW2 and got.virtual_size_bytes == 32 << 20
    assert Path(got.path).read_bytes() == image.read_bytes()
    assert seen and seen[-1] == image.stat().st_size
    assert cache.ensure(ref) == got
    assert image_server.requests == ["/base.qcow2"]
    assert _files(cache) == [f"{ref.sha256}.img"]


def test_concurrent_starts_download_once(tmp_path: Path, image_server: ImageServer) -> None:
    image = make_qcow2(image_server.root / "base.qcow2", "32M")
    image_server.delay_s = 0.5  # everyone asks while the first download is under way
    cache = _cache(tmp_path)
    ref = values.ImageRef(image_server.url("base.qcow2"), sha256(image))
    results: list[imagecache.CachedImage] = []
    threads = [threading.Thread(target=lambda: results.append(cache.ensure(ref))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len({r.path for r in results}) == 1
    assert image_server.requests == ["/base.qcow2"]


def test_wrong_sha256_is_never_used(tmp_path: Path, image_server: ImageServer) -> None:
    make_qcow2(image_server.root / "base.qcow2")
    cache = _cache(tmp_path)
    ref = values.ImageRef(image_server.url("base.qcow2"), "0" * 64)
    with pytest.raises(errors.ImageChecksumMismatch, match="not the 0000"):
        cache.ensure(ref)
    assert _files(cache) == []


def test_unreachable_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = _cache(tmp_path)
    ref = values.ImageRef(f"http://127.0.0.1:{port}/x.qcow2", "a" * 64)
    with pytest.raises(errors.ImageDownloadFailed, match="cannot download the image") as exc:
        cache.ensure(ref)
    assert exc.value.retryable
    assert _files(cache) == []


def test_http_error(tmp_path: Path, image_server: ImageServer) -> None:
    cache = _cache(tmp_path)
    with pytest.raises(errors.ImageDownloadFailed, match="HTTP 404"):
        cache.ensure(values.ImageRef(image_server.url("missing.qcow2"), "a" * 64))
    assert _files(cache) == []


def test_oversized_image(tmp_path: Path, image_server: ImageServer) -> None:
    image = make_qcow2(image_server.root / "big.raw", "1M", "-o", "preallocation=full")
    cache = _cache(tmp_path, max_bytes=64 * 1024)
    with pytest.raises(errors.ImageTooLarge, match=r"larger .* than this node accepts"):
        cache.ensure(values.ImageRef(image_server.url("big.raw"), sha256(image)))
    assert _files(cache) == []


def test_truncated_download(tmp_path: Path, image_server: ImageServer) -> None:
    image = make_qcow2(image_server.root / "base.qcow2")
    cache = _cache(tmp_path)
    with pytest.raises(errors.ImageDownloadFailed):
        cache.ensure(values.ImageRef(image_server.url("base.qcow2", "/truncated"), sha256(image)))
    assert _files(cache) == []


def test_external_backing_file_refused(tmp_path: Path, image_server: ImageServer) -> None:
    bad = make_qcow2(image_server.root / "bad.qcow2", "16M", "-b", "/etc/shadow", "-F", "raw", "-u")
    cache = _cache(tmp_path)
    with pytest.raises(errors.ImageRefused, match="external backing file"):
        cache.ensure(values.ImageRef(image_server.url("bad.qcow2"), sha256(bad)))
    assert _files(cache) == []


@pytest.mark.parametrize(
    ("url", "digest", "match"),
    [
        ("file:///etc/shadow", "a" * 64, "must be an http"),
        ("ftp://example.org/x", "a" * 64, "must be an http"),
        ("http://example.org/x", "A" * 64, "64 lowercase"),
        ("http://example.org/x", "abc", "64 lowercase"),
    ],
)
def test_bad_refs_refused_without_io(tmp_path: Path, url: str, digest: str, match: str) -> None:
    cache = _cache(tmp_path)
    with pytest.raises(errors.ImageRefused, match=match):
        cache.ensure(values.ImageRef(url, digest))
