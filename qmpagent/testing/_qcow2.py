"""qcow2 images: the subset QEMU's ``blockdev-create`` writes (an empty image, maybe with a
backing file), byte for byte, and a reader of their header.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["CLUSTER_SIZE", "Qcow2Header", "create_qcow2_image", "read_qcow2_header"]


_QCOW2_MAGIC: Final = b"QFI\xfb"
_CLUSTER_BITS: Final = 16
_CLUSTER: Final = 1 << _CLUSTER_BITS
_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_EXT_FEATURE_TABLE: Final = 0x6803F857
_FEATURES: Final = (
    (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
    (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
)


@dataclass(frozen=True)
class Qcow2Header:
    """What :func:`read_qcow2_header` found in a qcow2 image.

    Attributes:
        version: the qcow2 version (2 or 3).
        size: the virtual size in bytes.
        cluster_size: the cluster size in bytes.
        backing_file: the backing file name recorded in the image, or ``None``.
        backing_format: the backing file's format recorded in the image, or ``None``.
    """

    version: int
    size: int
    cluster_size: int
    backing_file: str | None = None
    backing_format: str | None = None


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def _qcow2_bytes(size: int, backing_file: str | None, backing_format: str | None) -> bytes:
    """An empty qcow2 v3 image, byte for byte as QEMU 7.2's ``blockdev-create`` (and
    ``qemu-img create``) makes it."""
    l2_coverage = _CLUSTER * (_CLUSTER // 8)
    l1_size = max(1, -(-size // l2_coverage))
    l1_bytes = l1_size * 8
    l1_clusters = -(-l1_bytes // _CLUSTER)
    refcount_table, refcount_block, l1_table = _CLUSTER, 2 * _CLUSTER, 3 * _CLUSTER
    extensions = b""
    if backing_format:
        data = backing_format.encode()
        extensions += struct.pack(">II", _EXT_BACKING_FORMAT, len(data)) + _pad8(data)
    table = b"".join(struct.pack(">BB", t, bit) + name.ljust(46, b"\0") for t, bit, name in _FEATURES)
    extensions += struct.pack(">II", _EXT_FEATURE_TABLE, len(table)) + _pad8(table)
    extensions += struct.pack(">II", 0, 0)
    header_length = 112
    backing = backing_file.encode() if backing_file else b""
    backing_offset = header_length + len(extensions) if backing else 0
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        _QCOW2_MAGIC, 3, backing_offset, len(backing), _CLUSTER_BITS, size, 0, l1_size,
        l1_table, refcount_table, 1, 0, 0, 0, 0, 0, 4, header_length,
    ) + b"\0" * 8  # compression type (zlib) and padding
    cluster0 = header + extensions + backing
    if len(cluster0) > _CLUSTER:
        raise ValueError("backing file name too long")
    clusters = 3 + l1_clusters
    refcounts = struct.pack(f">{clusters}H", *([1] * clusters))
    image = bytearray(l1_table + l1_bytes)
    image[: len(cluster0)] = cluster0
    image[refcount_table : refcount_table + 8] = struct.pack(">Q", refcount_block)
    image[refcount_block : refcount_block + len(refcounts)] = refcounts
    return bytes(image)


def create_qcow2_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Write an empty qcow2 v3 image to ``path`` (created or truncated), like QEMU's
    ``blockdev-create`` with driver ``qcow2`` (64 KiB clusters, 16-bit refcounts, zlib), the
    backing file and its format recorded in the header. ``qemu-img`` opens it.

    Raises:
        ValueError: ``size`` is negative or not a multiple of 512.
        OSError: the file cannot be written.
    """
    if size < 0 or size % 512:
        raise ValueError("Image size must be a multiple of 512 bytes")
    data = _qcow2_bytes(size, backing_file, backing_format)
    with open(path, "wb") as f:
        f.write(data)


def read_qcow2_header(path: str | os.PathLike[str]) -> Qcow2Header:
    """Read the header of the qcow2 image at ``path``.

    Raises:
        ValueError: the file is not a qcow2 image (``"Image is not in qcow2 format"``).
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(_CLUSTER)
    if len(head) < 72 or head[:4] != _QCOW2_MAGIC:
        raise ValueError("Image is not in qcow2 format")
    version, backing_offset, backing_size, cluster_bits, size = struct.unpack(">IQIIQ", head[4:32])
    if version not in (2, 3):
        raise ValueError(f"Unsupported qcow2 version {version}")
    header_length = 72
    if version == 3 and len(head) >= 104:
        header_length = struct.unpack(">I", head[100:104])[0]
    backing_format = None
    offset = header_length
    while offset + 8 <= len(head):
        ext_type, ext_len = struct.unpack(">II", head[offset : offset + 8])
        if ext_type == 0:
            break
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = head[offset + 8 : offset + 8 + ext_len].decode(errors="replace")
        offset += 8 + ext_len + (-ext_len % 8)
    backing_file = None
    if backing_offset and backing_size:
        backing_file = head[backing_offset : backing_offset + backing_size].decode(errors="replace")
    return Qcow2Header(version, size, 1 << cluster_bits, backing_file, backing_format)


#: The cluster size of the images written (64 KiB, QEMU's default).
CLUSTER_SIZE: Final = _CLUSTER
