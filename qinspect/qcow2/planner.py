"""The one I/O planner: read the pieces a walk needs in host order, several requests in flight.

Every bulk walk (map's L2 tables, check's and layout's L2 tables and refcount blocks, the deep
scan's data clusters, the TUI's scans through them) names the pieces it needs — file offsets and
lengths, in the order it wants them — and takes them back through a `PieceStream`, a cursor that
returns the next `n` pieces as one buffer.

Behind the cursor:

- pieces are grouped into *windows* of consecutive pieces (in the walk's order) of at most
  `window_bytes // 2` bytes; a window is read while the walk works on the one before it, so memory
  is bounded by the window, never by the image;
- inside a window the pieces are sorted by host offset and coalesced into requests; a gap of at most
  `gap_bytes` between two pieces is read through rather than skipped (a short gap costs less to read
  than a separate request), and a request never exceeds `MAX_REQUEST` bytes;
- requests go to a small pool of threads calling `os.preadv` (which releases the GIL), so the
  device sees several requests at once instead of one at a time; a window that reads at most
  `SYNC_BYTES` is read by the calling thread instead (a small image's few tables: the hand-off to
  the pool cost more than the reads);
- a walk that does not care about order (check and layout aggregate, then sort their messages)
  passes `order=HOST`: the whole walk then sweeps the file once, front to back.

`GAP_BYTES` and `WORKERS` come from measurements on the development machine (2-core VM, ext4 on
a virtual disk, page cache evicted with POSIX_FADV_DONTNEED, machine shared and loaded):
`bench/gap.py` reads 256 pairs of 4 KiB pieces a gap apart, as two reads or as one read through
the gap. Reading through won clearly up to 16 KiB (57-92 µs against 124-157 µs a pair), was even
around 32-48 KiB and lost from 64 KiB on (111-177 µs against 76-114 µs at 64-128 KiB): hence 32 KiB.
Workers, cold, median of 3 (`QINSPECT_IO_WORKERS`): check of the 1 TiB preallocated image 1.99 s
with 1, 0.93 s with 4, 1.71 s with 8; map of the 4 KiB-cluster 100 GiB image 1.02 / 0.83 / 0.80 s.
Bytes past the end of the file read as zeros (`HostFile.read_into`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Iterator
from enum import Enum
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from qinspect.qcow2.hostfile import HostFile

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

GAP_BYTES = 32 * 1024
"""Read through gaps up to this size (measured: see the module docstring)."""
MAX_REQUEST = 4 * 1024 * 1024
"""No single request is larger (keeps several in flight and the read-through waste bounded)."""
WINDOW_BYTES = 16 * 1024 * 1024
"""Memory held by one stream: two half-windows, the one being used and the one being read (in host
order a half-window bounds the bytes its requests read, gaps included)."""
WORKERS = int(os.environ.get("QINSPECT_IO_WORKERS", "4"))
SYNC_BYTES = 1024 * 1024
"""A window whose requests read at most this many bytes is read by the calling thread: handing a
few small reads (a small image's L2 tables and refcount blocks) to the pool costs more in
submission and thread wake-ups than the reads themselves."""
ADVISE = os.environ.get("QINSPECT_IO_ADVISE", "1") != "0"
"""Read-ahead advice (POSIX_FADV_WILLNEED) for streams longer than a window; 0 turns it off (for A/B runs)."""

if TYPE_CHECKING:  # the pool (and concurrent.futures, logging) is imported when first needed
    from concurrent.futures import Future, ThreadPoolExecutor

T = TypeVar("T")


class _Done(Generic[T]):
    """A finished read done by the calling thread: what `_Window` asks of a Future, without the
    pool's machinery (a small image's command never imports concurrent.futures)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return None


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # A forked child has the parent's pool object but none of its threads: start a new one.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=max(1, WORKERS), thread_name_prefix="qinspect-io")
        return _pool


class Order(Enum):
    """In which order a stream hands pieces back."""

    GIVEN = "given"  # the caller's order (reads are still sorted by host inside each window)
    HOST = "host"  # ascending host offset over the whole stream (one sweep of the file)


