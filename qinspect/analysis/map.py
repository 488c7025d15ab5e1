"""The guest map with `qemu-img map --output=json` semantics (QEMU 7.2, plus 8.2's `compressed`).

Each layer reports block status per extent (data / zero / allocated / offset / compressed) the way
`qcow2_co_block_status` and the generic block layer do, including the recursion into the host file
for metadata-preallocated images; unallocated ranges descend the backing chain; the results are
merged exactly as qemu-img merges them.

Everything runs on arrays, a batch of extents at a time (`MapRuns`): block status, merging and the
JSON text; Python loops only over the runs that need the host file asked (metadata preallocation)
or a backing layer consulted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.extents import ERROR_MESSAGES, ExtentError
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.image import Image, Layer, RawLayer
from qinspect.qcow2.l2 import SubclusterType

# BDRV_BLOCK_* flags we model.
DATA = 1
ZERO = 2
ALLOCATED = 4
OFFSET_VALID = 8
COMPRESSED = 16

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_FLAGS_BY_TYPE = np.zeros(8, dtype=np.uint8)
_FLAGS_BY_TYPE[SubclusterType.NORMAL] = DATA | OFFSET_VALID
_FLAGS_BY_TYPE[SubclusterType.ZERO_ALLOC] = ZERO | OFFSET_VALID
_FLAGS_BY_TYPE[SubclusterType.UNALLOCATED_ALLOC] = OFFSET_VALID
_FLAGS_BY_TYPE[SubclusterType.ZERO_PLAIN] = ZERO
_FLAGS_BY_TYPE[SubclusterType.UNALLOCATED_PLAIN] = 0
_FLAGS_BY_TYPE[SubclusterType.COMPRESSED] = DATA | COMPRESSED


@dataclass(frozen=True)
class MapEntry:
    """One merged range of `qemu-img map` output."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"start": self.start, "length": self.length, "depth": self.depth,
                                "present": self.present, "zero": self.zero, "data": self.data,
                                "compressed": self.compressed}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclass
class MapRuns:
    """Parallel arrays, one element per range, in guest order (raw block status or merged entries).

    `flags` holds the BDRV_BLOCK_* bits of this module; `offset` is -1 where no offset is reported.
    """

    start: I64
    length: I64
    flags: U8
    offset: I64
    depth: I64

    def __len__(self) -> int:
        return len(self.start)

    def take(self, sel: npt.NDArray[np.bool_] | I64 | slice) -> MapRuns:
        return MapRuns(self.start[sel], self.length[sel], self.flags[sel], self.offset[sel], self.depth[sel])

    @staticmethod
    def concat(parts: list[MapRuns]) -> MapRuns:
        if len(parts) == 1:
            return parts[0]
        return MapRuns(*(np.concatenate([getattr(p, k) for p in parts])
                         for k in ("start", "length", "flags", "offset", "depth")))

    @staticmethod
    def one(start: int, length: int, flags: int, offset: int, depth: int) -> MapRuns:
        return MapRuns(np.array([start], np.int64), np.array([length], np.int64), np.array([flags], np.uint8),
                       np.array([offset], np.int64), np.array([depth], np.int64))

    def entries(self) -> Iterator[MapEntry]:
        for s, n, f, o, d in zip(self.start.tolist(), self.length.tolist(), self.flags.tolist(),
                                 self.offset.tolist(), self.depth.tolist(), strict=True):
            yield MapEntry(s, n, d, bool(f & ALLOCATED), bool(f & ZERO), bool(f & DATA), bool(f & COMPRESSED),
                           o if o >= 0 else None)


