"""`qemu-img check` recomputed: references from every structure against the stored refcounts.

The walk follows QEMU's `qcow2_check_refcounts` step by step (header, active L1 and its L2 tables
with fragmentation info, every snapshot's L1, the snapshot table, the refcount table, the LUKS
region, bitmaps, refcount blocks; then compare; then the COPIED flags), with the same counts and
messages, but each L2 table batch is one set of numpy operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import BME_MAX_TABLE_SIZE, read_bitmap_table
from qinspect.qcow2.fields import QCOW_SNAPSHOT_HEADER
from qinspect.qcow2.header import table_fits
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import ClusterType, L2Format, classify_clusters

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
# Stored refcounts, in the narrowest dtype of the image's refcount width (uint16 by default).
Refcounts = npt.NDArray[np.unsignedinteger[Any]]
# References past the end of the file are counted densely up to this many extra clusters and
# sparsely beyond (QEMU grows its table; a hostile offset must not make us allocate terabytes).
DENSE_EXTRA_CLUSTERS = 1 << 22
# L2 entries checked per batch: 64 Ki keeps the numpy temporaries in the CPU cache.
L2_BATCH_ENTRIES = 1 << 16


# qcow2_inc_refcounts_imrt: the two lines printed for each reference past the refcount maximum.
OVERFLOW_HINT = ("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
                 "clean copy if the image cannot be opened for writing")


@dataclass(slots=True)
class CheckMessage:
    """Lines QEMU's check prints on stderr: kind is error, leak, check-error or report.

    `report` lines come from QEMU's error_report (printed with the program name in front, as
    "qemu-img: ..."); the others are its plain fprintf(stderr) lines. `text` may hold several
    lines, printed `repeat` times (an overflowing cluster referenced a million times is one
    message, not a million).
    """

    kind: str
    text: str
    cluster: int | None = None
    repeat: int = 1


@dataclass
class CheckResult:
    """The counts of `qemu-img check --output=json` plus the messages and per-cluster arrays."""

    filename: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[CheckMessage] = field(default_factory=list)
    # Why the check itself stopped (QEMU's "Check failed: <strerror>"); no counts are printed then.
    failed: str | None = None
    _keyed: list[tuple[int, int, CheckMessage]] | None = field(default=None, repr=False)
    _last_key: int = field(default=-1, repr=False)
    dirty: bool = False
    lazy_refcounts: bool = False
    leaked_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    corrupt_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    reference: U32 = field(default_factory=lambda: np.zeros(0, np.uint32))  # references per host cluster
    stored: Refcounts = field(default_factory=lambda: np.zeros(0, np.uint64))  # stored refcount per cluster

    def add(self, kind: str, text: str, cluster: int | None = None, repeat: int = 1, key: int | None = None) -> None:
        """Record a message; there is no cap (qemu-img prints every one).

        Inside `ordered()`, `key` is the message's place in QEMU's walk (L1 index, L2 index, step
        within the entry; see `walk_key`): the vectorised walk finds messages kind by kind, and
        they are put back in QEMU's entry-by-entry order when the block ends.
        """
        msg = CheckMessage(kind, text, cluster, repeat)
        if self._keyed is None:
            self.messages.append(msg)
            return
        if key is None:
            key = self._last_key
        self._last_key = max(self._last_key, key)
        self._keyed.append((key, len(self._keyed), msg))

    def ordered(self, on: bool) -> None:
        """Start (True) or end (False) a block of keyed messages; ending it sorts them in."""
        if on:
            self._keyed, self._last_key = [], -1
            return
        if self._keyed:
            self._keyed.sort(key=lambda t: (t[0], t[1]))
            self.messages.extend(m for _k, _i, m in self._keyed)
        self._keyed = None

    def stderr_lines(self, prog: str = "qinspect") -> list[str]:
        """What qemu-img check writes to stderr, in either output format (`prog: ` before reports)."""
        out: list[str] = []
        for m in self.messages:
            text = f"{prog}: {m.text}" if m.kind == "report" else m.text
            out.extend(text.split("\n") * m.repeat)
        if self.failed is not None:
            out.append(f"{prog}: Check failed: {self.failed}")
        elif self.check_errors:
            out.append(f"{prog}: Check failed")
        return out

    def to_json(self) -> dict[str, object]:
        """Keys as qemu-img prints them: the optional ones only when non-zero."""
        d: dict[str, object] = {}
        for key, val in (("image-end-offset", self.image_end_offset), ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters),
                         ("corruptions", self.corruptions), ("leaks", self.leaks)):
            if val:
                d[key] = val
        d["check-errors"] = self.check_errors
        d["filename"] = self.filename
        d["format"] = "qcow2"
        return d

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 not completed, 2 corruptions, 3 leaks only."""
        if self.check_errors or self.failed is not None:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _Refs:
    """The in-memory reference count table (QEMU's refcount_table in check)."""

    def __init__(self, nb_clusters: int, refcount_max: int, res: CheckResult, cs: int, file_len: int) -> None:
        self.file_len = file_len
        self.nb_file = nb_clusters
        self.max = refcount_max
        self.res = res
        self.cs = cs
        # Counted as they come (no list of every reference: 16 Mi data clusters would take 128 MiB
        # of indices and a sort): dense up to nb_file + DENSE_EXTRA_CLUSTERS, sparse past it.
        self.counts = np.zeros(nb_clusters, dtype=np.uint32)  # (2^32 references would take 32 GiB of L2)
        self.top = 0  # highest cluster referenced + 1
        self.far: list[I64] = []
        self.ranges: list[tuple[int, int]] = []  # (first, last) cluster ranges, applied in finish()

    def beyond_eof(self, offset: int, size: int, key: int | None = None) -> bool:
        """QEMU refuses to count a region ending a cluster or more past the end of the file."""
        if offset + size - self.file_len >= self.cs:
            self.res.corruptions += 1
            self.res.add("error", "ERROR: counting reference for region exceeding the end of the file by one "
                                  f"cluster or more: offset {offset:#x} size {size:#x}", key=key)
            return True
        return False

    def add_regions(self, offsets: I64, sizes: I64 | int, keys: I64 | None = None) -> None:
        """qcow2_inc_refcounts_imrt over many regions: +1 for each cluster each region touches.
        `keys` (see `walk_key`) place the messages about each region in QEMU's order."""
        if not len(offsets):
            return
        size = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offsets.shape)
        past = offsets + size - self.file_len >= self.cs
        if past.any():
            pk = keys[past].tolist() if keys is not None else [None] * int(np.count_nonzero(past))
            for o, n, k in zip(offsets[past].tolist(), size[past].tolist(), pk, strict=True):
                self.beyond_eof(o, n, k)
            offsets, size = offsets[~past], size[~past]
        bits = self.cs.bit_length() - 1  # shifts, not divisions: 16 Mi offsets on a 1 TiB image
        first = offsets >> bits
        if np.ndim(sizes) == 0 and int(sizes) == self.cs and not (offsets & (self.cs - 1)).any():
            self.add(first)  # aligned whole clusters (data clusters, L2 tables): one cluster each
            return
        last = (offsets + size - 1) >> bits
        self.add(first)
        extra = last - first
        if extra.any():  # regions over two or more clusters (unaligned tables, compressed data)
            cnt = extra[extra > 0]
            start = first[extra > 0] + 1
            self.add(np.repeat(start, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)))

    def add_range(self, offset: int, size: int) -> None:
        if size <= 0 or self.beyond_eof(offset, size):
            return
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        limit = self.nb_file + DENSE_EXTRA_CLUSTERS
        if last >= limit:
            # A hostile offset or size (from the file): count what is within reach, never allocate
            # in proportion to the claimed size.
            self.res.corruptions += 1
            self.res.add("error", f"ERROR host range {offset:#x}+{size:#x} lies past the end of the image file "
                                  f"(references beyond cluster {limit} not counted)")
            if first >= limit:
                self.add(np.array([first], dtype=np.int64))
                return
            last = limit - 1
        # O(1) per range, applied in finish() as a difference array: 65536 snapshot L1 tables or
        # 65535 bitmap tables of up to 1 GiB each must not cost an index array each.
        self.ranges.append((first, last))
        self.top = max(self.top, last + 1)

    def add(self, clusters: I64) -> None:
        """Count one reference to each element of `clusters` (duplicates count once each)."""
        if not len(clusters):
            return
        idx = clusters.astype(np.int64, copy=False)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        self.top = max(self.top, hi)
        limit = self.nb_file + DENSE_EXTRA_CLUSTERS
        if hi > limit:
            self.far.append(idx[idx >= limit])
            idx = idx[idx < limit]
            if not len(idx):
                return
            lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi > len(self.counts):  # references past the end of the file: grow (bounded by limit)
            grown = np.zeros(min(limit, max(hi, 2 * len(self.counts))), dtype=np.uint32)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        if len(idx) == 1 or bool((idx[1:] > idx[:-1]).all()):  # no duplicates (the usual case)
            if hi - lo == len(idx):
                seg = self.counts[lo:hi]  # consecutive clusters (preallocation, sequential writes)
                seg += np.uint32(1)
            else:
                self.counts[idx] += np.uint32(1)
        elif hi - lo <= 4 * len(idx) + 65536:
            seg = self.counts[lo:hi]
            np.add(seg, np.bincount(idx - lo, minlength=hi - lo), out=seg, casting="unsafe")
        else:
            u, c = np.unique(idx, return_counts=True)
            self.counts[u] += c.astype(np.uint32)
        self.overflow(self.counts, idx)

    def overflow(self, counts: U32, idx: I64) -> None:
        """qcow2_inc_refcounts_imrt never counts past refcount_max: each reference beyond it is
        "ERROR: overflow cluster offset=..." (two lines) and a corruption, and is not counted."""
        if self.max >= 0xFFFFFFFF or not len(idx):  # 32/64-bit refcounts: uint32 counts cannot get there
            return
        over = counts[idx] > self.max
        if not over.any():
            return
        u = np.unique(idx[over])
        for cl, n in zip(u.tolist(), (counts[u].astype(np.int64) - self.max).tolist(), strict=True):
            self.res.corruptions += n
            self.res.add("error", f"ERROR: overflow cluster offset=0x{cl * self.cs:x}\n{OVERFLOW_HINT}", cl, n)
        counts[u] = self.max

    def finish(self) -> tuple[U32, dict[int, int], int]:
        """Dense counts over [0, nb), sparse counts past it, and nb (QEMU's grown table size)."""
        nb = self.nb_file
        if self.top > nb:
            nb = min(self.top, nb + DENSE_EXTRA_CLUSTERS)
        counts = self.counts
        if len(counts) != nb:
            counts = np.zeros(nb, dtype=np.uint32)
            k = min(nb, len(self.counts))
            counts[:k] = self.counts[:k]
        self.counts = np.zeros(0, dtype=np.uint32)
        if self.ranges:  # every range ends below min(top, limit) = nb
            r = np.array(self.ranges, dtype=np.int64)
            self.ranges = []
            if int((r[:, 1] - r[:, 0]).sum()) <= (1 << 22):
                for a, b in r.tolist():  # the usual few short ranges: no array the size of the file
                    counts[a : b + 1] += np.uint32(1)
                    self.overflow(counts, np.arange(a, b + 1, dtype=np.int64))
            else:  # many or long ranges: a difference array over the span they cover
                lo, hi = int(r[:, 0].min()), int(r[:, 1].max()) + 1
                d = np.zeros(hi - lo + 1, dtype=np.int32)
                np.add.at(d, r[:, 0] - lo, 1)
                np.add.at(d, r[:, 1] + 1 - lo, -1)
                seg = counts[lo:hi]
                np.add(seg, np.cumsum(d[:-1], dtype=np.int32), out=seg, casting="unsafe")
                self.overflow(counts, np.arange(lo, hi, dtype=np.int64))
        sparse: dict[int, int] = {}
        if self.far:
            u, c = np.unique(np.concatenate(self.far), return_counts=True)
            sparse = {int(a): int(b) for a, b in zip(u, c, strict=True)}
            self.far = []
        return counts, sparse, nb