def coalesce(starts: I64, ends: I64, gap: int = GAP_BYTES, max_request: int = MAX_REQUEST) -> tuple[I64, I64, I64]:
    """Requests covering pieces [starts, ends) sorted by start: (req_start, req_end, piece_request).

    Two neighbouring pieces share a request when the gap between them is at most `gap` bytes and the
    request stays within `max_request` bytes (a single larger piece is a request of its own).
    """
    n = len(starts)
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z.copy(), z.copy()
    reach = np.maximum.accumulate(ends)
    new = np.ones(n, dtype=bool)
    new[1:] = starts[1:] - reach[:-1] > gap
    group = np.cumsum(new) - 1
    gstart = starts[new]
    # Split long groups every `max_request` bytes (by where each piece starts).
    sub = (starts - gstart[group]) // max_request
    key_new = new.copy()
    key_new[1:] |= sub[1:] != sub[:-1]
    req = np.cumsum(key_new) - 1
    req_start = starts[key_new]
    req_end = np.zeros(len(req_start), np.int64)
    np.maximum.at(req_end, req, ends)
    return req_start, req_end, req.astype(np.int64)


def _read(file: HostFile, starts: list[int], ends: list[int]) -> list[U8]:
    out = []
    for start, end in zip(starts, ends, strict=True):
        buf = np.empty(end - start, dtype=np.uint8)
        file.read_into(start, memoryview(buf.data))
        out.append(buf)
    return out


class _Window:
    """Pieces [a, b) of the stream, their requests submitted, and where each piece lands."""

    def __init__(self, stream: PieceStream, a: int, b: int) -> None:
        self.a, self.b = a, b
        offs = stream.offsets[a:b]
        lens = stream.lengths[a:b]
        if b - a == 1 and int(lens[0]) <= stream.max_request:
            # One piece (a small image's L2 table, one cluster): one request, nothing to sort.
            rs, re_ = offs, offs + lens
            self.piece_req = np.zeros(1, np.int64)
        else:
            order = np.argsort(offs, kind="stable")
            s, e = offs[order], offs[order] + lens[order]
            gap = stream.gap
            rs, re_, preq = coalesce(s, e, gap, stream.max_request)
            useful = int(lens.sum())
            # Pieces spread thin over the file (a window of L2 tables in L1 order): reading through
            # every gap would read the file many times over (each window sweeps it again). Narrow
            # the gap until at most as many bytes are read through as are wanted. Host-order
            # windows sweep disjoint parts of the file, so what they read through is read once.
            while gap and not stream._host_order and int((re_ - rs).sum()) > 2 * useful:
                gap = gap // 4 if gap >= 16384 else 0
                rs, re_, preq = coalesce(s, e, gap, stream.max_request)
            self.piece_req = np.empty(b - a, np.int64)
            self.piece_req[order] = preq
        self.req_start = rs
        # The requests in host order, cut into a few tasks of about equal bytes: each worker reads
        # its share in order (a future per request would cost more than a 4 KiB read).
        self.futures: list[Future[list[U8]] | _Done[list[U8]]] = []
        ntask = min(len(rs), 2 * WORKERS) if WORKERS > 1 else 1
        if ntask <= 1 or int((re_ - rs).sum()) <= SYNC_BYTES:
            self.futures.append(_Done(_read(stream.file, rs.tolist(), re_.tolist())))
        else:
            pool = _executor()
            cum = np.cumsum(re_ - rs)
            cuts = np.searchsorted(cum, cum[-1] * np.arange(1, ntask) / ntask, side="left") + 1
            bounds = np.unique(np.concatenate(([0], np.minimum(cuts, len(rs)), [len(rs)])))
            for t0, t1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                self.futures.append(pool.submit(_read, stream.file, rs[t0:t1].tolist(), re_[t0:t1].tolist()))
        self.out: U8 | None = None

    def assemble(self, stream: PieceStream) -> U8:
        """The window's pieces concatenated in stream order (waits for the reads)."""
        if self.out is not None:
            return self.out
        bufs = [b for f in self.futures for b in f.result()]
        self.futures = []
        offs = stream.offsets[self.a : self.b]
        lens = stream.lengths[self.a : self.b]
        total = int(lens.sum())
        if len(bufs) == 1 and int(offs[0]) == int(self.req_start[0]) and len(bufs[0]) == total and (
                len(offs) == 1 or bool((offs[1:] == offs[:-1] + lens[:-1]).all())):
            self.out = bufs[0]  # one contiguous request in order: hand it over as is
            return self.out
        out = np.empty(total, dtype=np.uint8)
        within = offs - self.req_start[self.piece_req]
        if _gather_rows(out, bufs, self.piece_req, within, lens):
            self.out = out
            return out
        dst = np.zeros(len(offs), np.int64)
        if len(offs) > 1:
            dst[1:] = np.cumsum(lens[:-1])
        # Pieces consecutive in both the request and the output copy as one block.
        brk = np.ones(len(offs), dtype=bool)
        brk[1:] = (self.piece_req[1:] != self.piece_req[:-1]) | (within[1:] != within[:-1] + lens[:-1])
        firsts = np.flatnonzero(brk)
        lasts = np.append(firsts[1:], len(offs)) - 1
        for f0, f1 in zip(firsts.tolist(), lasts.tolist(), strict=True):
            src = bufs[int(self.piece_req[f0])]
            w0 = int(within[f0])
            n = int(dst[f1] + lens[f1] - dst[f0])
            out[int(dst[f0]) : int(dst[f0]) + n] = src[w0 : w0 + n]
        self.out = out
        return out


