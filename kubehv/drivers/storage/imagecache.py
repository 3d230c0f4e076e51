"""The per-node image cache: each image downloaded once, verified, and never used half-done.

Why this module exists: many instances start from one cloud image. The cache keys files by
their SHA-256 (the manifest must give it), so a second instance -- or a migration target --
reuses the file, and an image whose bytes do not match is never used. Rules:

* concurrent starts of one image download it once: an exclusive ``flock`` per image, and
  whoever gets the lock second finds the finished file;
* partial downloads are never used: bytes go to a temporary name in the same folder and are
  renamed into place only after the size limit, the checksum and the header check passed;
* a failed download leaves nothing behind (the temporary file is removed);
* images whose qcow2 header names an external backing or data file are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from kubehv.drivers import values
from kubehv.drivers.storage import errors, qcow2

SHA256_RE = re.compile(r"[0-9a-f]{64}")
URL_RE = re.compile(r"https?://[^\s]{1,2040}")
CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes if the server said) while downloading."""


@dataclasses.dataclass(frozen=True, slots=True)
class CachedImage:
    path: str  # as the agent sees it
    sha256: str
    format: values.DiskFormat
    virtual_size_bytes: int


class ImageCache:
    """Images under ``directory`` (``<sha256>.img``), at most ``max_bytes`` each."""

    def __init__(self, directory: str, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def path_of(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}.img")

    def cached(self, sha256: str) -> CachedImage | None:
        path = self.path_of(sha256)
        if not os.path.isfile(path):
            return None
        header = qcow2.check_self_contained(path)
        return CachedImage(path, sha256, header.format, header.virtual_size_bytes)

    def ensure(self, image: values.ImageRef, progress: Progress | None = None) -> CachedImage:
        """The cached image, downloading and verifying it first if needed."""
        check_ref(image)
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        found = self.cached(image.sha256)
        if found is not None:
            return found
        with self._locked(image.sha256):
            found = self.cached(image.sha256)  # someone else finished while we waited
            if found is not None:
                return found
            return self._download(image, progress)

    @contextlib.contextmanager
    def _locked(self, sha256: str) -> Iterator[None]:
        fd = os.open(os.path.join(self.directory, f"{sha256}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _download(self, image: values.ImageRef, progress: Progress | None) -> CachedImage:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{image.sha256[:16]}.", suffix=".part", dir=self.directory
        )
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self._fetch(image.url, out, progress)
            if digest != image.sha256:
                raise errors.ImageChecksumMismatch(
                    f"the image at {image.url} has SHA-256 {digest}, not the {image.sha256} the "
                    "manifest expects; it was not used (fix the URL or the checksum)"
                )
            header = qcow2.check_self_contained(tmp)
            os.chmod(tmp, 0o444)
            final = self.path_of(image.sha256)
            os.rename(tmp, final)
            return CachedImage(final, image.sha256, header.format, header.virtual_size_bytes)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _fetch(self, url: str, out: object, progress: Progress | None) -> str:
        digest = hashlib.sha256()
        done = 0
        limit = self.max_bytes
        try:
            # http(s) only: check_ref refused every other scheme before we got here.
            request = urllib.request.Request(url, headers={"User-Agent": "kubehv-agent"})  # noqa: S310
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > limit:
                    raise _too_large(url, total, limit)
                while chunk := resp.read(CHUNK):
                    done += len(chunk)
                    if done > limit:
                        raise _too_large(url, done, limit)
                    digest.update(chunk)
                    out.write(chunk)  # type: ignore[attr-defined]
                    if progress is not None:
                        progress(done, total)
                if total is not None and done != total:
                    raise errors.ImageDownloadFailed(
                        f"the download of {url} stopped after {done} of {total} bytes"
                    )
        except urllib.error.HTTPError as exc:
            raise errors.ImageDownloadFailed(
                f"cannot download the image {url}: the server answered HTTP {exc.code} {exc.reason}"
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise errors.ImageDownloadFailed(f"cannot download the image {url}: {why}") from None
        return digest.hexdigest()


def _too_large(url: str, size: int, limit: int) -> errors.ImageTooLarge:
    return errors.ImageTooLarge(
        f"the image at {url} is larger ({size} bytes so far) than this node accepts "
        f"({limit} bytes, node setting image_max_size_mib); it was not kept"
    )


def check_ref(image: values.ImageRef) -> None:
    """No I/O: the URL is http(s) and the checksum 64 lowercase hex digits."""
    if not URL_RE.fullmatch(image.url):
        raise errors.ImageRefused(f"image URL {image.url!r} must be an http:// or https:// URL")
    if not SHA256_RE.fullmatch(image.sha256):
        raise errors.ImageRefused(
            f"image sha256 {image.sha256!r} must be 64 lowercase hexadecimal digits"
        )
