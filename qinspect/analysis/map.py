"""The guest map with `qemu-img map --output=json` semantics (QEMU 7.2, plus 8.2's `compressed`).

Each layer reports block status per extent (data / zero / allocated / offset / compressed) the way
`qcow2_co_block_status` and the generic block layer do, including the recursion into the host file
for metadata-preallocated images; unallocated ranges descend the backing chain; the results are
merged exactly as qemu-img merges them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
class _Run:
    start: int
    length: int
    flags: int
    offset: int  # -1 when not OFFSET_VALID
    depth: int


def metadata_preallocated(img: Image) -> bool:
    """qcow2_detect_metadata_preallocation: more referenced clusters than the file really holds."""
    f = img.file
    cs = img.cluster_size
    real_clusters = f.allocated_size // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-f.size // cs)
    if end_cluster <= threshold:
        return False  # cannot exceed the threshold: no need to read refcount blocks
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
        if count > threshold:
            return True
    return False


def _host_zero_split(host: HostFile, run: _Run) -> Iterator[_Run]:
    """BDRV_BLOCK_RECURSE: ask the host file whether a data run is really a hole."""
    pos, end = run.start, run.start + run.length
    while pos < end:
        hoff = run.offset + (pos - run.start)
        if hoff >= host.size:
            yield _Run(pos, end - pos, run.flags | ZERO, hoff, run.depth)
            return
        is_data, ext_end = host.data_extent(hoff)
        n = min(end - pos, max(ext_end - hoff, 1))
        if not is_data and ext_end >= host.size:
            n = end - pos  # trailing hole: EOF|ZERO covers the whole request
        yield _Run(pos, n, run.flags | (0 if is_data else ZERO), hoff, run.depth)
        pos += n


def _qcow2_runs(img: Image, start: int, end: int, prealloc: bool, depth: int) -> Iterator[_Run]:
    enc = img.encrypted
    for ex in img.extents(start, end):
        flags = _FLAGS_BY_TYPE[ex.sctype]
        bad = np.flatnonzero(ex.error)
        stop = int(bad[0]) if len(bad) else len(ex)
        for k in range(stop):
            f = int(flags[k])
            off = int(ex.host[k]) if f & OFFSET_VALID else -1
            if enc:
                f &= ~OFFSET_VALID
                off = -1
            run = _Run(int(ex.guest[k]), int(ex.length[k]), f, off, depth)
            if prealloc and f & DATA and f & OFFSET_VALID:
                yield from _host_zero_split(img.data_file(), run)
            else:
                yield run
        if len(bad):
            k = stop
            raise Qcow2Error(f"could not read file metadata at guest offset {int(ex.guest[k])}: "
                             f"{ERROR_MESSAGES[ExtentError(int(ex.error[k]))]}", int(ex.where[k]), path=img.path)


def _raw_runs(layer: RawLayer, start: int, end: int, depth: int) -> Iterator[_Run]:
    pos = start
    while pos < end:
        is_data, ext_end = layer.file.data_extent(pos)
        n = min(end, max(ext_end, pos + 1)) - pos
        if not is_data and ext_end >= layer.file.size:
            n = end - pos
        yield _Run(pos, n, (DATA if is_data else ZERO) | ALLOCATED | OFFSET_VALID, pos, depth)
        pos += n


class _Chain:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.prealloc = [metadata_preallocated(lay) if isinstance(lay, Image) else False for lay in layers]

    def runs(self, start: int, end: int, depth: int = 0) -> Iterator[_Run]:
        layer = self.layers[depth]
        end = min(end, layer.virtual_size)
        if isinstance(layer, RawLayer):
            yield from _raw_runs(layer, start, end, depth)
            return
        assert isinstance(layer, Image)
        lower = self.layers[depth + 1] if depth + 1 < len(self.layers) else None
        for run in _qcow2_runs(layer, start, end, self.prealloc[depth], depth):
            if run.flags & (DATA | ZERO):
                run.flags |= ALLOCATED
                yield run
            elif lower is None:
                run.flags |= ZERO
                yield run
            else:
                s, e = run.start, run.start + run.length
                cut = min(e, max(s, lower.virtual_size))
                if s < cut:
                    yield from self.runs(s, cut, depth + 1)
                if cut < e:
                    off = run.offset + (cut - s) if run.offset >= 0 else -1
                    yield _Run(cut, e - cut, run.flags | ZERO, off, depth)


def _mergeable(a: _Run, b: _Run) -> bool:
    if (a.flags & ~OFFSET_VALID) != (b.flags & ~OFFSET_VALID) or a.depth != b.depth:
        return False
    if (a.offset >= 0) != (b.offset >= 0):
        return False
    return a.offset < 0 or a.offset + a.length == b.offset


def iter_map(img: Image, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled,
             start: int = 0, length: int | None = None) -> Iterator[MapEntry]:
    """Merged map entries of the whole chain, in guest order (opens the backing chain)."""
    chain = _Chain(img.chain())
    end = img.virtual_size if length is None else min(img.virtual_size, start + length)
    cur: _Run | None = None
    for run in chain.runs(start, end):
        if run.length <= 0:
            continue
        if cur is not None and _mergeable(cur, run):
            cur.length += run.length
            continue
        if cur is not None:
            yield _entry(cur)
            if cancelled():
                raise Cancelled()
            progress(cur.start + cur.length - start, end - start)
        cur = _Run(run.start, run.length, run.flags, run.offset, run.depth)
    if cur is not None:
        yield _entry(cur)
    progress(end - start, end - start)


def _entry(r: _Run) -> MapEntry:
    return MapEntry(r.start, r.length, r.depth, bool(r.flags & ALLOCATED), bool(r.flags & ZERO),
                    bool(r.flags & DATA), bool(r.flags & COMPRESSED), r.offset if r.offset >= 0 else None)


def write_map_json(entries: Iterator[MapEntry], out: IO[str]) -> None:
    """Print entries the way qemu-img map --output=json does (one object per line)."""
    out.write("[")
    first = True
    for e in entries:
        if not first:
            out.write(",\n")
        first = False
        s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
             f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}, '
             f'"compressed": {_b(e.compressed)}')
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        out.write(s + "}")
    out.write("]\n")


def _b(v: bool) -> str:
    return "true" if v else "false"


def map_json(img: Image) -> list[dict[str, object]]:
    """The map as a list of JSON objects (for tests and small images)."""
    return [e.to_json() for e in iter_map(img)]


__all__ = ["MapEntry", "iter_map", "json", "map_json", "metadata_preallocated", "write_map_json"]
