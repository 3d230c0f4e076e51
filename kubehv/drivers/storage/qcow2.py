"""Reading a disk image's header: qcow2 or raw, its virtual size, and what it points at.

Why this module exists: a downloaded image is untrusted. A qcow2 header can name an external
backing file (``/etc/shadow``, another tenant's disk) or an external data file that QEMU would
open on the node; such images are refused before QEMU ever sees them. The header is parsed
here by hand (the format is public and fixed: QEMU's docs/interop/qcow2.txt), so the check does
not depend on qemu-img's probing rules.
"""

from __future__ import annotations

import dataclasses
import struct

from kubehv.drivers import values
from kubehv.drivers.storage import errors

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQ")  # magic, version, backing offset, backing size, bits, size
_INCOMPATIBLE = struct.Struct(">Q")  # v3: incompatible feature bits at offset 72
_EXTERNAL_DATA_FILE = 1 << 2
_KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, external data, compression type, extended L2


@dataclasses.dataclass(frozen=True, slots=True)
class ImageHeader:
    format: values.DiskFormat
    virtual_size_bytes: int
    backing_file: str | None = None


def read_header(path: str) -> ImageHeader:
    """The image's format and virtual size; raw for anything that is not qcow2."""
    with open(path, "rb") as fh:
        head = fh.read(104)
        if not head.startswith(MAGIC):
            fh.seek(0, 2)
            return ImageHeader(values.DiskFormat.RAW, fh.tell())
        if len(head) < _HEADER.size:
            raise errors.ImageRefused("the image has a truncated qcow2 header")
        _magic, version, backing_offset, backing_size, _bits, size = _HEADER.unpack_from(head)
        if version not in (2, 3):
            raise errors.ImageRefused(f"the image is qcow2 version {version}; only 2 and 3 run")
        backing: str | None = None
        if backing_offset:
            if backing_size > 1023:
                raise errors.ImageRefused("the image's qcow2 header has a malformed backing file")
            fh.seek(backing_offset)
            backing = fh.read(backing_size).decode("utf-8", "replace")
        if version == 3:
            if len(head) < 80:
                raise errors.ImageRefused("the image has a truncated qcow2 version 3 header")
            (features,) = _INCOMPATIBLE.unpack_from(head, 72)
            if features & _EXTERNAL_DATA_FILE:
                raise errors.ImageRefused(
                    "the image keeps its data in an external data file; only self-contained "
                    "images are accepted"
                )
            if features & ~_KNOWN_INCOMPATIBLE:
                raise errors.ImageRefused("the image uses qcow2 features this node does not know")
        return ImageHeader(values.DiskFormat.QCOW2, size, backing)


def check_self_contained(path: str) -> ImageHeader:
    """The header of a downloaded image, refusing one that names another file."""
    header = read_header(path)
    if header.backing_file is not None:
        raise errors.ImageRefused(
            f"the image names an external backing file ({header.backing_file!r}); images must "
            "be self-contained (flatten it with 'qemu-img convert' before publishing it)"
        )
    return header
