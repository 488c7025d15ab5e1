"""Early read-ahead of the L2 tables' span, started before numpy is imported.

A bulk command (`check`, `map`) spends its first ~50 ms importing numpy and the analyses before
the planner's sweep reads its first table. When the tables lie densely over a span of the file
(small clusters: tables interleaved with the data they map, which the sweep reads through), that
time can already bring the span into the page cache. A thread reads it on its own file descriptor
(its own kernel read-ahead state), one `preadv` per `CALL_BYTES`, every buffer of the call the same
64 KiB scratch buffer: nothing is kept, no memory is touched beyond it, and the interpreter lock is
taken once per call, not per buffer (so the import on the main thread does not hold it up). The
sweep then finds the pages in memory, or waits for the same reads.

It reads only a span the tables fill at least `MIN_TABLE_SHARE` of (a scattered 4 KiB-cluster
image: ~30%); sparse tables (large clusters, a metadata-preallocated image: a table per 512 MiB)
are left to the planner, which reads only the tables. So it reads at most 1 / MIN_TABLE_SHARE
times the tables' bytes. It does nothing when the span is already cached (a probe with
RWF_NOWAIT) or too small to be worth a thread, and those refusals come before any parsing. It
stops when the planner's sweep starts (`hand_over`): from then on the sweep reads on its own,
through the pages already read.

Measured on the 4 KiB-cluster 100 GiB image, quiet machine, interleaved runs with
QINSPECT_READ_AHEAD=0 and 1: cold (settled) check median 0.225 -> 0.213 s (21 runs; floor 0.117),
map 0.262 -> 0.238 s (15); after an idle spell (the VM has handed freed memory back to its host)
check 0.704 -> 0.577 s and map 0.661 -> 0.517 s (9); warm unchanged (0.154 s both, 11). The 1 TiB
preallocated image's check does not start it (0.239 / 0.243 s). Earlier read-aheads that took the
interpreter lock per MiB, or went through sendfile, were slower than none (bench/README.md,
session 4).

Numpy-free on purpose (it must run before numpy is imported); it parses the active L1 table with
`array`.
"""

from __future__ import annotations

import os
import sys
import threading
from array import array

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.hostfile import HostFile

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing; mypy knows the name)
if TYPE_CHECKING:
    from qinspect.qcow2.header import Header

MIN_TABLE_SHARE = 4
"""Read ahead only a span whose tables are at least 1/MIN_TABLE_SHARE of it."""
MIN_SPAN = 16 * 1024 * 1024
"""Below this the sweep starts soon enough on its own (and a scan's small images start no thread)."""
MAX_L1_ENTRIES = 1 << 18
"""Larger active L1 tables are not parsed here (in pure Python that would cost more than it saves)."""
CALL_BYTES = 16 * 1024 * 1024
"""Bytes per preadv (the interpreter lock is taken between calls; a hand-over waits for one)."""
_SCRATCH = 64 * 1024
ENABLED = os.environ.get("QINSPECT_READ_AHEAD", "1") != "0"
"""0 turns it off (for A/B runs)."""
_running: set[threading.Event] = set()  # the stop flags of read-aheads running now
_lock = threading.Lock()


def start_table_read_ahead(file: HostFile, header: Header) -> threading.Thread | None:
    """Start reading the span of the active L1 table's L2 tables of `file` (opened, `header`
    parsed) into the page cache, in a daemon thread, if it is dense and not cached yet; the
    thread, or None if there is nothing to do."""
    size = file.size
    # The cheap refusals first: a small file, or one already cached, costs no parsing (then the
    # span itself is probed: the file's tail may be data the span does not reach).
    if (not ENABLED or not 0 < header.l1_size <= MAX_L1_ENTRIES or size < MIN_SPAN
            or _cached(file.fd, 0, size)):
        return None
    cs = header.cluster_size
    try:
        raw = file.pread(header.l1_table_offset, header.l1_size * 8)
    except Qcow2Error:
        return None  # the walk reports it
    entries = array("Q")
    entries.frombytes(raw)
    if sys.byteorder == "little":
        entries.byteswap()
    # (C loops: a Python statement per entry would cost more than the read-ahead saves. Entries
    # are counted, not distinct tables: an image naming one table many times may have its span
    # read ahead, which reads at most the file once.)
    offsets = list(filter(None, map(C.L1E_OFFSET_MASK.__and__, entries)))
    if not offsets:
        return None
    lo, hi = min(offsets), min(size, max(offsets) + cs)
    if hi - lo < MIN_SPAN or len(offsets) * cs * MIN_TABLE_SHARE < hi - lo or _cached(file.fd, lo, hi):
        return None
    try:  # its own descriptor: its own kernel read-ahead state, apart from the walk's
        fd = os.open(file.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    stop = threading.Event()
    with _lock:
        _running.add(stop)
    thread = threading.Thread(target=_read_span, args=(fd, lo, hi, stop), name="qinspect-read-ahead", daemon=True)
    thread.start()
    return thread


def hand_over() -> None:
    """Stop the read-aheads running now (the planner's sweep starts: it reads from here on)."""
    with _lock:
        for stop in _running:
            stop.set()


def _cached(fd: int, lo: int, hi: int) -> bool:
    """Whether a few pages across [lo, hi) are in the page cache already (a warm file)."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    probe = bytearray(4096)
    for at in (lo, (lo + hi) // 2 & ~4095, max(lo, hi - 4096)):
        try:
            if os.preadv(fd, [probe], at, nowait) < len(probe):
                return False
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
            return False
    return True


def _read_span(fd: int, lo: int, hi: int, stop: threading.Event) -> None:
    scratch = memoryview(bytearray(_SCRATCH))
    try:
        pos = lo
        while pos < hi and not stop.is_set():
            n = min(CALL_BYTES, hi - pos)
            bufs = [scratch] * (n // _SCRATCH) + ([scratch[: n % _SCRATCH]] if n % _SCRATCH else [])
            got = os.preadv(fd, bufs, pos)
            if got <= 0:
                break
            pos += got
    except OSError:
        pass  # only a hint: the walk reads (and reports) for itself
    finally:
        with _lock:
            _running.discard(stop)
        os.close(fd)


__all__ = ["hand_over", "start_table_read_ahead"]
