"""Who owns each host cluster of the image file, and which table entries point at it.

`compute_layout` walks every structure `qemu-img check` walks — the header, the active L1 table
and every snapshot's L1 with all their L2 tables (read in batches, decoded with numpy), the
snapshot table, the refcount table and blocks, the LUKS region and the persistent bitmaps — and
records, for each host cluster, one `Owner` in a uint8 array. Clusters nothing points at are
*leaked* when their stored refcount is not 0, a *free* hole when it is, and *past end* beyond the
last cluster in use (check's image-end-offset). A cluster claimed through more than one L1 table
(the active one and a snapshot's, typically) is SHARED; one claimed as two different structures is
a CONFLICT (an overlap QEMU would call corruption).

Reference counts are recomputed on the way exactly as check recomputes them, so the layout and
`check_image` agree cluster for cluster (a test holds them to it).

Beside the owner array the layout keeps compact, sparse information: runs of data clusters
(host and guest contiguous) per L1 table, compressed cluster descriptors, and the small tables
(L1s, bitmap tables), from which `Layout.references(host_offset)` answers "which table entries
point here" without re-reading the image's L2 tables.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from itertools import islice

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.refwalk import RANK_TREE, SRC_ACTIVE, SRC_NONE, BatchConsumer, L2Batch, RefKind, RefWalk
from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import Bitmap
from qinspect.qcow2.fields import QCOW2_BITMAP_HEADER_EXT, QCOW2_CRYPTO_HEADER_EXT, QCOW_HEADER
from qinspect.qcow2.header import Header
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import ClusterType, classify_clusters
from qinspect.qcow2.snapshots import Snapshot

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
# The references counted per cluster saturate here (32-bit counts, as check's).
COUNT_MAX = 0xFFFFFFFF
SEEK_CHUNK = 1 << 16
"""L1 entries per pass of `Layout.active_seeks` (its temporaries per entry stay this long)."""
U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

UNSET = 255
# Sources of a claim (refwalk's): SRC_NONE outside any L1 tree, SRC_ACTIVE, snapshot k's tree k+1.

# Bits of `Layout.flags` (one uint8 per host cluster).
F_LIVE = 1  # claimed by a structure other than a snapshot's L1 tree (active tree, header, ...)
F_SNAPSHOT = 2  # claimed through a snapshot's L1 table
F_DATA = 4  # active data cluster whose every subcluster holds data
F_ZERO = 8  # active allocated cluster that reads as zeros (ZERO_ALLOC)
F_PARTIAL = 16  # active data cluster with a mix of data/zero/unallocated subclusters (extended L2)


class Owner(IntEnum):
    """What a host cluster of the image file is used for."""

    HEADER = 0
    L1 = 1
    SNAPSHOT_L1 = 2
    L2 = 3
    REFCOUNT_TABLE = 4
    REFCOUNT_BLOCK = 5
    DATA = 6
    COMPRESSED = 7
    SNAPSHOT_TABLE = 8
    BITMAP_DIRECTORY = 9
    BITMAP_TABLE = 10
    BITMAP_DATA = 11
    LUKS = 12
    LEAKED = 13
    FREE = 14
    PAST_END = 15
    SHARED = 16
    CONFLICT = 17

    @property
    def label(self) -> str:
        """A short human name ("refcount block", "free hole", ...)."""
        return _LABELS[self]


_LABELS = {
    Owner.HEADER: "header", Owner.L1: "L1 table", Owner.SNAPSHOT_L1: "snapshot L1 table", Owner.L2: "L2 table",
    Owner.REFCOUNT_TABLE: "refcount table", Owner.REFCOUNT_BLOCK: "refcount block", Owner.DATA: "data",
    Owner.COMPRESSED: "compressed data", Owner.SNAPSHOT_TABLE: "snapshot table",
    Owner.BITMAP_DIRECTORY: "bitmap directory", Owner.BITMAP_TABLE: "bitmap table", Owner.BITMAP_DATA: "bitmap data",
    Owner.LUKS: "LUKS region", Owner.LEAKED: "leaked", Owner.FREE: "free hole", Owner.PAST_END: "past end",
    Owner.SHARED: "shared (several L1 tables)", Owner.CONFLICT: "conflict (overlapping structures)",
}


class ReferenceKind(StrEnum):
    """What holds a pointer into a host cluster (the value is the name `layout --offset` prints)."""

    L2_ENTRY = "l2-entry"
    """An L2 entry: a data or compressed cluster."""
    L1_ENTRY = "l1-entry"
    """An L1 entry: an L2 table."""
    HEADER_FIELD = "header-field"
    """A header field: the active L1 table, the refcount table, the snapshot table."""
    SNAPSHOT_TABLE_ENTRY = "snapshot-table-entry"
    """A snapshot table entry: that snapshot's L1 table."""
    REFCOUNT_TABLE_ENTRY = "refcount-table-entry"
    """A refcount table entry: a refcount block."""
    HEADER_EXTENSION = "header-extension"
    """A header extension: the bitmap directory, the LUKS region."""
    BITMAP_DIRECTORY_ENTRY = "bitmap-directory-entry"
    """A bitmap directory entry: a bitmap table."""
    BITMAP_TABLE_ENTRY = "bitmap-table-entry"
    """A bitmap table entry: bitmap data."""

    @property
    def label(self) -> str:
        """The words for it ("L2 entry", "refcount table entry", ...)."""
        return _REFERENCE_LABELS[self]


_REFERENCE_LABELS = {
    ReferenceKind.L2_ENTRY: "L2 entry", ReferenceKind.L1_ENTRY: "L1 entry", ReferenceKind.HEADER_FIELD: "header field",
    ReferenceKind.SNAPSHOT_TABLE_ENTRY: "snapshot table entry",
    ReferenceKind.REFCOUNT_TABLE_ENTRY: "refcount table entry", ReferenceKind.HEADER_EXTENSION: "header extension",
    ReferenceKind.BITMAP_DIRECTORY_ENTRY: "bitmap directory entry",
    ReferenceKind.BITMAP_TABLE_ENTRY: "bitmap table entry",
}


@dataclass(frozen=True)
class Reference:
    """One table entry (or header field) that points into a host cluster.

    `kind` says which (see `ReferenceKind`).
    `table_offset` is the file offset of the table holding the entry, `entry_file_offset` that of the
    entry itself; `guest_offset` is the guest byte mapped (first byte of the range for L1 entries);
    `snapshot` is the id of the snapshot whose L1 tree the entry belongs to.
    """

    kind: ReferenceKind
    table_offset: int
    entry_index: int
    entry_file_offset: int
    guest_offset: int | None = None
    snapshot: str | None = None


