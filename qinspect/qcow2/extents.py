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
from typing import Protocol

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.header import Header
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.l2 import (
    ClusterType,
    L2Format,
    SubclusterType,
    classify_clusters,
    classify_standard_subclusters,
    classify_subclusters_at,
    invalid_bitmaps,
    uniform_bitmaps,
)
from qinspect.qcow2.planner import Order, PieceStream

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]


class L2Source(Protocol):
    """What the extent walk reads: the header, the L1 table and batches of L2 tables (an `Image`)."""

    @property
    def header(self) -> Header: ...

    @property
    def l1_table(self) -> U64: ...

    @property
    def l2_format(self) -> L2Format: ...

    @property
    def file(self) -> HostFile: ...

    def read_l2_batch(self, i0: int, i1: int, stream: PieceStream | None = None
                      ) -> tuple[U64, U64 | None, npt.NDArray[np.bool_]]: ...

    def read_l2_nonzero(self, l1_indices: I64, max_entries: int) -> tuple[I64, U64] | None: ...

MAX_L1_ENTRIES = C.QCOW_MAX_L1_SIZE // C.L1E_SIZE

# Entries gathered per batch: 64 Ki entries (512 KiB of standard L2 tables) keep every temporary
# array in the CPU cache, which makes the numpy passes 2-3x faster than with 1 Mi-entry batches.
BATCH_ENTRIES = 1 << 16

# The sparse path (`_sparse_extents`): L2 tables named out of host order (a file written at random)
# are read in one host-order sweep and only their non-zero entries decoded, when there are at least
# SPARSE_MIN_TABLES of them, at least SPARSE_MIN_DESCENTS of consecutive tables (in L1 order) go
# backwards in the file, and at most SPARSE_MAX_ENTRIES entries are non-zero (else: batches).
SPARSE_MIN_TABLES = 64
SPARSE_MIN_DESCENTS = 1 / 8
SPARSE_MAX_ENTRIES = 1 << 22
SPARSE_CHUNK = 1 << 16
"""Non-zero entries decoded per yielded batch on the sparse path."""

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


