"""Decompression of compressed clusters: raw deflate (zlib type) and zstd, as QEMU decodes them.

QEMU requires the output to fill a whole cluster exactly; anything else is an I/O error. The zstd
decoder is imported when the first zstd cluster is decoded: most images have none, and every bulk
command imports this module (loading `zstandard` costs ~1 ms of a small command's start).
"""

from __future__ import annotations

import zlib

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error


def decompress_cluster(data: bytes, compression_type: int, cluster_size: int, offset: int) -> bytes:
    """Decompress one cluster's worth from `data` (which may run past the compressed stream)."""
    if compression_type == C.COMPRESSION_TYPE_ZLIB:
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error as e:
            raise Qcow2Error(f"compressed cluster cannot be inflated: {e}", offset) from None
    elif compression_type == C.COMPRESSION_TYPE_ZSTD:
        out = _zstd_decompress(data, cluster_size, offset)
    else:
        raise Qcow2Error(f"unknown compression type {compression_type}", offset)
    if len(out) != cluster_size:
        raise Qcow2Error(
            f"compressed cluster decodes to {len(out)} bytes, not a whole cluster of {cluster_size}", offset
        )
    return out


def _zstd_decompress(data: bytes, cluster_size: int, offset: int) -> bytes:
    """Decode concatenated zstd frames until a cluster is full; output is capped at one cluster."""
    try:
        import zstandard as _zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        _zstandard = None  # type: ignore[assignment, unused-ignore]
    if _zstandard is not None:
        reader = _zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        out = bytearray()
        try:
            while len(out) < cluster_size:
                chunk = reader.read(cluster_size - len(out))
                if not chunk:
                    break
                out += chunk
        except _zstandard.ZstdError as e:
            raise Qcow2Error(f"compressed cluster cannot be decoded (zstd): {e}", offset) from None
        return bytes(out)
    try:  # Python >= 3.14
        from compression import zstd as _std_zstd  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # pragma: no cover - depends on the Python version
        _std_zstd = None
    if _std_zstd is not None:  # pragma: no cover - Python >= 3.14 only
        dec = _std_zstd.ZstdDecompressor()
        try:
            return bytes(dec.decompress(data, max_length=cluster_size))
        except _std_zstd.ZstdError as e:
            raise Qcow2Error(f"compressed cluster cannot be decoded (zstd): {e}", offset) from None
    raise Qcow2Error("zstd-compressed cluster, but no zstd decoder is installed (pip install zstandard)", offset)
