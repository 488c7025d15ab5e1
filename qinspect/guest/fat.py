"""FAT12/16/32: the BIOS parameter block and the first FAT.

A cluster is free when its FAT entry is 0. The FAT type follows from the number of data clusters,
as Microsoft's specification (and the Linux driver) decide it: < 4085 FAT12, < 65525 FAT16, else FAT32.
"""

from __future__ import annotations

import struct

import numpy as np

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Filesystem, FsInfo, GuestError
from qinspect.guest.ranges import runs_of_true


def probe(head: bytes) -> bool:
    """A plausible FAT boot sector: a jump, a power-of-two sector and cluster size, one or two FATs."""
    if len(head) < 512 or head[0] not in (0xEB, 0xE9) or head[510:512] != b"\x55\xaa":
        return False
    bps, spc, reserved, nfats = struct.unpack_from("<HBHB", head, 11)
    if head[3:11] == b"NTFS    " or head[3:11] == b"EXFAT   ":
        return False
    return (bps in (512, 1024, 2048, 4096) and spc in (1, 2, 4, 8, 16, 32, 64, 128) and reserved >= 1
            and nfats in (1, 2))


def read_fat(vol: VolumeReader) -> FsInfo:
    bs = vol.read(0, 512)
    bps, spc, reserved, nfats, root_entries, total16, _media, fatsz16 = struct.unpack_from("<HBHBHHBH", bs, 11)
    total32, fatsz32 = struct.unpack_from("<II", bs, 32)
    total = total16 or total32
    fatsz = fatsz16 or fatsz32
    if not fatsz or not total:
        raise GuestError("FAT boot sector: zero FAT size or sector count")
    root_sectors = -(-(root_entries * 32) // bps)
    data_start = reserved + nfats * fatsz + root_sectors
    if data_start >= total:
        raise GuestError(f"FAT boot sector: metadata ({data_start} sectors) fills the whole volume ({total})")
    clusters = (total - data_start) // spc
    fat_type = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if fat_type == 32:
        label_at, id_at = 71, 67
    else:
        label_at, id_at = 43, 39
    label = bs[label_at : label_at + 11].decode("latin-1").strip() or None
    if label == "NO NAME":
        label = None
    vol_id = struct.unpack_from("<I", bs, id_at)[0]
    cluster_bytes = bps * spc
    info = FsInfo(Filesystem.VFAT, block_size=cluster_bytes, label=label,
                  uuid=f"{vol_id >> 16:04X}-{vol_id & 0xFFFF:04X}")
    info.detail.update({"fat-type": f"FAT{fat_type}", "clusters": clusters, "data-start": data_start * bps})
    if total * bps > vol.size:
        info.problems.append(f"the filesystem claims {total} sectors, more than its volume holds "
                             f"({vol.size} bytes); clusters past the volume are not counted")
        clusters = max(0, min(clusters, (vol.size - data_start * bps) // cluster_bytes))
    # Entries 0 and 1 are reserved; cluster c (from 2) has entry c.
    need = clusters + 2
    nbytes = {12: -(-need * 3 // 2), 16: need * 2, 32: need * 4}[fat_type]
    if nbytes > fatsz * bps:
        info.problems.append(f"the FAT ({fatsz} sectors) is too small for {clusters} clusters; "
                             "clusters it does not describe are counted as used")
        nbytes = fatsz * bps
    raw = np.frombuffer(vol.read(reserved * bps, nbytes), dtype=np.uint8)
    if fat_type == 12:
        raw = np.r_[raw, np.zeros(-len(raw) % 3, np.uint8)]
        t = raw.reshape(-1, 3).astype(np.uint16)
        even = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
        odd = (t[:, 1] >> 4) | (t[:, 2] << 4)
        entries = np.stack([even, odd], axis=1).ravel().astype(np.uint32)
    elif fat_type == 16:
        entries = raw.view("<u2").astype(np.uint32)
    else:
        entries = raw[: len(raw) // 4 * 4].view("<u4") & np.uint32(0x0FFFFFFF)
    entries = entries[2:need]
    described = len(entries)
    free = runs_of_true(entries == 0)
    info.detail["bad-clusters"] = int((entries == (0xFF7 if fat_type == 12 else 0xFFF7 if fat_type == 16
                                                   else 0x0FFFFFF7)).sum())
    del described
    base = data_start * bps
    info.free = free.scaled(cluster_bytes, base)
    info.size_bytes = min(total * bps, vol.size)
    return info