class _Copied:
    """check_oflag_copied for data clusters, done during the L2 walk (no second walk, no list of
    every allocated entry): refcounts of clusters inside the file come from the stored refcounts
    read before the walk; the rare references past the end are kept and judged after it.
    Messages are kept to be reported after the refcount comparison, where QEMU prints them."""

    def __init__(self, img: Image, stored: Refcounts, unreadable: npt.NDArray[np.bool_] | None) -> None:
        self.img = img
        self.stored = stored
        self.unreadable = unreadable
        self.corruptions = 0
        self.found: list[tuple[int, int, int]] = []  # (walk_key, l2 entry, refcount)
        self.later: list[tuple[I64, I64, U64]] = []  # (walk keys, clusters, l2 entries)

    def batch(self, clusters: I64, l2e: U64, keys: I64) -> None:
        """Entries `l2e` pointing at host `clusters`; `keys` (walk_key) order their messages."""
        copied = (l2e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        if self.img.header.has_data_file:
            bad = np.flatnonzero(~copied)  # refcount 1 by definition
            rcs = np.ones(len(bad), dtype=np.uint64)
        else:
            n = len(self.stored)
            inside = clusters < n
            if n == 0:
                self.later.append((keys, clusters, l2e))
                return
            if not inside.all():
                pos = np.flatnonzero(~inside)
                self.later.append((keys[pos], clusters[pos], l2e[pos]))
                clusters = np.where(inside, clusters, 0)
            rc = self.stored[clusters]
            wrong = (rc == np.uint64(1)) != copied
            wrong &= inside
            if self.unreadable is not None:
                wrong &= ~self.unreadable[clusters]
            bad = np.flatnonzero(wrong)
            rcs = rc[bad]
        self.corruptions += len(bad)
        for k, e, r in zip(keys[bad].tolist(), l2e[bad].tolist(), rcs.tolist(), strict=True):
            self.found.append((k, e, r))

    def report(self, res: CheckResult, stored: Refcounts, unreadable: npt.NDArray[np.bool_] | None, nb: int) -> None:
        """Add the corruptions and messages (keyed: call inside res.ordered) once the final stored
        refcounts are known."""
        found = list(self.found)
        for keys, clusters, l2e in self.later:
            rcs = np.zeros(len(clusters), dtype=np.uint64)
            inside = clusters < len(stored)
            rcs[inside] = stored[clusters[inside]]
            for k in np.flatnonzero(~inside):
                rcs[k] = self.img.refcount(int(clusters[k]))
            ok = np.ones(len(clusters), dtype=bool)
            if unreadable is not None:
                inb = clusters < nb
                ok[inb] = ~unreadable[clusters[inb]]
            copied = (l2e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
            bad = np.flatnonzero(ok & ((rcs == 1) != copied))
            self.corruptions += len(bad)
            found += [(int(keys[k]), int(l2e[k]), int(rcs[k])) for k in bad]
        res.corruptions += self.corruptions
        for where, e, r in found:
            res.add("error", f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}", key=where)


def check_image(img: Image, progress: ProgressFn = no_progress,
                cancelled: CancelledFn = never_cancelled, filename: str | None = None) -> CheckResult:
    """Recompute every refcount of `img` and compare, as `qemu-img check` (without -r) does."""
    h = img.header
    cs = h.cluster_size
    res = CheckResult(filename or img.path, dirty=h.dirty, lazy_refcounts=h.lazy_refcounts)
    # size_to_clusters(total_sectors * 512): the virtual size rounded up to whole sectors first
    res.total_clusters = -(-(-(-h.size // 512) * 512) // cs)
    nb_file = -(-img.file.size // cs)
    rmax = (1 << h.refcount_bits) - 1
    refs = _Refs(nb_file, rmax, res, cs, img.file.size)
    fmt = img.l2_format
    stored_needed = nb_file

    # Snapshot-table checks (qcow2_check_read_snapshot_table). Check opens with BDRV_O_CHECK, which
    # skips the snapshot table at open; the check validates it first and stops if it is unusable.
    if h.nb_snapshots > C.QCOW_MAX_SNAPSHOTS:
        res.check_errors += 1
        res.add("report", "ERROR snapshot table too large")
        res.add("check-error", f"You can force-remove all {h.nb_snapshots - C.QCOW_MAX_SNAPSHOTS} overhanging "
                               "snapshots with qemu-img check -r all")
        res.failed = "File too large"
        return res
    if not table_fits(h.snapshots_offset, h.nb_snapshots, QCOW_SNAPSHOT_HEADER.size, cs):
        res.check_errors += 1
        res.add("report", "ERROR snapshot table offset invalid")
        res.failed = "Invalid argument"
        return res
    if img.snapshot_table.qemu_error is not None:
        error, hint = img.snapshot_table.qemu_error
        res.check_errors += 1
        res.add("report", f"ERROR failed to read the snapshot table: {error}")
        res.add("check-error", hint)
        res.failed = "File too large"
        return res
    for sn in img.snapshots:
        if h.version >= 3 and sn.extra_data_size < 16:
            res.corruptions += 1
            res.add("error", f"ERROR snapshot table entry {sn.index} is incomplete")

    refs.add_range(0, cs)  # header
    # The active L1 as read (empty when QEMU would refuse its size or offset), not as claimed.
    l1_jobs: list[tuple[int, int, bool, str]] = [(h.l1_table_offset, len(img.l1_table), True, "active")]
    if h.has_data_file and img.snapshots:
        res.corruptions += 1
        res.add("error", f"ERROR {len(img.snapshots)} snapshots in image with data file")
    for sn in img.snapshots:
        if sn.l1_table_offset % cs:
            res.corruptions += 1
            res.add("error", f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                             "L1 table is not cluster aligned; snapshot table entry corrupted")
            continue
        if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
            res.corruptions += 1
            res.add("error", f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                             "L1 table is too large; snapshot table entry corrupted")
            continue
        l1_jobs.append((sn.l1_table_offset, sn.l1_size, False, f"snapshot {sn.id_str}"))

    total_tables = 0
    l1_tables: list[tuple[U64, int, bool]] = []
    for off, size, active, _name in l1_jobs:
        if not size:
            continue
        refs.add_range(off, size * 8)
        l1 = img.l1_table if active else img.read_entries(off, size)
        l1_tables.append((l1, off, active))
        total_tables += int(np.count_nonzero(l1))
    done = 0
    # The stored refcounts of the file's clusters, read first (in host order) so that the COPIED
    # flags are checked during the one L2 walk.
    per = h.refcount_block_entries
    stored, bad_blocks = img.stored_refcounts_compact(nb_file)
    copied = _Copied(img, stored, _unreadable(bad_blocks, per, nb_file))
    n = h.l2_size
    for l1, _off, active in l1_tables:
        res.ordered(True)  # check_refcounts_l1: one L1 entry (and its L2 table) after another
        nz = np.flatnonzero(l1)  # an entry of 0 is skipped; any other is followed, even to offset 0
        reserved = nz[(l1[nz] & np.uint64(C.L1E_RESERVED_MASK)) != 0]
        for i in reserved:
            res.corruptions += 1
            res.add("error", f"ERROR found L1 entry with reserved bits set: {int(l1[i]):x}",
                    key=walk_key(int(i), -1, 0, n))
        l2_offsets = (l1[nz] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        batch = max(1, L2_BATCH_ENTRIES // h.l2_size)
        for b in range(0, len(l2_offsets), batch):
            if cancelled():
                raise Cancelled()
            offs = l2_offsets[b : b + batch]
            l1i = nz[b : b + batch].astype(np.int64)
            for k in np.flatnonzero((offs % cs) != 0).tolist():
                res.corruptions += 1
                res.add("error", f"ERROR l2_offset={int(offs[k]):x}: Table is not cluster aligned; L1 entry corrupted",
                        key=walk_key(int(l1i[k]), -1, 2, n))
            _check_l2_batch(img, fmt, offs, l1i, active, refs, res, copied)
            done += len(offs)
            progress(done, total_tables)
        res.ordered(False)

    refs.add_range(h.snapshots_offset, img.snapshot_table.size)
    refs.add_range(h.refcount_table_offset, len(img.refcount_table) * 8)
    if h.crypto_ext is not None:
        refs.add_range(h.crypto_ext.offset, h.crypto_ext.length)
    if not _bitmap_refs(img, refs, res):
        return res  # calculate_refcounts fails: no refcount comparison, no counts printed

    counts, sparse, nb = refs.finish()
    # Refcount blocks (check_refblocks): each counted once more and expected to be referenced once.
    rt = img.refcount_table
    nzr = np.flatnonzero(rt)
    for i in nzr:
        e = int(rt[i])
        off = e & C.REFT_OFFSET_MASK
        if e & C.REFT_RESERVED_MASK:
            res.corruptions += 1
            res.add("error", f"ERROR refcount table entry {int(i)} has reserved bits set")
            continue
        if off % cs:
            res.corruptions += 1
            res.add("error", f"ERROR refcount block {int(i)} is not cluster aligned; refcount table entry corrupted")
            continue
        cl = off // cs
        if cl >= nb:
            res.corruptions += 1
            res.add("error", f"ERROR refcount block {int(i)} is outside image")
            continue
        if off:
            if int(counts[cl]) >= rmax:
                res.corruptions += 1
                res.add("error", f"ERROR: overflow cluster offset=0x{off:x}\n{OVERFLOW_HINT}", cl)
            else:
                counts[cl] += np.uint32(1)
            if int(counts[cl]) != 1:
                res.corruptions += 1
                res.add("error", f"ERROR refcount block {int(i)} refcount={int(counts[cl])}")

    # compare_refcounts
    stored_needed = max(stored_needed, nb)
    if stored_needed > len(stored):  # references past the end of the file grew the table
        stored, bad_blocks = img.stored_refcounts_compact(stored_needed)
    # qcow2_get_refcount fails with EIO for every cluster of an unaligned refcount block; the first
    # failure also signals the corruption once (qcow2_signal_corruption, non-fatal: read-only).
    signalled = False
    for bi in bad_blocks:
        lo, hi = bi * per, min((bi + 1) * per, nb)
        if lo < hi:
            rb = int(rt[bi]) & C.REFT_OFFSET_MASK
            if not signalled and rb % cs:  # (a block past the block layer's limit is a plain EIO)
                res.add("check-error", f"qcow2: Image is corrupt: Refblock offset {_c_hex(rb)} unaligned (reftable "
                                       f"index: {_c_hex(bi)}); further non-fatal corruption events will be suppressed")
                signalled = True
            res.check_errors += hi - lo
            for c in range(lo, hi):
                res.add("check-error", f"Can't get refcount for cluster {c}: Input/output error", c)
    unreadable = _unreadable(bad_blocks, per, nb)
    if len(stored) > nb:
        stored = stored[:nb]
    diff = np.flatnonzero(stored != counts)
    if unreadable is not None:
        diff = diff[~unreadable[diff]]
    highest = _highest_used(stored, counts, unreadable)
    under = diff[stored[diff] < counts[diff]]
    over = diff[stored[diff] > counts[diff]]
    for i in diff.tolist():
        s, r = int(stored[i]), int(counts[i])
        res.add("error" if s < r else "leak",
                f"{'ERROR' if s < r else 'Leaked'} cluster {int(i)} refcount={s} reference={r}", int(i))
    res.corruptions += len(under)
    res.leaks += len(over)
    for cl, r in sorted(sparse.items()):
        s = img.refcount(cl) if cl // per < len(rt) else 0
        highest = max(highest, cl)
        if s != r:
            if s < r:
                res.corruptions += 1
            else:
                res.leaks += 1
            res.add("error" if s < r else "leak",
                    f"{'ERROR' if s < r else 'Leaked'} cluster {cl} refcount={s} reference={r}", cl)
    res.leaked_clusters = over.astype(np.int64)
    res.corrupt_clusters = under.astype(np.int64)

    # check_oflag_copied (active L1 only, from the stored refcounts): each L1 entry's message, then
    # those of its L2 table's entries
    res.ordered(True)
    l1 = img.l1_table
    for i in np.flatnonzero(l1):
        e = int(l1[i])
        off = e & C.L1E_OFFSET_MASK
        if not off:
            continue
        cl = off // cs
        if cl < nb and unreadable is not None and unreadable[cl]:
            continue
        rc = int(stored[cl]) if cl < len(stored) else img.refcount(cl)
        if (rc == 1) != bool(e & C.QCOW_OFLAG_COPIED):
            res.corruptions += 1
            res.add("error", f"ERROR OFLAG_COPIED L2 cluster: l1_index={int(i)} l1_entry={e:x} refcount={rc}",
                    key=walk_key(int(i), -1, 0, n))
    copied.report(res, stored, unreadable, nb)
    res.ordered(False)

    res.image_end_offset = (highest + 1) * cs
    res.reference = counts
    res.stored = stored
    return res


def walk_key(l1_index: Any, l2_index: Any, step: int, l2_size: int) -> Any:
    """Sort key of a message found at (L1 index, L2 index or -1 for the L1 entry, step within the
    entry), for ints or arrays: check_refcounts_l1/_l2 print one entry's messages after another's."""
    return (l1_index * (l2_size + 1) + (l2_index + 1)) * 8 + step


def _c_hex(v: int) -> str:
    """C's %#x: "0" for zero, 0x... otherwise."""
    return f"{v:#x}" if v else "0"


def _unreadable(bad_blocks: list[int], per: int, nb: int) -> npt.NDArray[np.bool_] | None:
    """Clusters [0, nb) whose refcount block cannot be read (None when there are none)."""
    if not bad_blocks:
        return None
    out = np.zeros(nb, dtype=bool)
    for bi in bad_blocks:
        out[bi * per : min((bi + 1) * per, nb)] = True
    return out


def _highest_used(stored: Refcounts, counts: U32, unreadable: npt.NDArray[np.bool_] | None) -> int:
    """The highest cluster with a stored refcount or a reference (0 if none), scanning from the end."""
    step = 1 << 20
    for hi in range(len(counts), 0, -step):
        lo = max(0, hi - step)
        used = (stored[lo:hi] != 0) | (counts[lo:hi] != 0)
        if unreadable is not None:
            used &= ~unreadable[lo:hi]
        nz = np.flatnonzero(used)
        if len(nz):
            return lo + int(nz[-1])
    return 0


def _check_l2_batch(img: Image, fmt: L2Format, offs: I64, l1i: I64, active: bool, refs: _Refs, res: CheckResult,
                    copied: _Copied) -> None:
    h = img.header
    cs = h.cluster_size
    n = h.l2_size
    # the L2 tables themselves (an unaligned one touches two clusters)
    refs.add_regions(offs, cs, walk_key(l1i, -1, 1, n))
    # A table at or past the end of the file reads as zeros and references nothing: do not read it.
    inside = offs < img.file.size
    offs, l1i = offs[inside], l1i[inside]
    if not len(offs):
        return

    def key(k: int, step: int) -> int:  # message order: entry k of this batch, step within the entry
        return int(walk_key(int(l1i[k // n]), k % n, step, n))

    # Read each table at its exact offset (QEMU reads unaligned tables too).
    words = img.read_l2_tables(offs)
    bitmaps: U64 | None = None  # (standard entries: no bitmap checks at all)
    if h.extended_l2:
        entries, bitmaps = words[0::2], words[1::2]
    else:
        entries = words
    bits = h.cluster_bits
    ctypes = classify_clusters(entries, fmt)
    comp = ctypes == ClusterType.COMPRESSED
    reserved = ~comp & ((entries & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0)
    for k in np.flatnonzero(reserved).tolist():
        res.corruptions += 1
        res.add("error", f"ERROR found l2 entry with reserved bits set: {int(entries[k]):x}", key=key(k, 0))

    # Compressed clusters.
    ci = np.flatnonzero(comp)
    if len(ci):
        ce = entries[ci]
        with_copied = (ce & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        for k, e in zip(ci[with_copied].tolist(), ce[with_copied].tolist(), strict=True):
            res.corruptions += 1
            res.add("error", f"ERROR: coffset=0x{int(e) & fmt.cluster_offset_mask:x}: copied flag must never be set "
                             "for compressed clusters", key=key(k, 1))
        ce = ce & ~np.uint64(C.QCOW_OFLAG_COPIED)
        if h.has_data_file:
            for k, e in zip(ci.tolist(), ce.tolist(), strict=True):
                res.corruptions += 1
                res.add("error", f"ERROR compressed cluster {int(k) % n} with data file, entry=0x{int(e):x}",
                        key=key(k, 2))
            ci = ci[:0]
            ce = ce[:0]
        badbm = bitmaps[ci] != 0 if bitmaps is not None else np.zeros(len(ci), dtype=bool)
        for k, e in zip(ci[badbm].tolist(), ce[badbm].tolist(), strict=True):
            res.corruptions += 1
            res.add("error", f"ERROR compressed cluster {int(k) % n} with non-zero subcluster allocation bitmap, "
                             f"entry=0x{int(e):x}", key=key(k, 3))
        ce = ce[~badbm]
        ci = ci[~badbm]
        coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
        nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
        csize = nsec * 512 - (coff & 511)
        refs.add_regions(coff, csize, walk_key(l1i[ci // n], ci % n, 4, n))
        if active:
            res.allocated_clusters += len(ce)
            res.compressed_clusters += len(ce)
            res.fragmented_clusters += len(ce)

    # Standard allocated clusters (NORMAL and ZERO_ALLOC).
    ai = np.flatnonzero((ctypes == ClusterType.NORMAL) | (ctypes == ClusterType.ZERO_ALLOC))
    if len(ai):
        ae = entries[ai]
        off = (ae & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        ab = bitmaps[ai] if bitmaps is not None else None
        if ab is not None:
            corrupt_bm = ((ab >> np.uint64(32)) & ab) != 0
            for k, o in zip(ai[corrupt_bm].tolist(), off[corrupt_bm].tolist(), strict=True):
                res.corruptions += 1
                res.add("error", f"ERROR offset={int(o):x}: Allocated cluster has corrupted subcluster allocation "
                                 "bitmap", key=key(k, 1))
        unal = (off & (cs - 1)) != 0
        if unal.any():
            if ab is not None:
                has_data = (ab & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
            else:
                has_data = (ae & np.uint64(C.QCOW_OFLAG_ZERO)) == 0
            for k, o, d in zip(ai[unal].tolist(), off[unal].tolist(), has_data[unal].tolist(), strict=True):
                res.corruptions += 1
                what = "Data cluster is not properly aligned" if d else "Preallocated cluster is not properly aligned"
                res.add("error", f"ERROR offset={int(o):x}: {what}; L2 entry corrupted.", key=key(k, 2))
        cl = off >> bits
        if active:
            res.allocated_clusters += len(ai)
            if len(ai) > 1:
                t = ai >> h.l2_bits  # which table of the batch
                same_table = t[1:] == t[:-1]
                res.fragmented_clusters += int(np.count_nonzero(same_table & (off[1:] != off[:-1] + cs)))
            # check_oflag_copied skips L1 entries whose table offset is 0 (only COPIED set)
            keys = walk_key(l1i[ai // n], ai % n, 0, n)
            if (offs != 0).all():
                copied.batch(cl, ae, keys)
            else:
                in_table = offs[ai // n] != 0
                copied.batch(cl[in_table], ae[in_table], keys[in_table])
        if not h.has_data_file:
            refs.add_regions(off, cs, walk_key(l1i[ai // n], ai % n, 4, n))

    # Unallocated clusters with allocation bits.
    if bitmaps is not None:
        ui = (ctypes == ClusterType.UNALLOCATED) & ((bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
        for k in np.flatnonzero(ui).tolist():
            res.corruptions += 1
            res.add("error", "ERROR: Unallocated cluster has non-zero subcluster allocation map", key=key(k, 5))


def _bitmap_refs(img: Image, refs: _Refs, res: CheckResult) -> bool:
    """qcow2_check_bitmaps_refcounts; False when it fails the check (a bitmap table entry that
    bitmap_table_load refuses: one corruption, and the check stops with EINVAL)."""
    ext = img.header.bitmaps_ext
    if ext is None or not img.header.bitmaps_consistent:
        return True
    # sizes as far as the format allows (QEMU refuses larger ones at open)
    refs.add_range(ext.bitmap_directory_offset, min(ext.bitmap_directory_size, C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE))
    cs = img.cluster_size
    for bm in img.bitmaps:
        refs.add_range(bm.bitmap_table_offset, min(bm.bitmap_table_size, BME_MAX_TABLE_SIZE) * 8)
        table = read_bitmap_table(img.file, bm)
        offs = table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
        bad = ((table & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
            (offs != 0) & (((table & np.uint64(1)) != 0) | ((offs % np.uint64(cs)) != 0)))
        if bad.any():
            res.corruptions += 1
            res.failed = "Invalid argument"
            return False
        refs.add_regions(offs[offs != 0].astype(np.int64), cs)
    return True