def metadata_preallocated(img: Image) -> bool:
    """qcow2_detect_metadata_preallocation: at least `threshold` referenced clusters (QEMU returns
    `cluster_count >= threshold` and stops counting there), where the threshold is a little more
    than the clusters the file really holds."""
    f = img.file
    cs = img.cluster_size
    real_clusters = f.allocated_size // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-f.size // cs)
    if end_cluster < threshold:
        return False  # cannot reach the threshold: no need to read refcount blocks
    per = img.header.refcount_block_entries
    count = 0
    for b in range(-(-end_cluster // per)):
        try:
            block = img.refcount_block(b)
        except Qcow2Error:
            return False
        if block is None:
            continue
        hi = min(per, end_cluster - b * per)
        count += int(np.count_nonzero(block[:hi]))
        if count >= threshold:
            return True
    return False


class _HostProbe:
    """`HostFile.data_extent` answers for one host file, remembering the last hole and data extent.

    Queries in ascending host order are mostly answered from what the previous SEEK_DATA and
    SEEK_HOLE calls found (a hole and the data extent after it), so a map of a
    metadata-preallocated image costs about two lseeks per data extent of the file.
    """

    def __init__(self, host: HostFile) -> None:
        self.host = host
        self.size = host.size
        self.hole = (0, 0)  # [a, b): no data; b is where data starts (or the file size)
        self.data = (0, 0)  # [a, b): data up to the hole at b

    def extent(self, off: int) -> tuple[bool, int]:
        """(is_data, end) exactly as `HostFile.data_extent(off)` would return, for off < size."""
        a, b = self.hole
        if a <= off < b:
            return False, b
        a, b = self.data
        if a <= off < b:
            return True, b
        return self.miss(off)

    def miss(self, off: int) -> tuple[bool, int]:
        nxt = self.host.next_data(off)  # the one host-extent prober (SEEK_DATA/SEEK_HOLE here)
        if nxt is None:
            self.hole = (off, self.size)
            return False, self.size
        d, h = nxt
        self.data = (d, h)
        if d > off:
            self.hole = (off, d)
            return False, d
        return True, h


# Data runs of a metadata-preallocated image are split this many at a time, sorted by host offset
# (the more at once, the more the probe's memory helps; bounded to bound memory).
SPLIT_RUNS = 1 << 17
FIRST_SPLIT_RUNS = 1 << 11


def _host_zero_split(probe: _HostProbe, runs: MapRuns) -> tuple[MapRuns, I64]:
    """BDRV_BLOCK_RECURSE: ask the host file whether each data run is really a hole.

    Returns the pieces (in guest order) and how many each run became. The host file is asked
    once per hole + data extent under the runs, in host order; the pieces are then cut with array
    operations, exactly where the per-piece loop of `_host_zero_split_loop` would cut them.
    """
    size = probe.size
    order = np.argsort(runs.offset, kind="stable")
    h0s = runs.offset[order].tolist()
    ends = (runs.offset + runs.length)[order].tolist()
    starts: list[int] = []  # known extents of the host file, ascending and disjoint
    stops: list[int] = []
    is_data: list[bool] = []
    covered = -1
    for h0, end in zip(h0s, ends, strict=True):
        cur = h0 if h0 > covered else covered
        lim = end if end < size else size
        while cur < lim:
            nxt = probe.host.next_data(cur)
            if nxt is None:  # no data after cur: a hole up to EOF and past it
                starts.append(cur)
                stops.append(_INF)
                is_data.append(False)
                cur = _INF
                break
            d, h = nxt
            if d > cur:
                starts.append(cur)
                stops.append(d)
                is_data.append(False)
            starts.append(d)
            stops.append(h)
            is_data.append(True)
            cur = h
        if cur > covered:
            covered = cur
    if not stops or stops[-1] != _INF:
        starts.append(size)  # past EOF: EOF|ZERO up to the end of the request
        stops.append(_INF)
        is_data.append(False)
    ks = np.array(starts, dtype=np.int64)
    ke = np.array(stops, dtype=np.int64)
    kd = np.array(is_data, dtype=bool)
    h0 = runs.offset
    end = runs.offset + runs.length
    k0 = np.searchsorted(ks, h0, side="right") - 1
    k1 = np.searchsorted(ks, end - 1, side="right") - 1
    if len(h0) and (k0.min() < 0 or bool((ke[k0] <= h0).any()) or bool((k1 < k0).any())):
        return _host_zero_split_loop(probe, runs)  # not covered (cannot happen): ask piece by piece
    counts = (k1 - k0 + 1).astype(np.int64)
    first = np.cumsum(counts) - counts
    k = np.repeat(k0, counts) + (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts))
    rh0 = np.repeat(h0, counts)
    rend = np.repeat(end, counts)
    pstart = np.maximum(rh0, ks[k])
    pend = np.minimum(rend, ke[k])
    flags = np.repeat(runs.flags, counts)
    flags[~kd[k]] |= np.uint8(ZERO)
    out = MapRuns(np.repeat(runs.start, counts) + (pstart - rh0), pend - pstart, flags, pstart,
                  np.repeat(runs.depth, counts))
    return out, counts


_INF = 1 << 62  # "to the end of any request"


def _host_zero_split_loop(probe: _HostProbe, runs: MapRuns) -> tuple[MapRuns, I64]:
    """`_host_zero_split` piece by piece, through the probe (the reference implementation).

    Runs are visited in host order (so the probe's memory helps) and the pieces put back in
    guest order. Returns the pieces and how many each run became.
    """
    size = probe.size
    starts, lens, hosts = runs.start.tolist(), runs.length.tolist(), runs.offset.tolist()
    rid: list[int] = []
    ps: list[int] = []
    ns: list[int] = []
    zs: list[bool] = []
    hs: list[int] = []
    ha, hb = probe.hole
    da, db = probe.data
    for r in np.argsort(runs.offset, kind="stable").tolist():
        g0, ln, h0 = starts[r], lens[r], hosts[r]
        pos = 0
        while pos < ln:
            hoff = h0 + pos
            if hoff >= size:
                n, is_data = ln - pos, False
            else:
                if ha <= hoff < hb:
                    is_data, ext_end = False, hb
                elif da <= hoff < db:
                    is_data, ext_end = True, db
                else:
                    is_data, ext_end = probe.miss(hoff)
                    ha, hb = probe.hole
                    da, db = probe.data
                n = ext_end - hoff
                if n < 1:
                    n = 1
                if n > ln - pos or (not is_data and ext_end >= size):
                    n = ln - pos  # (a trailing hole: EOF|ZERO covers the whole request)
            rid.append(r)
            ps.append(g0 + pos)
            ns.append(n)
            zs.append(not is_data)
            hs.append(hoff)
            pos += n
    ids = np.array(rid, dtype=np.int64)
    perm = np.argsort(ids, kind="stable")  # back to guest order; a run's pieces stay in order
    counts = np.bincount(ids, minlength=len(starts)).astype(np.int64)
    out = MapRuns(np.array(ps, dtype=np.int64)[perm], np.array(ns, dtype=np.int64)[perm],
                  np.repeat(runs.flags, counts), np.array(hs, dtype=np.int64)[perm], np.repeat(runs.depth, counts))
    out.flags[np.array(zs, dtype=bool)[perm]] |= np.uint8(ZERO)
    return out, counts


def _qcow2_runs(img: Image, start: int, end: int, probe: _HostProbe | None, depth: int) -> Iterator[MapRuns]:
    """Block status of one qcow2 layer, a batch of extents at a time (unallocated: no flags).

    With a probe (metadata preallocation), batches are gathered until SPLIT_RUNS data runs wait
    for the host file, so that many are looked up in one host-ordered pass; the first gatherings
    are smaller (FIRST_SPLIT_RUNS, doubling), so that the first ranges of a map stream out at once.
    """
    enc = img.encrypted
    held: list[MapRuns] = []
    waiting = 0
    limit = FIRST_SPLIT_RUNS

    def flush() -> MapRuns:
        nonlocal held, waiting
        runs = MapRuns.concat(held)
        held, waiting = [], 0
        assert probe is not None
        split = ((runs.flags & DATA) != 0) & ((runs.flags & OFFSET_VALID) != 0)
        if split.any():
            runs = _splice(runs, split, *_host_zero_split(probe, runs.take(split)))
        return runs

    for ex in img.extents(start, end):
        bad = np.flatnonzero(ex.error != 0)
        stop = int(bad[0]) if len(bad) else len(ex)
        if stop:
            flags = _FLAGS_BY_TYPE[ex.sctype[:stop]]
            if enc:
                flags = flags & np.uint8(~OFFSET_VALID & 0xFF)
                offset = np.full(stop, -1, dtype=np.int64)
            else:
                offset = np.where((flags & OFFSET_VALID) != 0, ex.host[:stop].astype(np.int64), np.int64(-1))
            runs = MapRuns(ex.guest[:stop].astype(np.int64), ex.length[:stop].astype(np.int64), flags, offset,
                           np.full(stop, depth, dtype=np.int64))
            if probe is None:
                yield runs
            else:
                held.append(runs)
                waiting += int(np.count_nonzero(((flags & DATA) != 0) & ((flags & OFFSET_VALID) != 0)))
                if waiting >= limit:
                    limit = min(2 * limit, SPLIT_RUNS)
                    yield flush()
        if len(bad):
            if held:
                yield flush()
            k = stop
            raise Qcow2Error(f"could not read file metadata at guest offset {int(ex.guest[k])}: "
                             f"{ERROR_MESSAGES[ExtentError(int(ex.error[k]))]}", int(ex.where[k]), path=img.path)
    if held:
        yield flush()


def _splice(runs: MapRuns, sel: npt.NDArray[np.bool_], pieces: MapRuns, npieces: I64) -> MapRuns:
    """Replace the selected runs (in order) by their pieces (`npieces[i]` for the i-th, in order)."""
    if sel.all():
        return pieces
    rows = np.flatnonzero(sel)
    counts = np.ones(len(runs), dtype=np.int64)
    counts[rows] = npieces
    out = runs.take(np.repeat(np.arange(len(runs)), counts))
    pos = (np.cumsum(counts) - counts)[rows]  # where each selected run's pieces go
    first_piece = np.cumsum(npieces) - npieces
    idx = np.repeat(pos, npieces) + (np.arange(len(pieces)) - np.repeat(first_piece, npieces))
    out.start[idx] = pieces.start
    out.length[idx] = pieces.length
    out.flags[idx] = pieces.flags
    out.offset[idx] = pieces.offset
    return out


def _raw_runs(layer: RawLayer, start: int, end: int, depth: int) -> MapRuns:
    starts: list[int] = []
    lens: list[int] = []
    flags: list[int] = []
    pos = start
    while pos < end:
        is_data, ext_end = layer.file.data_extent(pos)
        n = min(end, max(ext_end, pos + 1)) - pos
        if not is_data and ext_end >= layer.file.size:
            n = end - pos
        starts.append(pos)
        lens.append(n)
        flags.append((DATA if is_data else ZERO) | ALLOCATED | OFFSET_VALID)
        pos += n
    st = np.array(starts, dtype=np.int64)
    return MapRuns(st, np.array(lens, dtype=np.int64), np.array(flags, dtype=np.uint8), st.copy(),
                   np.full(len(st), depth, dtype=np.int64))


class _Chain:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.probes: list[_HostProbe | None] = [
            _HostProbe(lay.data_file()) if isinstance(lay, Image) and metadata_preallocated(lay) else None
            for lay in layers]

    def runs(self, start: int, end: int, depth: int = 0) -> Iterator[MapRuns]:
        layer = self.layers[depth]
        end = min(end, layer.virtual_size)
        if start >= end:
            return
        if isinstance(layer, RawLayer):
            yield _raw_runs(layer, start, end, depth)
            return
        assert isinstance(layer, Image)
        lower = self.layers[depth + 1] if depth + 1 < len(self.layers) else None
        for b in _qcow2_runs(layer, start, end, self.probes[depth], depth):
            alloc = (b.flags & (DATA | ZERO)) != 0
            b.flags[alloc] |= np.uint8(ALLOCATED)
            if lower is None:
                b.flags[~alloc] |= np.uint8(ZERO)
                yield b
                continue
            if alloc.all():
                yield b
                continue
            # Unallocated ranges descend the chain (as far as the lower layer reaches).
            k = 0
            for u in np.flatnonzero(~alloc).tolist():
                if u > k:
                    yield b.take(slice(k, u))
                k = u + 1
                s, e = int(b.start[u]), int(b.start[u] + b.length[u])
                cut = min(e, max(s, lower.virtual_size))
                if s < cut:
                    yield from self.runs(s, cut, depth + 1)
                if cut < e:
                    off = int(b.offset[u])
                    yield MapRuns.one(cut, e - cut, int(b.flags[u]) | ZERO, off + (cut - s) if off >= 0 else -1,
                                      depth)
            if k < len(b):
                yield b.take(slice(k, len(b)))


def _merge(runs: MapRuns) -> MapRuns:
    """qemu-img map's merging of consecutive ranges (same flags, depth, offset presence, contiguous)."""
    if len(runs) < 2:
        return runs
    f = runs.flags & np.uint8(~OFFSET_VALID & 0xFF)
    has = runs.offset >= 0
    same = (f[1:] == f[:-1]) & (runs.depth[1:] == runs.depth[:-1]) & (has[1:] == has[:-1])
    same &= ~has[1:] | (runs.offset[:-1] + runs.length[:-1] == runs.offset[1:])
    if not same.any():
        return runs
    heads = np.flatnonzero(np.concatenate(([True], ~same)))
    out = runs.take(heads)
    out.length = np.add.reduceat(runs.length, heads)
    return out


def iter_map_runs(img: Image, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled,
                  start: int = 0, length: int | None = None) -> Iterator[MapRuns]:
    """Merged map entries of the whole chain as arrays, a batch at a time, in guest order."""
    chain = _Chain(img.chain())
    end = img.virtual_size if length is None else min(img.virtual_size, start + length)
    pending: MapRuns | None = None
    for b in chain.runs(start, end):
        if not (b.length > 0).all():
            b = b.take(b.length > 0)
        if not len(b):
            continue
        merged = _merge(MapRuns.concat([pending, b]) if pending is not None else b)
        pending = merged.take(slice(len(merged) - 1, len(merged)))
        if len(merged) > 1:
            yield merged.take(slice(0, len(merged) - 1))
            if cancelled():
                raise Cancelled()
            progress(int(pending.start[0]) - start, end - start)
    if pending is not None:
        yield pending
    progress(end - start, end - start)


def iter_map(img: Image, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled,
             start: int = 0, length: int | None = None) -> Iterator[MapEntry]:
    """Merged map entries of the whole chain, in guest order (opens the backing chain)."""
    for b in iter_map_runs(img, progress, cancelled, start, length):
        yield from b.entries()


def _b(v: bool) -> str:
    return "true" if v else "false"


def _mid(flags: int) -> str:
    return (f'"present": {_b(bool(flags & ALLOCATED))}, "zero": {_b(bool(flags & ZERO))}, '
            f'"data": {_b(bool(flags & DATA))}, "compressed": {_b(bool(flags & COMPRESSED))}')


# One %-template per (flags, offset present): the whole batch is then formatted by one `%`
# operation in C (a "%.0s" swallows the unused offset), ~25% faster than an f-string per entry.
_TEMPLATES = np.array([
    '{ "start": %d, "length": %d, "depth": %d, ' + _mid(code >> 1) + (', "offset": %d}' if code & 1 else "}%.0s")
    for code in range(64)], dtype=object)


def write_map_json_runs(batches: Iterable[MapRuns], out: IO[str]) -> None:
    """Print merged batches the way qemu-img map --output=json does, a whole batch per write."""
    out.write("[")
    sep = ""
    for b in batches:
        for k in range(0, len(b), JSON_CHUNK):  # bounded text per write
            c = b.take(slice(k, k + JSON_CHUNK))
            n = len(c)
            codes = (c.flags & np.uint8(31)).astype(np.intp) * 2 + (c.offset >= 0)
            values = np.empty(4 * n, dtype=np.int64)
            values[0::4] = c.start
            values[1::4] = c.length
            values[2::4] = c.depth
            values[3::4] = c.offset
            out.write(sep + ",\n".join(_TEMPLATES[codes].tolist()) % tuple(values.tolist()))
            sep = ",\n"
    out.write("]\n")


JSON_CHUNK = 1 << 14


def map_json(img: Image) -> list[dict[str, object]]:
    """The map as a list of JSON objects (for tests and small images)."""
    return [e.to_json() for e in iter_map(img)]


__all__ = ["MapEntry", "MapRuns", "iter_map", "iter_map_runs", "json", "map_json", "metadata_preallocated",
           "write_map_json_runs"]
