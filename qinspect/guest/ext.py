"""ext2/3/4: the superblock, the group descriptors and the block bitmaps.

Free blocks are the zero bits of each group's block bitmap. A group flagged BLOCK_UNINIT (only
meaningful with uninit_bg/metadata_csum) has no bitmap on disk; its free blocks are computed the way
the kernel's `ext4_init_block_bitmap` does: everything except the superblock backup and group
descriptors it holds and any block bitmap, inode bitmap or inode table placed in it (with flex_bg,
a group can hold its whole flex group's metadata). With bigalloc a bit is a cluster of blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Filesystem, FsInfo, GuestError
from qinspect.guest.ranges import Ranges, runs_of_true

EXT_MAGIC = 0xEF53
COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_FLEX_BG = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
EXT4_BG_BLOCK_UNINIT = 0x2
MAX_GROUPS = 1 << 22
GROUP_BATCH = 256


def probe(head: bytes) -> bool:
    return len(head) >= 1024 + 58 and struct.unpack_from("<H", head, 1024 + 56)[0] == EXT_MAGIC


def _is_backup_group(g: int, sparse: bool, sparse2: tuple[int, int] | None) -> bool:
    if g == 0:
        return True
    if sparse2 is not None:
        return g in sparse2
    if not sparse or g == 1:
        return True
    for p in (3, 5, 7):
        n = p
        while n < g:
            n *= p
        if n == g:
            return True
    return False


def read_ext(vol: VolumeReader) -> FsInfo:
    sb = vol.read(1024, 1024)
    (blocks_lo, _r, free_lo, _free_inodes, first_data_block, log_bs, log_cs, bpg, cpg, ipg) = struct.unpack_from(
        "<4xIIIIIIIIII", sb, 0)
    rev = struct.unpack_from("<I", sb, 76)[0]
    inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    uuid_raw = sb[104:120]
    label = sb[120:136].split(b"\0", 1)[0].decode("utf-8", "replace") or None
    reserved_gdt = struct.unpack_from("<H", sb, 206)[0]
    desc_size_raw = struct.unpack_from("<H", sb, 254)[0]
    blocks_hi, free_hi = struct.unpack_from("<I4xI", sb, 0x150)
    backup_bgs = struct.unpack_from("<II", sb, 0x24C)
    if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) or ro_compat & (
            RO_COMPAT_HUGE_FILE | RO_COMPAT_GDT_CSUM | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM | RO_COMPAT_BIGALLOC):
        kind = Filesystem.EXT4
    elif compat & COMPAT_HAS_JOURNAL:
        kind = Filesystem.EXT3
    else:
        kind = Filesystem.EXT2
    info = FsInfo(kind, label=label, uuid=_uuid(uuid_raw))
    if log_bs > 6:
        raise GuestError(f"ext superblock: block size 2^(10+{log_bs}) is invalid")
    bs = 1024 << log_bs
    info.block_size = bs
    bigalloc = bool(ro_compat & RO_COMPAT_BIGALLOC)
    ratio = 1 << (log_cs - log_bs) if bigalloc and log_bs <= log_cs <= log_bs + 16 else 1
    if bigalloc and ratio == 1 and log_cs != log_bs:
        raise GuestError(f"ext superblock: cluster size 2^(10+{log_cs}) is invalid")
    bits_per_group = cpg if bigalloc else bpg
    if not 8 <= bits_per_group <= 8 * bs or bits_per_group % 8:
        raise GuestError(f"ext superblock: {bits_per_group} blocks per group is invalid")
    if bigalloc and bpg != cpg * ratio:
        raise GuestError(f"ext superblock: {bpg} blocks per group is not {cpg} clusters of {ratio} blocks")
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks = blocks_lo | (blocks_hi << 32 if is64 else 0)
    info.detail["superblock-free-blocks"] = free_lo | (free_hi << 32 if is64 else 0)
    if blocks * bs > vol.size:
        info.problems.append(f"the filesystem claims {blocks} blocks of {bs} bytes, more than its volume holds "
                             f"({vol.size} bytes); only the part inside the volume is read")
        blocks = vol.size // bs
    if first_data_block >= blocks:
        raise GuestError(f"ext superblock: first data block {first_data_block} is past the last block {blocks}")
    info.size_bytes = blocks * bs
    ngroups = -(-(blocks - first_data_block) // bpg)
    if ngroups > MAX_GROUPS:
        raise GuestError(f"ext superblock: {ngroups} block groups is more than qinspect reads ({MAX_GROUPS})")
    desc_size = desc_size_raw if is64 else 32
    if is64 and (desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1)):
        raise GuestError(f"ext superblock: group descriptor size {desc_size} is invalid")
    gdt_blocks = -(-(ngroups * desc_size) // bs)
    meta_bg = bool(incompat & INCOMPAT_META_BG)
    first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0] if meta_bg else 0
    sparse2 = backup_bgs if compat & COMPAT_SPARSE_SUPER2 else None
    layout = _GdtLayout(first_data_block, bpg, bs // desc_size, gdt_blocks, reserved_gdt, meta_bg, first_meta_bg,
                        bool(ro_compat & RO_COMPAT_SPARSE_SUPER), sparse2,
                        1 if first_data_block == 0 and bs == 1024 else 0)
    gdt = _read_descriptors(vol, layout, bs, ngroups, desc_size)
    d = np.frombuffer(gdt, dtype=np.uint8).reshape(ngroups, desc_size)
    u32 = d[:, :32].copy().view("<u4")
    block_bitmap = u32[:, 0].astype(np.int64)
    inode_bitmap = u32[:, 1].astype(np.int64)
    inode_table = u32[:, 2].astype(np.int64)
    flags = d[:, 18].astype(np.uint16) | (d[:, 19].astype(np.uint16) << 8)
    if is64 and desc_size >= 64:
        hi = d[:, 32:64].copy().view("<u4")
        block_bitmap |= hi[:, 0].astype(np.int64) << 32
        inode_bitmap |= hi[:, 1].astype(np.int64) << 32
        inode_table |= hi[:, 2].astype(np.int64) << 32
    csum = bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
    uninit = ((flags & EXT4_BG_BLOCK_UNINIT) != 0) if csum else np.zeros(ngroups, dtype=bool)
    itb = -(-(ipg * max(inode_size, 128)) // bs)
    info.detail.update({"groups": ngroups, "flex-bg": bool(incompat & INCOMPAT_FLEX_BG),
                        "uninit-groups": int(uninit.sum()), "bigalloc-ratio": ratio})
    bad = (block_bitmap < first_data_block) | (block_bitmap >= blocks)
    for g in np.flatnonzero(bad & ~uninit)[:8]:
        info.problems.append(f"group {int(g)}: block bitmap at block {int(block_bitmap[g])} is outside the "
                             "filesystem; the group is counted as full")
    if (bad & ~uninit).sum() > 8:
        info.problems.append(f"... {int((bad & ~uninit).sum()) - 8} more groups with a bitmap outside the filesystem")
    free_units: list[Ranges] = []
    # Initialised groups: their bitmaps, a batch of groups at a time, read in block order.
    bits_bytes = bits_per_group // 8
    readable = np.flatnonzero(~uninit & ~bad)
    for b0 in range(0, len(readable), GROUP_BATCH):
        gs = readable[b0 : b0 + GROUP_BATCH]
        rows = _read_blocks(vol, block_bitmap[gs], bs)[:, :bits_bytes]
        bits = np.unpackbits(rows, axis=1, bitorder="little")
        for k, g in enumerate(gs.tolist()):
            r = runs_of_true(bits[k] == 0)
            base = g * bits_per_group  # in allocation units (blocks, or clusters with bigalloc)
            free_units.append(Ranges(r.start + base, r.end + base))
    if uninit.any():
        free_units.append(_uninit_free(np.flatnonzero(uninit), layout, ratio, blocks,
                                       np.r_[block_bitmap, inode_bitmap], inode_table, itb))
    units = Ranges.of(np.concatenate([r.start for r in free_units]) if free_units else [],
                      np.concatenate([r.end for r in free_units]) if free_units else [])
    unit_bytes = bs * ratio
    # Bit i of group g is unit g*bits + i counted from the first data block (in blocks; clusters with bigalloc).
    offset = first_data_block * bs
    info.free = units.scaled(unit_bytes, offset).clip(0, blocks * bs)
    return info


def _uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class _GdtLayout:
    """Where the superblock backups and group descriptor blocks are (e2fsprogs' ext2fs_super_and_bgd_loc2)."""

    fdb: int
    bpg: int
    per_block: int  # descriptors per block = groups per meta group
    gdt_blocks: int
    reserved_gdt: int
    meta_bg: bool
    first_meta_bg: int
    sparse: bool
    sparse2: tuple[int, int] | None
    adjust: int = 0  # 1 when the first data block is 0 with 1 KiB blocks (bigalloc): block 0 is the boot block

    def has_super(self, g: int) -> bool:
        return _is_backup_group(g, self.sparse, self.sparse2)

    def first_block(self, g: int) -> int:
        return self.fdb + g * self.bpg

    def overhead(self, g: int) -> int:
        """Blocks at the start of group g taken by a superblock backup and descriptor blocks."""
        sup = (1 if self.has_super(g) else 0) + (self.adjust if g == 0 else 0)
        if not self.meta_bg or g // self.per_block < self.first_meta_bg:
            old = (self.first_meta_bg if self.meta_bg else self.gdt_blocks) + self.reserved_gdt
            return sup + (old if sup else 0)
        return sup + (1 if g % self.per_block in (0, 1, self.per_block - 1) else 0)

    def descriptor_block(self, m: int) -> int:
        """The block holding meta group m's descriptors (the primary copy)."""
        if not self.meta_bg or m < self.first_meta_bg:
            return self.fdb + 1 + self.adjust + m
        g = m * self.per_block
        return self.first_block(g) + (1 if self.has_super(g) else 0) + (self.adjust if g == 0 else 0)


def _read_descriptors(vol: VolumeReader, layout: _GdtLayout, bs: int, ngroups: int, desc_size: int) -> bytes:
    n = ngroups * desc_size
    if not layout.meta_bg:
        return vol.read(layout.descriptor_block(0) * bs, -(-n // bs) * bs)[:n]
    out = bytearray()
    for m in range(-(-ngroups // layout.per_block)):
        out += vol.read(layout.descriptor_block(m) * bs, bs)
    return bytes(out[:n])


def _read_blocks(vol: VolumeReader, blocks: np.ndarray, bs: int) -> np.ndarray:
    """The blocks `blocks` (one row each), reading runs of consecutive blocks in one request."""
    out = np.zeros((len(blocks), bs), dtype=np.uint8)
    order = np.argsort(blocks, kind="stable")
    sb = blocks[order]
    cut = np.flatnonzero(np.diff(sb) != 1) + 1
    for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(sb)], strict=True):
        n = hi - lo
        raw = vol.read(int(sb[lo]) * bs, n * bs)
        out[order[lo:hi]] = np.frombuffer(raw, dtype=np.uint8).reshape(n, bs)
    return out


def _uninit_free(groups: np.ndarray, layout: _GdtLayout, ratio: int, blocks: int, bitmaps: np.ndarray,
                 inode_table: np.ndarray, itb: int) -> Ranges:
    """Free units (blocks or clusters) of BLOCK_UNINIT groups, as ext4_init_block_bitmap computes them."""
    fdb = layout.fdb
    meta = Ranges.of(np.r_[bitmaps, inode_table], np.r_[bitmaps + 1, inode_table + itb])
    starts, ends = [], []
    for g in groups.tolist():
        lo = layout.first_block(g)
        hi = min(lo + layout.bpg, blocks)
        used = meta.clip(lo, hi)
        over = layout.overhead(g)
        if over:
            used = used.union(Ranges.of([lo], [min(hi, lo + over)]))
        free = used.complement(lo, hi)
        # Bits count from the first data block, in units of `ratio` blocks; a unit is free only if whole.
        s = -(-(free.start - fdb) // ratio)
        e = (free.end - fdb) // ratio
        starts.append(s)
        ends.append(e)
    if not starts:
        return Ranges.empty()
    return Ranges.of(np.concatenate(starts), np.concatenate(ends))
