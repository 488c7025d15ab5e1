"""The one refcount walk: every reference of an image, each distinct table read once.

`qemu-img check` (QEMU's `qcow2_check_refcounts`) visits the header, every L1 tree (the active one
and each snapshot's), every L2 table of each tree, the snapshot table, the refcount table, the LUKS
region, the bitmaps and the refcount blocks, and counts one reference for each thing each of them
points at. `check` and `layout` both consume this walk (`RefWalk`); neither walks by itself.

What the walk yields:

- `ranges`: byte ranges referenced by a header field or a table entry (`RangeRef`: kind, source
  tree, offset, size): the header, each tree's L1 table, the snapshot table, the refcount table,
  the LUKS region, the bitmap directory and bitmap tables;
- `groups`: the distinct L1 tables (`L1Group`), each with the trees that use it (65,536 snapshots
  sharing one L1 table are one group of 65,536 trees, read once);
- `tables`: the distinct L2 tables (`L2Tables`: one row per table offset) with how many L1 entries
  name each one (in all trees, in the active tree), how many snapshots reach it and where it is
  first named in QEMU's walk order (so consumers can put per-table messages back in that order);
- `l2_batches()`: the distinct L2 tables' entries, a batch at a time, read through the planner in
  host order (one sweep of the file); consumers weight what a table points at by its reference
  counts instead of expanding it once per reference;
- `bitmap_tables`: the distinct bitmap tables, read once, each with the bitmaps that use it.

So the work is bounded by what is distinct in the file, never by what it claims or how often it is
shared; qemu-img's own limits (`QCOW_MAX_L1_SIZE`, `QCOW_MAX_SNAPSHOTS`, `QCOW2_MAX_BITMAPS`) bound
what is accepted at all.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property, lru_cache

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import BME_MAX_TABLE_SIZE, Bitmap, read_bitmap_table
from qinspect.qcow2.image import Image
from qinspect.qcow2.planner import Order, PieceStream

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]

BatchConsumer = Generator[None, "L2Batch | None", object]
"""A consumer of the walk (check's, layout's): primed with next(), sent every L2 batch, then None;
its return value is the result."""

SRC_NONE = -1
"""Source of a reference outside any L1 tree (header, refcount table, bitmaps, ...)."""
SRC_ACTIVE = 0
"""Source of the active L1 tree; snapshot k's tree is source k + 1."""
# Entries gathered per L2 batch: 64 Ki keeps the numpy temporaries in the CPU cache.
L2_BATCH_ENTRIES = 1 << 16
# At most this many bytes of (sparse, or run by run) L2 tables per batch.
L2_BATCH_BYTES = 2 << 20
# L1 entries handled at a time where a consumer looks at every entry (2 MiB per int64 array).
L1_CHUNK_ENTRIES = 1 << 18
# Rank of a reference in QEMU's walk order: tree * RANK_TREE + L1 index (L1 index < 2^22).
RANK_TREE = 1 << 23


class RefKind(IntEnum):
    """What a reference points at."""

    HEADER = 0
    L1_TABLE = 1
    SNAPSHOT_L1_TABLE = 2
    L2_TABLE = 3
    DATA = 4
    COMPRESSED = 5
    SNAPSHOT_TABLE = 6
    REFCOUNT_TABLE = 7
    REFCOUNT_BLOCK = 8
    LUKS = 9
    BITMAP_DIRECTORY = 10
    BITMAP_TABLE = 11
    BITMAP_DATA = 12


@dataclass(frozen=True)
class RangeRef:
    """A byte range referenced once: `kind`, the tree it belongs to (`source`), offset and size."""

    kind: RefKind
    offset: int
    size: int
    source: int = SRC_NONE


@dataclass
class L1Group:
    """One distinct L1 table (by offset and size) and the trees (sources) that use it."""

    offset: int
    entries: U64
    sources: list[int]
    size: int = 0
    """Entries claimed (the table as read may be shorter: past the end of the file)."""

    @property
    def active(self) -> bool:
        return SRC_ACTIVE in self.sources

    @property
    def snapshots(self) -> int:
        return sum(1 for s in self.sources if s > SRC_ACTIVE)

    @property
    def last_snapshot(self) -> int:
        """Index of the last snapshot using this table (-1 for none)."""
        return max((s - 1 for s in self.sources if s > SRC_ACTIVE), default=-1)

    def l2_offsets(self) -> tuple[I64, I64]:
        """(L1 index, L2 table offset) of every non-zero entry: like check_refcounts_l1, an entry with
        only flag bits set names a table at offset 0."""
        idx = np.flatnonzero(self.entries).astype(np.int64)
        return idx, (self.entries[idx] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)

    def l2_offset_chunks(self, step: int = L1_CHUNK_ENTRIES) -> Iterator[tuple[I64, I64]]:
        """`l2_offsets()` a chunk of `step` L1 entries at a time: the temporaries of an L1 table of
        millions of entries stay a few MiB (issue 10: memory by what is distinct, not by what is
        claimed)."""
        for c0 in range(0, len(self.entries), step):
            chunk = self.entries[c0 : c0 + step]
            idx = np.flatnonzero(chunk)
            yield (c0 + idx).astype(np.int64), (chunk[idx] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)


