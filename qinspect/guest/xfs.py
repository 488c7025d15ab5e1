"""XFS: the superblock, each allocation group's AGF and its by-block-number free-space B+tree.

The free extents of an AG are the leaf records (startblock, blockcount) of the bnobt rooted in the
AGF — what `xfs_db -c freesp` counts and what `fstrim` discards. The walk checks every block's
magic, level and record count, visits each block once (a loop in the tree is reported, not
followed) and never leaves the AG.
"""

from __future__ import annotations

import struct

import numpy as np

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Filesystem, FsInfo, GuestError
from qinspect.guest.ranges import Ranges

XFS_SB_MAGIC = b"XFSB"
XFS_AGF_MAGIC = b"XAGF"
XFS_ABTB_MAGIC = b"ABTB"
XFS_ABTB_CRC_MAGIC = b"AB3B"
MAX_AGS = 1 << 16
MAX_LEVELS = 9


def probe(head: bytes) -> bool:
    return head[:4] == XFS_SB_MAGIC


def read_xfs(vol: VolumeReader) -> FsInfo:
    sb = vol.read(0, 512)
    bs, dblocks = struct.unpack_from(">IQ", sb, 4)
    uuid_raw = sb[32:48]
    agblocks, agcount = struct.unpack_from(">II", sb, 84)
    version, sectsize = struct.unpack_from(">HH", sb, 100)
    label = sb[108:120].split(b"\0", 1)[0].decode("utf-8", "replace") or None
    fdblocks = struct.unpack_from(">Q", sb, 144)[0]
    if bs < 512 or bs > 65536 or bs & (bs - 1) or sectsize < 512 or sectsize > bs or sectsize & (sectsize - 1):
        raise GuestError(f"XFS superblock: block size {bs} / sector size {sectsize} is invalid")
    if not 0 < agcount <= MAX_AGS or agblocks < 16:
        raise GuestError(f"XFS superblock: {agcount} allocation groups of {agblocks} blocks is invalid")
    h = uuid_raw.hex()
    info = FsInfo(Filesystem.XFS, block_size=bs, label=label,
                  uuid=f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    info.detail.update({"allocation-groups": agcount, "superblock-free-blocks": fdblocks})
    if dblocks * bs > vol.size:
        info.problems.append(f"the filesystem claims {dblocks} blocks, more than its volume holds "
                             f"({vol.size} bytes); only the part inside the volume is read")
        dblocks = vol.size // bs
    info.size_bytes = dblocks * bs
    crc = (version & 0xF) == 5
    hdr = 56 if crc else 16
    magic = XFS_ABTB_CRC_MAGIC if crc else XFS_ABTB_MAGIC
    starts: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    fl: list[int] = []
    for ag in range(agcount):
        ag_first = ag * agblocks
        if ag_first >= dblocks:
            info.problems.append(f"AG {ag} starts past the end of the filesystem")
            break
        ag_len_max = min(agblocks, dblocks - ag_first)
        try:
            s, n, agfl_blocks = _ag_free(vol, ag, ag_first * bs, bs, sectsize, hdr, magic, ag_len_max, crc,
                                  info.problems)
        except GuestError as e:
            info.problems.append(f"AG {ag}: {e.message}; its free space is not counted")
            continue
        starts.append(s + ag_first)
        lens.append(n)
        fl += [ag_first + b for b in agfl_blocks]
    if starts:
        s = np.concatenate(starts).astype(np.int64)
        n = np.concatenate(lens).astype(np.int64)
        bno = Ranges.of(s * bs, (s + n) * bs)
    else:
        bno = Ranges.empty()
    # The AG free lists are free blocks (xfs_db freesp and df count them) that fstrim leaves alone.
    agfl = Ranges.of(np.array(fl, np.int64) * bs, (np.array(fl, np.int64) + 1) * bs).subtract(bno)
    info.free = bno.union(agfl)
    info.untrimmed = agfl
    info.detail["free-list-blocks"] = len(fl)
    return info


def _ag_free(vol: VolumeReader, ag: int, ag_off: int, bs: int, sectsize: int, hdr: int, magic: bytes,
             ag_len_max: int, crc: bool, problems: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    agf = vol.read(ag_off + sectsize, sectsize)
    if agf[:4] != XFS_AGF_MAGIC:
        raise GuestError("AGF has a bad magic number")
    seqno, length, bno_root = struct.unpack_from(">III", agf, 8)
    bno_level = struct.unpack_from(">I", agf, 28)[0]
    flfirst, fllast, flcount, freeblks = struct.unpack_from(">IIII", agf, 40)
    if seqno != ag:
        problems.append(f"AG {ag}: AGF sequence number {seqno}")
    if length > ag_len_max or length == 0:
        problems.append(f"AG {ag}: AGF length {length} blocks (the AG has {ag_len_max})")
        length = min(length, ag_len_max) or ag_len_max
    if not 1 <= bno_level <= MAX_LEVELS:
        raise GuestError(f"bnobt has {bno_level} levels")
    maxrecs_leaf = (bs - hdr) // 8
    maxrecs_node = (bs - hdr) // 12
    recs: list[np.ndarray] = []
    seen: set[int] = set()
    frontier = [bno_root]
    level = bno_level - 1
    while frontier:
        nxt: list[int] = []
        for blk in frontier:
            if not 0 < blk < length:
                raise GuestError(f"bnobt block {blk} is outside the AG ({length} blocks)")
            if blk in seen:
                raise GuestError(f"bnobt loops: block {blk} is reached twice")
            seen.add(blk)
            b = vol.read(ag_off + blk * bs, bs)
            if b[:4] != magic:
                raise GuestError(f"bnobt block {blk} has a bad magic number")
            lv, numrecs = struct.unpack_from(">HH", b, 4)
            if lv != level:
                raise GuestError(f"bnobt block {blk} is at level {lv}, expected {level}")
            if level == 0:
                if numrecs > maxrecs_leaf:
                    raise GuestError(f"bnobt leaf {blk} claims {numrecs} records (at most {maxrecs_leaf})")
                recs.append(np.frombuffer(b, dtype=">u4", count=2 * numrecs, offset=hdr).reshape(-1, 2))
            else:
                if numrecs > maxrecs_node or numrecs == 0:
                    raise GuestError(f"bnobt node {blk} claims {numrecs} records (at most {maxrecs_node})")
                ptrs = struct.unpack_from(f">{numrecs}I", b, hdr + maxrecs_node * 8)
                nxt.extend(ptrs)
        frontier = nxt
        level -= 1
        if level < -1:
            break
    r = np.concatenate(recs).astype(np.int64) if recs else np.zeros((0, 2), np.int64)
    start, count = r[:, 0], r[:, 1]
    bad = (count == 0) | (start + count > length)
    if bad.any():
        problems.append(f"AG {ag}: {int(bad.sum())} free extents lie outside the AG or are empty (ignored)")
        start, count = start[~bad], count[~bad]
    order = np.argsort(start, kind="stable")
    start, count = start[order], count[order]
    if len(start) > 1 and (start[1:] < (start + count)[:-1]).any():
        problems.append(f"AG {ag}: free extents overlap")
    total = int(Ranges.of(start, start + count).total)
    if total != freeblks:
        problems.append(f"AG {ag}: the bnobt holds {total} free blocks, the AGF says {freeblks}")
    return start, count, _agfl(vol, ag, ag_off, sectsize, crc, flfirst, fllast, flcount, length, problems)


def _agfl(vol: VolumeReader, ag: int, ag_off: int, sectsize: int, crc: bool, first: int, last: int, count: int,
          length: int, problems: list[str]) -> list[int]:
    """The AG free list: `count` block numbers from slot `first` to `last`, wrapping around."""
    if count == 0:
        return []
    raw = vol.read(ag_off + 3 * sectsize, sectsize)
    hdr = 36 if crc else 0
    slots = (sectsize - hdr) // 4
    if crc and raw[:4] != b"XAFL":
        problems.append(f"AG {ag}: AGFL has a bad magic number; its blocks are counted as used")
        return []
    if first >= slots or last >= slots or count > slots or (last - first) % slots + 1 != count:
        problems.append(f"AG {ag}: free list first/last/count {first}/{last}/{count} are inconsistent")
        return []
    arr = struct.unpack_from(f">{slots}I", raw, hdr)
    blocks = [arr[(first + i) % slots] for i in range(count)]
    if any(not 0 < b < length for b in blocks):
        problems.append(f"AG {ag}: free list holds blocks outside the AG (ignored)")
        return [b for b in blocks if 0 < b < length]
    return blocks
