"""`qemu-img check` recomputed: references from every structure against the stored refcounts.

The walk follows QEMU's `qcow2_check_refcounts` step by step (header, active L1 and its L2 tables
with fragmentation info, every snapshot's L1, the snapshot table, the refcount table, the LUKS
region, bitmaps, refcount blocks; then compare; then the COPIED flags), with the same counts and
messages, but each L2 table batch is one set of numpy operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import read_bitmap_table
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import ClusterType, L2Format, classify_clusters

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
MAX_MESSAGES = 2000
# References past the end of the file are counted densely up to this many extra clusters and
# sparsely beyond (QEMU grows its table; a hostile offset must not make us allocate terabytes).
DENSE_EXTRA_CLUSTERS = 1 << 22


@dataclass
class CheckMessage:
    """One line QEMU's check would print on stderr: kind is error, leak or check-error."""

    kind: str
    text: str
    cluster: int | None = None


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
    messages_dropped: int = 0
    dirty: bool = False
    lazy_refcounts: bool = False
    leaked_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    corrupt_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    reference: U64 = field(default_factory=lambda: np.zeros(0, np.uint64))
    stored: U64 = field(default_factory=lambda: np.zeros(0, np.uint64))

    def add(self, kind: str, text: str, cluster: int | None = None) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(CheckMessage(kind, text, cluster))
        else:
            self.messages_dropped += 1

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
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _Refs:
    """The in-memory reference count table (QEMU's refcount_table in check)."""

    def __init__(self, nb_clusters: int, refcount_max: int, res: CheckResult, cs: int) -> None:
        self.parts: list[I64] = []
        self.nb_file = nb_clusters
        self.max = refcount_max
        self.res = res
        self.cs = cs

    def add_range(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        self.parts.append(np.arange(first, last + 1, dtype=np.int64))

    def add(self, clusters: I64) -> None:
        if len(clusters):
            self.parts.append(clusters.astype(np.int64, copy=False))

    def finish(self) -> tuple[U64, dict[int, int], int]:
        """Dense counts over [0, nb), sparse counts past it, and nb (QEMU's grown table size)."""
        allrefs = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        self.parts = []
        nb = self.nb_file
        sparse: dict[int, int] = {}
        if len(allrefs):
            top = int(allrefs.max()) + 1
            if top > nb:
                nb = min(top, nb + DENSE_EXTRA_CLUSTERS)
            far = allrefs[allrefs >= nb]
            if len(far):
                u, c = np.unique(far, return_counts=True)
                sparse = {int(a): int(b) for a, b in zip(u, c, strict=True)}
                allrefs = allrefs[allrefs < nb]
        counts = np.bincount(allrefs, minlength=nb).astype(np.uint64) if len(allrefs) else np.zeros(nb, np.uint64)
        return counts, sparse, nb


def check_image(img: Image, progress: ProgressFn = no_progress,
                cancelled: CancelledFn = never_cancelled, filename: str | None = None) -> CheckResult:
    """Recompute every refcount of `img` and compare, as `qemu-img check` (without -r) does."""
    h = img.header
    cs = h.cluster_size
    res = CheckResult(filename or img.path, dirty=h.dirty, lazy_refcounts=h.lazy_refcounts)
    res.total_clusters = -(-h.size // cs)
    nb_file = -(-img.file.size // cs)
    rmax = (1 << h.refcount_bits) - 1
    refs = _Refs(nb_file, rmax, res, cs)
    fmt = img.l2_format
    stored_needed = nb_file

    # Snapshot-table checks (qcow2_check_read_snapshot_table).
    for sn in img.snapshots:
        if h.version >= 3 and sn.extra_data_size < 16:
            res.corruptions += 1
            res.add("error", f"ERROR snapshot table entry {sn.index} is incomplete")

    refs.add_range(0, cs)  # header
    l1_jobs: list[tuple[int, int, bool, str]] = [(h.l1_table_offset, h.l1_size, True, "active")]
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
        l1 = img.l1_table if active else _read_u64(img, off, size)
        l1_tables.append((l1, off, active))
        total_tables += int(np.count_nonzero(l1))
    done = 0
    copied_l2: list[tuple[I64, U64]] = []  # (data cluster indices, COPIED bits) of active NORMAL/ZERO_ALLOC
    for l1, _off, active in l1_tables:
        nz = np.flatnonzero(l1)
        reserved = nz[(l1[nz] & np.uint64(C.L1E_RESERVED_MASK)) != 0]
        for i in reserved:
            res.corruptions += 1
            res.add("error", f"ERROR found L1 entry with reserved bits set: {int(l1[i]):x}")
        l2_offsets = (l1[nz] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        batch = max(1, (1 << 20) // h.l2_size)
        for b in range(0, len(l2_offsets), batch):
            if cancelled():
                raise Cancelled()
            offs = l2_offsets[b : b + batch]
            for o in offs[(offs % cs) != 0]:
                res.add("error", f"ERROR l2_offset={int(o):x}: Table is not cluster aligned; L1 entry corrupted")
            _check_l2_batch(img, fmt, offs, active, refs, res, copied_l2)
            done += len(offs)
            progress(done, total_tables)

    refs.add_range(h.snapshots_offset, img.snapshot_table.size)
    refs.add_range(h.refcount_table_offset, h.refcount_table_entries * 8)
    if h.crypto_ext is not None:
        refs.add_range(h.crypto_ext.offset, h.crypto_ext.length)
    _bitmap_refs(img, refs, res)

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
            if counts[cl] >= rmax:
                res.corruptions += 1
                res.add("error", f"ERROR: overflow cluster offset={off:#x}")
            else:
                counts[cl] += np.uint64(1)
            if int(counts[cl]) != 1:
                res.corruptions += 1
                res.add("error", f"ERROR refcount block {int(i)} refcount={int(counts[cl])}")

    # compare_refcounts
    stored_needed = max(stored_needed, nb)
    stored, bad_blocks = img.stored_refcounts(stored_needed)
    per = h.refcount_block_entries
    unreadable = np.zeros(nb, dtype=bool)
    for bi in bad_blocks:
        lo, hi = bi * per, min((bi + 1) * per, nb)
        if lo < hi:
            unreadable[lo:hi] = True
            res.check_errors += hi - lo
            res.add("check-error", f"Can't get refcount for clusters {lo}..{hi - 1}: Input/output error")
    diff = np.flatnonzero((stored != counts) & ~unreadable)
    used = np.flatnonzero(((stored > 0) | (counts > 0)) & ~unreadable)
    highest = int(used[-1]) if len(used) else 0
    under = diff[stored[diff] < counts[diff]]
    over = diff[stored[diff] > counts[diff]]
    for i in diff:
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

    # check_oflag_copied (active L1 only, from the stored refcounts)
    l1 = img.l1_table
    for i in np.flatnonzero(l1):
        e = int(l1[i])
        off = e & C.L1E_OFFSET_MASK
        if not off:
            continue
        cl = off // cs
        if cl < nb and unreadable[cl]:
            continue
        rc = int(stored[cl]) if cl < len(stored) else img.refcount(cl)
        if (rc == 1) != bool(e & C.QCOW_OFLAG_COPIED):
            res.corruptions += 1
            res.add("error", f"ERROR OFLAG_COPIED L2 cluster: l1_index={int(i)} l1_entry={e:x} refcount={rc}")
    for clusters, l2e in copied_l2:
        if h.has_data_file:
            rcs = np.ones(len(clusters), dtype=np.uint64)
            ok = np.ones(len(clusters), dtype=bool)
        else:
            inside = clusters < len(stored)
            rcs = np.zeros(len(clusters), dtype=np.uint64)
            rcs[inside] = stored[clusters[inside]]
            for k in np.flatnonzero(~inside):
                rcs[k] = img.refcount(int(clusters[k]))
            ok = np.ones(len(clusters), dtype=bool)
            inb = clusters < nb
            ok[inb] = ~unreadable[clusters[inb]]
        copied = (l2e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        bad = np.flatnonzero(ok & ((rcs == 1) != copied))
        res.corruptions += len(bad)
        for k in bad:
            res.add("error", f"ERROR OFLAG_COPIED data cluster: l2_entry={int(l2e[k]):x} refcount={int(rcs[k])}")

    res.image_end_offset = (highest + 1) * cs
    res.reference = counts
    res.stored = stored[:nb] if len(stored) >= nb else stored
    return res


def _read_u64(img: Image, offset: int, count: int) -> U64:
    return np.frombuffer(img.file.pread(offset, count * 8), dtype=">u8").astype(np.uint64)


def _check_l2_batch(img: Image, fmt: L2Format, offs: I64, active: bool, refs: _Refs, res: CheckResult,
                    copied_l2: list[tuple[I64, U64]]) -> None:
    h = img.header
    cs = h.cluster_size
    for o in offs:
        refs.add_range(int(o), cs)  # the L2 table itself
    # Read each table at its exact offset (QEMU reads unaligned tables too); merge adjacent reads.
    buf = np.zeros(len(offs) * cs, dtype=np.uint8)
    mv = memoryview(buf.data)
    k = 0
    while k < len(offs):
        m = k + 1
        while m < len(offs) and int(offs[m]) == int(offs[k]) + (m - k) * cs:
            m += 1
        img.file.read_into(int(offs[k]), mv[k * cs : m * cs])
        k = m
    words = np.frombuffer(buf, dtype=">u8").astype(np.uint64)
    if h.extended_l2:
        entries, bitmaps = words[0::2], words[1::2]
    else:
        entries, bitmaps = words, np.zeros(len(words), dtype=np.uint64)
    n = h.l2_size
    table = np.repeat(np.arange(len(offs)), n)
    ctypes = classify_clusters(entries, fmt)
    comp = ctypes == ClusterType.COMPRESSED
    reserved = ~comp & ((entries & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0)
    for e in entries[reserved]:
        res.corruptions += 1
        res.add("error", f"ERROR found l2 entry with reserved bits set: {int(e):x}")

    # Compressed clusters.
    ci = np.flatnonzero(comp)
    if len(ci):
        ce = entries[ci]
        with_copied = (ce & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        for e in ce[with_copied]:
            res.corruptions += 1
            res.add("error", f"ERROR: coffset=0x{int(e) & fmt.cluster_offset_mask:x}: copied flag must never be set "
                             "for compressed clusters")
        ce = ce & ~np.uint64(C.QCOW_OFLAG_COPIED)
        if h.has_data_file:
            for k, e in zip(ci.tolist(), ce.tolist(), strict=True):
                res.corruptions += 1
                res.add("error", f"ERROR compressed cluster {int(k) % n} with data file, entry=0x{int(e):x}")
            ci = ci[:0]
            ce = ce[:0]
        badbm = bitmaps[ci] != 0
        for k, e in zip(ci[badbm], ce[badbm], strict=True):
            res.corruptions += 1
            res.add("error", f"ERROR compressed cluster {int(k) % n} with non-zero subcluster allocation bitmap, "
                             f"entry=0x{int(e):x}")
        ce = ce[~badbm]
        coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
        nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
        csize = nsec * 512 - (coff & 511)
        first = coff // cs
        last = (coff + csize - 1) // cs
        cnt = last - first + 1
        refs.add(np.repeat(first, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)))
        if active:
            res.allocated_clusters += len(ce)
            res.compressed_clusters += len(ce)
            res.fragmented_clusters += len(ce)

    # Standard allocated clusters (NORMAL and ZERO_ALLOC).
    ai = np.flatnonzero((ctypes == ClusterType.NORMAL) | (ctypes == ClusterType.ZERO_ALLOC))
    if len(ai):
        ae = entries[ai]
        ab = bitmaps[ai]
        off = (ae & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        corrupt_bm = ((ab >> np.uint64(32)) & ab) != 0
        for o in off[corrupt_bm]:
            res.corruptions += 1
            res.add("error", f"ERROR offset={int(o):x}: Allocated cluster has corrupted subcluster allocation bitmap")
        unal = (off % cs) != 0
        if unal.any():
            if h.extended_l2:
                has_data = (ab & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
            else:
                has_data = (ae & np.uint64(C.QCOW_OFLAG_ZERO)) == 0
            for o, d in zip(off[unal], has_data[unal], strict=True):
                res.corruptions += 1
                what = "Data cluster is not properly aligned" if d else "Preallocated cluster is not properly aligned"
                res.add("error", f"ERROR offset={int(o):x}: {what}; L2 entry corrupted.")
        if active:
            res.allocated_clusters += len(ai)
            t = table[ai]
            if len(ai) > 1:
                same_table = t[1:] == t[:-1]
                res.fragmented_clusters += int(np.count_nonzero(same_table & (off[1:] != off[:-1] + cs)))
            copied_l2.append((off // cs, ae))
        if not h.has_data_file:
            refs.add(off // cs)

    # Unallocated clusters with allocation bits.
    if h.extended_l2:
        ui = (ctypes == ClusterType.UNALLOCATED) & ((bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
        for _ in range(int(np.count_nonzero(ui))):
            res.corruptions += 1
            res.add("error", "ERROR: Unallocated cluster has non-zero subcluster allocation map")


def _bitmap_refs(img: Image, refs: _Refs, res: CheckResult) -> None:
    ext = img.header.bitmaps_ext
    if ext is None or not img.header.bitmaps_consistent:
        return
    refs.add_range(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    cs = img.cluster_size
    for bm in img.bitmaps:
        refs.add_range(bm.bitmap_table_offset, bm.bitmap_table_size * 8)
        table = read_bitmap_table(img.file, bm)
        offs = table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
        bad = ((table & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
            (offs != 0) & (((table & np.uint64(1)) != 0) | ((offs % np.uint64(cs)) != 0)))
        res.corruptions += int(np.count_nonzero(bad))
        good = offs[~bad & (offs != 0)]
        refs.add((good // np.uint64(cs)).astype(np.int64))