@dataclass
class L2Tables:
    """The distinct L2 tables (one row per exact table offset, ascending)."""

    offsets: I64
    refs: I64
    """L1 entries naming the table, over every tree (QEMU walks it that many times)."""
    active_refs: I64
    """L1 entries of the active tree naming it."""
    snapshots: I64
    """Snapshot trees that name it at least once."""
    last_snapshot: I64
    """Index of the last snapshot naming it (-1: none)."""
    first_rank: I64
    """Where QEMU's walk first reaches it: tree * RANK_TREE + L1 index."""
    first_active_rank: I64
    """The same within the active tree (-1: not in the active tree)."""
    group_pairs: tuple[I64, I64] = field(default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    """(table id, group id) of every distinct (table, L1 group) pair, sorted by table id."""

    def __len__(self) -> int:
        return len(self.offsets)

    def id_of(self, offsets: I64) -> I64:
        """Table ids of exact table offsets (which must be among `offsets`)."""
        return np.searchsorted(self.offsets, offsets).astype(np.int64)


class L2Batch:
    """Entries of some distinct L2 tables: `ids[k]`'s entries are entries[k*l2_size:(k+1)*l2_size].

    The tables' bytes are kept as read (big-endian); `used()` finds the entries that are not all
    zeros (an all-zero entry, bitmap included, is unallocated and points at nothing, so a consumer
    that only counts references can skip it) and decodes only those: the work of a batch of
    sparse tables is then proportional to the entries in use, not to the tables' size. `entries`
    and `bitmaps` decode every entry, for consumers that look at each one.
    """

    def __init__(self, ids: I64, offsets: I64, raw: U8, extended: bool) -> None:
        self.ids = ids
        self.offsets = offsets
        self.extended = extended
        self._raw = raw.view(">u8")
        self._swapped = raw.view(np.uint64)  # the same words unswapped: enough to tell zero from non-zero
        self._used: tuple[I64 | None, U64, U64 | None] | None = None
        self._dense_known = False  # every entry non-zero (found by `table_runs`)
        self.by_runs = False
        """Set by a consumer that judged the batch from its tables' runs (`table_runs`) rather than
        entry by entry: the walk then makes the next batches as large as it may (their cost is per
        batch, not per entry)."""

    def __len__(self) -> int:
        """Entries in the batch (tables x l2_size)."""
        return len(self._raw) // 2 if self.extended else len(self._raw)

    @cached_property
    def entries(self) -> U64:
        words = self._raw[0::2] if self.extended else self._raw
        return words.astype(np.uint64)

    @cached_property
    def bitmaps(self) -> U64 | None:
        return self._raw[1::2].astype(np.uint64) if self.extended else None

    def used_count(self) -> int:
        """How many entries `used()` returns (counted without decoding them)."""
        if self._used is not None:
            return len(self._used[1])
        return len(self) if self._dense() else int(np.count_nonzero(self._nonzero()))

    def table_runs(self, step: int) -> U64 | None:
        """The first entry `e` of each table when every table's entries are e, e + step,
        e + 2 * step, ... in order (standard entries only; None otherwise, and for extended ones).

        With `step` the cluster size: tables each mapping consecutive host clusters with the same
        flags in every entry (a preallocated or sequentially written image), which a consumer can
        then judge from two numbers a table instead of entry by entry. The answer costs one
        comparison of the bytes as read with the runs they would be (nothing decoded); most other
        batches are told apart by each table's last entry alone."""
        raw = self._raw
        ntab = len(self.ids)
        if self.extended or not len(raw) or not ntab or len(raw) % ntab:
            return None
        n = len(raw) // ntab
        tabs = raw.reshape(ntab, n)
        firsts = tabs[:, 0].astype(np.uint64)
        span = (n - 1) * step
        for first, last in zip(firsts.tolist(), tabs[:, n - 1].tolist(), strict=True):
            if first + span != last:  # (nor can a run wrap past 2^64)
                return None
        expect = np.empty((ntab, n), ">u8")  # the runs, big-endian like the bytes read
        np.add(firsts[:, None], _multiples(n, step)[None, :], out=expect)
        if not np.array_equal(expect.view(np.uint64), self._swapped.reshape(ntab, n)):
            return None
        self._dense_known = bool(firsts.all())  # (increasing from a non-zero first entry: none is zero)
        return firsts

    def _dense(self) -> bool:
        # Every entry non-zero (a minimum over the words: no temporary array)
        if self._dense_known:
            return True
        e = self._swapped[0::2] if self.extended else self._swapped
        return len(e) > 0 and int(e.min()) != 0

    def _nonzero(self) -> npt.NDArray[np.bool_]:
        # (a boolean array: np.flatnonzero on it is several times faster than on the words)
        w = self._swapped
        nz: npt.NDArray[np.bool_] = (w[0::2] != 0) | (w[1::2] != 0) if self.extended else np.not_equal(w, 0)
        return nz

    def used(self) -> tuple[I64 | None, U64, U64 | None]:
        """(positions, entries, bitmaps) of the entries that are not all zeros, in batch order;
        positions is None when every entry is used (dense tables: no index array)."""
        if self._used is None:
            e = self._raw[0::2] if self.extended else self._raw
            b = self._raw[1::2] if self.extended else None
            if self._dense():
                self._used = (None, e.astype(np.uint64), b.astype(np.uint64) if b is not None else None)
            else:
                pos = np.flatnonzero(self._nonzero()).astype(np.int64, copy=False)
                self._used = (pos, e[pos].astype(np.uint64), b[pos].astype(np.uint64) if b is not None else None)
        return self._used


@lru_cache(maxsize=4)
def _multiples(m: int, step: int) -> U64:
    """0, step, 2 * step, ... (m of them), read-only: the same few batch sizes come back at every batch."""
    out = np.arange(m, dtype=np.uint64) * np.uint64(step)
    out.flags.writeable = False
    return out


@dataclass
class BitmapTable:
    """One distinct bitmap table (offset, claimed entries) as read, and the bitmaps using it."""

    offset: int
    size: int
    table: U64
    bitmaps: list[int]


class RefWalk:
    """Every reference of `img`, each distinct structure once (see the module docstring).

    Building it reads the snapshot L1 tables and the bitmap tables; `l2_batches()` reads the L2
    tables. The L1 entries with problems (reserved bits, unaligned tables) are there to be judged
    by the consumer (`groups`).
    """

    def __init__(self, img: Image) -> None:
        self.img = img
        h = img.header
        cs = h.cluster_size
        self.ranges: list[RangeRef] = [RangeRef(RefKind.HEADER, 0, cs)]
        self.bad_snapshots: list[tuple[int, str]] = []  # (snapshot index, why its L1 is not walked)
        # L1 trees: the active one as read (empty when QEMU would refuse its size or offset), then
        # each snapshot's as check accepts it. Trees with the same (offset, size) share one group.
        self.trees: list[tuple[int, int, int]] = []  # (source, offset, size) of every tree walked
        by_key: dict[tuple[int, int], int] = {}
        self.groups: list[L1Group] = []
        self.tree_group: list[int] = []

        def add_tree(source: int, offset: int, size: int, table: U64 | None) -> None:
            key = (offset, size)
            g = by_key.get(key)
            if g is None:
                g = len(self.groups)
                by_key[key] = g
                self.groups.append(L1Group(offset, table if table is not None else img.read_entries(offset, size), [],
                                           size))
            self.groups[g].sources.append(source)
            self.trees.append((source, offset, size))
            self.tree_group.append(g)
            if size:
                kind = RefKind.L1_TABLE if source == SRC_ACTIVE else RefKind.SNAPSHOT_L1_TABLE
                self.ranges.append(RangeRef(kind, offset, size * 8, source))

        add_tree(SRC_ACTIVE, h.l1_table_offset, len(img.l1_table), img.l1_table)
        for k, sn in enumerate(img.snapshots):
            if sn.l1_table_offset % cs:
                self.bad_snapshots.append((k, "unaligned"))
                continue
            if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
                self.bad_snapshots.append((k, "too large"))
                continue
            add_tree(k + 1, sn.l1_table_offset, sn.l1_size, None)
        self.tables = self._distinct_tables()
        self._inside = np.zeros(0, np.int64)
        self.l2_sweep_dense = False
        """Whether `run`'s sweep of the L2 tables reads most of the file range it spans (set by run,
        before the consumers start): then what else they read ahead of it slows it down."""

        if img.snapshots:
            self.ranges.append(RangeRef(RefKind.SNAPSHOT_TABLE, h.snapshots_offset, img.snapshot_table.size))
        self.ranges.append(RangeRef(RefKind.REFCOUNT_TABLE, h.refcount_table_offset, len(img.refcount_table) * 8))
        if h.crypto_ext is not None:
            self.ranges.append(RangeRef(RefKind.LUKS, h.crypto_ext.offset, h.crypto_ext.length))
        self.bitmap_tables: list[BitmapTable] = []
        self.bitmap_of: list[int] = []  # per bitmap: index into bitmap_tables
        ext = h.bitmaps_ext
        if ext is not None and h.bitmaps_consistent:
            # sizes as far as the format allows (QEMU refuses larger ones at open)
            self.ranges.append(RangeRef(RefKind.BITMAP_DIRECTORY, ext.bitmap_directory_offset,
                                        min(ext.bitmap_directory_size, C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE)))
            seen: dict[tuple[int, int], int] = {}
            for bi, bm in enumerate(img.bitmaps):
                size = min(bm.bitmap_table_size, BME_MAX_TABLE_SIZE)
                self.ranges.append(RangeRef(RefKind.BITMAP_TABLE, bm.bitmap_table_offset, size * 8))
                key = (bm.bitmap_table_offset, size)
                t = seen.get(key)
                if t is None:  # a table shared by many bitmaps is read once
                    t = len(self.bitmap_tables)
                    seen[key] = t
                    self.bitmap_tables.append(BitmapTable(bm.bitmap_table_offset, size, read_bitmap_table(img.file, bm),
                                                          []))
                self.bitmap_tables[t].bitmaps.append(bi)
                self.bitmap_of.append(t)

    @property
    def bitmaps(self) -> list[Bitmap]:
        return self.img.bitmaps if self.bitmap_of else []

    def _distinct_tables(self) -> L2Tables:
        # Per distinct L1 table: its distinct L2 offsets, where each is first named and how often
        # (one unique per group: a million entries naming one table shrink to one row at once).
        parts_off: list[I64] = []
        parts_grp: list[I64] = []
        parts_rank: list[I64] = []
        parts_cnt: list[I64] = []
        first_tree: dict[int, int] = {}
        for t, g in enumerate(self.tree_group):
            first_tree.setdefault(g, t)
        step = L1_CHUNK_ENTRIES  # bounded temporaries for an L1 table of millions of entries
        for g, grp in enumerate(self.groups):
            for c0 in range(0, len(grp.entries), step):
                chunk = grp.entries[c0 : c0 + step]
                idx = np.flatnonzero(chunk)
                offs = (chunk[idx] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
                u, first, cnt = np.unique(offs, return_index=True, return_counts=True)
                del offs
                parts_off.append(u.astype(np.int64))
                parts_grp.append(np.full(len(u), g, np.int64))
                parts_rank.append(first_tree[g] * RANK_TREE + c0 + idx[first])
                parts_cnt.append(cnt.astype(np.int64))
        offs = np.concatenate(parts_off) if parts_off else np.zeros(0, np.int64)
        grp_of = np.concatenate(parts_grp) if parts_grp else np.zeros(0, np.int64)
        rank = np.concatenate(parts_rank) if parts_rank else np.zeros(0, np.int64)
        cnt_of = np.concatenate(parts_cnt) if parts_cnt else np.zeros(0, np.int64)
        uniq, inv = np.unique(offs, return_inverse=True)
        inv = inv.astype(np.int64).reshape(-1)
        n = len(uniq)
        ntrees = np.array([len(g.sources) for g in self.groups], np.int64)
        nsnap = np.array([g.snapshots for g in self.groups], np.int64)
        last = np.array([g.last_snapshot for g in self.groups], np.int64)
        active = np.array([g.active for g in self.groups], bool)
        refs = np.zeros(n, np.int64)
        np.add.at(refs, inv, ntrees[grp_of] * cnt_of)
        act_sel = active[grp_of] if len(grp_of) else np.zeros(0, bool)
        active_refs = np.zeros(n, np.int64)
        np.add.at(active_refs, inv[act_sel], cnt_of[act_sel])
        # Distinct (table, group) pairs: snapshots reaching each table, the last of them.
        ng = max(1, len(self.groups))
        key = np.sort(inv * ng + grp_of)
        key = key[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else key  # (np.unique: numpy.ma)
        pt, pg = key // ng, key % ng
        snapshots = np.zeros(n, np.int64)
        np.add.at(snapshots, pt, nsnap[pg])
        last_snapshot = np.full(n, -1, np.int64)
        np.maximum.at(last_snapshot, pt, last[pg])
        first_rank = np.full(n, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first_rank, inv, rank)
        first_active = np.full(n, np.iinfo(np.int64).max, np.int64)
        if act_sel.any():
            np.minimum.at(first_active, inv[act_sel], rank[act_sel])
        first_active[first_active == np.iinfo(np.int64).max] = -1
        return L2Tables(uniq.astype(np.int64), refs, active_refs, snapshots, last_snapshot, first_rank, first_active,
                        (pt.astype(np.int64), pg.astype(np.int64)))

    def l1_entries(self) -> int:
        """Non-zero L1 entries over every tree (the L2 tables a naive walk, and QEMU, reads)."""
        return sum(int(np.count_nonzero(g.entries)) * len(g.sources) for g in self.groups)

    def l2_batches(self, batch_entries: int = L2_BATCH_ENTRIES) -> Iterator[L2Batch]:
        """The distinct L2 tables inside the file, in host order, a batch at a time (tables at or past
        the end of the file read as zeros and point at nothing: they are not read or yielded)."""
        with self._l2_stream() as stream:
            yield from self._batches(stream, batch_entries)

    def _l2_stream(self) -> PieceStream:
        """The planner's stream of the distinct L2 tables inside the file, in host order (its first
        reads start at once)."""
        img = self.img
        self._inside = np.flatnonzero(self.tables.offsets < img.file.size)
        return PieceStream(img.file, self.tables.offsets[self._inside], img.header.cluster_size, Order.HOST)

    def _batches(self, stream: PieceStream, batch_entries: int = L2_BATCH_ENTRIES) -> Iterator[L2Batch]:
        # About `batch_entries` entries in use per batch: sparse tables (a few entries used in each)
        # come many to a batch, up to L2_BATCH_BYTES of tables, so that the per-batch cost is paid
        # for entries that are there, not once per few tables.
        h = self.img.header
        base = max(1, batch_entries // h.l2_size)
        most = max(base, L2_BATCH_BYTES // h.cluster_size)
        per = base
        while stream.pos < len(stream):
            p0 = stream.pos
            raw = stream.take(per)
            ids = self._inside[stream.index[p0 : stream.pos]]
            batch = L2Batch(ids, self.tables.offsets[ids], raw, h.extended_l2)
            yield batch
            if batch.by_runs:  # tables of runs (a preallocated image), judged a table at a time
                per = most
                continue
            used = batch.used_count()
            per = most if used * most <= batch_entries else min(most, max(base, batch_entries * len(ids) // used))

    def run(self, consumers: list[BatchConsumer], progress: ProgressFn = no_progress,
            cancelled: CancelledFn = never_cancelled) -> list[object]:
        """Feed one pass over the distinct L2 tables to every consumer and return their results
        (check and layout from one read of each table). `progress(done, total)` counts distinct
        tables; `cancelled()` is polled between batches and raises `Cancelled`.

        The tables' reads start before the consumers are primed, so that what a consumer reads
        first (check: the stored refcounts) and the tables are in flight together."""
        results: list[object] = [None] * len(consumers)
        live: list[int] = []
        total = len(self.tables)
        done = 0
        with self._l2_stream() as stream:
            self.l2_sweep_dense = stream.dense
            for k, c in enumerate(consumers):
                try:
                    next(c)
                    live.append(k)
                except StopIteration as e:  # finished before the walk (check that stops early)
                    results[k] = e.value
            if live:
                for batch in self._batches(stream):
                    if cancelled():
                        for k in live:
                            consumers[k].close()
                        raise Cancelled()
                    for k in live:
                        consumers[k].send(batch)
                    done += len(batch.ids)
                    progress(done, total)
        progress(total, total)
        for k in live:
            try:
                consumers[k].send(None)
            except StopIteration as e:
                results[k] = e.value
            else:  # pragma: no cover - a consumer must return after None
                raise RuntimeError("walk consumer did not finish")
        return results


__all__ = [
    "L1_CHUNK_ENTRIES",
    "L2_BATCH_ENTRIES",
    "RANK_TREE",
    "SRC_ACTIVE",
    "SRC_NONE",
    "BatchConsumer",
    "BitmapTable",
    "L1Group",
    "L2Batch",
    "L2Tables",
    "RangeRef",
    "RefKind",
    "RefWalk",
]