GATHER_MIN_PIECES = 4
"""Requests holding fewer pieces than this (on average) are copied piece by piece instead."""


def _gather_rows(out: U8, bufs: list[U8], piece_req: I64, within: I64, lens: I64) -> bool:
    """Copy pieces of one size L into `out` (stream order) as rows: one fancy-indexed copy per
    request instead of one slice copy per piece. Only where every piece is L bytes at a multiple
    of L inside its request and each request's pieces are consecutive in the stream (host-order
    windows: a sweep of cluster-sized tables read through the gaps). False: nothing was copied."""
    n = len(lens)
    if n < GATHER_MIN_PIECES * len(bufs):
        return False
    size = int(lens[0])
    if size <= 0 or not bool((lens == size).all()) or bool((within % size).any()):
        return False
    if n > 1 and bool((piece_req[1:] < piece_req[:-1]).any()):
        return False
    if any(len(b) % size for b in bufs):
        return False
    bounds = np.searchsorted(piece_req, np.arange(len(bufs) + 1))
    rows = within // size
    out2 = out.reshape(n, size)
    for r, (p0, p1) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if p1 > p0:
            np.take(bufs[r].reshape(-1, size), rows[p0:p1], axis=0, out=out2[p0:p1], mode="clip")
    return True


class PieceStream:
    """A cursor over pieces (offset, length) of one file, read ahead through the planner.

    `take(n)` returns the next `n` pieces concatenated (in the stream's order) as a uint8 array;
    `index` maps stream positions back to the caller's piece numbers (the identity for
    `Order.GIVEN`, the host-order permutation for `Order.HOST`). Close it (or use `with`) to drop
    read-ahead that will not be used.
    """

    def __init__(self, file: HostFile, offsets: I64, lengths: I64 | int, order: Order = Order.GIVEN,
                 window_bytes: int = WINDOW_BYTES, gap: int = GAP_BYTES, max_request: int = MAX_REQUEST) -> None:
        self.file = file
        offs = np.asarray(offsets, dtype=np.int64)
        lens = (np.full(offs.shape, lengths, np.int64) if isinstance(lengths, int)
                else np.broadcast_to(np.asarray(lengths, dtype=np.int64), offs.shape))
        if order is Order.HOST:
            self.index: I64 = np.argsort(offs, kind="stable").astype(np.int64)
            offs, lens = offs[self.index], lens[self.index]
        else:
            self.index = np.arange(len(offs), dtype=np.int64)
        self.offsets: I64 = offs
        self.lengths: I64 = np.ascontiguousarray(lens)
        self.gap = gap
        self.max_request = max_request
        self.half = max(1, window_bytes // 2)
        self.pos = 0  # next piece to hand out
        self._cut = 0  # next piece not yet in a window
        self._windows: deque[_Window] = deque()
        self._ends = np.cumsum(self.lengths) if len(self.lengths) else np.zeros(0, np.int64)
        self._host_order = order is Order.HOST
        self._cost = self._ends
        if self._host_order and len(offs) > 1:
            reach = np.maximum.accumulate(self.offsets + self.lengths)
            gaps = self.offsets[1:] - reach[:-1]
            through = np.where((gaps > 0) & (gaps <= gap), gaps, 0)
            self._cost = self._ends + np.concatenate(([0], np.cumsum(through)))
        self._closed = False
        self._advice: Future[None] | None = None
        if ADVISE and not self._host_order and len(offs) and int(self._ends[-1]) > self.half:
            # Pieces wanted in the walk's order but spread over the file (L2 tables in L1 order):
            # ask the kernel to read them ahead in host order, one sweep, while the windows are read
            # and used (the page cache holds them, not this process). For host-order streams the
            # windows already sweep in order; advice there measured slower (1 TiB check, cold,
            # median of 5: 1.74 s with, 1.36 s without).
            self._advice = _executor().submit(self._advise)
        self._fill()

    def _advise(self) -> None:
        order = np.argsort(self.offsets, kind="stable")
        s = self.offsets[order]
        rs, re_, _ = coalesce(s, s + self.lengths[order], self.gap, self.max_request)
        fd = self.file.fd
        for r0, r1 in zip(rs.tolist(), re_.tolist(), strict=True):
            if self._closed:
                return
            if r0 < self.file.size:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, r0, min(r1, self.file.size) - r0, os.POSIX_FADV_WILLNEED)

    def __len__(self) -> int:
        return len(self.offsets)

    def _next_cut(self, a: int) -> int:
        if self._host_order:
            # Bound what the window's requests read: pieces and the gaps read through.
            base = int(self._cost[a - 1]) if a else 0
            b = int(np.searchsorted(self._cost, base + self.half, side="right"))
        else:
            base = int(self._ends[a - 1]) if a else 0
            b = int(np.searchsorted(self._ends, base + self.half, side="right"))
        return max(b, a + 1)

    def _fill(self) -> None:
        # Keep the window being consumed and one more in flight.
        while self._cut < len(self.offsets) and len(self._windows) < 2:
            b = min(len(self.offsets), self._next_cut(self._cut))
            self._windows.append(_Window(self, self._cut, b))
            self._cut = b

    def take(self, n: int) -> U8:
        """The next `n` pieces (fewer at the end), concatenated."""
        n = min(n, len(self.offsets) - self.pos)
        if n <= 0:
            return np.zeros(0, dtype=np.uint8)
        parts: list[U8] = []
        want_end = self.pos + n
        while self.pos < want_end:
            self._fill()
            w = self._windows[0]
            buf = w.assemble(self)
            base = int(self._ends[w.a - 1]) if w.a else 0
            lo = (int(self._ends[self.pos - 1]) if self.pos else 0) - base
            upto = min(want_end, w.b)
            hi = int(self._ends[upto - 1]) - base
            parts.append(buf[lo:hi])
            self.pos = upto
            if upto == w.b:
                self._windows.popleft()
                self._fill()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batches(self, n: int) -> Iterator[tuple[I64, U8]]:
        """(caller piece numbers, their bytes) for every `n` pieces until the stream is used up."""
        while self.pos < len(self.offsets):
            p0 = self.pos
            buf = self.take(n)
            yield self.index[p0 : self.pos], buf

    def close(self) -> None:
        self._closed = True
        if self._advice is not None:
            self._advice.cancel()
            if not self._advice.cancelled():
                self._advice.exception()
            self._advice = None
        for w in self._windows:
            for f in w.futures:
                f.cancel()
            for f in w.futures:
                if not f.cancelled():
                    f.exception()  # wait: the file must outlive the read
        self._windows.clear()

    def __enter__(self) -> PieceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pieces(file: HostFile, offsets: I64, lengths: I64 | int) -> U8:
    """All pieces at once, concatenated in the given order (for small sets: one window)."""
    offs = np.asarray(offsets, dtype=np.int64)
    with PieceStream(file, offs, lengths, window_bytes=1 << 62) as s:
        return s.take(len(offs))


__all__ = ["GAP_BYTES", "MAX_REQUEST", "SYNC_BYTES", "WINDOW_BYTES", "WORKERS", "Order", "PieceStream", "coalesce",
           "read_pieces"]
