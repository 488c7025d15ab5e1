"""Guest extents of one qcow2 layer: runs of one subcluster type with contiguous host offsets.

This is the vectorised counterpart of QEMU's `qcow2_get_host_offset`: L2 tables are read in
batches (host-adjacent tables in one read), classified with numpy masks, and cut into runs where
the type changes or the host offset stops being contiguous. Conditions under which QEMU fails a
read with EIO (unaligned tables, invalid subcluster bitmaps, zero clusters in v2 images, ...) come
out as extents of type INVALID with an error code, so that readers and mappers can report them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.l2 import (
    ClusterType,
    SubclusterType,
    classify_clusters,
    classify_subclusters_at,
    uniform_bitmaps,
)

if TYPE_CHECKING:
    from qinspect.qcow2.image import Image

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]

# Entries gathered per batch (1 Mi entries = 8 MiB of L2 data for standard entries).
BATCH_ENTRIES = 1 << 20

OFFSET_TYPES = (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC)


class ExtentError(IntEnum):
    """Why QEMU would fail a read of an extent (0 = it would not)."""

    NONE = 0
    INVALID_BITMAP = 1
    UNALIGNED_L2 = 2
    UNALIGNED_DATA = 3
    ZERO_IN_V2 = 4
    COMPRESSED_WITH_DATA_FILE = 5
    DATA_FILE_OFFSET_MISMATCH = 6


ERROR_MESSAGES = {
    ExtentError.INVALID_BITMAP: "invalid cluster entry (subcluster bitmap)",
    ExtentError.UNALIGNED_L2: "L2 table offset unaligned",
    ExtentError.UNALIGNED_DATA: "cluster allocation offset unaligned",
    ExtentError.ZERO_IN_V2: "zero cluster entry found in pre-v3 image",
    ExtentError.COMPRESSED_WITH_DATA_FILE: "compressed cluster entry found in image with external data file",
    ExtentError.DATA_FILE_OFFSET_MISMATCH: "external data file host cluster offset does not match guest offset",
}


@dataclass
class Extents:
    """Parallel arrays, one element per extent, ordered by guest offset.

    `host` is the host byte offset of the extent's start for NORMAL, ZERO_ALLOC and
    UNALLOCATED_ALLOC extents, and the raw L2 entry for COMPRESSED ones (one cluster each);
    `where` is the file offset of the L2 entry (or L1 entry) at fault for error extents.
    """

    guest: I64
    length: I64
    sctype: U8
    host: U64
    error: U8
    where: I64

    def __len__(self) -> int:
        return len(self.guest)

    @staticmethod
    def single(start: int, length: int, sctype: SubclusterType, error: int = 0, where: int = -1) -> Extents:
        return Extents(np.array([start], np.int64), np.array([length], np.int64), np.array([sctype], np.uint8),
                       np.zeros(1, np.uint64), np.array([error], np.uint8), np.array([where], np.int64))


def iter_extents(img: Image, start: int, end: int, batch_entries: int = BATCH_ENTRIES) -> Iterator[Extents]:
    """Yield the extents covering guest `[start, end)` in order, a batch of L2 tables at a time."""
    h = img.header
    end = min(end, h.size)
    if start >= end:
        return
    cs = h.cluster_size
    span = h.l2_size * cs
    l1 = img.l1_table
    i = start // span
    last = (end - 1) // span
    while i <= last:
        # A run of L1 entries without an L2 table is one unallocated extent.
        j = i
        while j <= last and (j >= len(l1) or not int(l1[j]) & C.L1E_OFFSET_MASK):
            j += 1
        if j > i:
            s, e = max(start, i * span), min(end, j * span)
            yield Extents.single(s, e - s, SubclusterType.UNALLOCATED_PLAIN)
            i = j
            continue
        # A run of L1 entries with tables, up to the batch size.
        per_batch = max(1, batch_entries // h.l2_size)
        j = i
        while j <= last and j - i < per_batch and j < len(l1) and int(l1[j]) & C.L1E_OFFSET_MASK:
            j += 1
        yield _table_extents(img, i, j, max(start, i * span), min(end, j * span))
        i = j


def _table_extents(img: Image, i0: int, i1: int, start: int, end: int) -> Extents:
    h = img.header
    cs = h.cluster_size
    fmt = img.l2_format
    n = h.l2_size
    entries, bitmaps, bad_l2 = img.read_l2_batch(i0, i1)
    first_cluster = i0 * n
    c0 = start // cs - first_cluster
    c1 = -(-end // cs) - first_cluster
    entries = entries[c0:c1]
    if bitmaps is not None:
        bitmaps = bitmaps[c0:c1]
    cidx = np.arange(c0, c1, dtype=np.int64)  # cluster index within the batch
    ctypes = classify_clusters(entries, fmt)
    sc_per = h.subclusters_per_cluster
    if bitmaps is not None:
        whole = uniform_bitmaps(bitmaps) | (ctypes == ClusterType.COMPRESSED)
        counts = np.where(whole, 1, sc_per)
        item_c = np.repeat(np.arange(len(entries)), counts)
        first_item = np.cumsum(counts) - counts
        sc = np.arange(len(item_c), dtype=np.int64) - np.repeat(first_item, counts)
        item_len = np.where(np.repeat(whole, counts), cs, h.subcluster_size).astype(np.int64)
        e = entries[item_c]
        types = classify_subclusters_at(ctypes[item_c], bitmaps[item_c], sc, fmt)
    else:
        item_c = np.arange(len(entries))
        sc = np.zeros(len(entries), dtype=np.int64)
        item_len = np.full(len(entries), cs, dtype=np.int64)
        e = entries
        types = classify_subclusters_at(ctypes, None, sc, fmt)
    guest = (first_cluster + cidx[item_c]) * cs + sc * h.subcluster_size
    cluster_off = e & np.uint64(C.L2E_OFFSET_MASK)
    host = cluster_off + (sc * h.subcluster_size).astype(np.uint64)
    is_off = np.isin(types, np.array(OFFSET_TYPES, dtype=np.uint8))
    compressed = types == SubclusterType.COMPRESSED
    host = np.where(compressed, e, np.where(is_off, host, np.uint64(0)))

    err = np.zeros(len(types), dtype=np.uint8)
    err[types == SubclusterType.INVALID] = ExtentError.INVALID_BITMAP
    if h.version < 3:
        err[(types == SubclusterType.ZERO_PLAIN) | (types == SubclusterType.ZERO_ALLOC)] = ExtentError.ZERO_IN_V2
    if fmt.has_data_file:
        err[compressed] = ExtentError.COMPRESSED_WITH_DATA_FILE
        err[is_off & (host != guest.astype(np.uint64))] = ExtentError.DATA_FILE_OFFSET_MISMATCH
    err[is_off & ((cluster_off & np.uint64(cs - 1)) != 0)] = ExtentError.UNALIGNED_DATA
    l2_of_item = (cidx[item_c] // n).astype(np.int64)
    err[bad_l2[l2_of_item]] = ExtentError.UNALIGNED_L2
    l1_index = i0 + l2_of_item
    l2_offsets = (img.l1_table[l1_index] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    entry_size = h.l2_entry_size
    where = np.where(err == ExtentError.UNALIGNED_L2, h.l1_table_offset + l1_index * 8,
                     l2_offsets + (cidx[item_c] % n) * entry_size)
    types = np.where(err != 0, np.uint8(SubclusterType.INVALID), types).astype(np.uint8)
    # Drop subcluster items wholly outside [start, end) (a range may begin or end mid-cluster).
    keep = (guest + item_len > start) & (guest < end)
    if not keep.all():
        guest, item_len, types, host, err, where = (a[keep] for a in (guest, item_len, types, host, err, where))
        is_off, compressed = is_off[keep], compressed[keep]

    # Cut into runs.
    if len(types) == 0:
        return Extents.single(start, 0, SubclusterType.UNALLOCATED_PLAIN)
    brk = np.ones(len(types), dtype=bool)
    if len(types) > 1:
        same = types[1:] == types[:-1]
        contiguous = ~is_off[1:] | (host[1:] == host[:-1] + item_len[:-1].astype(np.uint64))
        mergeable = same & contiguous & ~compressed[1:] & (err[1:] == 0) & (err[:-1] == 0)
        brk[1:] = ~mergeable
    idx = np.flatnonzero(brk)
    ex = Extents(guest[idx].astype(np.int64), np.add.reduceat(item_len, idx).astype(np.int64), types[idx],
                 host[idx], err[idx], where[idx].astype(np.int64))
    # Clip to [start, end).
    if ex.guest[0] < start:
        d = start - int(ex.guest[0])
        ex.guest[0] += d
        ex.length[0] -= d
        if ex.sctype[0] in OFFSET_TYPES:
            ex.host[0] += np.uint64(d)
    last_end = int(ex.guest[-1] + ex.length[-1])
    if last_end > end:
        ex.length[-1] -= last_end - end
    return ex
