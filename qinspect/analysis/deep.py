"""Deep scan: read the image's data clusters to find space a metadata walk cannot see.

Three numbers need the data itself:

* **all-zero clusters** — data clusters whose bytes are all zero (a guest that wrote zeros, a
  preallocated file that is not sparse); `qemu-img convert` does not copy them.
* **backing duplicates** — data clusters of an overlay whose bytes equal what the backing chain
  returns at the same guest offset: copy-on-write of unchanged data, typically whole clusters
  copied for a small guest write.
* **what a convert would reclaim** — the file size minus an estimate of what
  `qemu-img convert -O qcow2 [-B BACKING]` would write: header, refcount structures, the L1 table,
  the L2 tables actually needed and one cluster per guest cluster holding non-zero data.

The active layer's data extents (subcluster-exact, from the vectorised extent walk) are read in
batches of a few MiB, host-contiguous where possible; each guest cluster is judged by all its data
bytes. Bytes that hold no written data in the host file (holes and unwritten extents, per the
host-extent prober) are not read nor counted here (the space breakdown already calls them
preallocated-unused), so the result does not depend on the page cache. Compressed clusters are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from qinspect.analysis.measure import MeasureOptions, refcount_metadata_size
from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.space import not_written
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.hostfile import ExtentKind, ExtentMethod, HostExtents
from qinspect.qcow2.image import Image, Layer
from qinspect.qcow2.l2 import SubclusterType
from qinspect.qcow2.planner import Order, PieceStream

I64 = npt.NDArray[np.int64]
BATCH_BYTES = 8 << 20
CHUNK = 1 << 16
"""Ranges counted at a time by the conversion estimate."""


@dataclass(frozen=True)
class DeepScan:
    """What reading the data clusters found (bytes exclude ranges that are host-file holes)."""

    data_clusters: int
    """Guest clusters of the active layer with at least one data (sub)cluster."""
    data_bytes: int
    """Bytes of data read (extended-L2 data subclusters only)."""
    zero_clusters: int
    zero_bytes: int
    duplicate_clusters: int
    """Non-zero data clusters identical to the backing chain's content (0 without a backing file)."""
    duplicate_bytes: int
    compressed_clusters: int
    convert_size: int
    """Estimated file size of `qemu-img convert -O qcow2` of this image (with -B for overlays)."""
    convert_reclaim: int
    """File size minus `convert_size` (0 when the estimate is larger)."""
    skipped: str | None = None
    """Why nothing was read (encrypted data), or None."""
    nonzero_guest: I64 | None = field(default=None, repr=False, compare=False)
    """Guest ranges holding non-zero data (start, length): what a conversion must copy."""
    nonzero_length: I64 | None = field(default=None, repr=False, compare=False)
    zero_guest: I64 | None = field(default=None, repr=False, compare=False)
    """Guest ranges of the active layer that read as zeros (zero clusters, all-zero data)."""
    zero_length: I64 | None = field(default=None, repr=False, compare=False)


@dataclass
class _Extents:
    """The active layer's extents the deep scan needs, as parallel arrays."""

    guest: I64  # NORMAL (data) extents
    host: I64
    length: I64
    compressed: I64  # guest clusters of compressed clusters
    zero_guest: I64  # ZERO_PLAIN / ZERO_ALLOC extents
    zero_length: I64


