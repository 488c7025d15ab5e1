"""Where the bytes of the image file go: a breakdown that adds up exactly to the file size.

Every host cluster of the file is put in exactly one part (from the layout's owners and flags;
the last, partial cluster counts with its real length), and data clusters are split further by
what the active L2 entry says about them: guest data, zero-allocated (reads as zeros), allocated
but unused (extended-L2 subclusters never written, or ranges that are holes in the host file),
compressed. Data and L2 tables that only snapshots reference are counted apart, and for each
snapshot the bytes that deleting it would free (clusters referenced only through its L1 table).

A second breakdown splits the space the file really occupies on disk (`st_blocks * 512`) the same
way. Both come from the one host-extent prober (`HostFile.host_extents`, FIEMAP): written data,
unwritten extents (disk space reserved and reading as zeros: `preallocation=falloc`, the zero
padding QEMU allocates around a small write) and holes (no disk space). Because FIEMAP reads the
file system's extent map, the answer does not change with the page cache; without FIEMAP the
SEEK_DATA/SEEK_HOLE fallback is used and `host-extents.method` says so. Guest data clusters are
split into what holds written data, what only reserves zeroed space and what is a hole.
Whatever the file system adds or saves (block rounding, extent-tree blocks, compression) is the
`filesystem` part of the disk breakdown, which may be negative.

With a deep scan (`qinspect.analysis.deep`), guest data is split once more into data that is
all zeros and data identical to what the backing chain already holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from qinspect.analysis.layout import F_DATA, F_LIVE, F_ZERO, Layout, Owner, compute_layout
from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.hostfile import ExtentKind, HostExtents
from qinspect.qcow2.image import Image

I64 = npt.NDArray[np.int64]


class DeepParts(Protocol):
    """What the breakdown takes from a deep scan (`qinspect.analysis.deep.DeepScan`), which itself
    uses this module (`not_written`): space does not import deep."""

    @property
    def zero_bytes(self) -> int: ...

    @property
    def duplicate_bytes(self) -> int: ...


# Part names, in display order. The deep parts appear only after a deep scan.
PARTS = (
    "guest-data", "zero-data", "backing-duplicates", "zero-allocated", "preallocated-unused", "compressed",
    "header", "l1-table", "l2-tables", "refcount-table", "refcount-blocks",
    "snapshot-table", "snapshot-l1-tables", "snapshot-l2-tables", "snapshot-data",
    "bitmaps", "luks", "leaked", "free", "tail", "conflict",
)
DEEP_PARTS = ("zero-data", "backing-duplicates")
# The parts a `qemu-img convert` would not copy (what `Space.reclaimable` adds up).
RECLAIMABLE_PARTS = ("zero-data", "zero-allocated", "preallocated-unused", "leaked", "free", "tail")

PART_LABELS = {
    "guest-data": "guest data", "zero-data": "all-zero data clusters", "backing-duplicates": "copies of backing data",
    "zero-allocated": "zero-allocated clusters", "preallocated-unused": "preallocated, never written",
    "compressed": "compressed data", "header": "header", "l1-table": "L1 table", "l2-tables": "L2 tables",
    "refcount-table": "refcount table", "refcount-blocks": "refcount blocks", "snapshot-table": "snapshot table",
    "snapshot-l1-tables": "snapshot L1 tables", "snapshot-l2-tables": "L2 tables only snapshots use",
    "snapshot-data": "data only snapshots use", "bitmaps": "dirty bitmaps", "luks": "LUKS header",
    "leaked": "leaked clusters", "free": "free holes", "tail": "tail past the image end",
    "conflict": "overlapping structures", "filesystem": "file system rounding / unwritten extents",
    "guest-freed": "guest data freed by the guest",
}


@dataclass
class Space:
    """The file's bytes by part (`parts` adds up to `file_size`) and the same for the disk usage
    (`allocated_parts` adds up to `allocated_size`, i.e. st_blocks * 512)."""

    path: str
    file_size: int
    allocated_size: int
    cluster_size: int
    virtual_size: int
    parts: dict[str, int]
    allocated_parts: dict[str, int]
    snapshots: dict[str, int] = field(default_factory=dict)
    """Per snapshot id: bytes `qemu-img snapshot -d` would free."""
    snapshot_names: dict[str, str] = field(default_factory=dict)
    snapshot_disk: dict[str, int] = field(default_factory=dict)
    """Per snapshot id: the disk space (bytes) of what `qemu-img snapshot -d` would free."""
    hole_bytes: int = 0
    """Bytes of the file that are holes (no disk space)."""
    deep: bool = False
    extents: dict[str, object] = field(default_factory=dict)
    """The host-extent prober's summary: method, data-bytes, unwritten-bytes, hole-bytes."""
    guest_clusters: dict[str, int] = field(default_factory=dict)
    """File bytes of the active data clusters: `written` (data extents), `unwritten` (zeroed,
    reserved space), `hole` (no disk space)."""

    @property
    def reclaimable(self) -> int:
        """Bytes a `qemu-img convert` would not copy: unused and unreferenced space (deep parts
        included when scanned; snapshots and bitmaps excluded, convert drops them too but that
        loses them)."""
        return sum(self.reclaimable_parts.values())

    @property
    def reclaimable_parts(self) -> dict[str, int]:
        """`reclaimable` by part (every part of `RECLAIMABLE_PARTS`, zeros included)."""
        return {k: self.parts.get(k, 0) for k in RECLAIMABLE_PARTS}

    def to_json(self) -> dict[str, object]:
        """`{"file-size": N, "parts": {...}, ...}` with parts adding up to file-size."""
        return {
            "file-size": self.file_size,
            "parts": dict(self.parts),
            "allocated-size": self.allocated_size,
            "allocated-parts": dict(self.allocated_parts),
            "snapshots": [{"id": sid, "name": self.snapshot_names.get(sid, ""), "exclusive-bytes": b}
                          for sid, b in self.snapshots.items()],
            "hole-bytes": self.hole_bytes,
            "host-extents": dict(self.extents),
            "data-clusters": dict(self.guest_clusters),
            "deep": self.deep,
        }


