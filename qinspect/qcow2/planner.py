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
- pieces that do not overlap in the file are read straight into their places in the window's
  output, in the stream's order: one `preadv` per request, whose buffers are the pieces and, for
  the gaps read through, a small scratch buffer (the bytes between tables are never kept or
  copied); overlapping pieces are read into one buffer and gathered out of it with one vectorised
  copy (pieces of one length) or none at all (one contiguous run in order);
- a window whose requests cover most of the range they span (`DENSE`: tables packed between data
  clusters, read through) is one sequential task on a single "sweep" thread, so consecutive
  windows reach the file in order and the kernel's read-ahead streams them (several threads on one
  file's read-ahead break its sequence up: 1 MiB reads of a cold 330 MB file took 0.10-0.13 s from
  one thread and 0.11-0.38 s from two or four); a sparser window's requests go to a small pool of
  threads calling `os.preadv` (which releases the GIL), so the device sees several at once; a
  window that reads at most `SYNC_BYTES` is read by the calling thread (the hand-off costs more);
- a walk that does not care about order (check and layout aggregate, then sort their messages)
  passes `order=HOST`: the whole walk then sweeps the file once, front to back. A host-order
  stream too sparse for read-ahead to help (the 1 TiB preallocated image's tables, 512 MiB apart)
  is also advised (POSIX_FADV_WILLNEED) up to `ADVISE_AHEAD` bytes ahead of the walk, so that many
  requests are in flight, not only the current windows' (reading its 2,561 tables and refcount
  blocks cold took 0.36-0.71 s one at a time, 0.12-0.18 s four at a time, 0.18 s advised);
  a walk in its own order (map's tables in L1 order) is advised in host order as a whole.

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
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.readahead import hand_over

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
SYNC_REQUESTS = int(os.environ.get("QINSPECT_IO_SYNC_REQUESTS", "16"))
"""A window of at most SYNC_REQUESTS requests reading at most SYNC_BYTES is read by the calling
thread: handing a small image's few small reads to the pool costs more in submission and thread
wake-ups than the reads themselves (a scan opens hundreds of such images). More requests than
that go to the pool even when small: cold, each is a random read of ~0.1 ms, and several in
flight beat one after another (the 41 refcount blocks of the 4 KiB-cluster 100 GiB image, 8 MiB
apart: 9 ms read by the caller, 6 ms by the pool, medians of 5, loaded machine)."""
ADVISE = os.environ.get("QINSPECT_IO_ADVISE", "1") != "0"
"""Read-ahead advice (POSIX_FADV_WILLNEED) for streams longer than a window; 0 turns it off (for A/B runs)."""

ADVISE_AHEAD = int(os.environ.get("QINSPECT_IO_AHEAD", str(64 << 20)))
"""Advice runs at most this many bytes of pieces ahead of what the walk has taken (the page cache
is not unbounded either). Measured on the 1 TiB preallocated image, cold, reading its refcount
blocks and then its tables as check does: at load average 7-8 (medians of 6) no advice 0.29 s,
ahead by 4 MiB 0.28 s, 8 MiB 0.21 s, 16 MiB 0.17-0.23 s, 32 MiB 0.21 s, 64 MiB 0.22 s; at load
average 2.6, 6 interleaved runs: 32 MiB 0.157 s, 64 MiB 0.147 s, 128 MiB 0.160 s."""
DENSE = 0.5
"""A window whose requests cover at least this share of the host range they span is read in order
by one thread (the kernel's own read-ahead streams it; several threads on one file's read-ahead
only break its sequence up); sparser windows are spread over the pool."""


class Pool(Enum):
    """The thread pools of the planner (the value names their threads)."""

    READ = "read"
    """Sparse windows, spread over WORKERS threads."""
    SWEEP = "sweep"
    """Dense windows: one thread, in order."""
    ADVICE = "advice"
    """POSIX_FADV_WILLNEED ahead of host-order streams."""


_POOL_SIZES = {Pool.READ: max(1, WORKERS), Pool.SWEEP: 1, Pool.ADVICE: 2}
if TYPE_CHECKING:  # imported with the first pool: a small image's command (all reads in the calling
    # thread) never loads concurrent.futures, nor the logging it imports
    from concurrent.futures import Future, ThreadPoolExecutor

_pools: dict[Pool, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # A forked child has the parent's pool objects but none of their threads: start new ones.
    global _pool_lock
    _pools.clear()
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(kind: Pool = Pool.READ) -> ThreadPoolExecutor:
    """The pool of `kind` (made when first asked for)."""
    with _pool_lock:
        pool = _pools.get(kind)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = _pools[kind] = ThreadPoolExecutor(max_workers=_POOL_SIZES[kind],
                                                     thread_name_prefix=f"qinspect-io-{kind.value}")
        return pool


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


def _read_requests(file: HostFile, requests: list[tuple[int, list[memoryview]]]) -> None:
    """Each request (offset, buffers) with one `preadv` into its buffers (`HostFile.readv_into`)."""
    for offset, bufs in requests:
        file.readv_into(offset, bufs)


class _Window:
    """Pieces [a, b) of the stream, their requests submitted, and where each piece lands.

    Pieces that do not overlap in the file (the tables and blocks of every walk) are read straight
    into `out`, the window's pieces in stream order: a request is one `preadv` whose buffers are
    the places of its pieces in `out` and, for each gap read through between two of them, a slice
    of one small scratch buffer. The bytes between the pieces are never kept and nothing is copied
    afterwards (on the 4 KiB-cluster 100 GiB image two thirds of what the sweep reads is data
    between its tables: read into a window buffer and gathered, that cost a cold check ~12 ms of
    copying and page faults, 6 interleaved runs). Overlapping pieces (one cluster asked for twice)
    are read into one buffer, request after request in host order, and `assemble` gathers them out
    of it (one vectorised copy for pieces of one length, none for one contiguous run in order).
    """

    def __init__(self, stream: PieceStream, a: int, b: int) -> None:
        self.a, self.b = a, b
        offs = stream.offsets[a:b]
        lens = stream.lengths[a:b]
        # The pieces in host order (a host-order stream's are already), coalesced into requests.
        order = None if stream.host_order or b - a == 1 else np.argsort(offs, kind="stable")
        s = offs if order is None else offs[order]
        s_len = lens if order is None else lens[order]
        e = s + s_len
        gap = stream.gap
        rs, re_, preq = coalesce(s, e, gap, stream.max_request)
        useful = int(lens.sum())
        # Pieces spread thin over the file (a window of L2 tables in L1 order): reading through
        # every gap would read the file many times over, once per window. Narrow the gap until
        # at most as many bytes are read through as are wanted. (In host order the windows are
        # disjoint ranges of the file: read through, the stream reads each byte once at most.)
        while gap and not stream.host_order and int((re_ - rs).sum()) > 2 * useful:
            gap = gap // 4 if gap >= 16384 else 0
            rs, re_, preq = coalesce(s, e, gap, stream.max_request)
        self.futures: list[Future[None]] = []
        self.out: U8 | None = None
        self.buf = np.zeros(0, np.uint8)
        sizes = re_ - rs
        cum = np.cumsum(sizes)
        if b - a == 1 or bool((s[1:] >= e[:-1]).all()):
            out = np.empty(useful, np.uint8)
            self._submit(stream, self._scattered(out, lens, order, s, s_len, preq, rs), cum, rs, re_)
            self.out = out  # (complete once the futures are)
            return
        self.req_start = rs
        self.req_pos = cum - sizes  # where each request lands in `buf`
        self.piece_req = np.empty(b - a, np.int64)
        self.piece_req[np.arange(b - a) if order is None else order] = preq
        self.buf = np.empty(int(cum[-1]), dtype=np.uint8)
        mv = memoryview(self.buf.data)
        self._submit(stream, [(r0, [mv[p : p + n]]) for r0, p, n in
                              zip(rs.tolist(), self.req_pos.tolist(), sizes.tolist(), strict=True)], cum, rs, re_)

    @staticmethod
    def _scattered(out: U8, lens: I64, order: I64 | None, s: I64, s_len: I64, preq: I64,
                   rs: I64) -> list[tuple[int, list[memoryview]]]:
        # Per request, the buffers of one preadv: each piece's place in `out` (stream order), and
        # before it the gap read through since the previous piece, if any.
        n = len(s)
        at = np.cumsum(lens) - lens
        if order is not None:
            at = at[order]
        first = np.ones(n, dtype=bool)
        first[1:] = preq[1:] != preq[:-1]
        gaps = np.zeros(n, np.int64)
        gaps[1:] = s[1:] - (s[:-1] + s_len[:-1])
        gaps[first] = 0
        # (built by C loops: a Python statement per piece would cost ~0.3 us x 25,600 tables; a
        # piece without a gap before it gets an empty gap buffer, which preadv skips)
        mv = memoryview(out.data)
        pieces = list(map(mv.__getitem__, map(slice, at.tolist(), (at + s_len).tolist())))
        gap_l = gaps.tolist()
        scratch = memoryview(bytearray(max(gap_l, default=0)))
        gap_view = {g: scratch[:g] for g in set(gap_l)}
        gap_bufs = list(map(gap_view.__getitem__, gap_l))
        starts = np.flatnonzero(first).tolist()
        requests: list[tuple[int, list[memoryview]]] = []
        for r, (j0, j1) in enumerate(zip(starts, [*starts[1:], n], strict=True)):
            bufs = pieces[j0:j1] * 2
            bufs[0::2] = gap_bufs[j0:j1]
            bufs[1::2] = pieces[j0:j1]
            requests.append((int(rs[r]), bufs))
        return requests

    def _submit(self, stream: PieceStream, requests: list[tuple[int, list[memoryview]]], cum: I64, rs: I64,
                re_: I64) -> None:
        # The requests in host order, cut into a few tasks of about equal bytes: each worker reads
        # its share in order (a future per request would cost more than a 4 KiB read).
        n = len(rs)
        total = int(cum[-1])
        ntask = min(n, 2 * WORKERS) if WORKERS > 1 else 1
        if ntask <= 1 or (n <= SYNC_REQUESTS and total <= SYNC_BYTES):
            _read_requests(stream.file, requests)  # read now: nothing to wait for
        elif total >= DENSE * (int(re_[-1]) - int(rs[0])):
            # Mostly contiguous: one sequential task, windows one after another on one thread.
            self.futures.append(_executor(Pool.SWEEP).submit(_read_requests, stream.file, requests))
        else:
            pool = _executor()
            cuts = np.searchsorted(cum, cum[-1] * np.arange(1, ntask) / ntask, side="left") + 1
            bounds = np.concatenate(([0], np.minimum(cuts, n), [n]))  # ascending
            bounds = bounds[np.concatenate(([True], bounds[1:] != bounds[:-1]))]  # (np.unique would import numpy.ma)
            for t0, t1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                self.futures.append(pool.submit(_read_requests, stream.file, requests[t0:t1]))

    def assemble(self, stream: PieceStream) -> U8:
        """The window's pieces concatenated in stream order (waits for the reads)."""
        for f in self.futures:
            f.result()
        self.futures = []
        if self.out is not None:
            return self.out
        offs = stream.offsets[self.a : self.b]
        lens = stream.lengths[self.a : self.b]
        n = len(offs)
        # Where each piece starts in the window buffer.
        at = self.req_pos[self.piece_req] + (offs - self.req_start[self.piece_req])
        total = int(lens.sum())
        if total == len(self.buf) and int(at[0]) == 0 and (
                n == 1 or bool((at[1:] == at[:-1] + lens[:-1]).all())):
            self.out = self.buf  # the pieces are the buffer, in order: hand it over as is
            self.buf = np.zeros(0, np.uint8)
            return self.out
        size = int(lens[0])
        if n > 1 and size > 0 and bool((lens == size).all()):
            # One length: view the buffer as overlapping records of `size` bytes starting at every
            # byte, and take the records at the pieces' positions (one memcpy per piece, in C).
            records = np.ndarray((len(self.buf) - size + 1,), np.dtype((np.void, size)), self.buf.data, 0, (1,))
            out: U8 = records[at].view(np.uint8).reshape(-1)
        else:
            out = np.empty(total, dtype=np.uint8)
            dst = np.zeros(n, np.int64)
            if n > 1:
                dst[1:] = np.cumsum(lens[:-1])
            # Pieces consecutive in both the buffer and the output copy as one block.
            brk = np.ones(n, dtype=bool)
            brk[1:] = at[1:] != at[:-1] + lens[:-1]
            firsts = np.flatnonzero(brk)
            lasts = np.append(firsts[1:], n) - 1
            for f0, f1 in zip(firsts.tolist(), lasts.tolist(), strict=True):
                a0 = int(at[f0])
                m = int(dst[f1] + lens[f1] - dst[f0])
                out[int(dst[f0]) : int(dst[f0]) + m] = self.buf[a0 : a0 + m]
        self.buf = np.zeros(0, np.uint8)
        self.out = out
        return out


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
        self.host_order = order is Order.HOST
        self._cost = self._ends
        if self.host_order and len(offs) > 1:
            reach = np.maximum.accumulate(self.offsets + self.lengths)
            gaps = self.offsets[1:] - reach[:-1]
            through = np.where((gaps > 0) & (gaps <= gap), gaps, 0)
            self._cost = self._ends + np.concatenate(([0], np.cumsum(through)))
        self._closed = False
        self._advice: Future[None] | None = None
        self._taken = threading.Condition()
        self.dense = bool(self.host_order and len(offs)) and int(self._cost[-1]) >= DENSE * (
            int(self.offsets[-1] + self.lengths[-1]) - int(self.offsets[0]))
        """A host-order sweep that reads most of the range it spans (through the gaps): it relies on
        the kernel's read-ahead, which other reads ahead of it (cached pages) disturb."""
        if self.dense:
            hand_over()  # the tables' early read-ahead, if one runs, stops: the sweep reads from here
        if ADVISE and len(offs) and int(self._ends[-1]) > self.half:
            if not self.host_order:
                # Pieces wanted in the walk's order but spread over the file (L2 tables in L1 order):
                # ask the kernel to read them ahead in host order, one sweep, while the windows are
                # read and used (the page cache holds them, not this process).
                self._advice = _executor(Pool.ADVICE).submit(self._advise)
            else:
                # Host order, sparse (the 1 TiB preallocated image's tables, 512 MiB apart): a
                # window's few requests at a time leave the device idle between them; advice keeps
                # many in flight, a bounded distance ahead of the walk. Dense streams are left to
                # the kernel's read-ahead (advice there only competes with it).
                if not self.dense:
                    self._advice = _executor(Pool.ADVICE).submit(self._advise_ahead)
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

    def _advise_ahead(self) -> None:
        # Host order: the pieces' own requests, each advised once the walk has taken all but
        # ADVISE_AHEAD bytes of the pieces before it.
        rs, re_, preq = coalesce(self.offsets, self.offsets + self.lengths, self.gap, self.max_request)
        last = np.searchsorted(preq, np.arange(len(rs)), side="right") - 1
        upto = self._ends[last]  # piece bytes up to the end of each request
        fd = self.file.fd
        size = self.file.size
        for r0, r1, u in zip(rs.tolist(), re_.tolist(), upto.tolist(), strict=True):
            with self._taken:
                # (a walk that stops taking without closing its stream: stop advising after a
                # while, rather than keep a thread waiting that interpreter exit would join)
                waited = 0
                while not self._closed and u - self._taken_bytes() > ADVISE_AHEAD and waited < 200:
                    before = self.pos
                    self._taken.wait(0.05)
                    waited = 0 if self.pos != before else waited + 1
            if self._closed or waited >= 200:
                return
            if r0 < size:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, r0, min(r1, size) - r0, os.POSIX_FADV_WILLNEED)

    def _taken_bytes(self) -> int:
        return int(self._ends[self.pos - 1]) if self.pos else 0

    def __len__(self) -> int:
        return len(self.offsets)

    def _next_cut(self, a: int) -> int:
        if self.host_order:
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
            if self._advice is not None:
                with self._taken:
                    self._taken.notify_all()
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
        with self._taken:
            self._closed = True
            self._taken.notify_all()
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


__all__ = ["GAP_BYTES", "MAX_REQUEST", "SYNC_BYTES", "SYNC_REQUESTS", "WINDOW_BYTES", "WORKERS", "Order",
           "PieceStream", "coalesce", "read_pieces"]