def _active_extents(img: Image) -> _Extents:
    """Walk the active layer's L2 tables once (vectorised) and keep the extents we need."""
    keep: dict[str, list[I64]] = {k: [] for k in ("g", "h", "n", "c", "zg", "zn")}
    cs = img.cluster_size
    zero_types = np.array([SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC], dtype=np.uint8)
    for ex in img.extents():
        normal = ex.sctype == SubclusterType.NORMAL
        comp = ex.sctype == SubclusterType.COMPRESSED
        zero = np.isin(ex.sctype, zero_types)
        keep["g"].append(ex.guest[normal])
        keep["h"].append(ex.host[normal].astype(np.int64))
        keep["n"].append(ex.length[normal])
        keep["c"].append(ex.guest[comp] // cs)
        keep["zg"].append(ex.guest[zero])
        keep["zn"].append(ex.length[zero])
    cat = {k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in keep.items()}
    return _Extents(cat["g"], cat["h"], cat["n"], cat["c"], cat["zg"], cat["zn"])


def _split(guest: I64, host: I64, length: I64, unit: int) -> tuple[I64, I64, I64]:
    """Cut extents at multiples of `unit` so that each piece lies in one unit of guest space."""
    if not len(guest):
        return guest, host, length
    first = guest // unit
    last = (guest + length - 1) // unit
    cnt = last - first + 1
    idx = np.repeat(np.arange(len(guest)), cnt)
    k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ustart = (first[idx] + k) * unit
    g0 = np.maximum(guest[idx], ustart)
    g1 = np.minimum(guest[idx] + length[idx], ustart + unit)
    h0 = host[idx] + (g0 - guest[idx])
    return g0, h0, g1 - g0


def _hole_cover(holes: tuple[I64, I64], x: I64) -> I64:
    """Bytes of holes below each offset in `x`."""
    hs, he = holes
    if not len(hs):
        return np.zeros(len(x), dtype=np.int64)
    prefix = np.concatenate(([0], np.cumsum(he - hs)))
    k = np.searchsorted(he, x, side="right")
    part = np.zeros(len(x), dtype=np.int64)
    inside = k < len(hs)
    part[inside] = np.clip(x[inside] - hs[k[inside]], 0, None)
    return prefix[k] + part


def deep_scan(img: Image, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled,
              batch_bytes: int = BATCH_BYTES, convert_to: MeasureOptions | None = None) -> DeepScan:
    """Read every data cluster of the active layer (and the backing chain where it overlaps).

    `progress(done, total)` counts data bytes read; `cancelled()` is polled between batches.
    `convert_to` are the target options of the conversion whose size is estimated (default: this
    image's geometry, see `convert_options`).
    """
    cs = img.cluster_size
    target = convert_to or convert_options(img)
    ex = _active_extents(img)
    if img.encrypted:
        return DeepScan(0, 0, 0, 0, 0, 0, len(ex.compressed), 0, 0, skipped="guest data is encrypted")
    try:
        img.data_file()
        back = img.backing()
    except Qcow2Error as e:
        return DeepScan(0, 0, 0, 0, 0, 0, len(ex.compressed), 0, 0, skipped=e.message)
    # Pieces no larger than a source cluster or a target cluster, whichever is smaller: each is
    # judged zero / equal to the backing file as a whole.
    unit = min(cs, target.cluster_size)
    g, h, n = _split(ex.guest, ex.host, ex.length, unit)
    # Bytes never written (holes and unwritten extents of the file holding the data, per FIEMAP)
    # read as zeros and are preallocated space, not data: not read, not counted.
    holes = not_written(data_extents(img))
    hole_n = _hole_cover(holes, h + n) - _hole_cover(holes, h)
    nonzero = np.zeros(len(g), dtype=bool)
    differs = np.ones(len(g), dtype=bool)  # pieces left unread never count as duplicates
    # Pieces entirely in a hole of the file read as zeros: nothing to read (sparse preallocation).
    todo = np.flatnonzero(hole_n < n)
    tg, th, tn = g[todo], h[todo], n[todo]
    data_file = img.data_file()
    total = int(tn.sum())
    done = 0
    i = 0
    # Data pieces through the planner, in guest order (the backing comparison needs that order);
    # each window is read in host order with several requests in flight.
    stream = PieceStream(data_file, th, tn, Order.GIVEN, window_bytes=2 * batch_bytes)
    ends = np.cumsum(tn)
    while i < len(todo):
        if cancelled():
            stream.close()
            raise Cancelled()
        base = int(ends[i - 1]) if i else 0
        j = max(i + 1, int(np.searchsorted(ends, base + batch_bytes, side="right")))
        acc = int(ends[j - 1]) - base
        buf = stream.take(j - i)
        starts = np.concatenate(([0], np.cumsum(tn[i:j])[:-1])).astype(np.int64)
        nonzero[todo[i:j]] = np.logical_or.reduceat(buf != 0, starts)
        if back is not None:
            other = _gather(lambda off, ln: _read_layer(back, off, ln), tg[i:j], tn[i:j], acc)
            differs[todo[i:j]] = np.logical_or.reduceat(buf != other, starts)
        done += acc
        progress(done, total)
        i = j
    stream.close()
    progress(total, total)

    # Judge each source guest cluster by all of its pieces.
    cluster = g // cs
    if len(g):
        order = np.argsort(cluster, kind="stable")
        cl = cluster[order]
        first = np.flatnonzero(np.concatenate(([True], cl[1:] != cl[:-1])))
        c_nonzero = np.logical_or.reduceat(nonzero[order], first)
        c_differs = np.logical_or.reduceat(differs[order], first)
        c_bytes = np.add.reduceat((n - hole_n)[order], first)
        c_read = np.add.reduceat(n[order], first)
    else:
        c_nonzero = c_differs = np.zeros(0, dtype=bool)
        c_bytes = c_read = np.zeros(0, dtype=np.int64)
    # Clusters with no bytes outside holes are preallocated space, not zero data.
    zero_c = ~c_nonzero & (c_bytes > 0)
    dup_c = c_nonzero & ~c_differs
    zero_g = np.concatenate((ex.zero_guest, g[~nonzero]))
    zero_n = np.concatenate((ex.zero_length, n[~nonzero]))
    convert = convert_estimate(img, g[nonzero], n[nonzero], ex.compressed, zero_g, zero_n, target)
    return DeepScan(
        data_clusters=len(c_bytes), data_bytes=int(c_read.sum()),
        zero_clusters=int(np.count_nonzero(zero_c)), zero_bytes=int(c_bytes[zero_c].sum()),
        duplicate_clusters=int(np.count_nonzero(dup_c)), duplicate_bytes=int(c_bytes[dup_c].sum()),
        compressed_clusters=len(ex.compressed), convert_size=convert,
        convert_reclaim=max(0, img.file.size - convert),
        nonzero_guest=g[nonzero], nonzero_length=n[nonzero], zero_guest=zero_g, zero_length=zero_n,
    )


def data_extents(img: Image) -> HostExtents:
    """The host extents of the file holding the guest data (the image, or its external data file);
    none when the external data file cannot be opened (its data cannot be read either)."""
    try:
        return img.data_file().host_extents()
    except Qcow2Error:
        z = np.zeros(0, np.int64)
        return HostExtents(z, z, np.zeros(0, np.uint8), ExtentMethod.NONE, 0)


def _read_layer(layer: Layer, offset: int, length: int) -> bytes:
    """Guest bytes of a backing layer; past its end (a shorter backing file) reads zeros."""
    avail = max(0, min(length, layer.virtual_size - offset))
    head = layer.read(offset, avail) if avail else b""
    return head + bytes(length - avail)


def _gather(read: Callable[[int, int], bytes], offs: I64, lens: I64, total: int) -> npt.NDArray[np.uint8]:
    """Guest pieces (offset, length) of a backing layer into one buffer, contiguous pieces in one
    `read` (these go through the layer's own guest view, whose file reads use the planner)."""
    buf = np.empty(total, dtype=np.uint8)
    pos = 0
    k = 0
    while k < len(offs):
        m = k + 1
        while m < len(offs) and int(offs[m]) == int(offs[m - 1] + lens[m - 1]):
            m += 1
        span = int(lens[k:m].sum())
        buf[pos : pos + span] = np.frombuffer(read(int(offs[k]), span), dtype=np.uint8)
        pos += span
        k = m
    return buf


def convert_options(img: Image) -> MeasureOptions:
    """The target options a conversion that keeps this image's geometry uses: its cluster size,
    extended L2 and refcount width (compat 1.1, as qemu-img's default)."""
    h = img.header
    return MeasureOptions(cluster_size=h.cluster_size, extended_l2=h.extended_l2, refcount_bits=h.refcount_bits)


class _Distinct:
    """How many distinct units (target clusters, L2 tables, file-system blocks) a stream of unit
    intervals `[first, last]` names, in memory bounded by what is still open.

    Intervals arrive a chunk at a time in guest order; `settle(frontier)` says that no later
    interval starts below unit `frontier`, which closes every interval that ends before it. Only
    the open ones (at most those that reach the frontier) are kept.
    """

    def __init__(self) -> None:
        self.count = 0
        self.max = -1
        self._first = np.zeros(0, np.int64)
        self._last = np.zeros(0, np.int64)

    def add(self, first: I64, last: I64) -> None:
        if not len(first):
            return
        f = np.concatenate((self._first, first))
        l_ = np.concatenate((self._last, last))
        order = np.argsort(f, kind="stable")
        f, l_ = f[order], l_[order]
        # Merge overlapping intervals (touching ones may stay apart: they share no unit).
        reach = np.maximum.accumulate(l_)
        brk = np.concatenate(([True], f[1:] > reach[:-1]))
        idx = np.flatnonzero(brk)
        self._first = f[idx]
        self._last = np.maximum.reduceat(l_, idx)
        self.max = max(self.max, int(self._last[-1]))

    def settle(self, frontier: int | None) -> None:
        k = len(self._last) if frontier is None else int(np.searchsorted(self._last, frontier, side="left"))
        if k:
            self.count += int((self._last[:k] - self._first[:k] + 1).sum())
            self._first, self._last = self._first[k:], self._last[k:]


def _units(guest: I64, length: I64, unit: int) -> tuple[I64, I64]:
    """The unit intervals `[first, last]` that guest ranges touch."""
    return guest // unit, (guest + length - 1) // unit


@dataclass
class _Summary:
    """What a conversion writes, counted in one pass over the ranges to copy (see `convert_estimate`)."""

    data: _Distinct = field(default_factory=_Distinct)
    """Target clusters written: data, compressed, and (overlays) those zeros cover in part."""
    l2: _Distinct = field(default_factory=_Distinct)
    """L2 tables those clusters and (overlays) the zero ranges need."""
    plain: _Distinct = field(default_factory=_Distinct)
    """Target clusters holding data or compressed clusters only."""
    plain_l2: _Distinct = field(default_factory=_Distinct)
    blocks: _Distinct = field(default_factory=_Distinct)
    """File-system blocks (extended L2: written subclusters) holding data or compressed clusters."""
    data_end: int = -1
    """The end of the last data range."""
    compressed_last: int = -1
    """The last target cluster where a compressed cluster starts."""
    has_data: bool = False
    zero_carry: tuple[int, int] | None = None
    """A run of zeros that may continue in the next chunk (not counted yet)."""


@dataclass(frozen=True)
class _Geometry:
    tcs: int
    t_l2: int
    cs: int
    zero_unit: int
    block_unit: int
    with_zeros: bool


def _geometry(img: Image, o: MeasureOptions) -> _Geometry:
    tcs = o.cluster_size
    return _Geometry(tcs, tcs // (16 if o.extended_l2 else 8), img.cluster_size,
                     tcs // 32 if o.extended_l2 else tcs, max(tcs // 32, 4096), img.header.backing_file is not None)


def _summarise_chunk(s: _Summary, g: _Geometry, dg: I64, dn: I64, comp: I64, zg: I64, zn: I64,
                     bound: int | None) -> None:
    """Count one chunk of ranges; `bound`: no later range starts below it (None: the last chunk)."""
    tcs, t_l2 = g.tcs, g.t_l2
    cg, cn = comp * g.cs, np.full(len(comp), g.cs, np.int64)
    df, dl = _units(dg, dn, tcs)
    cf, cl = _units(cg, cn, tcs)
    pf, pl = np.concatenate((df, cf)), np.concatenate((dl, cl))
    s.plain.add(pf, pl)
    s.plain_l2.add(pf // t_l2, pl // t_l2)
    bf, bl = [np.concatenate(x) for x in zip(_units(dg, dn, g.block_unit), _units(cg, cn, g.block_unit), strict=True)]
    s.blocks.add(bf, bl)
    if len(dg):
        s.has_data = True
        s.data_end = max(s.data_end, int((dg + dn).max()))
    if len(comp):
        s.compressed_last = max(s.compressed_last, int((cg // tcs).max()))
    frontier = bound
    af, al = pf, pl
    zf, zl = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if g.with_zeros:
        if s.zero_carry is not None:
            zg = np.concatenate(([s.zero_carry[0]], zg))
            zn = np.concatenate(([s.zero_carry[1] - s.zero_carry[0]], zn))
            s.zero_carry = None
        if len(zg):
            # Merge touching zero ranges into runs: a unit is covered only by one run entirely.
            order = np.argsort(zg, kind="stable")
            zs, ze = zg[order], zg[order] + zn[order]
            run_end = np.maximum.accumulate(ze)
            brk = np.concatenate(([True], zs[1:] > run_end[:-1]))
            idx = np.flatnonzero(brk)
            starts, ends = zs[idx], np.maximum.reduceat(ze, idx)
            if bound is not None and int(ends[-1]) >= bound:
                # The last run may go on in the next chunk: count it there.
                s.zero_carry = (int(starts[-1]), int(ends[-1]))
                starts, ends = starts[:-1], ends[:-1]
                frontier = min(bound, s.zero_carry[0])
            u = g.zero_unit
            # Units a run covers in part (its first and last, where it does not start/end on one)
            # are allocated and copied on write.
            partial = np.concatenate((starts[starts % u != 0] // u, (ends[ends % u != 0] - 1) // u)) * u // tcs
            af, al = np.concatenate((pf, partial)), np.concatenate((pl, partial))
            zf, zl = _units(starts, ends - starts, tcs)
    s.data.add(af, al)
    s.l2.add(np.concatenate((af, zf)) // t_l2, np.concatenate((al, zl)) // t_l2)
    fu = None if frontier is None else frontier // tcs
    fl2 = None if fu is None else fu // t_l2
    s.data.settle(fu)
    s.plain.settle(fu)
    s.l2.settle(fl2)
    s.plain_l2.settle(fl2)
    s.blocks.settle(None if frontier is None else frontier // g.block_unit)


def _summarise_arrays(img: Image, o: MeasureOptions, dg: I64, dn: I64, comp: I64, zg: I64 | None,
                      zn: I64 | None) -> _Summary:
    """The ranges given (in any order) counted in guest order, `CHUNK` ranges at a time."""
    g = _geometry(img, o)
    s = _Summary()
    z = np.zeros(0, np.int64)
    zg, zn = (zg, zn) if zg is not None and zn is not None else (z, z)
    comp = np.sort(comp)
    od, oz = np.argsort(dg, kind="stable"), np.argsort(zg, kind="stable")
    dg, dn, zg, zn = dg[od], dn[od], zg[oz], zn[oz]
    del od, oz
    starts = np.sort(np.concatenate((dg, comp * g.cs, zg)))
    bounds = [*starts[CHUNK::CHUNK].tolist(), None]
    del starts
    lo = (0, 0, 0)
    for b in bounds:
        hi = (len(dg), len(comp), len(zg)) if b is None else \
            (int(np.searchsorted(dg, b)), int(np.searchsorted(comp * g.cs, b)), int(np.searchsorted(zg, b)))
        _summarise_chunk(s, g, dg[lo[0]:hi[0]], dn[lo[0]:hi[0]], comp[lo[1]:hi[1]], zg[lo[2]:hi[2]],
                         zn[lo[2]:hi[2]], b)
        lo = hi
    return s


def _summarise_written(img: Image, o: MeasureOptions) -> _Summary:
    """`written_ranges` counted a batch of extents at a time, never all at once (a million
    alternating extents stay a few MiB)."""
    g = _geometry(img, o)
    s = _Summary()
    ext = data_extents(img)
    ws, we = ext.ranges(ExtentKind.DATA)
    ns, ne = not_written(ext)
    cs = img.cluster_size
    zero_types = np.array([SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC], dtype=np.uint8)
    pending: tuple[I64, I64, I64, I64, I64] | None = None
    for ex in img.extents():
        if not len(ex.guest):
            continue
        if pending is not None:
            _summarise_chunk(s, g, *pending, int(ex.guest[0]))
        normal = ex.sctype == SubclusterType.NORMAL
        gg, hh, nn = ex.guest[normal], ex.host[normal].astype(np.int64), ex.length[normal]
        dg, dn = _cut(gg, hh, nn, ws, we)
        hg, hn = _cut(gg, hh, nn, ns, ne)
        zero = np.isin(ex.sctype, zero_types)
        comp = (ex.guest[ex.sctype == SubclusterType.COMPRESSED] // cs).astype(np.int64)
        pending = (dg, dn, comp, np.concatenate((ex.guest[zero], hg)).astype(np.int64),
                   np.concatenate((ex.length[zero], hn)).astype(np.int64))
    if pending is not None:
        _summarise_chunk(s, g, *pending, None)
    else:
        s.data.settle(None)  # nothing at all
    return s


def _estimate(img: Image, o: MeasureOptions, s: _Summary) -> int:
    tcs = o.cluster_size
    t_l2 = tcs // (16 if o.extended_l2 else 8)
    data_c, l2_tables = s.data.count, s.l2.count
    l1_entries = -(-img.virtual_size // (tcs * t_l2))
    l1_clusters = -(-l1_entries * 8 // tcs)
    clusters = 1 + l1_clusters + l2_tables + data_c
    size = clusters * tcs + refcount_metadata_size(clusters, tcs, o.refcount_bits.bit_length() - 1)
    if not data_c and not l2_tables:
        size -= l1_clusters * tcs - l1_entries * 8  # qemu-img leaves the file ending at the L1 table
    elif o.extended_l2 and data_c and s.has_data:
        # The last data cluster is written only up to its last written subcluster.
        sub = tcs // 32
        last = s.data.max
        if s.data_end > last * tcs and s.compressed_last != last:
            end_in = min(s.data_end - last * tcs, tcs)
            size -= tcs - -(-end_in // sub) * sub
    return size


def convert_estimate(img: Image, data_guest: I64, data_length: I64, compressed_clusters: I64,
                     zero_guest: I64 | None = None, zero_length: I64 | None = None,
                     options: MeasureOptions | None = None) -> int:
    """Estimated file size of `qemu-img convert -O qcow2 -o OPTIONS [-B BACKING] IMG OUT`.

    `data_guest`/`data_length` are the active layer's guest ranges holding non-zero data,
    `compressed_clusters` the guest cluster indices of its compressed clusters (decompressed and
    assumed non-zero), `zero_*` its ranges that read as zeros (zero clusters and all-zero data).
    Every target cluster touched by data is written. Without a backing file zeros are not written
    at all; for overlays the conversion keeps the backing file (-B): ranges of zeros become zero
    clusters (which need their L2 table) where they cover whole target clusters, and partly covered
    clusters are written (copy-on-write). The file ends right after the L1 table when nothing else
    is written.
    """
    o = options or convert_options(img)
    return _estimate(img, o, _summarise_arrays(img, o, data_guest, data_length, compressed_clusters,
                                               zero_guest, zero_length))


@dataclass(frozen=True)
class ConvertPrediction:
    """What `qemu-img convert -O qcow2 -o OPTIONS` of this image is predicted to produce."""

    file_size: int
    disk_usage: int
    data_clusters: int
    l2_tables: int


def _cut(guest: I64, host: I64, length: I64, rs: I64, re: I64) -> tuple[I64, I64]:
    """Guest pieces of the extents (guest, host, length) whose host bytes lie in ranges [rs, re)."""
    if not len(guest) or not len(rs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    h1 = host + length
    k0 = np.searchsorted(re, host, side="right")
    k1 = np.searchsorted(rs, h1, side="left")
    cnt = np.maximum(k1 - k0, 0)
    idx = np.repeat(np.arange(len(guest)), cnt)
    k = k0[idx] + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    a = np.maximum(host[idx], rs[k])
    b = np.minimum(h1[idx], re[k])
    keep = b > a
    idx, a, b = idx[keep], a[keep], b[keep]
    return guest[idx] + (a - host[idx]), b - a


def written_ranges(img: Image) -> tuple[I64, I64, I64, I64, I64]:
    """Without reading data: (data guest, data length, compressed clusters, zero guest, zero length).

    Data is what the active layer's data extents hold in written host extents (FIEMAP); what they
    hold in holes or unwritten extents reads as zeros and joins the zero ranges.
    """
    ex = _active_extents(img)
    ext = data_extents(img)
    ws, we = ext.ranges(ExtentKind.DATA)
    order = np.argsort(ex.host, kind="stable")
    g, h, n = ex.guest[order], ex.host[order], ex.length[order]
    dg, dn = _cut(g, h, n, ws, we)
    ns, ne = not_written(ext)
    zg, zn = _cut(g, h, n, ns, ne)
    return dg, dn, ex.compressed, np.concatenate((ex.zero_guest, zg)), np.concatenate((ex.zero_length, zn))


def predict_convert(img: Image, options: MeasureOptions, deep: DeepScan | None = None) -> ConvertPrediction:
    """File size and disk usage of `qemu-img convert -O qcow2 -o OPTIONS [-B BACKING]` of `img`.

    The data that must be copied is the deep scan's non-zero data when there is one, else the
    data extents that hold written host data. The file size is `convert_estimate`'s. On disk,
    qemu-img writes every metadata cluster whole except the L1 table (written up to its last
    entry, rounded to 4 KiB); without extended L2 each data cluster is written whole (QEMU
    zero-fills the rest of a partly written cluster), with extended L2 only the subclusters that
    hold data are written (4 KiB file-system blocks), the others stay holes.
    """
    if deep is not None and deep.nonzero_guest is not None and deep.nonzero_length is not None:
        summary = _summarise_arrays(img, options, deep.nonzero_guest, deep.nonzero_length, _compressed(img),
                                    deep.zero_guest, deep.zero_length)
    else:
        summary = _summarise_written(img, options)
    size = _estimate(img, options, summary)
    tcs = options.cluster_size
    data_c = summary.plain.count
    t_l2 = tcs // (16 if options.extended_l2 else 8)
    l1_entries = -(-img.virtual_size // (tcs * t_l2))
    l1_clusters = -(-l1_entries * 8 // tcs)
    l1_written = -(-l1_entries * 8 // 4096) * 4096
    disk = size
    if data_c:
        disk -= max(0, l1_clusters * tcs - l1_written)
        if options.extended_l2:
            unit = max(tcs // 32, 4096)
            disk -= data_c * tcs - summary.blocks.count * unit
    return ConvertPrediction(size, max(0, min(disk, size)), data_c, summary.plain_l2.count)


def _compressed(img: Image) -> I64:
    """Guest cluster indices of the active layer's compressed clusters."""
    cs = img.cluster_size
    parts = [ex.guest[ex.sctype == SubclusterType.COMPRESSED] // cs for ex in img.extents()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


__all__ = ["ConvertPrediction", "DeepScan", "convert_estimate", "convert_options", "deep_scan", "predict_convert",
           "written_ranges"]