def file_holes(img: Image) -> tuple[I64, I64]:
    """(start, end) byte ranges of the image file that are holes (no disk space)."""
    return img.file.host_extents().ranges(ExtentKind.HOLE)


def not_written(ext: HostExtents) -> tuple[I64, I64]:
    """(start, end) ranges that hold no written data (holes and unwritten extents), merged."""
    sel = ext.kind != int(ExtentKind.DATA)
    s, e = ext.start[sel], ext.end[sel]
    if not len(s):
        return s, e
    brk = np.concatenate(([True], s[1:] != e[:-1]))
    idx = np.flatnonzero(brk)
    ends = np.concatenate((e[idx[1:] - 1], e[-1:]))
    return s[brk], ends


@dataclass(frozen=True)
class HoleMap:
    """The file's holes per host cluster, sparse: runs of clusters entirely in a hole, and the
    clusters a hole covers in part with the bytes it covers."""

    full_start: I64
    full_end: I64
    part_cluster: I64
    part_bytes: I64
    full_bytes: int = 0
    starts: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    ends: I64 = field(default_factory=lambda: np.zeros(0, np.int64))

    def cover(self, x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Bytes of holes below each file offset in `x` (any shape)."""
        hs, he = self.starts, self.ends
        if not len(hs):
            return np.zeros(np.shape(x), dtype=np.int64)
        prefix = np.concatenate(([0], np.cumsum(he - hs)))
        k = np.searchsorted(he, x, side="right")
        inside = k < len(hs)
        part = np.where(inside, np.clip(x - hs[np.minimum(k, len(hs) - 1)], 0, None), 0)
        out: npt.NDArray[np.int64] = prefix[k] + part
        return out

    @property
    def total(self) -> int:
        """Bytes of the file that are holes."""
        return self.full_bytes + int(self.part_bytes.sum())

    def per_part(self, p: npt.NDArray[np.uint8], nparts: int, cluster_size: int) -> I64:
        """Hole bytes falling in each part, `p` being the part index of every cluster."""
        out = np.zeros(nparts, dtype=np.int64)
        if len(self.full_start):
            idx = np.concatenate([p[a:b] for a, b in zip(self.full_start.tolist(), self.full_end.tolist(),
                                                          strict=True)])
            out += np.bincount(idx, minlength=nparts).astype(np.int64) * cluster_size
        if len(self.part_cluster):
            out += np.bincount(p[self.part_cluster], weights=self.part_bytes, minlength=nparts).astype(np.int64)
        return out

    def at(self, clusters: I64, cluster_size: int) -> I64:
        """Hole bytes of the given clusters."""
        out = np.zeros(len(clusters), dtype=np.int64)
        if len(self.full_start):
            k = np.searchsorted(self.full_start, clusters, side="right") - 1
            ok = k >= 0
            inside = np.zeros(len(clusters), dtype=bool)
            inside[ok] = clusters[ok] < self.full_end[k[ok]]
            out[inside] = cluster_size
        if len(self.part_cluster):
            order = np.argsort(self.part_cluster, kind="stable")
            pc, pb = self.part_cluster[order], self.part_bytes[order]
            uniq, first = np.unique(pc, return_index=True)
            sums = np.add.reduceat(pb, first)
            k = np.searchsorted(uniq, clusters)
            hit = (k < len(uniq)) & (uniq[np.minimum(k, len(uniq) - 1)] == clusters)
            out[hit] += sums[k[hit]]
        return out


def hole_map(holes: tuple[I64, I64], cluster_size: int, file_size: int) -> HoleMap:
    """Turn hole byte ranges into a `HoleMap` (O(holes), no per-cluster array)."""
    hs, he = holes
    he = np.minimum(he, file_size)
    keep = he > hs
    hs, he = hs[keep], he[keep]
    cs = cluster_size
    first_full = -(-hs // cs)
    end_full = he // cs
    whole = end_full > first_full
    head_c = hs // cs
    head = (hs % cs != 0) | ~whole
    head_bytes = np.minimum(he, (head_c + 1) * cs) - hs
    tail = (he % cs != 0) & (end_full > head_c)
    pc = np.concatenate((head_c[head], end_full[tail]))
    pb = np.concatenate((head_bytes[head], (he - end_full * cs)[tail]))
    fs, fe = first_full[whole], end_full[whole]
    return HoleMap(fs, fe, pc, pb, int(((fe - fs) * cs).sum()), hs, he)


def hole_bytes_per_cluster(holes: tuple[I64, I64], nb_clusters: int, cluster_size: int, file_size: int) -> I64:
    """Bytes of each host cluster that lie in a hole (a dense array; for tests and small files)."""
    hm = hole_map(holes, cluster_size, file_size)
    return hm.at(np.arange(nb_clusters, dtype=np.int64), cluster_size)


def _popcount32(x: npt.NDArray[np.uint64]) -> I64:
    """Bits set in the low 32 bits of each element."""
    v = (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if hasattr(np, "bitwise_count"):
        out: I64 = np.bitwise_count(v).astype(np.int64)
        return out
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    res: I64 = table[v.view(np.uint8).reshape(-1, 4)].sum(axis=1)
    return res


def _split_partial(lay: Layout, p: npt.NDArray[np.uint8], data_part: int, holes: HoleMap, unwritten: HoleMap,
                   moves: dict[str, int], alloc_moves: dict[str, int]) -> None:
    """Extended L2 clusters with mixed subclusters: only data subclusters are guest data.

    Zero subclusters count as zero-allocated, unallocated ones as preallocated-unused. Clusters
    that are whole and all written are split by counting bits; the few others (the file's last,
    short cluster, clusters with holes or unwritten extents) subcluster by subcluster.
    `compute_space` has already put every cluster here into guest data, its holes and unwritten
    bytes into preallocated-unused; this moves the rest.
    """
    cs = lay.cluster_size
    sc = cs // C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
    nb = lay.nb_clusters
    pcs = lay.partial_clusters
    sel = p[pcs] == data_part
    pcs, bm = pcs[sel], lay.partial_bitmaps[sel]
    if not len(pcs):
        return
    alloc = bm & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
    zero = bm >> np.uint64(32)
    special = (holes.at(pcs, cs) > 0) | (unwritten.at(pcs, cs) > 0) | (pcs == nb - 1)
    # Simple clusters: whole, all written.
    n_zero = _popcount32(zero[~special])
    n_unused = 32 - _popcount32((alloc | zero)[~special])
    zero_b = int(n_zero.sum()) * sc
    unused_b = int(n_unused.sum()) * sc
    for m in (moves, alloc_moves):
        m["guest-data"] -= zero_b + unused_b
        m["zero-allocated"] += zero_b
        m["preallocated-unused"] += unused_b
    if not special.any():
        return
    # Special clusters: per subcluster, the bytes inside the file, its hole and unwritten bytes.
    spc = pcs[special]
    j = np.arange(C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER, dtype=np.uint64)
    a_bits = ((alloc[special][:, None] >> j[None, :]) & np.uint64(1)).astype(bool)
    z_bits = ((zero[special][:, None] >> j[None, :]) & np.uint64(1)).astype(bool)
    start = spc[:, None] * cs + j.astype(np.int64)[None, :] * sc
    inside = np.clip(lay.file_size - start, 0, sc)
    h = holes.cover(start + inside) - holes.cover(start)
    u = unwritten.cover(start + inside) - unwritten.cover(start)
    d = inside - h - u
    for name, mask in (("zero-allocated", z_bits), ("preallocated-unused", ~a_bits & ~z_bits)):
        moves["guest-data"] -= int(d[mask].sum())
        moves["preallocated-unused"] -= int((h + u)[mask].sum())
        moves[name] += int(inside[mask].sum())
        alloc_moves["guest-data"] -= int(d[mask].sum())
        alloc_moves["preallocated-unused"] -= int(u[mask].sum())
        alloc_moves[name] += int((d + u)[mask].sum())


def compute_space(img: Image, layout: Layout | None = None, deep: DeepParts | None = None,
                  progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled) -> Space:
    """Break the file (and its disk usage) down by part; computes the layout when not given."""
    lay = layout if layout is not None else compute_layout(img, progress, cancelled)
    cs = lay.cluster_size
    nb = lay.nb_clusters
    kind = lay.kind
    flags = lay.flags
    ext = img.file.host_extents()
    holes = hole_map(ext.ranges(ExtentKind.HOLE), cs, lay.file_size)
    unwritten = hole_map(ext.ranges(ExtentKind.UNWRITTEN), cs, lay.file_size)
    live = (flags & F_LIVE) != 0

    # Part index of each cluster (one byte each); data clusters are split below.
    part_idx = {name: i for i, name in enumerate(PARTS)}
    nparts = len(PARTS)
    p = np.full(nb, part_idx["conflict"], dtype=np.uint8)

    def put(mask: npt.NDArray[np.bool_], name: str) -> None:
        p[mask] = part_idx[name]

    is_l2, is_data, is_comp = kind == Owner.L2, kind == Owner.DATA, kind == Owner.COMPRESSED
    put(kind == Owner.HEADER, "header")
    put(kind == Owner.L1, "l1-table")
    put(kind == Owner.SNAPSHOT_L1, "snapshot-l1-tables")
    put(is_l2 & live, "l2-tables")
    put(is_l2 & ~live, "snapshot-l2-tables")
    put(kind == Owner.REFCOUNT_TABLE, "refcount-table")
    put(kind == Owner.REFCOUNT_BLOCK, "refcount-blocks")
    put(is_data & live, "guest-data")
    put((is_data | is_comp) & ~live, "snapshot-data")
    put(is_comp & live, "compressed")
    put(kind == Owner.SNAPSHOT_TABLE, "snapshot-table")
    put((kind >= Owner.BITMAP_DIRECTORY) & (kind <= Owner.BITMAP_DATA), "bitmaps")
    put(kind == Owner.LUKS, "luks")
    put(kind == Owner.LEAKED, "leaked")
    put(kind == Owner.FREE, "free")
    put(kind == Owner.PAST_END, "tail")
    put(lay.owner == Owner.CONFLICT, "conflict")
    del is_l2, is_comp
    # Active clusters that read as zeros (ZERO_ALLOC, or every subcluster zero).
    zero = is_data & live & ((flags & F_ZERO) != 0) & ((flags & F_DATA) == 0)
    put(zero, "zero-allocated")
    del is_data, zero, live

    # Whole clusters per part; the last cluster of the file may be short.
    counts = np.bincount(p, minlength=nparts).astype(np.int64)
    file_parts = counts * cs
    if nb:
        file_parts[int(p[-1])] -= nb * cs - lay.file_size
    hole_parts = holes.per_part(p, nparts, cs)
    unwritten_parts = unwritten.per_part(p, nparts, cs)
    disk_parts = file_parts - hole_parts

    # Guest data the file holds as holes or unwritten extents was never written: preallocated,
    # unused (holes take no disk space, unwritten extents do).
    moves: dict[str, int] = {k: 0 for k in PARTS}
    alloc_moves: dict[str, int] = {k: 0 for k in PARTS}
    gd = part_idx["guest-data"]
    holed, unw = int(hole_parts[gd]), int(unwritten_parts[gd])
    data_clusters = {"written": int(file_parts[gd]) - holed - unw, "unwritten": unw, "hole": holed}
    moves["guest-data"] -= holed + unw
    moves["preallocated-unused"] += holed + unw
    alloc_moves["guest-data"] -= unw
    alloc_moves["preallocated-unused"] += unw
    if len(lay.partial_clusters):
        _split_partial(lay, p, gd, holes, unwritten, moves, alloc_moves)
    parts = {name: int(file_parts[i]) + moves[name] for i, name in enumerate(PARTS)}
    aparts = {name: int(disk_parts[i]) + alloc_moves[name] for i, name in enumerate(PARTS)}

    if deep is not None:
        # Deep parts come out of guest data (their bytes exclude holes, so on disk too).
        for name, nbytes in (("zero-data", deep.zero_bytes), ("backing-duplicates", deep.duplicate_bytes)):
            take = min(nbytes, parts["guest-data"])
            parts["guest-data"] -= take
            parts[name] += take
            dtake = min(nbytes, aparts["guest-data"])
            aparts["guest-data"] -= dtake
            aparts[name] += dtake
    else:
        for name in DEEP_PARTS:
            parts.pop(name)
            aparts.pop(name)

    allocated = img.file.allocated_size
    aparts["filesystem"] = allocated - sum(aparts.values())

    snaps: dict[str, int] = {}
    snap_disk: dict[str, int] = {}
    for sid, clusters in lay.snapshot_exclusive().items():
        short = nb * cs - lay.file_size if len(clusters) and int(clusters[-1]) == nb - 1 else 0
        snaps[sid] = len(clusters) * cs - short
        snap_disk[sid] = snaps[sid] - int(holes.at(clusters.astype(np.int64), cs).sum())
    names = {sn.id_str: sn.name for sn in img.snapshots}
    return Space(path=img.path, file_size=lay.file_size, allocated_size=allocated, cluster_size=cs,
                 virtual_size=img.virtual_size, parts=parts, allocated_parts=aparts, snapshots=snaps,
                 snapshot_names=names, snapshot_disk=snap_disk, hole_bytes=holes.total, deep=deep is not None,
                 extents=ext.to_json(), guest_clusters=data_clusters)


def part_label(key: str, parts: dict[str, int]) -> str:
    """A part's label; "guest data" reads "guest data in use by the guest" once the guest's own view
    has split off what it freed (`guest-freed`)."""
    if key == "guest-data" and "guest-freed" in parts:
        return "guest data in use by the guest"
    return PART_LABELS.get(key, key)


__all__ = [
    "PARTS",
    "PART_LABELS",
    "DeepParts",
    "HoleMap",
    "Space",
    "compute_space",
    "file_holes",
    "hole_bytes_per_cluster",
    "hole_map",
    "not_written",
    "part_label",
]
