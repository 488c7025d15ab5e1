"""NTFS: the cluster allocation bitmap `$Bitmap` (MFT record 6), read with The Sleuth Kit (pytsk3).

TSK parses the MFT record, its attribute list and the data runs of `$Bitmap`; a bit is one cluster,
least significant bit first, 1 = in use. pytsk3 reads the volume through `VolumeReader`, so it sees
exactly the guest's bytes and nothing past the volume.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Filesystem, FsInfo, GuestError
from qinspect.guest.ranges import runs_of_zero_bits

if TYPE_CHECKING:
    import pytsk3

BITMAP_INODE = 6


def probe(head: bytes) -> bool:
    return len(head) >= 512 and head[3:11] == b"NTFS    "


def tsk_image(vol: VolumeReader) -> pytsk3.Img_Info:
    """A pytsk3 image backed by `vol` (reads past the volume come back as zeros, as on a real disk end)."""
    import pytsk3

    class _Img(pytsk3.Img_Info):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            n = max(0, min(size, vol.size - offset))
            try:
                data = vol.read(offset, n) if n else b""
            except GuestError:
                data = b""
            return data + b"\0" * (size - len(data))

        def get_size(self) -> int:
            return vol.size

        def close(self) -> None:
            pass

    return _Img()


def read_ntfs(vol: VolumeReader) -> FsInfo:
    boot = vol.read(0, 512)
    bps, spc_raw = struct.unpack_from("<HB", boot, 11)
    total_sectors, _mft, _mftmirr = struct.unpack_from("<QQQ", boot, 40)
    serial = struct.unpack_from("<Q", boot, 72)[0]
    spc = spc_raw if spc_raw <= 0x80 else 1 << (256 - spc_raw) if spc_raw >= 0xF4 else 0
    if bps not in (256, 512, 1024, 2048, 4096) or not spc:
        raise GuestError(f"NTFS boot sector: {bps} bytes per sector, sectors-per-cluster byte {spc_raw:#x}")
    cluster = bps * spc
    info = FsInfo(Filesystem.NTFS, block_size=cluster, uuid=f"{serial:016X}")
    size = (total_sectors * bps) // cluster * cluster
    if size > vol.size:
        info.problems.append(f"the filesystem claims {total_sectors} sectors, more than its volume holds "
                             f"({vol.size} bytes); clusters past the volume are not counted")
        size = vol.size // cluster * cluster
    clusters = size // cluster
    info.size_bytes = size
    try:
        import pytsk3

        fs = pytsk3.FS_Info(tsk_image(vol), offset=0)
        if fs.info.block_size != cluster:
            info.problems.append(f"TSK reads a cluster size of {fs.info.block_size}, the boot sector says {cluster}")
        f = fs.open_meta(inode=BITMAP_INODE)
        bm_size = int(f.info.meta.size)
        need = -(-clusters // 8)
        if bm_size < need:
            info.problems.append(f"$Bitmap is {bm_size} bytes, too short for {clusters} clusters; "
                                 "clusters it does not describe are counted as used")
        n = min(bm_size, need)
        data = bytearray()
        chunk = 8 << 20
        for off in range(0, n, chunk):
            data += f.read_random(off, min(chunk, n - off))
    except OSError as e:  # pytsk3 reports every failure as IOError
        raise GuestError(f"NTFS: The Sleuth Kit cannot read $Bitmap: {str(e).strip()}") from None
    nbits = min(clusters, 8 * len(data))
    info.free = runs_of_zero_bits(bytes(data), nbits).scaled(cluster)
    info.detail["clusters"] = clusters
    return info
