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

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import BME_MAX_TABLE_SIZE, Bitmap, read_bitmap_table
from qinspect.qcow2.fields import QCOW2_BITMAP_HEADER_EXT, QCOW2_CRYPTO_HEADER_EXT, QCOW_HEADER
from qinspect.qcow2.header import Header
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import ClusterType, classify_clusters
from qinspect.qcow2.snapshots import Snapshot

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

UNSET = 255
# Sources of a claim: structures outside any L1 tree, the active L1 tree, snapshot k's tree (k+1).
SRC_NONE = -1
SRC_ACTIVE = 0

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


@dataclass(frozen=True)
class Reference:
    """One table entry (or header field) that points into a host cluster.

    `kind` is one of: "l2-entry" (data or compressed cluster), "l1-entry" (L2 table),
    "header-field" (active L1, refcount table, snapshot table), "snapshot-table-entry" (a snapshot's
    L1), "refcount-table-entry" (refcount block), "header-extension" (bitmap directory, LUKS
    region), "bitmap-directory-entry" (bitmap table), "bitmap-table-entry" (bitmap data).
    `table_offset` is the file offset of the table holding the entry, `entry_file_offset` that of the
    entry itself; `guest_offset` is the guest byte mapped (first byte of the range for L1 entries);
    `snapshot` is the id of the snapshot whose L1 tree the entry belongs to.
    """

    kind: str
    table_offset: int
    entry_index: int
    entry_file_offset: int
    guest_offset: int | None = None
    snapshot: str | None = None


@dataclass
class _DataRuns:
    """Runs of allocated (NORMAL / ZERO_ALLOC) L2 entries of one L1 tree, host and guest contiguous."""

    host: I64  # first host cluster index
    guest: I64  # first guest cluster index
    length: I64
    zero: BoolArray  # run of ZERO_ALLOC entries
    disjoint: bool = True  # runs sorted by host do not overlap: lookups are one binary search

    @staticmethod
    def empty() -> _DataRuns:
        z = np.zeros(0, np.int64)
        return _DataRuns(z, z.copy(), z.copy(), np.zeros(0, bool))


