"""The image header check on images made by the real qemu-img.

Why: a downloaded qcow2 image that names a backing file or an external data file would make
QEMU open a file of the node; the header parser must see both, and must not mistake a raw
image (or a qcow2 made the normal way) for one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubehv.drivers import values
from kubehv.drivers.storage import errors, qcow2
from tests.workloads.conftest import make_qcow2


def test_plain_qcow2_is_self_contained(tmp_path: Path) -> None:
    header = qcow2.check_self_contained(str(make_qcow2(tmp_path / "a.qcow2", "16M")))
    assert header.format is values.DiskFormat.QCOW2
    assert header.virtual_size_bytes == 16 << 20
    assert header.backing_file is None


def test_qcow2_v2_header(tmp_path: Path) -> None:
    path = make_qcow2(tmp_path / "v2.qcow2", "8M", "-o", "compat=0.10")
    assert qcow2.read_header(str(path)).virtual_size_bytes == 8 << 20


def test_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * 65536)
    header = qcow2.check_self_contained(str(path))
    assert (header.format, header.virtual_size_bytes) == (values.DiskFormat.RAW, 65536)


def test_external_backing_file_is_refused(tmp_path: Path) -> None:
    make_qcow2(tmp_path / "base.qcow2")
    bad = make_qcow2(tmp_path / "bad.qcow2", "16M", "-b", "/etc/shadow", "-F", "raw", "-u")
    assert qcow2.read_header(str(bad)).backing_file == "/etc/shadow"
    with pytest.raises(errors.ImageRefused, match=r"external backing file.*/etc/shadow"):
        qcow2.check_self_contained(str(bad))


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    bad = make_qcow2(tmp_path / "df.qcow2", "16M", "-o", f"data_file={tmp_path / 'data.raw'}")
    with pytest.raises(errors.ImageRefused, match="external data file"):
        qcow2.check_self_contained(str(bad))


def test_truncated_qcow2_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(qcow2.MAGIC + b"\0\0\0\3")
    with pytest.raises(errors.ImageRefused, match="truncated"):
        qcow2.read_header(str(path))