@dataclass
class _DataRuns:
    """Runs of allocated (NORMAL / ZERO_ALLOC) L2 entries of one L1 tree, host and guest contiguous."""

    host: I64  # first host cluster index
    guest: I64  # first guest cluster index (relative to the table's first entry)
    length: I64
    zero: BoolArray  # run of ZERO_ALLOC entries
    table: I64  # distinct L2 table id (RefWalk.tables)
    disjoint: bool = True  # runs sorted by host do not overlap: lookups are one binary search

    @staticmethod
    def empty() -> _DataRuns:
        z = np.zeros(0, np.int64)
        return _DataRuns(z, z.copy(), z.copy(), np.zeros(0, bool), z.copy())


@dataclass
class _Compressed:
    """Compressed L2 entries of one L1 tree: host cluster span and guest cluster."""

    first: I64
    last: I64
    guest: I64  # relative to the table's first entry
    table: I64

    @staticmethod
    def empty() -> _Compressed:
        z = np.zeros(0, np.int64)
        return _Compressed(z, z.copy(), z.copy(), z.copy())


@dataclass
class Layout:
    """The owner of every host cluster of one image file, plus what points where.

    `owner[i]` is the `Owner` of host cluster i (bytes [i*cluster_size, (i+1)*cluster_size) of the
    file; the last one may be partial). `kind[i]` is the structure kind behind a SHARED cluster
    (equal to `owner` elsewhere). `flags[i]` holds the F_* bits above. `reference[i]` is the refcount
    `qemu-img check` recomputes, `stored_refcount` the one in the file (0 past the refcount table).
    """

    path: str
    cluster_size: int
    file_size: int
    owner: U8
    kind: U8
    flags: U8
    reference: U32
    stored_refcount: npt.NDArray[np.unsignedinteger]  # in the image's refcount width
    image_end_offset: int
    snapshot_ids: list[str]
    snapshot_count: npt.NDArray[np.uint16] | None
    """Per cluster: how many snapshots' L1 trees reference it (None without snapshots)."""
    snapshot_last: npt.NDArray[np.int32] | None
    """Per cluster: index of the last snapshot referencing it (meaningful where count is 1)."""
    partial_clusters: I64
    """Host clusters of active data with mixed subclusters (extended L2), sorted."""
    partial_bitmaps: U64
    """Per partial cluster: its extended L2 subcluster bitmap (allocation bits 0-31, zero bits 32-63)."""
    l2_reads: int
    """Non-zero L1 entries over all L1 tables: the L2 tables a full walk (check, repair) reads."""
    refcount_blocks: int
    leaks: int
    """Clusters whose stored refcount exceeds the recomputed one (check's "leaks")."""
    refcount_errors: int
    """Clusters whose stored refcount is below the recomputed one (check's refcount corruptions)."""
    anomalies: dict[str, int] = field(default_factory=dict)
    refs_past_eof: int = 0
    refs_end: int = 0
    """End (bytes) of the highest host cluster any table references; past `file_size` when truncated."""
    """Clusters referenced beyond the end of the file."""
    _walk: RefWalk | None = field(default=None, repr=False)
    _runs: _DataRuns = field(default_factory=lambda: _DataRuns.empty(), repr=False)
    """Runs of allocated entries of every distinct L2 table (guest relative to the table), by host."""
    _compressed: _Compressed = field(default_factory=lambda: _Compressed.empty(), repr=False)
    _comp_per_table: I64 = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _header: Header | None = field(default=None, repr=False)
    _snapshots: Sequence[Snapshot] = field(default_factory=list, repr=False)
    _snapshot_table_size: int = field(default=0, repr=False)
    _refcount_table: U64 = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)
    _bitmaps: list[Bitmap] = field(default_factory=list, repr=False)
    _bitmap_tables: list[U64] = field(default_factory=list, repr=False)

    # -- simple queries ------------------------------------------------------------------------------
    @property
    def nb_clusters(self) -> int:
        return len(self.owner)

    def owner_at(self, host_offset: int) -> Owner:
        """The owner of the host cluster holding `host_offset` (PAST_END beyond the file)."""
        i = host_offset // self.cluster_size
        if host_offset < 0 or i >= len(self.owner):
            return Owner.PAST_END
        return Owner(int(self.owner[i]))

    def kind_at(self, host_offset: int) -> Owner:
        """Like `owner_at`, but the structure kind for SHARED clusters (DATA, L2, COMPRESSED...)."""
        i = host_offset // self.cluster_size
        if host_offset < 0 or i >= len(self.kind):
            return Owner.PAST_END
        return Owner(int(self.kind[i]))

    def counts(self) -> dict[Owner, int]:
        """Clusters per owner (every owner present, zeros included)."""
        c = np.bincount(self.owner, minlength=len(Owner))
        return {o: int(c[o]) for o in Owner}

    def cluster_bytes(self) -> I64:
        """Bytes of the file in each host cluster (the last cluster may be partial)."""
        n = len(self.owner)
        out = np.full(n, self.cluster_size, dtype=np.int64)
        if n:
            out[-1] = self.file_size - (n - 1) * self.cluster_size
        return out

    def bytes_by_owner(self) -> dict[Owner, int]:
        """File bytes per owner; they add up to the file size."""
        b = np.bincount(self.owner, minlength=len(Owner)).astype(np.int64) * self.cluster_size
        if len(self.owner):
            b[int(self.owner[-1])] -= len(self.owner) * self.cluster_size - self.file_size
        return {o: int(b[o]) for o in Owner}

    def runs(self) -> list[tuple[int, int, Owner]]:
        """(first cluster, number of clusters, owner) of each run of equal owners, in file order."""
        o = self.owner
        if not len(o):
            return []
        starts = np.flatnonzero(np.concatenate(([True], o[1:] != o[:-1])))
        ends = np.append(starts[1:], len(o))
        return [(int(s), int(e - s), Owner(int(o[s]))) for s, e in zip(starts, ends, strict=True)]

    def snapshot_exclusive(self) -> dict[str, I64]:
        """Per snapshot id: host clusters referenced only through that snapshot's L1 table
        (what `qemu-img snapshot -d` would free)."""
        out: dict[str, I64] = {}
        if self.snapshot_count is None or self.snapshot_last is None:
            return {sid: np.zeros(0, np.int64) for sid in self.snapshot_ids}
        only = ((self.flags & F_LIVE) == 0) & (self.snapshot_count == 1)
        idx = np.flatnonzero(only).astype(np.int64)
        who = self.snapshot_last[idx]
        order = np.argsort(who, kind="stable")  # one pass, not one per snapshot (65,536 of them)
        idx, who = idx[order], who[order]
        bounds = np.searchsorted(who, np.arange(len(self.snapshot_ids) + 1))
        for k, sid in enumerate(self.snapshot_ids):
            out[sid] = idx[bounds[k] : bounds[k + 1]]
        return out

    def _tree_tables(self, source: int) -> tuple[I64, I64]:
        """(L1 index, distinct table id) of every L1 entry of tree `source` naming a table."""
        w = self._walk
        z = np.zeros(0, np.int64)
        if w is None:
            return z, z.copy()
        for t, (src, _off, _size) in enumerate(w.trees):
            if src == source:
                idx, offs = w.groups[w.tree_group[t]].l2_offsets()
                return idx, w.tables.id_of(offs)
        return z, z.copy()

    def active_data_runs(self) -> tuple[I64, I64, I64, BoolArray]:
        """(host cluster, guest cluster, length, zero) of the active L1 tree's allocated runs,
        sorted by guest offset (runs of a table named by several L1 entries appear for each)."""
        r = self._runs
        l1_idx, ids = self._tree_tables(SRC_ACTIVE)
        z = np.zeros(0, np.int64)
        if not len(r.host) or not len(ids) or self._header is None:
            return z, z.copy(), z.copy(), np.zeros(0, bool)
        order = np.lexsort((r.guest, r.table))
        tab = r.table[order]
        ntab = int(max(int(ids.max()), int(tab.max()))) + 1
        start = np.searchsorted(tab, np.arange(ntab + 1))
        cnt = (start[1:] - start[:-1])[ids]
        base = start[:-1][ids]
        pick = np.repeat(base - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
        sel = order[pick]
        guest = r.guest[sel] + np.repeat(l1_idx * self._header.l2_size, cnt)
        g_order = np.argsort(guest, kind="stable")
        sel = sel[g_order]
        return r.host[sel], guest[g_order], r.length[sel], r.zero[sel]

    def active_allocated_clusters(self) -> int:
        """Allocated (NORMAL / ZERO_ALLOC) entries of the active tree, counted per L1 entry naming
        each table, without expanding a shared table once per entry."""
        r = self._runs
        _idx, ids = self._tree_tables(SRC_ACTIVE)
        if not len(r.host) or not len(ids):
            return 0
        per_table = np.bincount(r.table, weights=r.length.astype(np.float64), minlength=int(ids.max()) + 1)
        return int(per_table[ids].sum())

    def active_seeks(self, skip_bytes: int) -> tuple[int, int, int]:
        """(data clusters, seeks, backward seeks) of a read of the active tree's non-zero data runs
        in guest order, where a seek is a jump backwards or more than `skip_bytes` forward.

        Computed per distinct table (inside each table) plus at each boundary between consecutive
        L1 entries: bounded by what is distinct, not by how often a table is named."""
        r = self._runs
        _idx, ids = self._tree_tables(SRC_ACTIVE)
        del _idx  # one int64 per L1 entry, not needed here (16 MiB at 2 Mi entries)
        if not len(r.host) or not len(ids):
            return 0, 0, 0
        cs = self.cluster_size
        keep = ~r.zero
        host, guest, length, table = r.host[keep], r.guest[keep], r.length[keep], r.table[keep]
        if not len(host):
            return 0, 0, 0
        order = np.lexsort((guest, table))
        host, length, table = host[order], length[order], table[order]
        ntab = max(int(table.max()), int(ids.max())) + 1
        start = np.searchsorted(table, np.arange(ntab + 1))
        has = start[1:] > start[:-1]
        ends = host + length
        same = table[1:] == table[:-1]
        gap = host[1:] - ends[:-1]
        seek_in = same & ((gap < 0) | (gap * cs > skip_bytes))
        back_in = same & (host[1:] < host[:-1])
        t_seeks = np.bincount(table[1:][seek_in], minlength=ntab)
        t_back = np.bincount(table[1:][back_in], minlength=ntab)
        t_len = np.bincount(table, weights=length.astype(np.float64), minlength=ntab)
        first_host = np.zeros(ntab, np.int64)
        last_end = np.zeros(ntab, np.int64)
        last_start = np.zeros(ntab, np.int64)
        first_host[has] = host[start[:-1][has]]
        last_end[has] = ends[start[1:][has] - 1]
        last_start[has] = host[start[1:][has] - 1]
        clusters = seeks = backward = 0
        prev = np.zeros(0, np.int64)  # the last entry with data before this chunk
        # The L1 entries in chunks: the temporaries per entry stay SEEK_CHUNK long, not 2 Mi.
        for lo in range(0, len(ids), SEEK_CHUNK):
            part = ids[lo : lo + SEEK_CHUNK]
            seq = part[has[part]]  # the active entries whose table has data, in guest order
            if not len(seq):
                continue
            clusters += int(t_len[seq].sum())
            seeks += int(t_seeks[seq].sum())
            backward += int(t_back[seq].sum())
            pairs = np.concatenate((prev, seq))
            if len(pairs) > 1:
                a, b = pairs[:-1], pairs[1:]
                bgap = first_host[b] - last_end[a]
                seeks += int(np.count_nonzero((bgap < 0) | (bgap * cs > skip_bytes)))
                backward += int(np.count_nonzero(first_host[b] < last_start[a]))
            prev = seq[-1:]
        return clusters, seeks, backward

    def compressed_count(self, source: int = SRC_ACTIVE) -> int:
        """Compressed L2 entries in one L1 tree (0 = active, k+1 = snapshot k)."""
        _idx, ids = self._tree_tables(source)
        return int(self._comp_per_table[ids].sum()) if len(ids) and len(self._comp_per_table) else 0

    # -- reverse lookup --------------------------------------------------------------------------------
    def references(self, host_offset: int, limit: int | None = None) -> list[Reference]:
        """The table entries and header fields that point into the cluster holding `host_offset`,
        the first `limit` of them (all with None: see `iter_references` for the order)."""
        return list(islice(self.iter_references(host_offset), limit))

    def count_references(self, host_offset: int) -> int:
        """How many references `iter_references` yields, counted without making them (one L2 table
        named by 2 Mi L1 entries has 2 Mi references, and the data it maps as many)."""
        cs = self.cluster_size
        hc = host_offset // cs
        if self._header is None or host_offset < 0:
            return 0
        n = sum(1 for _ in self._structure_references(hc))
        w = self._walk
        if w is None:
            return n
        lo, hi = hc * cs, (hc + 1) * cs
        for grp in w.groups:
            for _idx, l2o in grp.l2_offset_chunks():
                n += int(np.count_nonzero((l2o < hi) & (l2o + cs > lo))) * len(grp.sources)
        return n + sum(int(w.tables.refs[tid]) for tid, _ei in self._l2_hits(hc))

    def iter_references(self, host_offset: int) -> Iterator[Reference]:
        """Every table entry or header field that points into the cluster holding `host_offset`:
        header fields, snapshot table entries, header extensions, refcount table entries, bitmap
        directory and table entries, then L1 entries (by L1 table, index, tree) and L2 entries (by
        tree, guest cluster). Answered from what the layout walk kept in memory (no I/O, safe from
        any thread), a chunk of L1 entries at a time: memory stays bounded however many entries
        name one table."""
        cs = self.cluster_size
        hc = host_offset // cs
        h = self._header
        if h is None or host_offset < 0:
            return
        yield from self._structure_references(hc)
        w = self._walk
        if w is None:
            return
        lo, hi = hc * cs, (hc + 1) * cs
        l2_size, l2e = h.l2_size, h.l2_entry_size

        def sid_of(src: int) -> str | None:
            return None if src == SRC_ACTIVE else self.snapshot_ids[src - 1]

        for grp in w.groups:
            for idx, l2o in grp.l2_offset_chunks():  # (temporaries of a chunk, not of 2 Mi L1 entries)
                for i in idx[(l2o < hi) & (l2o + cs > lo)].tolist():
                    for src in grp.sources:
                        yield Reference(ReferenceKind.L1_ENTRY, grp.offset, i, grp.offset + 8 * i, i * l2_size * cs,
                                        sid_of(src))
        hits = self._l2_hits(hc)
        if not hits:
            return
        # The L2 entries mapping this cluster, from every L1 entry naming their tables, in the
        # order (tree, guest cluster, table): tree by tree, and within a tree a chunk of L1
        # entries at a time (the guest clusters of one chunk all come before the next chunk's).
        hit_off = np.array([int(w.tables.offsets[tid]) for tid, _ei in hits], np.int64)
        hit_ei = np.array([ei for _tid, ei in hits], np.int64)
        order = np.argsort(hit_off, kind="stable")
        hit_off, hit_ei = hit_off[order], hit_ei[order]
        uniq = np.unique(hit_off)
        trees = sorted((src, g) for g, grp in enumerate(w.groups) for src in grp.sources)
        for src, g in trees:
            grp = w.groups[g]
            for idx, l2o in grp.l2_offset_chunks():
                sel = np.flatnonzero(np.isin(l2o, uniq))
                if not len(sel):
                    continue
                rows: list[tuple[int, int]] = []  # (guest cluster, table)
                for li, t in zip(idx[sel].tolist(), l2o[sel].tolist(), strict=True):
                    k0, k1 = np.searchsorted(hit_off, [t, t + 1])
                    rows.extend((li * l2_size + ei, t) for ei in hit_ei[k0:k1].tolist())
                for gc, table in sorted(rows):
                    ei = gc % l2_size
                    yield Reference(ReferenceKind.L2_ENTRY, table, ei, table + ei * l2e, gc * cs, sid_of(src))

    def _structure_references(self, hc: int) -> Iterator[Reference]:
        """The references to host cluster `hc` from the header, the snapshot table, the header
        extensions, the refcount table and the bitmaps (not from L1 or L2 tables)."""
        cs = self.cluster_size
        h = self._header
        assert h is not None
        snapshots = self._snapshots
        lo, hi = hc * cs, (hc + 1) * cs

        def covers(off: int, length: int) -> bool:
            return length > 0 and off < hi and off + length > lo

        if covers(h.l1_table_offset, h.l1_size * 8):
            yield Reference(ReferenceKind.HEADER_FIELD, 0, 0, QCOW_HEADER.offset("l1_table_offset"))
        if covers(h.refcount_table_offset, h.refcount_table_entries * 8):
            yield Reference(ReferenceKind.HEADER_FIELD, 0, 0, QCOW_HEADER.offset("refcount_table_offset"))
        if snapshots and covers(h.snapshots_offset, self._snapshot_table_size):
            yield Reference(ReferenceKind.HEADER_FIELD, 0, 0, QCOW_HEADER.offset("snapshots_offset"))
        for sn in snapshots:
            if covers(sn.l1_table_offset, sn.l1_size * 8):
                yield Reference(ReferenceKind.SNAPSHOT_TABLE_ENTRY, h.snapshots_offset, sn.index, sn.entry_offset,
                                None, sn.id_str)
        for ext in h.extensions:
            if ext.magic == C.QCOW2_EXT_MAGIC_BITMAPS and h.bitmaps_ext is not None and covers(
                    h.bitmaps_ext.bitmap_directory_offset, h.bitmaps_ext.bitmap_directory_size):
                yield Reference(ReferenceKind.HEADER_EXTENSION, ext.offset, 0,
                                ext.data_offset + QCOW2_BITMAP_HEADER_EXT.offset("bitmap_directory_offset"))
            if ext.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER and h.crypto_ext is not None and covers(
                    h.crypto_ext.offset, h.crypto_ext.length):
                yield Reference(ReferenceKind.HEADER_EXTENSION, ext.offset, 0,
                                ext.data_offset + QCOW2_CRYPTO_HEADER_EXT.offset("offset"))
        rt = self._refcount_table
        if len(rt):
            offs = rt & np.uint64(C.REFT_OFFSET_MASK)
            for i in np.flatnonzero((offs // np.uint64(cs)) == np.uint64(hc)):
                if int(offs[i]):
                    yield Reference(ReferenceKind.REFCOUNT_TABLE_ENTRY, h.refcount_table_offset, int(i),
                                    h.refcount_table_offset + 8 * int(i))
        if h.bitmaps_ext is not None and h.bitmaps_consistent:
            for bi, bm in enumerate(self._bitmaps):
                if covers(bm.bitmap_table_offset, bm.bitmap_table_size * 8):
                    yield Reference(ReferenceKind.BITMAP_DIRECTORY_ENTRY, h.bitmaps_ext.bitmap_directory_offset, bi,
                                    bm.entry_offset)
                if bi < len(self._bitmap_tables):
                    t = self._bitmap_tables[bi] & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
                    for j in np.flatnonzero((t != 0) & ((t // np.uint64(cs)) == np.uint64(hc))):
                        yield Reference(ReferenceKind.BITMAP_TABLE_ENTRY, bm.bitmap_table_offset, int(j),
                                        bm.bitmap_table_offset + 8 * int(j))

    def _l2_hits(self, hc: int) -> list[tuple[int, int]]:
        """(table id, L2 index) of every distinct L2 table entry mapping host cluster `hc`."""
        hits: list[tuple[int, int]] = []
        r = self._runs
        if len(r.host):
            if r.disjoint:
                k = int(np.searchsorted(r.host, hc, side="right")) - 1
                cand = [k] if k >= 0 else []
            else:
                cand = np.flatnonzero(r.host <= hc).tolist()
            for k in cand:
                h0, n = int(r.host[k]), int(r.length[k])
                if h0 <= hc < h0 + n:
                    hits.append((int(r.table[k]), int(r.guest[k]) + hc - h0))
        c = self._compressed
        for k in np.flatnonzero((c.first <= hc) & (c.last >= hc)).tolist():
            hits.append((int(c.table[k]), int(c.guest[k])))
        return hits


# -- the walk ------------------------------------------------------------------------------------------
class _Walker:
    """Accumulates claims (cluster, kind, source) into the owner arrays and reference counts."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.cs = img.cluster_size
        self.nb = -(-img.file.size // self.cs)
        self.kind = np.full(self.nb, UNSET, dtype=np.uint8)
        # Which L1 tree claimed a cluster first: only needed to see sharing between trees, which
        # needs snapshots (without them each kind has a single possible source).
        self.src: npt.NDArray[np.int32] | None = None
        self.shared: BoolArray | None = None
        if img.snapshots:
            self.src = np.full(self.nb, -2, dtype=np.int32)
            self.shared = np.zeros(self.nb, dtype=bool)
        self.conflict = np.zeros(self.nb, dtype=bool)
        self.flags = np.zeros(self.nb, dtype=np.uint8)
        # references to clusters inside the file, 32-bit as check counts them (2^32 references to
        # one cluster would take 32 GiB of L2 tables); half the memory of 64-bit on big files
        self.counts = np.zeros(self.nb, dtype=np.uint32)
        self.far: list[I64] = []  # referenced clusters past the end of the file (one per reference)
        self.top = 0  # highest referenced cluster + 1
        self.anomalies: dict[str, int] = {}

    def note(self, what: str, n: int = 1) -> None:
        if n:
            self.anomalies[what] = self.anomalies.get(what, 0) + n

    def claim(self, clusters: I64, kind: Owner, source: int | npt.NDArray[np.int32], count_ref: bool = True,
              weights: I64 | None = None, multi: BoolArray | None = None, flag: U8 | None = None) -> None:
        """Record that `clusters` are used as `kind` by `source` (SRC_NONE, SRC_ACTIVE or k+1, one
        or per cluster), referenced `weights` times each (1), by several trees where `multi` is set,
        with `flag` bits (F_LIVE / F_SNAPSHOT from `source` by default)."""
        if not len(clusters):
            return
        clusters = clusters.astype(np.int64, copy=False)
        inside = (clusters >= 0) & (clusters < self.nb)
        if count_ref:
            self.top = max(self.top, int(clusters.max()) + 1)
            c_in = clusters[inside]
            w_in = weights[inside] if weights is not None else None
            if len(c_in):
                lo, hi = int(c_in.min()), int(c_in.max()) + 1
                if hi - lo <= 4 * len(c_in) + 65536:
                    seg = self.counts[lo:hi]
                    add = np.bincount(c_in - lo, weights=w_in, minlength=hi - lo)
                    if int(seg.max()) + int(add.max()) < COUNT_MAX:
                        np.add(seg, add.astype(seg.dtype), out=seg)
                    else:  # as check does: summed in 64 bits, saturated into the 32-bit counts
                        seg[:] = np.minimum(seg.astype(np.int64) + add.astype(np.int64), COUNT_MAX)
                elif w_in is None and int(self.counts[c_in].max()) + len(c_in) < COUNT_MAX:
                    np.add.at(self.counts, c_in, 1)
                else:
                    u, inv = np.unique(c_in, return_inverse=True)
                    tot = np.bincount(inv.reshape(-1), weights=None if w_in is None else w_in.astype(np.float64))
                    self.counts[u] = np.minimum(self.counts[u].astype(np.int64) + tot.astype(np.int64), COUNT_MAX)
            if not inside.all():
                out = ~inside
                self.far.append(clusters[out] if weights is None else np.repeat(clusters[out], weights[out]))
        if not inside.all():
            clusters = clusters[inside]
            if not np.isscalar(source) and not isinstance(source, int):
                source = source[inside]
            multi = multi[inside] if multi is not None else None
            flag = flag[inside] if flag is not None else None
        c = clusters
        if not len(c):
            return
        src_arr = np.broadcast_to(np.asarray(source, dtype=np.int32), c.shape)
        cur = self.kind[c]
        unset = cur == UNSET
        new = c[unset]
        self.kind[new] = kind
        if self.src is not None:
            new_src = src_arr[unset]
            if len(new) > 1 and self.shared is not None:
                # The same cluster claimed twice in this call from different trees: shared.
                o = np.lexsort((new_src, new))
                cn, sn = new[o], new_src[o]
                twice = (cn[1:] == cn[:-1]) & (sn[1:] != sn[:-1])
                if twice.any():
                    self.shared[cn[1:][twice]] = True
            self.src[new] = new_src
        old = c[~unset]
        if len(old):
            diff_kind = cur[~unset] != kind
            self.conflict[old[diff_kind]] = True
            if self.src is not None and self.shared is not None:
                same_sel = ~diff_kind
                same = old[same_sel]
                self.shared[same[self.src[same] != src_arr[~unset][same_sel]]] = True
        if multi is not None and self.shared is not None and multi.any():
            self.shared[c[multi]] = True
        if flag is None:
            self.flags[c] |= np.where(src_arr > SRC_ACTIVE, np.uint8(F_SNAPSHOT), np.uint8(F_LIVE))
        else:
            self.flags[c] |= flag

    def claim_range(self, offset: int, size: int, kind: Owner, source: int = SRC_NONE, weight: int = 1,
                    multi: bool = False, flag: int | None = None) -> None:
        """Claim the clusters covering bytes [offset, offset+size) (check's add_range), `weight` times."""
        if size <= 0:
            return
        if offset + size - self.img.file.size >= self.cs:  # check refuses to count it at all
            self.note("structures past the end of the file")
            self.top = max(self.top, -(-(offset + size) // self.cs))
            return
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        limit = self.nb + (1 << 22)  # as check: never allocate in proportion to a size read from the file
        if last >= limit:
            self.note("structures claimed to extend far past the end of the file")
            last = max(first, limit - 1) if first < limit else first
        cl = np.arange(first, last + 1, dtype=np.int64)
        self.claim(cl, kind, source, weights=np.full(len(cl), weight, np.int64) if weight != 1 else None,
                   multi=np.full(len(cl), multi) if multi else None,
                   flag=np.full(len(cl), flag, np.uint8) if flag is not None else None)


class _SnapshotCounts:
    """Per host cluster: how many snapshots' trees reach it and the last of them, from the distinct
    tables (a cluster reached through two tables is recomputed exactly at the end)."""

    def __init__(self, nb: int, walk: RefWalk) -> None:
        self.walk = walk
        self.count = np.zeros(nb, dtype=np.int64)
        self.last = np.full(nb, -1, dtype=np.int32)
        self.by_table = np.full(nb, -1, dtype=np.int64)  # the distinct table that added it
        self.multi: list[tuple[I64, I64]] = []  # (cluster, table) of clusters reached from two tables

    def add(self, clusters: I64, tables: I64) -> None:
        t = self.walk.tables
        ok = (clusters >= 0) & (clusters < len(self.count)) & (t.snapshots[tables] > 0)
        c, tb = clusters[ok], tables[ok]
        if not len(c):
            return
        key = np.unique(c * (len(t) + 1) + tb)  # once per (cluster, table)
        c, tb = key // (len(t) + 1), key % (len(t) + 1)
        prev = self.by_table[c]
        again = (prev >= 0) & (prev != tb)
        if again.any():
            self.multi.append((c[again], prev[again]))
            self.multi.append((c[again], tb[again]))
        np.add.at(self.count, c, t.snapshots[tb])
        np.maximum.at(self.last, c, t.last_snapshot[tb].astype(np.int32))
        self.by_table[c] = tb

    def add_l1_tables(self) -> None:
        w = self.walk
        cs = w.img.cluster_size
        for grp in w.groups:
            n = grp.snapshots
            if not n or not len(grp.entries):
                continue
            first, last = grp.offset // cs, (grp.offset + len(grp.entries) * 8 - 1) // cs
            c = np.arange(first, min(last + 1, len(self.count)), dtype=np.int64)
            self.count[c] += n
            self.last[c] = np.maximum(self.last[c], grp.last_snapshot)

    def finish(self) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.int32]]:
        if self.multi:
            c = np.concatenate([m[0] for m in self.multi])
            tb = np.concatenate([m[1] for m in self.multi])
            pt, pg = self.walk.tables.group_pairs
            nsnap = np.array([g.snapshots for g in self.walk.groups], np.int64)
            lastg = np.array([g.last_snapshot for g in self.walk.groups], np.int64)
            for cl in np.unique(c).tolist():  # rare: shared compressed clusters, corruption
                groups: set[int] = set()
                for t in np.unique(tb[c == cl]).tolist():
                    lo, hi = np.searchsorted(pt, [t, t + 1])
                    groups.update(pg[lo:hi].tolist())
                gl = sorted(groups)
                self.count[cl] = int(nsnap[gl].sum())
                self.last[cl] = int(lastg[gl].max()) if gl else -1
        return np.minimum(self.count, np.iinfo(np.uint16).max).astype(np.uint16), self.last


def compute_layout(img: Image, progress: ProgressFn = no_progress,
                   cancelled: CancelledFn = never_cancelled) -> Layout:
    """Walk every structure of `img` and return the owner of each host cluster of its file.

    The references come from the one refcount walk (`RefWalk`, shared with check: see
    `analysis.walks.check_and_layout` for both from one pass). `progress(done, total)` counts
    distinct L2 tables read; `cancelled()` is polled between batches and raises `Cancelled`.
    """
    walk = RefWalk(img)
    lay = walk.run([layout_consumer(img, walk)], progress, cancelled)[0]
    assert isinstance(lay, Layout)
    return lay


def layout_consumer(img: Image, walk: RefWalk) -> BatchConsumer:
    """layout as a consumer of the walk's L2 batches (see `RefWalk.run`); returns the `Layout`."""
    h = img.header
    cs = h.cluster_size
    w = _Walker(img)
    snapshot_ids = [sn.id_str for sn in img.snapshots]
    w.note("invalid snapshot L1 tables", len(walk.bad_snapshots))
    for rr in walk.ranges:
        if rr.kind == RefKind.HEADER:
            w.claim_range(rr.offset, rr.size, Owner.HEADER, rr.source)
    for grp in walk.groups:  # each distinct L1 table once, referenced by every tree using it
        if grp.size:
            kind_l1 = Owner.L1 if grp.active else Owner.SNAPSHOT_L1
            w.claim_range(grp.offset, grp.size * 8, kind_l1, grp.sources[0], weight=len(grp.sources),
                          multi=len(grp.sources) > 1,
                          flag=(F_LIVE if grp.active else 0) | (F_SNAPSHOT if grp.snapshots else 0))
    for grp in walk.groups:
        times = len(grp.sources)
        w.note("L1 entries with reserved bits", times * int(np.count_nonzero((grp.entries & np.uint64(
            C.L1E_RESERVED_MASK)) != 0)))
        w.note("unaligned L2 table offsets", times * int(np.count_nonzero(grp.l2_offsets()[1] % cs)))
    tables = walk.tables
    # Per distinct table: the tree that reaches it first, whether several trees do, its flag bits.
    first_src = np.array([walk.trees[t][0] for t in (tables.first_rank // RANK_TREE).tolist()], np.int32)
    multi_tab = ((tables.active_refs > 0).astype(np.int64) + tables.snapshots) > 1
    flag_tab = (np.where(tables.active_refs > 0, F_LIVE, 0) | np.where(tables.snapshots > 0, F_SNAPSHOT, 0)
                ).astype(np.uint8)
    snaps = _SnapshotCounts(w.nb, walk) if img.snapshots else None
    if snaps is not None:
        snaps.add_l1_tables()
    # The tables themselves (check's add_range(offset, cluster_size): two clusters when unaligned).
    t_all = np.arange(len(tables), dtype=np.int64)
    first = tables.offsets // cs
    last = (tables.offsets + cs - 1) // cs
    for cl, sel in ((first, t_all), (last[last != first], t_all[last != first])):
        w.claim(cl, Owner.L2, first_src[sel], weights=tables.refs[sel],
                multi=multi_tab[sel], flag=flag_tab[sel])
        if snaps is not None:
            snaps.add(cl, sel)
    run_parts: list[_DataRuns] = []
    comp_parts: list[_Compressed] = []
    partial: list[tuple[I64, U64]] = []
    ctx = _TableInfo(first_src, multi_tab, flag_tab, snaps)
    while (batch := (yield)) is not None:
        r, c, p = _walk_l2_batch(img, w, walk, batch, ctx)
        run_parts.append(r)
        comp_parts.append(c)
        if p is not None:
            partial.append(p)
    runs = _merge_runs(run_parts)
    comps = _Compressed(*(np.concatenate([getattr(c, f) for c in comp_parts]) if comp_parts
                          else np.zeros(0, np.int64) for f in ("first", "last", "guest", "table")))
    comp_per_table = np.bincount(comps.table, minlength=len(tables)).astype(np.int64)
    snap_count, snap_last = snaps.finish() if snaps is not None else (None, None)

    # Everything else check counts.
    others = {RefKind.SNAPSHOT_TABLE: Owner.SNAPSHOT_TABLE, RefKind.REFCOUNT_TABLE: Owner.REFCOUNT_TABLE,
              RefKind.LUKS: Owner.LUKS, RefKind.BITMAP_DIRECTORY: Owner.BITMAP_DIRECTORY,
              RefKind.BITMAP_TABLE: Owner.BITMAP_TABLE}
    for rr in walk.ranges:
        if rr.kind in others:
            w.claim_range(rr.offset, rr.size, others[rr.kind])
    for bt in walk.bitmap_tables:  # each distinct table once, counted for every bitmap using it
        table = bt.table
        times = len(bt.bitmaps)
        offs_b = table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
        bad = ((table & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
            (offs_b != 0) & (((table & np.uint64(1)) != 0) | ((offs_b % np.uint64(cs)) != 0)))
        w.note("invalid bitmap table entries", times * int(np.count_nonzero(bad)))
        good = (offs_b[~bad & (offs_b != 0)] // np.uint64(cs)).astype(np.int64)
        w.claim(good, Owner.BITMAP_DATA, SRC_NONE, weights=np.full(len(good), times, np.int64) if times > 1 else None)
    bitmap_tables = [walk.bitmap_tables[t].table for t in walk.bitmap_of]

    # Reference counts as check computes them (before refcount blocks).
    # References to whole clusters at or past the end of the file: check refuses to count them
    # (a region ending a cluster or more past the end); they are only noted.
    refs_past_eof = int(sum(len(f) for f in w.far))
    w.far = []
    nb_counted = w.nb
    counts = w.counts

    # Refcount blocks (check_refblocks): counted once more, claimed as refcount blocks.
    rt = img.refcount_table
    rt_u = rt & np.uint64(C.REFT_OFFSET_MASK)
    # An offset >= 2^62 lies past any file: clamp it (keeping its alignment) so int64 cannot overflow.
    rt_off = np.where(rt_u >= np.uint64(1 << 62), np.uint64(1 << 62) | (rt_u & np.uint64(cs - 1)),
                      rt_u).astype(np.int64)
    rt_ok = (rt != 0) & ((rt & np.uint64(C.REFT_RESERVED_MASK)) == 0) & ((rt_off % cs) == 0) & (rt_off != 0)
    w.note("refcount table entries with reserved bits", int(np.count_nonzero((rt & np.uint64(C.REFT_RESERVED_MASK))
                                                                             != 0)))
    w.note("unaligned refcount block offsets", int(np.count_nonzero((rt != 0) & ((rt_off % cs) != 0))))
    rb_clusters = rt_off[rt_ok] // cs
    rb_in = rb_clusters[rb_clusters < nb_counted]
    w.note("refcount blocks outside the image", int(len(rb_clusters) - len(rb_in)))
    np.add.at(counts, rb_in, 1)
    w.claim(rb_clusters, Owner.REFCOUNT_BLOCK, SRC_NONE, count_ref=False)
    # qcow2_inc_refcounts_imrt never counts past the refcount maximum (check reports the overflow).
    if h.refcount_bits < 32:  # (a wider maximum is past what the 32-bit counts hold)
        np.minimum(counts, (1 << h.refcount_bits) - 1, out=counts)

    # Stored refcounts and the image end (check's compare_refcounts).
    # in the image's refcount width (uint16 by default): a quarter of uint64's memory on big files
    stored, bad_blocks = img.stored_refcounts_compact(nb_counted)
    per = h.refcount_block_entries
    counts_u = counts
    in_use = (stored > 0) | (counts_u > 0)
    over = stored > counts_u
    under = stored < counts_u
    if bad_blocks:  # clusters under unreadable refcount blocks are left out, as check does
        readable = np.ones(nb_counted, dtype=bool)
        for bi in bad_blocks:
            readable[bi * per : min((bi + 1) * per, nb_counted)] = False
        in_use &= readable
        over &= readable
        under &= readable
    # the last cluster in use, without listing them all (16 Mi indices on a preallocated 1 TiB image)
    highest = len(in_use) - 1 - int(np.argmax(in_use[::-1])) if in_use.any() else 0
    image_end = (highest + 1) * cs
    leaks = int(np.count_nonzero(over))
    errors = int(np.count_nonzero(under))
    del in_use, over, under
    # The references per cluster, as the layout keeps them; the 64-bit counts go now, before the
    # owner arrays below are built (peak memory on big files).
    reference = counts[: w.nb]  # already 32-bit: no copy
    del counts, counts_u
    w.counts = np.zeros(0, np.uint32)

    # Final owners.
    nb = w.nb
    kind = w.kind
    st = stored[:nb]
    end_cluster = min(nb, -(-image_end // cs))
    unclaimed = kind == UNSET
    leaked = unclaimed & (st > 0)
    kind[leaked] = Owner.LEAKED
    hole = unclaimed & ~leaked
    kind[:end_cluster][hole[:end_cluster]] = Owner.FREE
    kind[end_cluster:][hole[end_cluster:]] = Owner.PAST_END
    owner = kind.copy()
    if w.shared is not None:
        owner[w.shared] = Owner.SHARED
    owner[w.conflict] = Owner.CONFLICT

    flags = w.flags
    pc = np.zeros(0, np.int64)
    pb = np.zeros(0, np.uint64)
    if partial:
        pc_all = np.concatenate([p[0] for p in partial])
        pb_all = np.concatenate([p[1] for p in partial])
        pc, first = np.unique(pc_all, return_index=True)
        pb = pb_all[first]
        keep = pc < nb
        pc, pb = pc[keep], pb[keep]

    return Layout(
        path=img.path, cluster_size=cs, file_size=img.file.size, owner=owner, kind=kind, flags=flags,
        reference=reference, stored_refcount=st, image_end_offset=image_end,
        snapshot_ids=snapshot_ids, snapshot_count=snap_count, snapshot_last=snap_last,
        partial_clusters=pc, partial_bitmaps=pb,
        l2_reads=walk.l1_entries(), refcount_blocks=int(np.count_nonzero(rt_ok)), leaks=leaks, refcount_errors=errors,
        anomalies=w.anomalies, refs_past_eof=refs_past_eof, refs_end=w.top * cs,
        _walk=walk, _runs=runs, _compressed=comps, _comp_per_table=comp_per_table, _header=h,
        _snapshots=img.snapshots, _snapshot_table_size=img.snapshot_table.size,
        _refcount_table=img.refcount_table, _bitmaps=list(img.bitmaps) if h.bitmaps_ext is not None else [],
        _bitmap_tables=bitmap_tables,
    )


@dataclass
class _TableInfo:
    """Per distinct L2 table: first tree reaching it, reached by several trees, flag bits."""

    first_src: npt.NDArray[np.int32]
    multi: BoolArray
    flag: U8
    snaps: _SnapshotCounts | None


def _walk_l2_batch(img: Image, w: _Walker, walk: RefWalk, batch: L2Batch, ctx: _TableInfo
                   ) -> tuple[_DataRuns, _Compressed, tuple[I64, U64] | None]:
    """Claim everything the distinct L2 tables of `batch` point to, once per table, weighted by the
    L1 entries naming each table."""
    h = img.header
    cs = h.cluster_size
    fmt = img.l2_format
    n = h.l2_size
    tables = walk.tables
    entries = batch.entries
    bitmaps = batch.bitmaps if batch.bitmaps is not None else np.zeros(len(entries), dtype=np.uint64)
    ntab = len(batch.ids)
    tab_of = np.repeat(batch.ids, n)  # distinct table id of each entry
    rel = np.tile(np.arange(n, dtype=np.int64), ntab)  # entry index inside its table
    w_tab = tables.refs
    ctypes = classify_clusters(entries, fmt)
    comp = ctypes == ClusterType.COMPRESSED
    w.note("L2 entries with reserved bits",
           int((w_tab[tab_of] * (~comp & ((entries & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0))).sum()))

    def claim(clusters: I64, kind: Owner, tids: I64) -> None:
        w.claim(clusters, kind, ctx.first_src[tids], weights=w_tab[tids], multi=ctx.multi[tids], flag=ctx.flag[tids])
        if ctx.snaps is not None:
            ctx.snaps.add(clusters, tids)

    # Compressed clusters: every host cluster their bytes touch.
    comps = _Compressed.empty()
    ci = np.flatnonzero(comp)
    if len(ci):
        ce = entries[ci] & ~np.uint64(C.QCOW_OFLAG_COPIED)
        if h.has_data_file:
            w.note("compressed clusters with a data file", int(w_tab[tab_of[ci]].sum()))
            ci = ci[:0]
            ce = ce[:0]
        badbm = bitmaps[ci] != 0
        w.note("compressed clusters with a subcluster bitmap", int(w_tab[tab_of[ci[badbm]]].sum()))
        ci, ce = ci[~badbm], ce[~badbm]
        coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
        nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
        csize = nsec * 512 - (coff & 511)
        cfirst = coff // cs
        clast = (coff + csize - 1) // cs
        cnt = clast - cfirst + 1
        spans = np.repeat(cfirst, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        claim(spans, Owner.COMPRESSED, np.repeat(tab_of[ci], cnt))
        comps = _Compressed(cfirst, clast, rel[ci], tab_of[ci])

    # Standard allocated clusters (NORMAL and ZERO_ALLOC).
    runs = _DataRuns.empty()
    part: tuple[I64, U64] | None = None
    ai = np.flatnonzero((ctypes == ClusterType.NORMAL) | (ctypes == ClusterType.ZERO_ALLOC))
    if len(ai):
        ae, ab = entries[ai], bitmaps[ai]
        ta = tab_of[ai]
        off = (ae & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        w.note("unaligned data cluster offsets", int(w_tab[ta[(off % cs) != 0]].sum()))
        if h.extended_l2:
            alloc = ab & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
            zero = ab >> np.uint64(32)
            w.note("invalid subcluster bitmaps", int(w_tab[ta[(alloc & zero) != 0]].sum()))
            full = np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
            is_zero = zero == full
            is_data = (alloc == full) & (zero == 0)
        else:
            is_zero = ctypes[ai] == ClusterType.ZERO_ALLOC
            is_data = ~is_zero
        hc = off // cs
        if not h.has_data_file:
            claim(hc, Owner.DATA, ta)
            act = tables.active_refs[ta] > 0
            ok = (hc >= 0) & (hc < w.nb) & act
            w.flags[hc[ok & is_data]] |= np.uint8(F_DATA)
            w.flags[hc[ok & is_zero]] |= np.uint8(F_ZERO)
            mixed = ok & ~is_data & ~is_zero
            if mixed.any():
                w.flags[hc[mixed]] |= np.uint8(F_PARTIAL)
                part = (hc[mixed], ab[mixed])
        if h.has_data_file:
            return runs, comps, part  # host offsets are in the data file, not in this file
        g = rel[ai]
        z = is_zero
        brk = np.ones(len(ai), dtype=bool)
        if len(ai) > 1:
            brk[1:] = (hc[1:] != hc[:-1] + 1) | (g[1:] != g[:-1] + 1) | (z[1:] != z[:-1]) | (ta[1:] != ta[:-1])
        starts = np.flatnonzero(brk)
        lengths = np.diff(np.append(starts, len(ai)))
        runs = _DataRuns(hc[starts], g[starts], lengths.astype(np.int64), z[starts], ta[starts])

    # Unallocated clusters with allocation bits (extended L2): invalid.
    if h.extended_l2:
        bad_u = (ctypes == ClusterType.UNALLOCATED) & ((bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
        w.note("invalid subcluster bitmaps", int(w_tab[tab_of[bad_u]].sum()))
    return runs, comps, part


def _merge_runs(parts: list[_DataRuns]) -> _DataRuns:
    """Concatenate a tree's runs, sorted by host cluster, and note whether they overlap."""
    if not parts:
        return _DataRuns.empty()
    host = np.concatenate([p.host for p in parts])
    guest = np.concatenate([p.guest for p in parts])
    length = np.concatenate([p.length for p in parts])
    zero = np.concatenate([p.zero for p in parts])
    table = np.concatenate([p.table for p in parts])
    order = np.argsort(host, kind="stable")
    host, guest, length, zero, table = host[order], guest[order], length[order], zero[order], table[order]
    disjoint = bool(len(host) < 2 or np.all(host[1:] >= host[:-1] + length[:-1]))
    return _DataRuns(host, guest, length, zero, table, disjoint)


__all__ = ["F_DATA", "F_LIVE", "F_PARTIAL", "F_SNAPSHOT", "F_ZERO", "Layout", "Owner", "Reference",
           "ReferenceKind", "compute_layout"]