@dataclass
class _Compressed:
    """Compressed L2 entries of one L1 tree: host cluster span and guest cluster."""

    first: I64
    last: I64
    guest: I64

    @staticmethod
    def empty() -> _Compressed:
        z = np.zeros(0, np.int64)
        return _Compressed(z, z.copy(), z.copy())


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
    stored_refcount: U64
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
    _l1: list[U64] = field(default_factory=list, repr=False)
    _l1_offsets: list[int] = field(default_factory=list, repr=False)
    _runs: list[_DataRuns] = field(default_factory=list, repr=False)
    _compressed: list[_Compressed] = field(default_factory=list, repr=False)
    _header: Header | None = field(default=None, repr=False)
    _snapshots: list[Snapshot] = field(default_factory=list, repr=False)
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
        idx = np.flatnonzero(only)
        who = self.snapshot_last[idx]
        for k, sid in enumerate(self.snapshot_ids):
            out[sid] = idx[who == k].astype(np.int64)
        return out

    def active_data_runs(self) -> tuple[I64, I64, I64, BoolArray]:
        """(host cluster, guest cluster, length, zero) of the active L1 tree's allocated runs,
        sorted by guest offset."""
        r = self._runs[0] if self._runs else _DataRuns.empty()
        order = np.argsort(r.guest, kind="stable")
        return r.host[order], r.guest[order], r.length[order], r.zero[order]

    def compressed_count(self, source: int = SRC_ACTIVE) -> int:
        """Compressed L2 entries in one L1 tree (0 = active, k+1 = snapshot k)."""
        return len(self._compressed[source].guest) if source < len(self._compressed) else 0

    # -- reverse lookup --------------------------------------------------------------------------------
    def references(self, host_offset: int) -> list[Reference]:
        """Every table entry or header field that points into the cluster holding `host_offset`.

        Answered from what the layout walk kept in memory: no I/O, safe from any thread.
        """
        cs = self.cluster_size
        hc = host_offset // cs
        h = self._header
        out: list[Reference] = []
        if h is None or host_offset < 0:
            return out
        snapshots = self._snapshots
        lo, hi = hc * cs, (hc + 1) * cs

        def covers(off: int, length: int) -> bool:
            return length > 0 and off < hi and off + length > lo

        if covers(h.l1_table_offset, h.l1_size * 8):
            out.append(Reference("header-field", 0, 0, QCOW_HEADER.offset("l1_table_offset")))
        if covers(h.refcount_table_offset, h.refcount_table_entries * 8):
            out.append(Reference("header-field", 0, 0, QCOW_HEADER.offset("refcount_table_offset")))
        if snapshots and covers(h.snapshots_offset, self._snapshot_table_size):
            out.append(Reference("header-field", 0, 0, QCOW_HEADER.offset("snapshots_offset")))
        for sn in snapshots:
            if covers(sn.l1_table_offset, sn.l1_size * 8):
                out.append(Reference("snapshot-table-entry", h.snapshots_offset, sn.index, sn.entry_offset,
                                     None, sn.id_str))
        for ext in h.extensions:
            if ext.magic == C.QCOW2_EXT_MAGIC_BITMAPS and h.bitmaps_ext is not None and covers(
                    h.bitmaps_ext.bitmap_directory_offset, h.bitmaps_ext.bitmap_directory_size):
                out.append(Reference("header-extension", ext.offset, 0,
                                     ext.data_offset + QCOW2_BITMAP_HEADER_EXT.offset("bitmap_directory_offset")))
            if ext.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER and h.crypto_ext is not None and covers(
                    h.crypto_ext.offset, h.crypto_ext.length):
                out.append(Reference("header-extension", ext.offset, 0,
                                     ext.data_offset + QCOW2_CRYPTO_HEADER_EXT.offset("offset")))
        rt = self._refcount_table
        if len(rt):
            offs = rt & np.uint64(C.REFT_OFFSET_MASK)
            for i in np.flatnonzero((offs // np.uint64(cs)) == np.uint64(hc)):
                if int(offs[i]):
                    out.append(Reference("refcount-table-entry", h.refcount_table_offset, int(i),
                                         h.refcount_table_offset + 8 * int(i)))
        if h.bitmaps_ext is not None and h.bitmaps_consistent:
            for bi, bm in enumerate(self._bitmaps):
                if covers(bm.bitmap_table_offset, bm.bitmap_table_size * 8):
                    out.append(Reference("bitmap-directory-entry", h.bitmaps_ext.bitmap_directory_offset, bi,
                                         bm.entry_offset))
                if bi < len(self._bitmap_tables):
                    t = self._bitmap_tables[bi] & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
                    for j in np.flatnonzero((t != 0) & ((t // np.uint64(cs)) == np.uint64(hc))):
                        out.append(Reference("bitmap-table-entry", bm.bitmap_table_offset, int(j),
                                             bm.bitmap_table_offset + 8 * int(j)))
        l2_size, l2e = h.l2_size, h.l2_entry_size
        for s, l1 in enumerate(self._l1):
            sid = None if s == 0 else self.snapshot_ids[s - 1]
            l1_off = self._l1_offsets[s]
            offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
            hit = (l1 != 0) & (offs < hi) & (offs + cs > lo)
            for i in np.flatnonzero(hit):
                out.append(Reference("l1-entry", l1_off, int(i), l1_off + 8 * int(i), int(i) * l2_size * cs, sid))
            for gc in self._guest_clusters_at(s, hc):
                li, ei = gc // l2_size, gc % l2_size
                table = int(l1[li]) & C.L1E_OFFSET_MASK if li < len(l1) else 0
                out.append(Reference("l2-entry", table, ei, table + ei * l2e, gc * cs, sid))
        return out

    def _guest_clusters_at(self, source: int, hc: int) -> list[int]:
        """Guest clusters of L1 tree `source` whose L2 entries point into host cluster `hc`."""
        found: list[int] = []
        if source < len(self._runs):
            r = self._runs[source]
            if len(r.host):
                if r.disjoint:
                    k = int(np.searchsorted(r.host, hc, side="right")) - 1
                    cand = np.array([k], dtype=np.int64) if k >= 0 else np.zeros(0, np.int64)
                else:
                    cand = np.flatnonzero(r.host <= hc)
                for k in cand:
                    h0, n = int(r.host[k]), int(r.length[k])
                    if h0 <= hc < h0 + n:
                        found.append(int(r.guest[k]) + hc - h0)
        if source < len(self._compressed):
            c = self._compressed[source]
            found.extend(int(g) for g in c.guest[(c.first <= hc) & (c.last >= hc)])
        return sorted(found)


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
        self.refs: list[I64] = []
        self.source_claims: list[I64] = []  # claims of the snapshot tree being walked
        self.anomalies: dict[str, int] = {}

    def note(self, what: str, n: int = 1) -> None:
        if n:
            self.anomalies[what] = self.anomalies.get(what, 0) + n

    def claim(self, clusters: I64, kind: Owner, source: int, count_ref: bool = True) -> None:
        """Record that `clusters` are used as `kind` by `source` (SRC_NONE, SRC_ACTIVE or k+1)."""
        if not len(clusters):
            return
        clusters = clusters.astype(np.int64, copy=False)
        if count_ref:
            self.refs.append(clusters)
        if source > SRC_ACTIVE:
            self.source_claims.append(clusters)
        c = clusters[(clusters >= 0) & (clusters < self.nb)]
        if not len(c):
            return
        cur = self.kind[c]
        unset = cur == UNSET
        new = c[unset]
        self.kind[new] = kind
        if self.src is not None:
            self.src[new] = source
        old = c[~unset]
        if len(old):
            diff_kind = cur[~unset] != kind
            self.conflict[old[diff_kind]] = True
            if self.src is not None and self.shared is not None:
                same = old[~diff_kind]
                self.shared[same[self.src[same] != source]] = True
        self.flags[c] |= np.uint8(F_SNAPSHOT if source > SRC_ACTIVE else F_LIVE)

    def claim_range(self, offset: int, size: int, kind: Owner, source: int = SRC_NONE) -> None:
        """Claim the clusters covering bytes [offset, offset+size) (check's add_range)."""
        if size <= 0:
            return
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        limit = self.nb + (1 << 22)  # as check: never allocate in proportion to a size read from the file
        if last >= limit:
            self.note("structures claimed to extend far past the end of the file")
            last = max(first, limit - 1) if first < limit else first
        self.claim(np.arange(first, last + 1, dtype=np.int64), kind, source)


def compute_layout(img: Image, progress: ProgressFn = no_progress,
                   cancelled: CancelledFn = never_cancelled) -> Layout:
    """Walk every structure of `img` and return the owner of each host cluster of its file.

    `progress(done, total)` counts L2 tables read over all L1 tables; `cancelled()` is polled
    between batches and raises `Cancelled`.
    """
    h = img.header
    cs = h.cluster_size
    w = _Walker(img)
    w.claim_range(0, cs, Owner.HEADER)

    # L1 tables: the active one and each snapshot's (as check accepts them).
    l1s: list[U64] = []
    l1_offsets: list[int] = []
    sources: list[int] = []
    snapshot_ids = [sn.id_str for sn in img.snapshots]
    l1s.append(img.l1_table)
    l1_offsets.append(h.l1_table_offset)
    sources.append(SRC_ACTIVE)
    for k, sn in enumerate(img.snapshots):
        ok = sn.l1_table_offset % cs == 0 and sn.l1_size <= C.QCOW_MAX_L1_SIZE // 8
        if not ok:
            w.note("invalid snapshot L1 tables")
        tbl = img.snapshot_l1_table(k) if ok and sn.l1_size else np.zeros(0, np.uint64)
        l1s.append(tbl)
        l1_offsets.append(sn.l1_table_offset)
        sources.append(k + 1)
    has_snapshots = bool(img.snapshots)
    snap_count = np.zeros(w.nb, dtype=np.uint16) if has_snapshots else None
    snap_last = np.full(w.nb, -1, dtype=np.int32) if has_snapshots else None

    def l2_offsets_of(l1: U64) -> tuple[I64, I64]:
        # Like check_refcounts_l1: every non-zero entry names an L2 table, even when only flag
        # bits are set (its table is then "at" offset 0, over the header).
        idx = np.flatnonzero(l1)
        return idx, (l1[idx] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)

    total_tables = sum(len(l2_offsets_of(t)[0]) for t in l1s)
    done = 0
    runs: list[_DataRuns] = []
    comps: list[_Compressed] = []
    partial: list[tuple[I64, U64]] = []
    for s, l1 in enumerate(l1s):
        src = sources[s]
        w.source_claims = []
        kind_l1 = Owner.L1 if src == SRC_ACTIVE else Owner.SNAPSHOT_L1
        if len(l1):
            w.claim_range(l1_offsets[s], len(l1) * 8, kind_l1, src)
        reserved = int(np.count_nonzero((l1 & np.uint64(C.L1E_RESERVED_MASK)) != 0))
        w.note("L1 entries with reserved bits", reserved)
        idx, offs = l2_offsets_of(l1)
        w.note("unaligned L2 table offsets", int(np.count_nonzero(offs % cs)))
        batch = max(1, (1 << 20) // h.l2_size)
        run_parts: list[_DataRuns] = []
        comp_parts: list[_Compressed] = []
        for b in range(0, len(offs), batch):
            if cancelled():
                raise Cancelled()
            r, c, p = _walk_l2_batch(img, w, idx[b : b + batch], offs[b : b + batch], src)
            run_parts.append(r)
            comp_parts.append(c)
            if p is not None:
                partial.append(p)
            done += len(offs[b : b + batch])
            progress(done, total_tables)
        runs.append(_merge_runs(run_parts))
        comps.append(_Compressed(*(np.concatenate([getattr(c, f) for c in comp_parts]) if comp_parts
                                   else np.zeros(0, np.int64) for f in ("first", "last", "guest"))))
        if src > SRC_ACTIVE and snap_count is not None and snap_last is not None and w.source_claims:
            u = np.unique(np.concatenate(w.source_claims))
            u = u[(u >= 0) & (u < w.nb)]
            snap_count[u] += np.uint16(1)
            snap_last[u] = src - 1
        w.source_claims = []
    progress(total_tables, total_tables)

    # Everything else check counts.
    if img.snapshots:
        w.claim_range(h.snapshots_offset, img.snapshot_table.size, Owner.SNAPSHOT_TABLE)
    w.claim_range(h.refcount_table_offset, len(img.refcount_table) * 8, Owner.REFCOUNT_TABLE)  # as read
    if h.crypto_ext is not None:
        w.claim_range(h.crypto_ext.offset, h.crypto_ext.length, Owner.LUKS)
    bitmap_tables: list[U64] = []
    if h.bitmaps_ext is not None and h.bitmaps_consistent:
        w.claim_range(h.bitmaps_ext.bitmap_directory_offset,
                      min(h.bitmaps_ext.bitmap_directory_size, C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE),
                      Owner.BITMAP_DIRECTORY)
        for bm in img.bitmaps:
            w.claim_range(bm.bitmap_table_offset, min(bm.bitmap_table_size, BME_MAX_TABLE_SIZE) * 8, Owner.BITMAP_TABLE)
            table = read_bitmap_table(img.file, bm)
            bitmap_tables.append(table)
            offs_b = table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
            bad = ((table & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
                (offs_b != 0) & (((table & np.uint64(1)) != 0) | ((offs_b % np.uint64(cs)) != 0)))
            w.note("invalid bitmap table entries", int(np.count_nonzero(bad)))
            good = offs_b[~bad & (offs_b != 0)]
            w.claim((good // np.uint64(cs)).astype(np.int64), Owner.BITMAP_DATA, SRC_NONE)

    # Reference counts as check computes them (before refcount blocks).
    allrefs = np.concatenate(w.refs) if w.refs else np.zeros(0, np.int64)
    w.refs = []
    top = int(allrefs.max()) + 1 if len(allrefs) else 0
    nb_counted = max(w.nb, min(top, w.nb + (1 << 22)))  # check grows its table past the file, bounded
    refs_past_eof = 0
    if top > w.nb:
        beyond = allrefs >= w.nb
        refs_past_eof = int(np.count_nonzero(beyond))
        allrefs = allrefs[~beyond | (allrefs < nb_counted)]
    counts = np.bincount(allrefs, minlength=nb_counted) if len(allrefs) else np.zeros(nb_counted, np.int64)
    del allrefs

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

    # Stored refcounts and the image end (check's compare_refcounts).
    stored, bad_blocks = img.stored_refcounts(nb_counted)
    per = h.refcount_block_entries
    counts_u = counts.view(np.uint64)  # counts are never negative
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
    used = np.flatnonzero(in_use)
    highest = int(used[-1]) if len(used) else 0
    image_end = (highest + 1) * cs
    leaks = int(np.count_nonzero(over))
    errors = int(np.count_nonzero(under))
    del in_use, over, under, used

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

    reference = counts[:nb].astype(np.uint32)
    return Layout(
        path=img.path, cluster_size=cs, file_size=img.file.size, owner=owner, kind=kind, flags=flags,
        reference=reference, stored_refcount=st, image_end_offset=image_end,
        snapshot_ids=snapshot_ids, snapshot_count=snap_count, snapshot_last=snap_last,
        partial_clusters=pc, partial_bitmaps=pb,
        l2_reads=total_tables, refcount_blocks=int(np.count_nonzero(rt_ok)), leaks=leaks, refcount_errors=errors,
        anomalies=w.anomalies, refs_past_eof=refs_past_eof, refs_end=top * cs,
        _l1=l1s, _l1_offsets=l1_offsets, _runs=runs, _compressed=comps, _header=h,
        _snapshots=list(img.snapshots), _snapshot_table_size=img.snapshot_table.size,
        _refcount_table=img.refcount_table, _bitmaps=list(img.bitmaps) if h.bitmaps_ext is not None else [],
        _bitmap_tables=bitmap_tables,
    )


def _walk_l2_batch(img: Image, w: _Walker, l1_idx: I64, offs: I64, src: int
                   ) -> tuple[_DataRuns, _Compressed, tuple[I64, U64] | None]:
    """Claim the L2 tables at `offs` and everything their entries point to."""
    h = img.header
    cs = h.cluster_size
    fmt = img.l2_format
    n = h.l2_size
    kind_l2 = Owner.L2
    # The tables themselves (check's add_range(offset, cluster_size): two clusters when unaligned).
    first = offs // cs
    last = (offs + cs - 1) // cs
    w.claim(first, kind_l2, src)
    un = last != first
    if un.any():
        w.claim(last[un], kind_l2, src)
    # A table at or past the end of the file reads as zeros and points nowhere: do not read it.
    in_file = offs < img.file.size
    if not in_file.all():
        l1_idx, offs = l1_idx[in_file], offs[in_file]
    words = img.read_l2_tables(offs)
    if h.extended_l2:
        entries, bitmaps = words[0::2], words[1::2]
    else:
        entries, bitmaps = words, np.zeros(len(words), dtype=np.uint64)
    guest = np.repeat(l1_idx * n, n) + np.tile(np.arange(n, dtype=np.int64), len(offs))
    ctypes = classify_clusters(entries, fmt)
    comp = ctypes == ClusterType.COMPRESSED
    w.note("L2 entries with reserved bits",
           int(np.count_nonzero(~comp & ((entries & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0))))

    # Compressed clusters: every host cluster their bytes touch.
    comps = _Compressed.empty()
    ci = np.flatnonzero(comp)
    if len(ci):
        ce = entries[ci] & ~np.uint64(C.QCOW_OFLAG_COPIED)
        if h.has_data_file:
            w.note("compressed clusters with a data file", len(ci))
            ci = ci[:0]
            ce = ce[:0]
        badbm = bitmaps[ci] != 0
        w.note("compressed clusters with a subcluster bitmap", int(np.count_nonzero(badbm)))
        ci, ce = ci[~badbm], ce[~badbm]
        coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
        nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
        csize = nsec * 512 - (coff & 511)
        cfirst = coff // cs
        clast = (coff + csize - 1) // cs
        cnt = clast - cfirst + 1
        spans = np.repeat(cfirst, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        w.claim(spans, Owner.COMPRESSED, src)
        comps = _Compressed(cfirst, clast, guest[ci])

    # Standard allocated clusters (NORMAL and ZERO_ALLOC).
    runs = _DataRuns.empty()
    part: tuple[I64, U64] | None = None
    ai = np.flatnonzero((ctypes == ClusterType.NORMAL) | (ctypes == ClusterType.ZERO_ALLOC))
    if len(ai):
        ae, ab = entries[ai], bitmaps[ai]
        off = (ae & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        w.note("unaligned data cluster offsets", int(np.count_nonzero(off % cs)))
        if h.extended_l2:
            alloc = ab & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
            zero = ab >> np.uint64(32)
            w.note("invalid subcluster bitmaps", int(np.count_nonzero((alloc & zero) != 0)))
            full = np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
            is_zero = zero == full
            is_data = (alloc == full) & (zero == 0)
        else:
            is_zero = ctypes[ai] == ClusterType.ZERO_ALLOC
            is_data = ~is_zero
        hc = off // cs
        if not h.has_data_file:
            w.claim(hc, Owner.DATA, src)
            if src == SRC_ACTIVE:
                ok = (hc >= 0) & (hc < w.nb)
                w.flags[hc[ok & is_data]] |= np.uint8(F_DATA)
                w.flags[hc[ok & is_zero]] |= np.uint8(F_ZERO)
                mixed = ok & ~is_data & ~is_zero
                if mixed.any():
                    w.flags[hc[mixed]] |= np.uint8(F_PARTIAL)
                    part = (hc[mixed], ab[mixed])
        if h.has_data_file:
            return runs, comps, part  # host offsets are in the data file, not in this file
        g = guest[ai]
        z = is_zero
        brk = np.ones(len(ai), dtype=bool)
        if len(ai) > 1:
            brk[1:] = (hc[1:] != hc[:-1] + 1) | (g[1:] != g[:-1] + 1) | (z[1:] != z[:-1])
        starts = np.flatnonzero(brk)
        lengths = np.diff(np.append(starts, len(ai)))
        runs = _DataRuns(hc[starts], g[starts], lengths.astype(np.int64), z[starts])

    # Unallocated clusters with allocation bits (extended L2): invalid.
    if h.extended_l2:
        w.note("invalid subcluster bitmaps", int(np.count_nonzero(
            (ctypes == ClusterType.UNALLOCATED) & ((bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0))))
    return runs, comps, part


def _merge_runs(parts: list[_DataRuns]) -> _DataRuns:
    """Concatenate a tree's runs, sorted by host cluster, and note whether they overlap."""
    if not parts:
        return _DataRuns.empty()
    host = np.concatenate([p.host for p in parts])
    guest = np.concatenate([p.guest for p in parts])
    length = np.concatenate([p.length for p in parts])
    zero = np.concatenate([p.zero for p in parts])
    order = np.argsort(host, kind="stable")
    host, guest, length, zero = host[order], guest[order], length[order], zero[order]
    disjoint = bool(len(host) < 2 or np.all(host[1:] >= host[:-1] + length[:-1]))
    return _DataRuns(host, guest, length, zero, disjoint)


__all__ = ["F_DATA", "F_LIVE", "F_PARTIAL", "F_SNAPSHOT", "F_ZERO", "Layout", "Owner", "Reference",
           "compute_layout"]