def iter_extents(img: L2Source, start: int, end: int, batch_entries: int = BATCH_ENTRIES) -> Iterator[Extents]:
    """Yield the extents covering guest `[start, end)` in order, a batch of L2 tables at a time."""
    h = img.header
    cs = h.cluster_size
    span = h.l2_size * cs
    # Nothing maps guest space past the largest L1 table the format allows (QEMU refuses such a
    # size: "L1 table is too small"): stopping there bounds `present` and keeps offsets in int64.
    end = min(end, h.size, MAX_L1_ENTRIES * span)
    if start >= end:
        return
    l1 = img.l1_table
    first = start // span
    last = (end - 1) // span
    # Which L1 entries of [first, last] have a table, and where that changes (no loop per entry).
    present = np.zeros(last + 1 - first, dtype=bool)
    hi = min(last + 1, len(l1))
    if hi > first:
        present[: hi - first] = (l1[first:hi] & np.uint64(C.L1E_OFFSET_MASK)) != 0
    per_batch = max(1, batch_entries // h.l2_size)
    # Short runs of entries without a table between tables join the batches around them (their
    # entries read as zeros: unallocated); only long runs become one unallocated extent. A
    # scattered image alternates every few entries: thousands of tiny batches otherwise.
    edges = np.flatnonzero(present[1:] != present[:-1]) + 1
    bounds = np.concatenate(([0], edges, [len(present)]))
    run_present = present[bounds[:-1]]
    run_len = np.diff(bounds)
    fill = ~run_present & (run_len <= per_batch)
    fill[0] = fill[-1] = False  # leading / trailing gaps stay gaps
    if fill.any():
        for a, b in zip(bounds[:-1][fill].tolist(), bounds[1:][fill].tolist(), strict=True):
            present[a:b] = True
    # Tables named by more than one L1 entry (hostile sharing: one table behind a million entries)
    # are classified once and their extents repeated, never re-read and re-decoded per entry.
    offs_all = np.zeros(len(present), np.int64)
    if hi > first:
        offs_all[: hi - first] = (l1[first:hi] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    readable = (offs_all != 0) & ((offs_all % cs) == 0)
    shared = np.zeros(len(present), dtype=bool)
    if not h.has_data_file and readable.any():
        srt = np.sort(offs_all[readable])
        dup = srt[1:][srt[1:] == srt[:-1]]  # sorted: drop repeats without np.unique (it imports numpy.ma)
        dup = dup[np.concatenate(([True], dup[1:] != dup[:-1]))] if len(dup) else dup
        del srt
        if len(dup):
            shared = readable & np.isin(offs_all, dup)
        # entries only partly inside [start, end) stay on the ordinary path
        if first * span < start:
            shared[0] = False
        if (last + 1) * span > end:
            shared[-1] = False
    cat = np.where(shared, 2, np.where(present, 1, 0)).astype(np.int8)
    cuts = (np.flatnonzero(cat[1:] != cat[:-1]) + 1 + first).tolist()
    cache: dict[int, Extents] = {}
    ordinary = readable & (cat == 1)
    sparse = _read_sparse(img, first, offs_all, ordinary, (cat == 1) & (offs_all != 0) & ~readable)
    if sparse is not None:
        for i, j in zip([first, *cuts], [*cuts, last + 1], strict=True):
            kind = int(cat[i - first])
            s, e = max(start, i * span), min(end, j * span)
            if kind == 0:
                yield Extents.single(s, e - s, SubclusterType.UNALLOCATED_PLAIN)
            elif kind == 2:
                yield from _shared_extents(img, i, offs_all[i - first : j - first], span, cache)
            else:
                yield from _sparse_extents(img, sparse, s, e)
        return
    # One read-ahead stream over the tables of the ordinary batches, in L1 order (the planner reads
    # each window in host order with several requests in flight while the batches are classified).
    with PieceStream(img.file, offs_all[ordinary], cs, Order.GIVEN) as stream:
        for i, j in zip([first, *cuts], [*cuts, last + 1], strict=True):
            kind = int(cat[i - first])
            if kind == 0:
                # A run of L1 entries without an L2 table is one unallocated extent.
                s, e = max(start, i * span), min(end, j * span)
                yield Extents.single(s, e - s, SubclusterType.UNALLOCATED_PLAIN)
                continue
            if kind == 2:
                yield from _shared_extents(img, i, offs_all[i - first : j - first], span, cache)
                continue
            # A run of L1 entries with tables, a batch at a time.
            for b in range(i, j, per_batch):
                b1 = min(j, b + per_batch)
                yield _table_extents(img, b, b1, max(start, b * span), min(end, b1 * span), stream)


def _read_sparse(img: L2Source, first: int, offs: I64, ordinary: npt.NDArray[np.bool_],
                 unreadable: npt.NDArray[np.bool_]) -> tuple[I64, U64] | None:
    """The non-zero entries of the ordinary tables (L1 entries first.. where `ordinary`), when the
    sparse path applies (see SPARSE_MIN_TABLES); None: read them batch by batch."""
    h = img.header
    if h.extended_l2 or unreadable.any():
        return None  # subcluster bitmaps and unaligned tables: the batch path's per-item errors
    k = np.flatnonzero(ordinary)
    if len(k) < SPARSE_MIN_TABLES:
        return None
    o = offs[k]
    if int(np.count_nonzero(o[1:] < o[:-1])) < SPARSE_MIN_DESCENTS * (len(k) - 1):
        return None  # tables in host order already: the batches read them in one sweep
    return img.read_l2_nonzero(k + first, SPARSE_MAX_ENTRIES)


def _sparse_extents(img: L2Source, sparse: tuple[I64, U64], start: int, end: int) -> Iterator[Extents]:
    """Extents of guest [start, end) from the non-zero entries (guest cluster, entry) of its tables
    (every other entry is zero: unallocated), SPARSE_CHUNK entries per batch."""
    cs = img.header.cluster_size
    n = img.header.l2_size
    cluster, entries = sparse
    c_start, c_end = start // cs, -(-end // cs)
    a = int(np.searchsorted(cluster, c_start, side="left"))
    b = int(np.searchsorted(cluster, c_end, side="left"))
    pos = start
    while True:
        k = min(b, a + SPARSE_CHUNK)
        stop = end if k >= b else int(cluster[k]) * cs
        i0 = (pos // cs) // n
        base = i0 * n
        c0 = pos // cs - base
        c1 = -(-stop // cs) - base
        r = cluster[a:k] - base
        m0 = k - a
        # Items: each non-zero entry, and one zero item for every run of zero entries (before the
        # first, between two, after the last); an item spans the clusters up to the next item.
        if m0 == 0:
            ci = np.array([c0], np.int64)
            e = np.zeros(1, np.uint64)
        else:
            lead = 1 if int(r[0]) > c0 else 0
            after = np.empty(m0, dtype=bool)
            after[:-1] = r[1:] > r[:-1] + 1
            after[-1] = int(r[-1]) + 1 < c1
            at = np.arange(m0, dtype=np.int64) + lead + np.cumsum(after) - after
            ci = np.empty(m0 + lead + int(np.count_nonzero(after)), np.int64)
            e = np.zeros(len(ci), np.uint64)
            ci[at] = r
            e[at] = entries[a:k]
            ci[at[after] + 1] = r[after] + 1
            if lead:
                ci[0] = c0
        yield _standard_extents(img, i0, e, np.zeros(0, dtype=bool), c0, pos, stop, ci)
        if k >= b:
            return
        a, pos = k, stop


SHARED_CHUNK = 1 << 16
"""Extents per yield when repeating shared tables."""


def _shared_extents(img: L2Source, i0: int, offs: I64, span: int, cache: dict[int, Extents]) -> Iterator[Extents]:
    """Extents of L1 entries i0.. naming tables at `offs` (all whole inside the range, all shared):
    each distinct table decoded once (relative to its first guest byte), then repeated per entry."""
    uniq, local = np.unique(offs, return_inverse=True)
    local = local.reshape(-1)
    for k, o in enumerate(uniq.tolist()):
        if o not in cache:
            e = i0 + int(np.flatnonzero(local == k)[0])
            ex = _table_extents(img, e, e + 1, e * span, (e + 1) * span, None)
            ex.guest = ex.guest - e * span
            cache[o] = ex
    parts = [cache[o] for o in uniq.tolist()]
    counts = np.array([len(p) for p in parts], np.int64)
    csr = np.concatenate(([0], np.cumsum(counts)))
    cat = Extents(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                    ("guest", "length", "sctype", "host", "error", "where")))
    per_entry = counts[local]
    ends = np.cumsum(per_entry)
    a = 0
    while a < len(offs):
        base = int(ends[a - 1]) if a else 0
        b = max(a + 1, int(np.searchsorted(ends, base + SHARED_CHUNK, side="right")))
        cnt = per_entry[a:b]
        starts = csr[local[a:b]]
        idx = np.repeat(starts - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        shift = np.repeat((np.arange(a, b, dtype=np.int64) + i0) * span, cnt)
        yield Extents(cat.guest[idx] + shift, cat.length[idx], cat.sctype[idx], cat.host[idx], cat.error[idx],
                      cat.where[idx])
        a = b


def _table_extents(img: L2Source, i0: int, i1: int, start: int, end: int, stream: PieceStream | None) -> Extents:
    h = img.header
    cs = h.cluster_size
    n = h.l2_size
    entries, bitmaps, bad_l2 = img.read_l2_batch(i0, i1, stream)
    first_cluster = i0 * n
    c0 = start // cs - first_cluster
    c1 = -(-end // cs) - first_cluster
    if c1 <= c0:
        return Extents.single(start, 0, SubclusterType.UNALLOCATED_PLAIN)
    if bitmaps is None:
        e = entries[c0:c1]
        runs = _continued_runs(img, e, bad_l2) if COLLAPSE else None
        if runs is not None:
            return _standard_extents(img, i0, e[runs], bad_l2, c0, start, end, runs + c0)
        return _standard_extents(img, i0, e, bad_l2, c0, start, end)
    return _extended_extents(img, i0, entries[c0:c1], bitmaps[c0:c1], bad_l2, c0, start, end)


COLLAPSE = True
"""Collapse runs of entries that continue each other before classifying (`_continued_runs`)."""
COLLAPSE_MIN_ENTRIES = 64
COLLAPSE_MAX_RUNS = 1 / 8
"""Collapse only when the runs are at most this fraction of the entries (else it does not pay)."""


def _continued_runs(img: L2Source, e: U64, bad_l2: npt.NDArray[np.bool_]) -> I64 | None:
    """The first entry of each run of standard L2 entries that continue each other, or None.

    An entry continues the one before it when it is that entry plus one cluster (the next host
    cluster, same flags: a preallocated or sequentially written image) or the same entry again
    (unallocated, zero). Such a run is one item of one type, contiguous in host and guest, which
    the classification then handles as a whole instead of entry by entry. None (classify every
    entry) when the runs are too many to pay, or when a run would hide what QEMU checks per entry:
    compressed entries, duplicated host offsets, unaligned offsets, zero flags in a v2 image,
    unaligned tables, an external data file, or an offset that would carry out of its bits.
    """
    h = img.header
    m = len(e)
    if m < COLLAPSE_MIN_ENTRIES or h.has_data_file or bad_l2.any():
        return None
    cs = np.uint64(h.cluster_size)
    d = e[1:] - e[:-1]
    other = np.flatnonzero(d != cs)
    if len(other) < COLLAPSE_MAX_RUNS * m:
        # Only runs of consecutive host clusters (a preallocated image): two passes find them.
        heads = np.concatenate((np.zeros(1, np.int64), other + 1))
        step: npt.NDArray[np.bool_] | None = None
    else:
        step = d == cs
        brk = np.empty(m, dtype=bool)
        brk[0] = True
        np.not_equal(d, np.uint64(0), out=brk[1:])
        brk[1:] &= ~step
        brk[2:] |= step[1:] != step[:-1]  # a run keeps one kind of continuation
        heads = np.flatnonzero(brk)
        if len(heads) > COLLAPSE_MAX_RUNS * m:
            return None
    run_len = np.diff(np.append(heads, m))
    multi = run_len > 1
    if not multi.any():
        return heads
    mh = heads[multi]
    he = e[mh]
    off = he & np.uint64(C.L2E_OFFSET_MASK)
    by_step = np.ones(len(mh), dtype=bool) if step is None else step[mh]
    bad = (he & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
    bad |= by_step & ((off == 0) | ((off & (cs - np.uint64(1))) != 0)
                      | (((off + (run_len[multi] - 1).astype(np.uint64) * cs) & ~np.uint64(C.L2E_OFFSET_MASK)) != 0))
    bad |= ~by_step & (off != 0)
    if h.version < 3:
        bad |= (he & np.uint64(C.QCOW_OFLAG_ZERO)) != 0
    if bad.any():
        return None
    return heads


_IS_OFF = np.zeros(8, dtype=bool)
_IS_OFF[list(OFFSET_TYPES)] = True


def _standard_extents(img: L2Source, i0: int, e: U64, bad_l2: npt.NDArray[np.bool_], c0: int,
                      start: int, end: int, ci: I64 | None = None) -> Extents:
    """One item per cluster: classify with a lookup table, cut where type or contiguity changes.

    Item k is cluster c0 + k of the batch (of L1 entry i0 on); with `ci`, item k is cluster ci[k]
    of the batch and spans the clusters up to the next item's (the sparse path's zero items)."""
    h = img.header
    cs = h.cluster_size
    fmt = img.l2_format
    n = h.l2_size
    m = len(e)
    cluster_off = e & np.uint64(C.L2E_OFFSET_MASK)
    types = classify_standard_subclusters(e, fmt, cluster_off != 0)
    is_off = _IS_OFF[types]
    compressed = types == SubclusterType.COMPRESSED
    if compressed.any():
        host = np.where(compressed, e, np.where(is_off, cluster_off, np.uint64(0)))
    else:
        host = np.where(is_off, cluster_off, np.uint64(0))
    del cluster_off

    cidx0 = i0 * n + c0  # absolute guest cluster index of item 0
    err: U8 | None = None

    def _err() -> U8:
        nonlocal err
        if err is None:
            err = np.zeros(m, dtype=np.uint8)
        return err

    if h.version < 3:
        z = (types == SubclusterType.ZERO_PLAIN) | (types == SubclusterType.ZERO_ALLOC)
        if z.any():
            _err()[z] = ExtentError.ZERO_IN_V2
    if fmt.has_data_file:
        if compressed.any():
            _err()[compressed] = ExtentError.COMPRESSED_WITH_DATA_FILE
        guest_u = ((np.arange(m, dtype=np.uint64) + np.uint64(cidx0)) if ci is None
                   else (ci + i0 * n).astype(np.uint64)) * np.uint64(cs)
        mism = is_off & (host != guest_u)
        if mism.any():
            _err()[mism] = ExtentError.DATA_FILE_OFFSET_MISMATCH
    unal = (e & np.uint64(C.L2E_OFFSET_MASK & (cs - 1))) != 0
    if unal.any():
        unal &= is_off
        if unal.any():
            _err()[unal] = ExtentError.UNALIGNED_DATA
    if bad_l2.any():
        tables = (np.arange(m, dtype=np.int64) + c0 if ci is None else ci) // n
        bad_items = bad_l2[tables]
        if bad_items.any():
            _err()[bad_items] = ExtentError.UNALIGNED_L2
    if err is not None:
        types = np.where(err != 0, np.uint8(SubclusterType.INVALID), types).astype(np.uint8)

    # Cut into runs: a new run where the type changes, the host offset is not contiguous, at every
    # compressed cluster and around every error item.
    if m > 1:
        brk = np.empty(m, dtype=bool)
        brk[0] = True
        np.not_equal(types[1:], types[:-1], out=brk[1:])
        gap = (host[1:] - host[:-1]) != (np.uint64(cs) if ci is None
                                         else (ci[1:] - ci[:-1]).astype(np.uint64) * np.uint64(cs))
        gap &= is_off[1:]
        brk[1:] |= gap
        brk[1:] |= compressed[1:]
        if err is not None:
            bad = err != 0
            brk[1:] |= bad[1:] | bad[:-1]
        idx = np.flatnonzero(brk)
    else:
        idx = np.zeros(1, dtype=np.int64)
    nxt = np.empty(len(idx), dtype=np.int64)
    if ci is None:
        nxt[:-1] = idx[1:]
        nxt[-1] = m
        first_c = idx + c0
        nxt += c0
    else:
        first_c = ci[idx]
        nxt[:-1] = first_c[1:]
        nxt[-1] = -(-end // cs) - i0 * n
    guest = (first_c + i0 * n) * cs
    length = (nxt - first_c) * cs
    ex_err = err[idx] if err is not None else np.zeros(len(idx), dtype=np.uint8)
    ex = Extents(guest.astype(np.int64), length.astype(np.int64), types[idx], host[idx], ex_err,
                 _where(img, i0, first_c, ex_err))
    _clip(ex, start, end)
    return ex


def _where(img: L2Source, i0: int, cidx: I64, err: U8) -> I64:
    """File offset of the L2 entry of batch cluster `cidx` (of the L1 entry for unaligned tables)."""
    h = img.header
    n = h.l2_size
    l1_index = i0 + cidx // n
    l2_offsets = (img.l1_table[l1_index] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    return np.where(err == ExtentError.UNALIGNED_L2, h.l1_table_offset + l1_index * 8,
                    l2_offsets + (cidx % n) * h.l2_entry_size).astype(np.int64)


def _clip(ex: Extents, start: int, end: int) -> None:
    """Clip the first and last extent to [start, end) (a range may begin or end mid-cluster)."""
    if ex.guest[0] < start:
        d = start - int(ex.guest[0])
        ex.guest[0] += d
        ex.length[0] -= d
        if ex.sctype[0] in OFFSET_TYPES:
            ex.host[0] += np.uint64(d)
    last_end = int(ex.guest[-1] + ex.length[-1])
    if last_end > end:
        ex.length[-1] -= last_end - end


def _extended_extents(img: L2Source, i0: int, entries: U64, bitmaps: U64, bad_l2: npt.NDArray[np.bool_],
                      c0: int, start: int, end: int) -> Extents:
    h = img.header
    cs = h.cluster_size
    fmt = img.l2_format
    n = h.l2_size
    first_cluster = i0 * n
    ctypes = classify_clusters(entries, fmt)
    sc_per = h.subclusters_per_cluster
    whole = uniform_bitmaps(bitmaps) | (ctypes == ClusterType.COMPRESSED)
    if whole.all():
        item_c = np.arange(len(entries))
        sc = np.zeros(len(entries), dtype=np.int64)
        item_len = np.full(len(entries), cs, dtype=np.int64)
        e = entries
        types = classify_subclusters_at(ctypes, bitmaps, sc, fmt)
    else:
        # A mixed cluster becomes one item per run of subclusters of one type (not one per
        # subcluster): such a run is contiguous in host and guest and would be merged anyway.
        # Clusters whose items all fail a read (invalid bitmap, unaligned table or data, data file
        # mismatch) keep one item per subcluster, as error items are never merged.
        nu = np.flatnonzero(~whole)
        b = bitmaps[nu]
        z = b >> np.uint64(32)
        a = b & np.uint64(0xFFFFFFFF) & ~z
        change = ((z ^ (z << np.uint64(1))) | (a ^ (a << np.uint64(1)))) & np.uint64(0xFFFFFFFE)
        nt = ctypes[nu]
        full = invalid_bitmaps(nt, b) | bad_l2[(nu + c0) // n]
        off_nu = entries[nu] & np.uint64(C.L2E_OFFSET_MASK)
        normal = nt == ClusterType.NORMAL
        full |= normal & ((off_nu & np.uint64(cs - 1)) != 0)
        if fmt.has_data_file:
            full |= normal & (off_nu != ((nu + c0 + first_cluster) * cs).astype(np.uint64))
        if h.version < 3:
            full[:] = True
        change[full] = np.uint64(0xFFFFFFFE)
        starts = np.unpackbits(change.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        starts[:, 0] = 1
        counts = np.ones(len(entries), dtype=np.int64)
        counts[nu] = starts.sum(axis=1, dtype=np.int64)
        item_c = np.repeat(np.arange(len(entries)), counts)
        first_item = np.cumsum(counts) - counts
        sc = np.zeros(len(item_c), dtype=np.int64)
        pos_nu = np.flatnonzero(starts != 0)  # row-major: the mixed clusters' items, in order
        cnt_nu = counts[nu]
        dest = np.repeat(first_item[nu], cnt_nu) + (np.arange(len(pos_nu)) - np.repeat(np.cumsum(cnt_nu) - cnt_nu,
                                                                                       cnt_nu))
        sc[dest] = pos_nu % sc_per
        nxt = np.empty(len(sc), dtype=np.int64)  # first subcluster of the next item of the cluster
        nxt[:-1] = sc[1:]
        nxt[first_item + counts - 1] = sc_per
        item_len = np.where(whole[item_c], cs, (nxt - sc) * h.subcluster_size).astype(np.int64)
        e = entries[item_c]
        types = classify_subclusters_at(ctypes[item_c], bitmaps[item_c], sc, fmt)
    cidx = item_c.astype(np.int64) + c0  # cluster index within the batch
    guest = (first_cluster + cidx) * cs + sc * h.subcluster_size
    cluster_off = e & np.uint64(C.L2E_OFFSET_MASK)
    host = cluster_off + (sc * h.subcluster_size).astype(np.uint64)
    is_off = _IS_OFF[types]
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
    l2_of_item = cidx // n
    err[bad_l2[l2_of_item]] = ExtentError.UNALIGNED_L2
    types = np.where(err != 0, np.uint8(SubclusterType.INVALID), types).astype(np.uint8)
    # Drop subcluster items wholly outside [start, end) (a range may begin or end mid-cluster).
    keep = (guest + item_len > start) & (guest < end)
    if not keep.all():
        guest, item_len, cidx = guest[keep], item_len[keep], cidx[keep]
        types, host, err = types[keep], host[keep], err[keep]
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
                 host[idx], err[idx], _where(img, i0, cidx[idx], err[idx]))
    _clip(ex, start, end)
    return ex
