"""`qemu-img check` recomputed: references from every structure against the stored refcounts.

The walk follows QEMU's `qcow2_check_refcounts` step by step (header, active L1 and its L2 tables
with fragmentation info, every snapshot's L1, the snapshot table, the refcount table, the LUKS
region, bitmaps, refcount blocks; then compare; then the COPIED flags), with the same counts and
messages, but each L2 table batch is one set of numpy operations.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import TypeVar, overload

import numpy as np
import numpy.typing as npt

from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.refwalk import BatchConsumer, L1Group, L2Batch, L2Tables, RefKind, RefWalk
from qinspect.qcow2 import constants as C
from qinspect.qcow2.fields import QCOW_SNAPSHOT_HEADER
from qinspect.qcow2.header import table_fits
from qinspect.qcow2.image import Image, StoredRefcounts
from qinspect.qcow2.l2 import L2Format

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
Counts = npt.NDArray[np.unsignedinteger]
"""Recomputed references per host cluster: uint16 up to 16-bit refcounts, uint32 above (`_Refs`)."""
# Stored refcounts, in the narrowest dtype of the image's refcount width (uint16 by default).
Refcounts = npt.NDArray[np.unsignedinteger]
Numbers = int | npt.NDArray[np.integer]
"""The numbers of L2 messages (`_Rows.a` / `.b`): one for all the entries, or one per entry."""
_G = TypeVar("_G", bound=np.generic)
# References past the end of the file are counted densely up to this many extra clusters and
# sparsely beyond (QEMU grows its table; a hostile offset must not make us allocate terabytes).
DENSE_EXTRA_CLUSTERS = 1 << 22
# At most this many COPIED checks wait for the end of the L2 sweep (32 bytes each).
DEFER_ENTRIES = 1 << 20


# qcow2_inc_refcounts_imrt: the two lines printed for each reference past the refcount maximum.
L1_TABLE_KEY = -1
"""Key of the messages about a tree's L1 table itself: before those of its entries (see walk_key)."""
BLOCK_LINES = 1 << 13
"""Lines of check messages formatted and written at a time (see `CheckMessage.blocks`)."""
TEXT_MESSAGES = 64
"""Messages of a `TableBlock` in its `text` (a table of garbage has a million)."""

OVERFLOW_HINT = ("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
                 "clean copy if the image cannot be opened for writing")


class MessageKind(StrEnum):
    """Which of QEMU's check messages a line is (the words `CheckMessage.kind` always had)."""

    ERROR = "error"
    """An "ERROR ..." line of a corruption (fprintf to stderr)."""
    LEAK = "leak"
    """A "Leaked cluster ..." line."""
    CHECK_ERROR = "check-error"
    """A line about the check itself failing somewhere (an unreadable refcount block, ...)."""
    REPORT = "report"
    """An error_report() line: printed with the program name in front."""


def _repeated(block: str, repeat: int, max_lines: int) -> Iterator[str]:
    """`block` (newline-terminated lines) `repeat` times, as strings of about `max_lines` lines."""
    per = max(1, max_lines // (block.count("\n") or 1))
    left = repeat
    while left > 0:
        k = min(per, left)
        yield block * k
        left -= k


@dataclass(slots=True)
class CheckMessage:
    """Lines QEMU's check prints on stderr: kind is error, leak, check-error or report.

    `report` lines come from QEMU's error_report (printed with the program name in front, as
    "qemu-img: ..."); the others are its plain fprintf(stderr) lines. `text` may hold several
    lines, printed `repeat` times (an overflowing cluster referenced a million times is one
    message, not a million).
    """

    kind: MessageKind
    text: str
    cluster: int | None = None
    repeat: int = 1
    indices: range | None = None
    """When set, `text` is a template printed once per index (`text.format(i)`): a run of L1
    entries with the same message, a million lines kept as one object."""

    def lines(self, prog: str) -> Iterator[str]:
        """The stderr lines of this message, generated one at a time."""
        texts = [self.text] if self.indices is None else (self.text.format(i) for i in self.indices)
        for text in texts:
            text = f"{prog}: {text}" if self.kind is MessageKind.REPORT else text
            parts = text.split("\n")
            for _ in range(self.repeat):
                yield from parts

    def blocks(self, prog: str, escape: Callable[[str], str], max_lines: int = BLOCK_LINES) -> Iterator[str]:
        """`lines()` as newline-terminated blocks of up to about `max_lines` lines, each line passed
        through `escape` (for the terminal): a message repeated a million times, or a template
        printed for a million L1 entries, is formatted a block at a time, not a line at a time."""
        if self.indices is None:
            text = f"{prog}: {self.text}" if self.kind is MessageKind.REPORT else self.text
            yield from _repeated("".join(escape(part) + "\n" for part in text.split("\n")), self.repeat, max_lines)
            return
        head, sep, tail = self.text.partition("{}")
        if not sep or "{" in head + tail or "}" in head + tail or self.repeat != 1:
            # Not a plain one-field template: format each index (still written a block at a time).
            chunk: list[str] = []
            for line in self.lines(prog):
                chunk.append(escape(line) + "\n")
                if len(chunk) >= max_lines:
                    yield "".join(chunk)
                    chunk = []
            if chunk:
                yield "".join(chunk)
            return
        # One `{}` field filled with an integer: escape the two constant halves once and join the
        # decimal indices between them (str.join over map(str): no Python call per line).
        pre = f"{prog}: {head}" if self.kind is MessageKind.REPORT else head
        pre_e = "\n".join(escape(p) for p in pre.split("\n"))
        tail_e = "\n".join(escape(p) for p in tail.split("\n"))
        per = max(1, max_lines // (self.text.count("\n") + 1))
        glue = tail_e + "\n" + pre_e
        ix = self.indices
        for a in range(0, len(ix), per):
            part = ix[a : a + per]
            yield pre_e + glue.join(map(str, part)) + tail_e + "\n"


class L2Message(IntEnum):
    """What a message about an L2 entry (or a reference it makes) says; its text is rebuilt from
    the kind and two numbers (`_Rows.texts`) when it is printed."""

    RESERVED = 0  # a: the l2 entry
    COMPRESSED_COPIED = 1  # a: the compressed cluster's offset
    COMPRESSED_DATA_FILE = 2  # a: the l2 entry without COPIED
    COMPRESSED_BITMAP = 3  # a: the l2 entry without COPIED
    PAST_EOF = 4  # a: offset, b: size of the region
    CORRUPT_BITMAP = 5  # a: the cluster's offset
    UNALIGNED_DATA = 6  # a: the cluster's offset
    UNALIGNED_PREALLOC = 7  # a: the cluster's offset
    UNALLOC_BITMAP = 8
    OVERFLOW = 9  # a: the overflowing cluster's offset
    COPIED = 10  # a: the l2 entry, b: the refcount


_L2_TEXTS: dict[int, str] = {
    L2Message.RESERVED: "ERROR found l2 entry with reserved bits set: {a:x}",
    L2Message.COMPRESSED_COPIED: ("ERROR: coffset=0x{a:x}: copied flag must never be set for compressed "
                                  "clusters"),
    L2Message.COMPRESSED_DATA_FILE: "ERROR compressed cluster {l2} with data file, entry=0x{a:x}",
    L2Message.COMPRESSED_BITMAP: ("ERROR compressed cluster {l2} with non-zero subcluster allocation bitmap, "
                                  "entry=0x{a:x}"),
    L2Message.PAST_EOF: ("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                         "offset {a:#x} size {b:#x}"),
    L2Message.CORRUPT_BITMAP: "ERROR offset={a:x}: Allocated cluster has corrupted subcluster allocation bitmap",
    L2Message.UNALIGNED_DATA: "ERROR offset={a:x}: Data cluster is not properly aligned; L2 entry corrupted.",
    L2Message.UNALIGNED_PREALLOC: ("ERROR offset={a:x}: Preallocated cluster is not properly aligned; L2 entry "
                                   "corrupted."),
    L2Message.UNALLOC_BITMAP: "ERROR: Unallocated cluster has non-zero subcluster allocation map",
    L2Message.OVERFLOW: "ERROR: overflow cluster offset=0x{a:x}\n" + OVERFLOW_HINT,  # (the hint has no braces)
    L2Message.COPIED: "ERROR OFLAG_COPIED data cluster: l2_entry={a:x} refcount={b}",
}
"""QEMU's text of each `L2Message` (one or more lines), to be formatted with the L2 index and the
message's two numbers."""


def _l2_text(kind: int, l2: int, a: int, b: int) -> str:
    """The text (one or more lines) of a message about L2 entry `l2` (see `L2Message`)."""
    return _L2_TEXTS[kind].format(l2=l2, a=a, b=b)


class _Rows:
    """The messages about one L2 table's entries as numbers, in walk order (L2 index, step within
    the entry): 22 bytes a message, not a tuple and a string (a table of 128 Ki garbage entries
    makes 256 Ki messages, printed again at every L1 entry naming it)."""

    __slots__ = ("a", "b", "kind", "l2", "step")

    def __init__(self, l2: npt.NDArray[np.int32], step: npt.NDArray[np.int8], kind: npt.NDArray[np.uint8],
                 a: U64, b: U64) -> None:
        self.l2, self.step, self.kind, self.a, self.b = l2, step, kind, a, b

    def __len__(self) -> int:
        return len(self.l2)

    @staticmethod
    def sorted_of(parts: list[_Rows]) -> _Rows:
        """The rows of `parts` in walk order (stable: equal places keep their order in `parts`)."""
        one = parts[0] if len(parts) == 1 else _Rows(*(np.concatenate([getattr(q, f) for q in parts])
                                                      for f in ("l2", "step", "kind", "a", "b")))
        o = np.lexsort((one.step, one.l2))
        if bool((o[1:] > o[:-1]).all()):
            return one
        return _Rows(one.l2[o], one.step[o], one.kind[o], one.a[o], one.b[o])

    def key_of(self, k: int) -> tuple[int, int]:
        return int(self.l2[k]), int(self.step[k])

    def texts(self, lo: int = 0, hi: int | None = None) -> Iterator[str]:
        """The texts of rows [lo, hi), a chunk at a time."""
        hi = len(self) if hi is None else hi
        for c in range(lo, hi, 1 << 12):
            e = min(hi, c + (1 << 12))
            yield from map(_l2_text, self.kind[c:e].tolist(), self.l2[c:e].tolist(), self.a[c:e].tolist(),
                           self.b[c:e].tolist())


class _TableRowsBuilder:
    """`_Rows` per distinct L2 table, gathered as arrays (table id, L2 index, step, kind, a, b) and
    sorted into walk order a batch at a time (`end_batch`): what is kept is the rows, 22 bytes each,
    and the temporaries are a batch's."""

    def __init__(self) -> None:
        self.parts: list[tuple[I64, npt.NDArray[np.int32], npt.NDArray[np.int8], npt.NDArray[np.uint8], U64, U64]] = []
        self.rows: dict[int, _Rows] = {}

    def add(self, tids: I64, l2: I64, step: int, kind: L2Message, a: Numbers = 0, b: Numbers = 0) -> None:
        m = len(tids)
        if not m:
            return
        self.parts.append((tids.astype(np.int64), l2.astype(np.int32), np.full(m, step, np.int8),
                           np.full(m, int(kind), np.uint8), np.broadcast_to(np.asarray(a, np.uint64), (m,)).copy(),
                           np.broadcast_to(np.asarray(b, np.uint64), (m,)).copy()))

    def end_batch(self) -> None:
        """Sort the rows added since the last call into their tables."""
        if not self.parts:
            return
        parts, self.parts = self.parts, []

        def cat(arrays: list[npt.NDArray[_G]]) -> npt.NDArray[_G]:
            return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

        t = cat([q[0] for q in parts])
        l2 = cat([q[1] for q in parts])
        st = cat([q[2] for q in parts])
        o = np.lexsort((st, l2, t))  # (stable: the order they were found in, at equal places)
        t, l2, st = t[o], l2[o], st[o]
        kd = cat([q[3] for q in parts])[o]
        a = cat([q[4] for q in parts])[o]
        b = cat([q[5] for q in parts])[o]
        parts = []
        u, first = np.unique(t, return_index=True)
        ends = np.append(first[1:], len(t))
        own = len(u) > 1  # (own arrays then: a slice would keep the whole batch's alive)
        for tid, i, j in zip(u.tolist(), first.tolist(), ends.tolist(), strict=True):
            rows = _Rows(l2[i:j], st[i:j], kd[i:j], a[i:j], b[i:j]) if not own else \
                _Rows(l2[i:j].copy(), st[i:j].copy(), kd[i:j].copy(), a[i:j].copy(), b[i:j].copy())
            old = self.rows.get(tid)
            self.rows[tid] = rows if old is None else _Rows.sorted_of([old, rows])

    def finish(self) -> dict[int, _Rows]:
        self.end_batch()
        return self.rows


class TableBlock:
    """The messages of one L2 table's entries (`_Rows` from `start` on) as printed at one L1 entry
    naming it, `repeat` times (at that many consecutive entries): one object, however many lines,
    its text rebuilt when printed. Reads like a `CheckMessage` (kind, text, lines, blocks)."""

    __slots__ = ("_text", "repeat", "rows", "start")
    kind = MessageKind.ERROR
    cluster = None
    indices = None

    def __init__(self, rows: _Rows, start: int = 0, repeat: int = 1) -> None:
        self.rows, self.start, self.repeat = rows, start, repeat
        self._text: str | None = None

    @property
    def text(self) -> str:
        """The messages of one repetition, the first TEXT_MESSAGES of them and a count of the others
        (a view's evidence, built once when asked: the CLI prints `blocks()` and never asks)."""
        if self._text is None:
            n = len(self.rows) - self.start
            head = "\n".join(self.rows.texts(self.start, self.start + min(n, TEXT_MESSAGES)))
            self._text = head if n <= TEXT_MESSAGES else f"{head}\n... and {n - TEXT_MESSAGES} more messages"
        return self._text

    def lines(self, prog: str) -> Iterator[str]:
        for _ in range(self.repeat):
            for text in self.rows.texts(self.start):
                yield from text.split("\n")

    def blocks(self, prog: str, escape: Callable[[str], str], max_lines: int = BLOCK_LINES) -> Iterator[str]:
        """`lines()` as newline-terminated blocks of about `max_lines` lines (escaped): a small table's
        block is formatted once and repeated, a big one formatted chunk by chunk each time."""
        n = len(self.rows) - self.start
        if n <= max_lines:
            one = "".join(escape(part) + "\n" for t in self.rows.texts(self.start) for part in t.split("\n"))
            yield from _repeated(one, self.repeat, max_lines)
            return
        for _ in range(self.repeat):
            for c in range(self.start, len(self.rows), max_lines):
                yield "".join(escape(part) + "\n" for t in self.rows.texts(c, min(len(self.rows), c + max_lines))
                              for part in t.split("\n"))


Message = CheckMessage | TableBlock
"""A message of `CheckResult.messages`: lines as QEMU prints them."""


class _KeyedMessages:
    """The messages of an `ordered()` block with their keys: 24 bytes a message (a key and a
    sequence number in arrays, a reference to a shared `CheckMessage`), sorted by (key, sequence
    number) when the block ends."""

    __slots__ = ("keys", "msgs", "seqs")

    def __init__(self) -> None:
        self.keys = array("q")
        self.seqs = array("q")
        self.msgs: list[Message] = []

    def append(self, key: int, msg: Message) -> None:
        self.keys.append(key)
        self.seqs.append(len(self.msgs))
        self.msgs.append(msg)

    def extend(self, other: _KeyedMessages) -> None:
        """Take in another block's messages, their keys and sequence numbers kept."""
        self.keys.extend(other.keys)
        self.seqs.extend(other.seqs)
        self.msgs.extend(other.msgs)

    def max_key(self) -> int:
        return max(self.keys) if self.keys else -1

    def sorted_into(self, out: list[Message]) -> None:
        """Append the messages to `out` in (key, sequence number) order."""
        if not self.msgs:
            return
        order = np.lexsort((np.frombuffer(self.seqs, dtype=np.int64), np.frombuffer(self.keys, dtype=np.int64)))
        msgs = self.msgs
        for a in range(0, len(order), 1 << 16):  # (a million Python ints at once would be 30 MiB)
            out.extend(map(msgs.__getitem__, order[a : a + (1 << 16)].tolist()))


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
    messages: list[Message] = field(default_factory=list)
    # Why the check itself stopped (QEMU's "Check failed: <strerror>"); no counts are printed then.
    failed: str | None = None
    _keyed: _KeyedMessages | None = field(default=None, repr=False)
    _interned: dict[tuple[MessageKind, str, int | None, int], CheckMessage] = field(default_factory=dict, repr=False)
    _last_key: int = field(default=-1, repr=False)
    dirty: bool = False
    lazy_refcounts: bool = False
    leaked_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    corrupt_clusters: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    reference: Counts = field(default_factory=lambda: np.zeros(0, np.uint32))  # references per host cluster
    stored: Refcounts = field(default_factory=lambda: np.zeros(0, np.uint64))  # stored refcount per cluster

    def add(self, kind: MessageKind, text: str, cluster: int | None = None, repeat: int = 1,
            key: int | None = None) -> None:
        """Record a message; there is no cap (qemu-img prints every one).

        Inside `ordered()`, `key` is the message's place in QEMU's walk (L1 index, L2 index, step
        within the entry; see `walk_key`): the vectorised walk finds messages kind by kind, and
        they are put back in QEMU's entry-by-entry order when the block ends.

        Equal messages are one shared object (`messages` holds a reference per line printed): a
        garbage L1 table whose million entries repeat one value makes a million equal messages,
        and memory follows the distinct ones, not the count (issue 10).
        """
        ident = (kind, text, cluster, repeat)
        msg = self._interned.get(ident)
        if msg is None:
            msg = self._interned[ident] = CheckMessage(kind, text, cluster, repeat)
        if self._keyed is None:
            self.messages.append(msg)
            return
        if key is None:
            key = self._last_key
        self._last_key = max(self._last_key, key)
        self._keyed.append(key, msg)

    def add_message(self, msg: TableBlock, key: int) -> None:
        """Record a block of messages built by the walk (`TableBlock`), at `key` inside `ordered()`."""
        assert self._keyed is not None
        self._last_key = max(self._last_key, key)
        self._keyed.append(key, msg)

    def take_keyed(self) -> _KeyedMessages:
        """End a block of keyed messages without printing them: they are returned, to be given to
        `add_keyed` in another block (the same messages for every tree sharing an L1 table)."""
        out, self._keyed = self._keyed or _KeyedMessages(), None
        return out

    def add_keyed(self, items: _KeyedMessages) -> None:
        """Put messages taken with `take_keyed` into the current block (their keys kept)."""
        assert self._keyed is not None
        self._keyed.extend(items)
        self._last_key = max(self._last_key, items.max_key())

    def messages_last_indices(self, indices: range) -> None:
        """Make the message just added a template printed once per index (see CheckMessage)."""
        if self._keyed is not None and self._keyed.msgs:
            last = self._keyed.msgs[-1]
            assert isinstance(last, CheckMessage)
            self._keyed.msgs[-1] = replace(last, indices=indices)  # (unshared)
        else:
            last = self.messages[-1]
            assert isinstance(last, CheckMessage)
            self.messages[-1] = replace(last, indices=indices)

    def ordered(self, on: bool) -> None:
        """Start (True) or end (False) a block of keyed messages; ending it sorts them in."""
        if on:
            self._keyed, self._last_key = _KeyedMessages(), -1
            return
        if self._keyed is not None:
            self._keyed.sorted_into(self.messages)
        self._keyed = None

    def stderr_lines(self, prog: str = "qinspect") -> list[str]:
        """What qemu-img check writes to stderr, in either output format (`prog: ` before reports)."""
        return [*self.iter_stderr_lines(prog), *self.final_lines(prog)]

    def iter_stderr_lines(self, prog: str = "qinspect") -> Iterator[str]:
        """The message lines of `stderr_lines` one at a time (millions of them stream in constant
        memory), without the final "Check failed" line (`final_lines`)."""
        for m in self.messages:
            yield from m.lines(prog)

    def iter_stderr_blocks(self, escape: Callable[[str], str], prog: str = "qinspect") -> Iterator[str]:
        """`iter_stderr_lines` as blocks of escaped, newline-terminated lines, for writing."""
        for m in self.messages:
            yield from m.blocks(prog, escape)

    def final_lines(self, prog: str = "qinspect") -> list[str]:
        if self.failed is not None:
            return [f"{prog}: Check failed: {self.failed}"]
        if self.check_errors:
            return [f"{prog}: Check failed"]
        return []

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
        # of indices and a sort): dense up to nb_file + DENSE_EXTRA_CLUSTERS, sparse past it. A
        # count never stays above refcount_max (`settle`), so up to 16-bit refcounts
        # uint16 holds it (32 MiB at 1 TiB, not 64: fewer fresh pages); wider refcounts take uint32
        # (2^32 references would take 32 GiB of L2). +1 is added where no count is at the maximum
        # yet (uint16 would wrap past 65535), other additions are made in int64 (`settle`).
        dtype = np.uint16 if refcount_max <= 0xFFFF else np.uint32
        self.counts: Counts = np.zeros(nb_clusters, dtype=dtype)
        self.top = 0  # highest cluster referenced + 1
        self.clean_from = 0  # no cluster from here on is counted yet (the dense counts there are 0)
        self.far: list[I64] = []
        self.ranges: list[tuple[int, int]] = []  # (first, last) cluster ranges, applied in finish()
        # References past refcount_max per cluster: counted as corruptions here; their messages are
        # printed afterwards at their places in QEMU's walk (`_Replay`).
        self.excess: dict[int, int] = {}
        self.overflows = 0  # their sum

    def beyond_eof(self, offset: int, size: int, key: int | None = None) -> bool:
        """QEMU refuses to count a region ending a cluster or more past the end of the file."""
        if offset + size - self.file_len >= self.cs:
            self.res.corruptions += 1
            self.res.add(MessageKind.ERROR, "ERROR: counting reference for region exceeding the end of the file by one "
                                  f"cluster or more: offset {offset:#x} size {size:#x}", key=key)
            return True
        return False

    def add_regions(self, offsets: I64, sizes: I64 | int, keys: I64 | None = None, weights: I64 | None = None) -> None:
        """qcow2_inc_refcounts_imrt over many regions: +1 for each cluster each region touches
        (+weights[k] for region k: what a table points at counts once per L1 entry naming it).
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
            if weights is not None:
                weights = weights[~past]
        bits = self.cs.bit_length() - 1  # shifts, not divisions: 16 Mi offsets on a 1 TiB image
        first = offsets >> bits
        if np.ndim(sizes) == 0 and int(sizes) == self.cs and not (offsets & (self.cs - 1)).any():
            self.add(first, weights)  # aligned whole clusters (data clusters, L2 tables): one cluster each
            return
        last = (offsets + size - 1) >> bits
        self.add(first, weights)
        extra = last - first
        if extra.any():  # regions over two or more clusters (unaligned tables, compressed data)
            sel = extra > 0
            cnt = extra[sel]
            start = first[sel] + 1
            more = np.repeat(start, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
            self.add(more, np.repeat(weights[sel], cnt) if weights is not None else None)

    def add_range(self, offset: int, size: int, key: int | None = None) -> None:
        if size <= 0 or self.beyond_eof(offset, size, key):
            return
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        limit = self.nb_file + DENSE_EXTRA_CLUSTERS
        if last >= limit:
            # A hostile offset or size (from the file): count what is within reach, never allocate
            # in proportion to the claimed size.
            self.res.corruptions += 1
            self.res.add(MessageKind.ERROR, f"ERROR host range {offset:#x}+{size:#x} lies past the end of the image "
                                            f"file (references beyond cluster {limit} not counted)")
            if first >= limit:
                self.add(np.array([first], dtype=np.int64))
                return
            last = limit - 1
        # O(1) per range, applied in finish() as a difference array: 65536 snapshot L1 tables or
        # 65535 bitmap tables of up to 1 GiB each must not cost an index array each.
        self.ranges.append((first, last))
        self.top = max(self.top, last + 1)

    def add_runs(self, firsts: I64, lengths: I64) -> None:
        """One reference to each cluster of the runs [firsts[k], firsts[k] + lengths[k]): a slice of
        the table per run, no index per cluster (a preallocated or sequentially written table is
        one run)."""
        hi = int((firsts + lengths).max())
        if hi > len(self.counts) or hi > self.nb_file + DENSE_EXTRA_CLUSTERS:
            # past the end of the file: grown or sparse counts
            self.add(_expand_runs(firsts, lengths))
            return
        self.top = max(self.top, hi)
        fl, ll = firsts.tolist(), lengths.tolist()
        lo = fl[0]
        if len(fl) > 1 and lo >= self.clean_from and hi - lo <= 2 * sum(ll) and all(
                fl[i] >= fl[i - 1] + ll[i - 1] for i in range(1, len(fl))):
            # Ascending runs a little apart (tables each followed by their clusters) in fresh
            # territory: the span written as 1 at once, the gaps between the runs back to 0.
            self.counts[lo:hi].fill(1)
            for i in range(1, len(fl)):
                self.counts[fl[i - 1] + ll[i - 1] : fl[i]] = 0
            self.clean_from = hi
            return
        for f, k in zip(fl, ll, strict=True):
            seg = self.counts[f : f + k]
            if f >= self.clean_from:
                # Nothing counted there yet (runs come in host order): 1 each, written without being
                # read (fresh pages are faulted in once, not read as zeros first), and no refcount
                # maximum is below 1.
                seg.fill(1)
                self.clean_from = f + k
                continue
            self.clean_from = max(self.clean_from, f + k)
            self.bump(self.counts, f, f + k)

    def add(self, clusters: I64, weights: I64 | None = None) -> None:
        """Count one reference to each element of `clusters` (duplicates count once each), or
        `weights[k]` references to `clusters[k]`."""
        if not len(clusters):
            return
        if weights is not None and bool((weights == 1).all()):
            weights = None
        idx = clusters.astype(np.int64, copy=False)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        self.top = max(self.top, hi)
        limit = self.nb_file + DENSE_EXTRA_CLUSTERS
        if hi > limit:
            far = idx >= limit
            self.far.append(idx[far] if weights is None else np.repeat(idx[far], weights[far]))
            idx = idx[~far]
            if weights is not None:
                weights = weights[~far]
            if not len(idx):
                return
            lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi > len(self.counts):  # references past the end of the file: grow (bounded by limit)
            grown = np.zeros(min(limit, max(hi, 2 * len(self.counts))), dtype=self.counts.dtype)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        self.clean_from = max(self.clean_from, hi)
        if weights is not None:
            # Many references at once (a shared table): summed in int64, saturated at 2^32 - 1, and
            # brought back to refcount_max with one message each (`settle`).
            u, inv = np.unique(idx, return_inverse=True)
            tot = np.bincount(inv.reshape(-1), weights=weights.astype(np.float64)).astype(np.int64)
            self.settle(self.counts, u, np.minimum(self.counts[u].astype(np.int64) + tot, np.iinfo(np.uint32).max))
            return
        if len(idx) == 1 or bool((idx[1:] > idx[:-1]).all()):  # no duplicates (the usual case)
            if hi - lo == len(idx):  # consecutive clusters (preallocation, sequential writes)
                self.bump(self.counts, lo, hi)
            else:
                cur = self.counts[idx]
                if int(cur.max()) >= self.max:
                    self.settle(self.counts, idx, cur.astype(np.int64) + 1)
                else:
                    self.counts[idx] = cur + 1  # (none was at the maximum: none passes it)
            return
        if hi - lo <= 4 * len(idx) + 65536:
            seg = self.counts[lo:hi]
            inc = np.bincount(idx - lo, minlength=hi - lo)
            nz = np.flatnonzero(inc)
            self.settle(self.counts, lo + nz, seg[nz].astype(np.int64) + inc[nz])
            return
        u, c = np.unique(idx, return_counts=True)
        self.settle(self.counts, u, self.counts[u].astype(np.int64) + c)

    def bump(self, counts: Counts, lo: int, hi: int) -> None:
        """One reference to each cluster of [lo, hi): +1 in place where no count there is at the
        maximum yet (then none passes it, and uint16 does not wrap), in int64 otherwise."""
        seg = counts[lo:hi]
        if int(seg.max()) >= self.max:
            self.settle(counts, np.arange(lo, hi, dtype=np.int64), seg.astype(np.int64) + 1)
        else:
            seg += 1

    def settle(self, counts: Counts, idx: I64, new: I64) -> None:
        """Store the new counts `new` (exact, int64) of the distinct clusters `idx`.

        qcow2_inc_refcounts_imrt never counts past refcount_max: each reference beyond it is
        "ERROR: overflow cluster offset=..." (two lines) and a corruption, and is not counted. So a
        count past the maximum is stored as the maximum, and what is beyond it is recorded
        (`excess`, printed at its places in the walk by `_Replay`). 32/64-bit refcounts: uint32
        counts cannot get there."""
        if self.max < 0xFFFFFFFF:
            over = new > self.max
            if over.any():
                for cl, n in zip(idx[over].tolist(), (new[over] - self.max).tolist(), strict=True):
                    self.res.corruptions += n
                    self.excess[cl] = self.excess.get(cl, 0) + n
                    self.overflows += n
                new = np.minimum(new, self.max)
        counts[idx] = new

    def finish(self) -> tuple[Counts, dict[int, int], int]:
        """Dense counts over [0, nb), sparse counts past it, and nb (QEMU's grown table size)."""
        nb = self.nb_file
        if self.top > nb:
            nb = min(self.top, nb + DENSE_EXTRA_CLUSTERS)
        counts = self.counts
        if len(counts) != nb:
            counts = np.zeros(nb, dtype=self.counts.dtype)
            k = min(nb, len(self.counts))
            counts[:k] = self.counts[:k]
        self.counts = np.zeros(0, dtype=counts.dtype)
        if self.ranges:  # every range ends below min(top, limit) = nb
            r = np.array(self.ranges, dtype=np.int64)
            self.ranges = []
            if int((r[:, 1] - r[:, 0]).sum()) <= (1 << 22):
                for a, b in r.tolist():  # the usual few short ranges: no array the size of the file
                    self.bump(counts, a, b + 1)
            else:  # many or long ranges: a difference array over the span they cover
                lo, hi = int(r[:, 0].min()), int(r[:, 1].max()) + 1
                d = np.zeros(hi - lo + 1, dtype=np.int32)
                np.add.at(d, r[:, 0] - lo, 1)
                np.add.at(d, r[:, 1] + 1 - lo, -1)
                inc = np.cumsum(d[:-1], dtype=np.int32)
                nz = np.flatnonzero(inc)
                self.settle(counts, lo + nz, counts[lo:hi][nz].astype(np.int64) + inc[nz])
        sparse: dict[int, int] = {}
        if self.far:
            u, c = np.unique(np.concatenate(self.far), return_counts=True)
            sparse = {int(a): int(b) for a, b in zip(u, c, strict=True)}
            self.far = []
        return counts, sparse, nb


class _Copied:
    """check_oflag_copied for data clusters, done during the L2 walk (no second walk, no list of
    every allocated entry): refcounts of clusters inside the file come from the stored refcounts,
    read as the walk needs them; the rare references past the end are kept and judged after it.
    Messages are kept to be reported after the refcount comparison, where QEMU prints them."""

    def __init__(self, img: Image, stored: Refcounts, unreadable: npt.NDArray[np.bool_] | None,
                 reader: StoredRefcounts) -> None:
        self.img = img
        self.stored = stored
        self.unreadable = unreadable
        self.reader = reader  # reads the blocks of `stored` as they are needed
        self.swept = 0  # how far the L2 sweep has read the file (host offset)
        self.deferred = 0  # entries judged after the sweep (their refcount block lay ahead of it)
        # Per distinct table: (L2 index, l2 entry, refcount) of each wrong COPIED flag, as numbers,
        # printed for every active L1 entry naming the table.
        self.found = _TableRowsBuilder()
        self.later: list[tuple[I64, I64, I64, U64]] = []  # (table ids, L2 indices, clusters, l2 entries)

    def none_wrong(self, runs: tuple[I64, I64], l2e: U64 | tuple[int, int]) -> bool:
        """True when no entry `l2e` (or: entries from l2e[0] to l2e[1]), pointing at the runs of
        consecutive clusters `runs` (first, length), can have a wrong COPIED flag: every entry has
        it and every refcount is 1, or none has it and no refcount is 1. Answered with reductions
        over the refcounts (no per-entry gather); False means "look entry by entry" (`batch`)."""
        if self.img.header.has_data_file or self.unreadable is not None:
            return False
        firsts, lengths = runs
        if int((firsts + lengths).max()) > len(self.stored):
            return False
        ends = firsts + lengths - 1
        if self.reader.unread_after(firsts, self.swept).any() or self.reader.unread_after(ends, self.swept).any():
            return False  # a block ahead of the sweep: `batch` judges those entries after it
        fl, ll = firsts.tolist(), lengths.tolist()
        # Runs in ascending order with no refcount block between two of them (a batch of tables
        # each followed by its clusters): their blocks are those of the span they cover, and their
        # refcounts are reduced over that span at once (np.*.reduceat), not run by run.
        per = self.img.header.refcount_block_entries
        joined = all(0 <= fl[i] - fl[i - 1] - ll[i - 1] < per for i in range(1, len(fl)))
        lo_c, hi_c = fl[0], fl[-1] + ll[-1]
        if joined:
            self.reader.need(lo_c, hi_c)
        else:
            for f, k in zip(fl, ll, strict=True):
                self.reader.need(f, f + k)
        lowest, highest = l2e if isinstance(l2e, tuple) else (int(l2e.min()), int(l2e.max()))
        every, none = lowest >= C.QCOW_OFLAG_COPIED, highest < C.QCOW_OFLAG_COPIED
        if not (every or none):
            return False
        if joined and len(fl) > 1 and hi_c - lo_c <= 2 * sum(ll):
            seg = self.stored[lo_c:hi_c]
            at = np.empty(2 * len(fl) - 1, np.int64)  # each run, then the gap after it
            at[0::2] = firsts - lo_c
            at[1::2] = (firsts + lengths)[:-1] - lo_c
            mins = np.minimum.reduceat(seg, at)[0::2]
            maxs = np.maximum.reduceat(seg, at)[0::2]
            if every:
                return int(mins.min()) == int(maxs.max()) == 1
            return not bool(((mins <= 1) & (maxs >= 1)).any())
        for f, k in zip(fl, ll, strict=True):
            seg = self.stored[f : f + k]
            lo, hi = int(seg.min()), int(seg.max())
            if (every and not lo == hi == 1) or (none and lo <= 1 <= hi):
                return False
        return True

    def batch(self, clusters: I64, l2e: U64, where: Callable[[I64], tuple[I64, I64]]) -> None:
        """Entries `l2e` pointing at host `clusters`; `where(k)` gives (distinct table ids, L2
        indices) of entries k, asked only for the few entries that need it (wrong flags, clusters
        past the stored refcounts)."""
        if self.img.header.has_data_file:
            bad = np.flatnonzero(l2e < np.uint64(C.QCOW_OFLAG_COPIED))  # refcount 1 by definition
            rcs = np.ones(len(bad), dtype=np.uint64)
        else:
            n = len(self.stored)
            if n == 0:
                tids, l2i = where(np.arange(len(clusters), dtype=np.int64))
                self.later.append((tids, l2i, clusters, l2e))
                return
            inside: npt.NDArray[np.bool_] | None = None
            if len(clusters) and int(clusters.max()) >= n:
                inside = clusters < n
                pos = np.flatnonzero(~inside)
                tids, l2i = where(pos)
                self.later.append((tids, l2i, clusters[pos], l2e[pos]))
                clusters = np.where(inside, clusters, 0)
            if len(clusters) and self.deferred + len(clusters) <= DEFER_ENTRIES:
                # Entries whose refcount block lies ahead of the sweep are judged after it, with the
                # others in `later` (reading that block now would leave it cached ahead of the sweep:
                # see StoredRefcounts); memory for them is bounded by DEFER_ENTRIES.
                ahead = self.reader.unread_after(clusters, self.swept)
                if inside is not None:
                    ahead &= inside
                if ahead.any():
                    pos = np.flatnonzero(ahead)
                    tids, l2i = where(pos)
                    self.later.append((tids, l2i, clusters[pos], l2e[pos]))
                    self.deferred += len(pos)
                    inside = ~ahead if inside is None else inside & ~ahead
            if len(clusters):
                self.reader.need_clusters(clusters if inside is None else clusters[inside])
            rc = self.stored[clusters]
            # COPIED (bit 63) must be set exactly where the refcount is 1
            wrong = (rc == 1) != (l2e >= np.uint64(C.QCOW_OFLAG_COPIED))
            if inside is not None:
                wrong &= inside
            if self.unreadable is not None:
                wrong &= ~self.unreadable[clusters]
            bad = np.flatnonzero(wrong)
            rcs = rc[bad]
        if not len(bad):
            return
        tids, l2i = where(bad)
        self.found.add(tids, l2i, 0, L2Message.COPIED, l2e[bad], rcs)

    def judge(self, stored: Refcounts, unreadable: npt.NDArray[np.bool_] | None, nb: int) -> dict[int, _Rows]:
        """The wrong COPIED flags per table (`_Rows`, walk order) once the final stored refcounts are
        known: those found during the sweep and the entries judged after it."""
        found = self.found
        for tids, l2i, clusters, l2e in self.later:
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
            kk = np.flatnonzero(ok & ((rcs == 1) != copied))
            found.add(tids[kk], l2i[kk], 0, L2Message.COPIED, l2e[kk], rcs[kk])
        self.later = []
        return found.finish()

    def report(self, res: CheckResult, msgs: dict[int, _Rows], walk: RefWalk, blocked: I64) -> None:
        """Add the corruptions and messages `msgs` (from `judge`; keyed: call inside res.ordered):
        each table's, at every active L1 entry naming it; `blocked` (sorted): the L1 entries with
        messages of their own."""
        if not msgs:
            return
        n = self.img.header.l2_size
        active = walk.groups[walk.tree_group[0]]
        with_texts = np.array(sorted(msgs), np.int64)
        runs = _Runs(res, n, msgs, blocked)
        for idx, offs in active.l2_offset_chunks():
            keep = offs != 0  # check_oflag_copied skips L1 entries whose table offset is 0
            idx, offs = idx[keep], offs[keep]
            tids = walk.tables.id_of(offs)
            hit = np.isin(tids, with_texts)
            runs.add(idx[hit], tids[hit])
        runs.flush()


class _Replay:
    """The overflow messages of qcow2_inc_refcounts_imrt at their places in QEMU's walk.

    The counts are summed order-free (`_Refs`, which records how many references each cluster
    has past refcount_max: `excess`). Which references overflow depends on the order: the
    (refcount_max + 1)-th reference to a cluster and every later one, in the order
    check_refcounts_l1/_l2 meet them. So the walk is replayed for the overflowing clusters only:
    per distinct L2 table, the references it makes to them (its own cluster when named, then its
    entries' clusters in L2 index order, read once more, once per table); per tree, the runs of
    consecutive L1 entries naming one table are replayed as a whole (a reference's running count
    grows by a constant per entry, so each one's first overflowing entry is computed, and a run
    prints a few blocks repeated, not one line per entry).
    """

    def __init__(self, img: Image, walk: RefWalk, refs: _Refs, fmt: L2Format, table_msgs: dict[int, _Rows]) -> None:
        self.walk = walk
        self.res = refs.res
        self.cs = refs.cs
        self.bits = refs.cs.bit_length() - 1
        self.n = img.header.l2_size
        self.rmax = refs.max
        self.file_len = refs.file_len
        self.file_size = img.file.size
        self.table_msgs = table_msgs
        self.has_msgs = np.array(sorted(table_msgs), np.int64)
        self.excess = refs.excess
        self.ov = np.array(sorted(refs.excess), np.int64)  # the overflowing clusters
        self.cnt = np.zeros(len(self.ov), np.int64)  # their running counts
        self.emitted = np.zeros(len(self.ov), np.int64)
        self.texts: dict[int, str] = {}
        self.blocks: dict[tuple[int, bytes], _Rows] = {}  # per (table id, overflows in it): its rows
        self.shared: dict[tuple[int, int, int], TableBlock] = {}  # (rows id, start, repeat): one object
        # per table id: (L2 index, -1 for the table itself; step; index into ov) of its references
        self.events: dict[int, tuple[I64, I64, I64]] = {}
        self.ev_tables = np.zeros(0, np.int64)
        self.group_touch: dict[int, bool] = {}
        self.group_corr: dict[int, int] = {}
        if len(self.ov):
            self._collect(img, fmt)

    def _oidx(self, clusters: I64) -> tuple[I64, npt.NDArray[np.bool_]]:
        j = np.minimum(np.searchsorted(self.ov, clusters), len(self.ov) - 1)
        return j, self.ov[j] == clusters

    def _collect(self, img: Image, fmt: L2Format) -> None:
        tables = self.walk.tables
        cs, bits, n = self.cs, self.bits, self.n
        parts: list[tuple[I64, I64, I64, I64]] = []  # (table ids, L2 index, step, ov index)
        offs = tables.offsets
        ok = offs + cs - self.file_len < cs
        for second, c in ((False, offs >> bits), (True, (offs + cs - 1) >> bits)):
            j, hit = self._oidx(c)
            hit &= ok
            if second:
                hit &= (offs & (cs - 1)) != 0  # (an aligned table is one cluster)
            t = np.flatnonzero(hit)
            parts.append((t, np.full(len(t), -1, np.int64), np.full(len(t), 1, np.int64), j[t]))
        h = img.header
        if not h.has_data_file:  # (with a data file the L2 entries count nothing)
            for batch in self.walk.l2_batches():
                pos, entries, bitmaps = batch.used()
                m = len(entries)
                if not m:
                    continue
                p = np.arange(m, dtype=np.int64) if pos is None else pos
                comp = (entries & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
                off = (entries & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
                alloc = ~comp & (off != 0)
                ro, rs, rp = [off[alloc]], [np.full(int(np.count_nonzero(alloc)), cs, np.int64)], [p[alloc]]
                if comp.any():
                    ci = np.flatnonzero(comp)
                    if bitmaps is not None:
                        ci = ci[bitmaps[ci] == 0]
                    ce = entries[ci] & ~np.uint64(C.QCOW_OFLAG_COPIED)
                    coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
                    nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
                    ro.append(coff)
                    rs.append(nsec * 512 - (coff & 511))
                    rp.append(p[ci])
                o, sz, pp = np.concatenate(ro), np.concatenate(rs), np.concatenate(rp)
                keep = o + sz - self.file_len < cs
                o, sz, pp = o[keep], sz[keep], pp[keep]
                srt = np.argsort(pp, kind="stable")
                o, sz, pp = o[srt], sz[srt], pp[srt]
                first = o >> bits
                cnt = ((o + sz - 1) >> bits) - first + 1
                if len(cnt) and int(cnt.max()) > 1:
                    first = _expand_runs(first, cnt)
                    pp = np.repeat(pp, cnt)
                j, hit = self._oidx(first)
                pp = pp[hit]
                parts.append((batch.ids[pp // n], pp % n, np.full(len(pp), 4, np.int64), j[hit]))
        t = np.concatenate([q[0] for q in parts])
        l2 = np.concatenate([q[1] for q in parts])
        st = np.concatenate([q[2] for q in parts])
        jj = np.concatenate([q[3] for q in parts])
        srt = np.lexsort((l2, t))  # (stable: a region's clusters stay in ascending order)
        t, l2, st, jj = t[srt], l2[srt], st[srt], jj[srt]
        u, start = np.unique(t, return_index=True)
        ends = np.append(start[1:], len(t))
        for tid, a, b in zip(u.tolist(), start.tolist(), ends.tolist(), strict=True):
            self.events[tid] = (l2[a:b], st[a:b], jj[a:b])
        self.ev_tables = u.astype(np.int64)

    def text(self, j: int) -> str:
        t = self.texts.get(j)
        if t is None:
            t = self.texts[j] = f"ERROR: overflow cluster offset=0x{int(self.ov[j]) * self.cs:x}\n{OVERFLOW_HINT}"
        return t

    def touches(self, g: int, tree: tuple[int, int, int]) -> bool:
        """Whether tree `tree` (of L1 group g) makes a reference to an overflowing cluster."""
        if not len(self.ov):
            return False
        _src, off, size = tree
        if size:
            lo, hi = np.searchsorted(self.ov, [off >> self.bits, ((off + size * 8 - 1) >> self.bits) + 1])
            if hi > lo:
                return True
        t = self.group_touch.get(g)
        if t is None:
            t = self.group_touch[g] = any(bool(np.isin(self.walk.tables.id_of(l2o), self.ev_tables).any())
                                          for _l1i, l2o in self.walk.groups[g].l2_offset_chunks())
        return t

    def note_corruptions(self, g: int, n: int) -> None:
        self.group_corr[g] = n

    def corruptions_of(self, g: int) -> int:
        return self.group_corr.get(g, 0)

    def bump(self, offset: int, size: int, key: int | None = None, keyed: bool = False) -> None:
        """One reference to each cluster of a region (qcow2_inc_refcounts_imrt), in order."""
        if not len(self.ov) or size <= 0 or offset + size - self.file_len >= self.cs:
            return
        lo, hi = np.searchsorted(self.ov, [offset >> self.bits, ((offset + size - 1) >> self.bits) + 1])
        for j in range(int(lo), int(hi)):
            self._one(j, key if keyed else None)

    def _one(self, j: int, key: int | None) -> None:
        if self.cnt[j] >= self.rmax:
            self.res.add(MessageKind.ERROR, self.text(j), int(self.ov[j]), key=key)
            self.emitted[j] += 1
        else:
            self.cnt[j] += 1

    def tree(self, res: CheckResult, grp: L1Group, blocked: I64) -> None:
        """The messages of a tree's L2 tables (and the overflows of its references), keyed; `blocked`
        (sorted): the L1 entries with messages of their own."""
        pending: tuple[int, int, int, int] | None = None  # (first L1 index, table, offset, entries): a run
        for l1i, l2o in grp.l2_offset_chunks():  # (bounded temporaries for an L1 table of millions of entries)
            tids = self.walk.tables.id_of(l2o)
            sel = np.zeros(len(l1i), dtype=bool)
            if len(self.has_msgs):
                sel |= np.isin(tids, self.has_msgs) & (l2o < self.file_size)
            if len(self.ev_tables):
                sel |= np.isin(tids, self.ev_tables)
            idx = np.flatnonzero(sel)
            if not len(idx):
                continue
            li, ti, lo = l1i[idx], tids[idx], l2o[idx]
            bl = np.isin(li, blocked) if len(blocked) else np.zeros(len(li), dtype=bool)
            brk = (ti[1:] != ti[:-1]) | (li[1:] != li[:-1] + 1) | bl[1:] | bl[:-1]
            starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
            ends = np.append(starts[1:], len(li))
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                run = (int(li[a]), int(ti[a]), int(lo[a]), b - a)
                if (pending is not None and a == 0 and not bl[0] and pending[1] == run[1]
                        and pending[0] + pending[3] == run[0] and not _has(blocked, pending[0])):
                    pending = (pending[0], pending[1], pending[2], pending[3] + run[3])  # across chunks
                    continue
                if pending is not None:
                    self._run(res, *pending)
                pending = run
        if pending is not None:
            self._run(res, *pending)

    def _run(self, res: CheckResult, li0: int, tid: int, l2_offset: int, r: int) -> None:
        """r consecutive L1 entries from li0 naming table tid."""
        msgs = self.table_msgs.get(tid) if l2_offset < self.file_size else None
        res.corruptions += (len(msgs) if msgs is not None else 0) * r
        ev = self.events.get(tid)
        if ev is None:
            self._block(res, li0, r, msgs)
            return
        l2s, steps, js = ev
        uj, inv, kc = np.unique(js, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        # occurrence of each reference among those of its cluster within one entry
        srt = np.argsort(inv, kind="stable")
        occ = np.empty(len(js), np.int64)
        occ[srt] = np.arange(len(js)) - np.repeat(np.cumsum(kc) - kc, kc)
        k = kc[inv]
        need = self.rmax - self.cnt[js] - occ
        first_over = np.maximum(0, -(-need // k))  # the first entry of the run where it overflows
        self.cnt[uj] = np.minimum(self.rmax, self.cnt[uj] + kc * r)
        cuts = np.unique(np.concatenate(([0], first_over[first_over < r], [r])))
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            over = np.flatnonzero(first_over <= a)
            np.add.at(self.emitted, js[over], b - a)
            self._block(res, li0 + a, b - a, self._with_overflows(tid, msgs, l2s[over], steps[over], js[over]))

    def _with_overflows(self, tid: int, msgs: _Rows | None, l2s: I64, steps: I64, js: I64) -> _Rows | None:
        """The table's rows with the overflow messages of references `js` (at L2 index, step) merged
        in walk order (the table's first at equal places), made once per table and set of overflows."""
        if not len(js):
            return msgs
        key = (tid, js.astype(np.int64).tobytes() + l2s.astype(np.int64).tobytes())
        rows = self.blocks.get(key)
        if rows is None:
            m = len(js)
            ov = _Rows(l2s.astype(np.int32), steps.astype(np.int8), np.full(m, int(L2Message.OVERFLOW), np.uint8),
                       (self.ov[js] * self.cs).astype(np.uint64), np.zeros(m, np.uint64))
            rows = self.blocks[key] = _Rows.sorted_of([msgs, ov] if msgs is not None else [ov])
        return rows

    def _block(self, res: CheckResult, li: int, r: int, block: _Rows | None) -> None:
        """The messages `block` at L1 entry li, r times (at r consecutive entries). At one entry, the
        table's own overflows (L2 index -1) are messages apart: the entry's own messages come between
        them and those of the table's entries (walk_key)."""
        if block is None or not len(block):
            return
        start = 0
        if r == 1:
            start = int(np.searchsorted(block.l2, 0))
            for text, k in zip(block.texts(0, start), range(start), strict=True):
                res.add(MessageKind.ERROR, text, key=int(walk_key(li, -1, int(block.step[k]), self.n)))
            if start == len(block):
                return
        ident = (id(block), start, r)
        msg = self.shared.get(ident)
        if msg is None:
            msg = self.shared[ident] = TableBlock(block, start, r)
        res.add_message(msg, int(walk_key(li, *block.key_of(start), self.n)))

    def bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts' references: the directory, then per bitmap its table and
        the clusters it names."""
        if not len(self.ov):
            return
        walk = self.walk
        tables = [rr for rr in walk.ranges if rr.kind == RefKind.BITMAP_TABLE]
        for rr in walk.ranges:
            if rr.kind == RefKind.BITMAP_DIRECTORY:
                self.bump(rr.offset, rr.size)
        for bi, t in enumerate(walk.bitmap_of):
            if bi < len(tables):
                self.bump(tables[bi].offset, tables[bi].size)
            table = walk.bitmap_tables[t].table
            offs = (table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)).astype(np.int64)
            offs = offs[offs != 0]
            j, hit = self._oidx(offs >> self.bits)
            for jj in j[hit].tolist():
                self._one(int(jj), None)

    def leftover(self, res: CheckResult) -> None:
        """Overflows the replay did not meet (none, when it models the walk exactly): printed
        after the walk, so that every one is printed once."""
        for j in range(len(self.ov)):
            left = self.excess[int(self.ov[j])] - int(self.emitted[j])
            if left > 0:
                res.add(MessageKind.ERROR, self.text(j), int(self.ov[j]), left)


class _Runs:
    """The messages of each table (L2 index, step, text) at every L1 entry naming it, keyed in walk
    order, fed a chunk of L1 entries at a time (`add`, then `flush`). Consecutive L1 entries naming
    the same table (and with no message of their own, `blocked`) become one message printed that
    many times: a table named by a million entries costs its messages once, not a million
    CheckMessages, and no list of the million entries is made."""

    def __init__(self, res: CheckResult, n: int, texts: dict[int, _Rows], blocked: I64 | None = None) -> None:
        self.res = res
        self.n = n
        self.texts = texts
        self.blocked_a = blocked if blocked is not None else np.zeros(0, np.int64)  # (sorted)
        self.pending: tuple[int, int, int] | None = None  # (first L1 index, table id, entries)
        self.shared: dict[tuple[int, int], TableBlock] = {}  # (table id, repeat): one object

    def add(self, l1_idx: I64, tids: I64) -> None:
        """Entries `l1_idx` (ascending, after those already given) naming tables `tids`."""
        if not len(l1_idx):
            return
        brk = (tids[1:] != tids[:-1]) | (l1_idx[1:] != l1_idx[:-1] + 1)
        if len(self.blocked_a):
            brk |= np.isin(l1_idx[1:], self.blocked_a)
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
        ends = np.append(starts[1:], len(l1_idx))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            li0, tid = int(l1_idx[a]), int(tids[a])
            p = self.pending
            if a == 0 and p is not None and p[1] == tid and p[0] + p[2] == li0 and not _has(self.blocked_a, li0):
                self.pending = (p[0], tid, p[2] + b - a)  # a run across chunks
                continue
            self.flush()
            self.pending = (li0, tid, b - a)

    def flush(self) -> None:
        if self.pending is None:
            return
        li0, tid, r = self.pending
        self.pending = None
        msgs = self.texts[tid]
        self.res.corruptions += len(msgs) * r
        msg = self.shared.get((tid, r))
        if msg is None:
            msg = self.shared[(tid, r)] = TableBlock(msgs, 0, r)
        self.res.add_message(msg, int(walk_key(li0, *msgs.key_of(0), self.n)))


def check_image(img: Image, progress: ProgressFn = no_progress,
                cancelled: CancelledFn = never_cancelled, filename: str | None = None) -> CheckResult:
    """Recompute every refcount of `img` and compare, as `qemu-img check` (without -r) does."""
    walk = RefWalk(img)
    res = walk.run([check_consumer(img, walk, filename)], progress, cancelled)[0]
    assert isinstance(res, CheckResult)
    return res


def check_consumer(img: Image, walk: RefWalk, filename: str | None = None) -> BatchConsumer:
    """check as a consumer of the walk's L2 batches (see `RefWalk.run`): sent each batch, then None;
    returns the `CheckResult`."""
    h = img.header
    cs = h.cluster_size
    res = CheckResult(filename or img.path, dirty=h.dirty, lazy_refcounts=h.lazy_refcounts)
    # size_to_clusters(total_sectors * 512): the virtual size rounded up to whole sectors first
    res.total_clusters = -(-(-(-h.size // 512) * 512) // cs)
    nb_file = -(-img.file.size // cs)
    rmax = (1 << h.refcount_bits) - 1
    # bdrv_getlength(bs->file) is total_sectors * 512: the file's size rounded up to whole sectors
    refs = _Refs(nb_file, rmax, res, cs, -(-img.file.size // 512) * 512)
    fmt = img.l2_format
    stored_needed = nb_file

    # Snapshot-table checks (qcow2_check_read_snapshot_table). Check opens with BDRV_O_CHECK, which
    # skips the snapshot table at open; the check validates it first and stops if it is unusable.
    if h.nb_snapshots > C.QCOW_MAX_SNAPSHOTS:
        res.check_errors += 1
        res.add(MessageKind.REPORT, "ERROR snapshot table too large")
        res.add(MessageKind.CHECK_ERROR, f"You can force-remove all {h.nb_snapshots - C.QCOW_MAX_SNAPSHOTS} "
                                         "overhanging snapshots with qemu-img check -r all")
        res.failed = "File too large"
        return res
    if not table_fits(h.snapshots_offset, h.nb_snapshots, QCOW_SNAPSHOT_HEADER.size, cs):
        res.check_errors += 1
        res.add(MessageKind.REPORT, "ERROR snapshot table offset invalid")
        res.failed = "Invalid argument"
        return res
    if img.snapshot_table.qemu_error is not None:
        error, hint = img.snapshot_table.qemu_error
        res.check_errors += 1
        res.add(MessageKind.REPORT, f"ERROR failed to read the snapshot table: {error}")
        res.add(MessageKind.CHECK_ERROR, hint)
        res.failed = "File too large"
        return res
    for sn in img.snapshots:
        if h.version >= 3 and sn.extra_data_size < 16:
            res.corruptions += 1
            res.add(MessageKind.ERROR, f"ERROR snapshot table entry {sn.index} is incomplete")

    refs.add_range(0, cs)  # header
    # (the L1 tables, the snapshot errors and the data-file error are counted and printed tree by
    # tree after the L2 sweep, where check_refcounts_l1 meets them)
    # The stored refcounts of the file's clusters, read block by block as the COPIED checks of the
    # one L2 walk need them (StoredRefcounts says why not all first), the rest after the walk.
    per = h.refcount_block_entries
    stored_rc = img.stored_refcounts_lazy(nb_file)
    if not walk.l2_sweep_dense:
        stored_rc.read_all()  # (a sparse sweep leans on no read-ahead: read them all, many at once)
    stored, bad_blocks = stored_rc.values, stored_rc.bad
    copied = _Copied(img, stored, _unreadable(bad_blocks, per, nb_file), stored_rc)
    n = h.l2_size
    # 1. Every distinct L2 table once, in host order: what it points at counts once per L1 entry
    # naming it; its messages are kept per table and printed below at every entry naming it.
    tables = walk.tables
    found = _TableRowsBuilder()
    while (batch := (yield)) is not None:
        _check_l2_batch(img, fmt, batch, tables, refs, res, copied, found)
        found.end_batch()
        copied.found.end_batch()
    table_msgs = found.finish()
    stored_rc.read_all()
    # 2. check_refcounts_l1, per distinct L1 table: its own region and each entry's L2 table region
    # are counted for every tree using it; the messages of its entries (not yet those of its L2
    # tables) are kept keyed, to be printed for each tree below.
    file_size = img.file.size
    group_l1: dict[int, tuple[_KeyedMessages, int, I64]] = {}
    for t, g in enumerate(walk.tree_group):
        _src, l1_off, l1_size = walk.trees[t]
        if g in group_l1:
            if l1_size and l1_off + l1_size * 8 - refs.file_len < cs:  # (past the end: counted as the first)
                refs.add_range(l1_off, l1_size * 8)
            continue
        before_c, before_o = res.corruptions, refs.overflows
        grp = walk.groups[g]
        res.ordered(True)
        if l1_size:
            refs.add_range(l1_off, l1_size * 8, key=L1_TABLE_KEY)
        l1 = grp.entries
        blocked_parts: list[I64] = []
        ntrees = len(grp.sources)
        # A chunk of L1 entries at a time (the messages are keyed: their order is the walk's anyway).
        # An entry of 0 is skipped; any other is followed, even to offset 0.
        for l1i, l2o in grp.l2_offset_chunks():
            rsv = l1i[(l1[l1i] & np.uint64(C.L1E_RESERVED_MASK)) != 0]
            for i, e in zip(rsv.tolist(), l1[rsv].tolist(), strict=True):
                res.corruptions += 1
                res.add(MessageKind.ERROR, f"ERROR found L1 entry with reserved bits set: {e:x}",
                        key=walk_key(i, -1, 0, n))
            blocked_parts.append(rsv)
            # the L2 tables themselves (an unaligned one touches two clusters), once per entry and tree
            past = l2o + cs - file_size >= cs
            if past.any():
                blocked_parts.append(l1i[past])
            refs.add_regions(l2o, cs, walk_key(l1i, -1, 1, n),
                             weights=np.full(len(l2o), ntrees, np.int64) if ntrees > 1 else None)
            unal = np.flatnonzero((l2o & (cs - 1)) != 0)
            for i, o in zip(l1i[unal].tolist(), l2o[unal].tolist(), strict=True):
                res.corruptions += 1
                res.add(MessageKind.ERROR, f"ERROR l2_offset={o:x}: Table is not cluster aligned; L1 entry corrupted",
                        key=walk_key(i, -1, 2, n))
            blocked_parts.append(l1i[unal])
        blocked = _sorted_unique(blocked_parts)
        # (the overflows are counted once for all the trees, by the weights: not repeated per tree)
        group_l1[g] = (res.take_keyed(), res.corruptions - before_c - (refs.overflows - before_o), blocked)

    for rr in walk.ranges:
        if rr.kind in (RefKind.SNAPSHOT_TABLE, RefKind.REFCOUNT_TABLE, RefKind.LUKS):
            refs.add_range(rr.offset, rr.size)
    bitmaps_ok = _bitmap_refs(img, walk, refs, res)
    counts, sparse, nb = refs.finish()
    # 3. The messages of the walk in QEMU's order, tree by tree (overflows replayed from the
    # counts: `_Replay`), then those of the structures counted after the trees.
    replay = _Replay(img, walk, refs, fmt, table_msgs)
    replay.bump(0, cs)  # the header
    order: list[tuple[int, int]] = [(0, -1)]  # (tree index or -1, snapshot index or -1)
    tree_of = {src: t for t, (src, _o, _s) in enumerate(walk.trees)}
    bad_sn = dict(walk.bad_snapshots)
    for k in range(len(img.snapshots)):
        order.append((tree_of.get(k + 1, -1), k))
    done_groups: dict[int, list[Message]] = {}
    seen_groups: set[int] = set()
    for t, k in order:
        if k == 0 and h.has_data_file and img.snapshots:
            res.corruptions += 1
            res.add(MessageKind.ERROR, f"ERROR {len(img.snapshots)} snapshots in image with data file")
        if t < 0:
            sn = img.snapshots[k]
            res.corruptions += 1
            if bad_sn.get(k) == "unaligned":
                res.add(MessageKind.ERROR, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                                 "L1 table is not cluster aligned; snapshot table entry corrupted")
            else:
                res.add(MessageKind.ERROR, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                                 "L1 table is too large; snapshot table entry corrupted")
            continue
        g = walk.tree_group[t]
        keyed, corr, blocked = group_l1[g]
        if g in seen_groups:
            res.corruptions += corr
        seen_groups.add(g)
        if g in done_groups and not replay.touches(g, walk.trees[t]):
            res.messages.extend(done_groups[g])  # the same message objects again: no copies
            res.corruptions += replay.corruptions_of(g)
            continue
        before_n, before_c = len(res.messages), res.corruptions
        res.ordered(True)
        res.add_keyed(keyed)
        _src, l1_off, l1_size = walk.trees[t]
        if l1_size and l1_off + l1_size * 8 - refs.file_len < cs:
            replay.bump(l1_off, l1_size * 8, key=L1_TABLE_KEY, keyed=True)
        replay.tree(res, walk.groups[g], blocked)
        res.ordered(False)
        if not replay.touches(g, walk.trees[t]):
            if len(walk.groups[g].sources) > 1:  # (kept for the other trees using the table)
                done_groups[g] = res.messages[before_n:]
            replay.note_corruptions(g, res.corruptions - before_c)
    for rr in walk.ranges:
        if rr.kind in (RefKind.SNAPSHOT_TABLE, RefKind.REFCOUNT_TABLE, RefKind.LUKS):
            replay.bump(rr.offset, rr.size)
    if not bitmaps_ok:
        return res  # calculate_refcounts fails: no refcount comparison, no counts printed
    replay.bitmaps()
    replay.leftover(res)

    # Refcount blocks (check_refblocks): each counted once more and expected to be referenced once.
    rt = img.refcount_table
    nzr = np.flatnonzero(rt)
    for i in nzr:
        e = int(rt[i])
        off = e & C.REFT_OFFSET_MASK
        if e & C.REFT_RESERVED_MASK:
            res.corruptions += 1
            res.add(MessageKind.ERROR, f"ERROR refcount table entry {int(i)} has reserved bits set")
            continue
        if off % cs:
            res.corruptions += 1
            res.add(MessageKind.ERROR,
                    f"ERROR refcount block {int(i)} is not cluster aligned; refcount table entry corrupted")
            continue
        cl = off // cs
        if cl >= nb:
            res.corruptions += 1
            res.add(MessageKind.ERROR, f"ERROR refcount block {int(i)} is outside image")
            continue
        if off:
            if int(counts[cl]) >= rmax:
                res.corruptions += 1
                res.add(MessageKind.ERROR, f"ERROR: overflow cluster offset=0x{off:x}\n{OVERFLOW_HINT}", cl)
            else:
                counts[cl] += 1
            if int(counts[cl]) != 1:
                res.corruptions += 1
                res.add(MessageKind.ERROR, f"ERROR refcount block {int(i)} refcount={int(counts[cl])}")

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
                res.add(MessageKind.CHECK_ERROR,
                        f"qcow2: Image is corrupt: Refblock offset {_c_hex(rb)} unaligned (reftable "
                        f"index: {_c_hex(bi)}); further non-fatal corruption events will be suppressed")
                signalled = True
            res.check_errors += hi - lo
            for c in range(lo, hi):
                res.add(MessageKind.CHECK_ERROR, f"Can't get refcount for cluster {c}: Input/output error", c)
    unreadable = _unreadable(bad_blocks, per, nb)
    if len(stored) > nb:
        stored = stored[:nb]
    diff = _differing(stored, counts)
    if unreadable is not None:
        diff = diff[~unreadable[diff]]
    highest = _highest_used(stored, counts, unreadable)
    under = diff[stored[diff] < counts[diff]]
    over = diff[stored[diff] > counts[diff]]
    for i in diff.tolist():
        s, r = int(stored[i]), int(counts[i])
        res.add(MessageKind.ERROR if s < r else MessageKind.LEAK,
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
            res.add(MessageKind.ERROR if s < r else MessageKind.LEAK,
                    f"{'ERROR' if s < r else 'Leaked'} cluster {cl} refcount={s} reference={r}", cl)
    res.leaked_clusters = over.astype(np.int64)
    res.corrupt_clusters = under.astype(np.int64)

    # check_oflag_copied (active L1 only, from the stored refcounts): each L1 entry's message, then
    # those of its L2 table's entries
    res.ordered(True)
    l1 = img.l1_table
    step = 1 << 18  # bounded temporaries for an L1 table of millions of entries
    l1_msgs: list[I64] = []
    copied_msgs = copied.judge(stored, unreadable, nb)
    with_msgs = np.array(sorted(copied_msgs), np.int64)
    for c0 in range(0, len(l1), step):
        nzi = c0 + np.flatnonzero(l1[c0 : c0 + step] & np.uint64(C.L1E_OFFSET_MASK))
        l1e = l1[nzi]
        cls = ((l1e & np.uint64(C.L1E_OFFSET_MASK)) // np.uint64(cs)).astype(np.int64)
        keep = np.ones(len(nzi), dtype=bool)
        if unreadable is not None:
            inb = cls < nb
            keep[inb] = ~unreadable[cls[inb]]
        inside = cls < len(stored)
        rcs = np.zeros(len(nzi), dtype=np.uint64)
        rcs[inside] = stored[cls[inside]]
        for k in np.flatnonzero(~inside & keep).tolist():
            rcs[k] = img.refcount(int(cls[k]))
        wrong = keep & ((rcs == 1) != ((l1e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0))
        bad = np.flatnonzero(wrong)
        res.corruptions += len(bad)
        if not len(bad):
            continue
        wi, be, br = nzi[bad].astype(np.int64), l1e[bad], rcs[bad]
        l1_msgs.append(wi)
        # Runs of consecutive entries with the same value and refcount: one message each. An entry
        # whose table has messages of its own (printed after the entry's) is a run by itself.
        brk = (wi[1:] != wi[:-1] + 1) | (be[1:] != be[:-1]) | (br[1:] != br[:-1])
        if len(with_msgs):
            offs = (be & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
            j = np.minimum(np.searchsorted(walk.tables.offsets, offs), max(0, len(walk.tables) - 1))
            own = np.isin(j, with_msgs) & (walk.tables.offsets[j] == offs) if len(walk.tables) else offs < 0
            brk |= own[1:] | own[:-1]
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
        ends = np.append(starts[1:], len(wi))
        for k, j, i0, i1, e, r in zip(starts.tolist(), ends.tolist(), wi[starts].tolist(), wi[ends - 1].tolist(),
                                      be[starts].tolist(), br[starts].tolist(), strict=True):
            if j - k == 1:
                res.add(MessageKind.ERROR, f"ERROR OFLAG_COPIED L2 cluster: l1_index={i0} l1_entry={e:x} refcount={r}",
                        key=walk_key(i0, -1, 0, n))
            else:
                res.add(MessageKind.ERROR,
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={} " + f"l1_entry={e:x} refcount={r}",
                        key=walk_key(i0, -1, 0, n))
                res.messages_last_indices(range(i0, i1 + 1))
    copied.report(res, copied_msgs, walk, _sorted_unique(l1_msgs))
    res.ordered(False)

    res.image_end_offset = (highest + 1) * cs
    res.reference = counts
    res.stored = stored
    return res


def _sorted_unique(parts: list[I64]) -> I64:
    """The distinct values of `parts`, ascending (a set of L1 indices as an array, 8 bytes each)."""
    parts = [q for q in parts if len(q)]
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def _has(sorted_values: I64, x: int) -> bool:
    i = int(np.searchsorted(sorted_values, x))
    return i < len(sorted_values) and int(sorted_values[i]) == x


@overload
def walk_key(l1_index: int, l2_index: int, step: int, l2_size: int) -> int: ...
@overload
def walk_key(l1_index: I64, l2_index: int | I64, step: int, l2_size: int) -> I64: ...
@overload
def walk_key(l1_index: int, l2_index: I64, step: int, l2_size: int) -> I64: ...
def walk_key(l1_index: int | I64, l2_index: int | I64, step: int, l2_size: int) -> int | I64:
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


def _differing(stored: Refcounts, counts: Counts, step: int = 1 << 20) -> I64:
    """Clusters whose stored refcount is not their count (`stored` and `counts` of one length), a
    chunk at a time: one small mask reused, not one the size of the image (16 MiB of fresh pages
    at 1 TiB)."""
    found: list[I64] = []
    mask = np.empty(min(step, len(counts)), dtype=bool)
    for lo in range(0, len(counts), step):
        hi = min(lo + step, len(counts))
        part = mask[: hi - lo]
        np.not_equal(stored[lo:hi], counts[lo:hi], out=part)
        nz = np.flatnonzero(part)
        if len(nz):
            found.append(nz + lo)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _highest_used(stored: Refcounts, counts: Counts, unreadable: npt.NDArray[np.bool_] | None) -> int:
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


def _check_l2_batch(img: Image, fmt: L2Format, batch: L2Batch, tables: L2Tables, refs: _Refs, res: CheckResult,
                    copied: _Copied, table_msgs: _TableRowsBuilder) -> None:
    """check_refcounts_l2 for a batch of distinct tables: what each table points at counts once per
    L1 entry naming it, the active tree's counters once per active L1 entry naming it; messages
    are kept per table as numbers (`_Rows`) and printed by the caller in walk order.

    Only the entries in use are looked at (`L2Batch.used`: all-zero entries point at nothing),
    and the rare kinds (compressed, zero flag, reserved bits, unaligned offsets) are found with
    one mask over all of them and handled on that subset: a batch of plain data clusters costs
    a handful of passes over its entries."""
    h = img.header
    cs = h.cluster_size
    n = h.l2_size
    if not h.has_data_file and _check_l2_run(img, batch, tables, refs, res, copied):
        return
    pos, entries, bitmaps = batch.used()  # (standard entries: no bitmap checks at all)
    m = len(entries)
    if not m:
        return
    w_tab = tables.refs[batch.ids]
    a_tab = tables.active_refs[batch.ids]
    std = not h.extended_l2

    def positions(k: I64) -> I64:
        """Batch positions (table in batch * n + L2 index) of used entries k."""
        return k if pos is None else pos[k]

    def note(k: I64, step: int, kind: L2Message, a: Numbers = 0, b: Numbers = 0) -> None:
        """Messages of kind `kind` about used entries `k` (kept as numbers: no text per entry)."""
        if len(k):
            p = positions(k)
            table_msgs.add(batch.ids[p // n], p % n, step, kind, a, b)

    bits = h.cluster_bits
    copied.swept = int(batch.offsets.max()) + cs  # (host order: the sweep has read the file up to here)
    unaligned_bits = C.L2E_OFFSET_MASK & (cs - 1)
    rare = (C.QCOW_OFLAG_COMPRESSED | C.L2E_STD_RESERVED_MASK | unaligned_bits
            | (C.QCOW_OFLAG_ZERO if std else 0))
    # (an OR over all entries says at once whether any has a rare bit: usually none does)
    if int(np.bitwise_or.reduce(entries)) & rare:
        flagged = np.flatnonzero(entries & np.uint64(rare))
    else:
        flagged = np.zeros(0, np.int64)
    fe = entries[flagged]
    comp_k = flagged[(fe & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0]
    rk = flagged[((fe & np.uint64(C.QCOW_OFLAG_COMPRESSED)) == 0) & ((fe & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0)]
    note(rk, 0, L2Message.RESERVED, entries[rk])

    # Compressed clusters.
    ci = comp_k
    if len(ci):
        ce = entries[ci]
        with_copied = (ce & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        note(ci[with_copied], 1, L2Message.COMPRESSED_COPIED, ce[with_copied] & np.uint64(fmt.cluster_offset_mask))
        ce = ce & ~np.uint64(C.QCOW_OFLAG_COPIED)
        if h.has_data_file:
            note(ci, 2, L2Message.COMPRESSED_DATA_FILE, ce)
            ci = ci[:0]
            ce = ce[:0]
        badbm = bitmaps[ci] != 0 if bitmaps is not None else np.zeros(len(ci), dtype=bool)
        note(ci[badbm], 3, L2Message.COMPRESSED_BITMAP, ce[badbm])
        ce = ce[~badbm]
        ci = ci[~badbm]
        coff = (ce & np.uint64(fmt.cluster_offset_mask)).astype(np.int64)
        nsec = ((ce >> np.uint64(fmt.csize_shift)) & np.uint64(fmt.csize_mask)).astype(np.int64) + 1
        csize = nsec * 512 - (coff & 511)
        keep = _past_eof(refs, coff, csize, ci, note)
        refs.add_regions(coff[keep], csize[keep], weights=w_tab[positions(ci[keep]) // n])
        act = int(a_tab[positions(ci) // n].sum())
        res.allocated_clusters += act
        res.compressed_clusters += act
        res.fragmented_clusters += act

    # Standard allocated clusters (NORMAL and ZERO_ALLOC): not compressed, with an offset (or,
    # with a data file, offset 0 and COPIED, unless the zero flag makes it ZERO_PLAIN).
    off = (entries & np.uint64(C.L2E_OFFSET_MASK)).view(np.int64)  # (< 2^56)
    alloc: npt.NDArray[np.bool_] | None = None  # None: every used entry is allocated
    if h.has_data_file or len(comp_k) or int(off.min()) == 0:
        alloc = off != 0
        if h.has_data_file:
            plain = entries >= np.uint64(C.QCOW_OFLAG_COPIED)
            if std:
                plain &= (entries & np.uint64(C.QCOW_OFLAG_ZERO)) == 0
            alloc |= plain
        if len(comp_k):
            alloc[comp_k] = False
    na = m if alloc is None else int(np.count_nonzero(alloc))
    ai: I64 | None = None if na == m or alloc is None else np.flatnonzero(alloc)  # None: every used entry
    if na:
        ae = entries if ai is None else entries[ai]
        aoff = off if ai is None else off[ai]
        apos = pos if ai is None else positions(ai)  # batch positions (None: 0..m-1, every entry)

        def a_positions(k: I64) -> I64:
            return k if apos is None else apos[k]

        def a_note(k: I64, step: int, kind: L2Message, a: Numbers = 0) -> None:
            note(k if ai is None else ai[k], step, kind, a)

        ab = (bitmaps if ai is None else bitmaps[ai]) if bitmaps is not None else None
        if ab is not None:
            corrupt_bm = ((ab >> np.uint64(32)) & ab) != 0
            a_note(np.flatnonzero(corrupt_bm), 1, L2Message.CORRUPT_BITMAP, aoff[corrupt_bm])
        unal_k = flagged[(fe & np.uint64(unaligned_bits)) != 0]
        if alloc is not None:
            unal_k = unal_k[alloc[unal_k]]
        if len(unal_k):
            ua = unal_k if ai is None else np.searchsorted(ai, unal_k)  # as indices into the allocated
            if ab is not None:
                has_data = (ab[ua] & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
            else:
                has_data = (ae[ua] & np.uint64(C.QCOW_OFLAG_ZERO)) == 0
            a_note(ua[has_data], 2, L2Message.UNALIGNED_DATA, aoff[ua[has_data]])
            a_note(ua[~has_data], 2, L2Message.UNALIGNED_PREALLOC, aoff[ua[~has_data]])
        clusters: I64 | None = None

        def cl() -> I64:
            nonlocal clusters
            if clusters is None:
                clusters = aoff >> bits
            return clusters

        ntab = len(batch.ids)
        a_one = int(a_tab[0]) if bool((a_tab == a_tab[0]).all()) else None  # the usual: one weight for all
        w_one = int(w_tab[0]) if bool((w_tab == w_tab[0]).all()) else None
        ta: I64 | None = None  # table (in batch) of each allocated entry, computed when needed

        def tables_of() -> I64:
            nonlocal ta
            if ta is None:
                ta = a_positions(np.arange(na, dtype=np.int64)) // n
            return ta

        res.allocated_clusters += a_one * na if a_one is not None else int(a_tab[tables_of()].sum())
        # Fragmentation: an allocated entry not right after the previous one of its table.
        jump = np.diff(aoff) != cs  # (between tables too)
        jumps = int(np.count_nonzero(jump))
        runs: tuple[I64, I64] | None = None  # (first cluster, length) of each run of consecutive clusters
        if jumps * 64 <= na and not len(unal_k):
            starts = np.concatenate(([0], np.flatnonzero(jump) + 1))
            runs = (aoff[starts] >> bits, np.diff(np.append(starts, na)))
        if jumps and ntab > 1:
            # the first allocated entry of each table follows another table's: not a jump
            starts = np.arange(1, ntab, dtype=np.int64) * n
            firsts = np.searchsorted(apos, starts) if apos is not None else starts[starts < na]
            firsts = firsts[(firsts > 0) & (firsts < na)]  # ascending; each crossing once:
            firsts = firsts[np.concatenate(([True], firsts[1:] != firsts[:-1]))] if len(firsts) else firsts
            jumps -= int(np.count_nonzero(jump[firsts - 1]))
            jump[firsts - 1] = False
        if a_one is not None:
            res.fragmented_clusters += a_one * jumps
        else:
            res.fragmented_clusters += int(a_tab[tables_of()[1:][jump]].sum())
        # check_oflag_copied (active tree only) skips L1 entries whose table offset is 0 (only COPIED set)
        act_tab = (a_tab > 0) & (batch.offsets != 0)

        def where(k: I64, sel: I64 | None = None) -> tuple[I64, I64]:
            p = a_positions(k if sel is None else sel[k])
            return batch.ids[p // n], p % n

        if act_tab.all():
            if runs is None or not copied.none_wrong(runs, ae):
                copied.batch(cl(), ae, where)
        elif act_tab.any():
            sel = np.flatnonzero(act_tab[tables_of()])
            if len(sel):
                copied.batch(cl()[sel], ae[sel], lambda k: where(k, sel))
        if not h.has_data_file:
            if int(aoff.max()) + cs - refs.file_len >= cs:
                keep = _past_eof(refs, aoff, np.full(na, cs, np.int64), ai if ai is not None else
                                 np.arange(na, dtype=np.int64), note)
                refs.add_regions(aoff[keep], cs, weights=None if w_one == 1 else w_tab[tables_of()[keep]])
            elif runs is not None and w_one == 1:
                refs.add_runs(*runs)  # a few runs of consecutive clusters, each referenced once
            elif not len(unal_k):
                refs.add(cl(), None if w_one == 1 else w_tab[tables_of()])
            else:
                refs.add_regions(aoff, cs, weights=None if w_one == 1 else w_tab[tables_of()])

    # Unallocated clusters with allocation bits.
    if bitmaps is not None:
        ui = ((bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)) != 0) if alloc is not None else np.zeros(m, bool)
        if alloc is not None:
            ui &= ~alloc
        if len(comp_k):
            ui[comp_k] = False
        note(np.flatnonzero(ui), 5, L2Message.UNALLOC_BITMAP)


def _check_l2_run(img: Image, batch: L2Batch, tables: L2Tables, refs: _Refs, res: CheckResult,
                  copied: _Copied) -> bool:
    """`_check_l2_batch` for a batch whose every table maps one run of consecutive host clusters
    with the same flags in each entry (`L2Batch.table_runs`: a preallocated image, 8 Ki entries a
    table), when there is nothing to report: no rare bit, nothing past the end of the file, no
    wrong COPIED flag, each table named once. What the entry-by-entry path would find then follows
    from each table's first and last entries: every entry is allocated, none is fragmented (a
    jump between two tables is not), each run is counted once. Returns False, having counted
    nothing, when the batch is not such a batch; the caller then looks entry by entry."""
    h = img.header
    cs = h.cluster_size
    n = h.l2_size
    firsts_e = batch.table_runs(cs)
    if firsts_e is None:
        return False
    rare = (C.QCOW_OFLAG_COMPRESSED | C.L2E_STD_RESERVED_MASK | (C.L2E_OFFSET_MASK & (cs - 1))
            | (0 if h.extended_l2 else C.QCOW_OFLAG_ZERO))
    span = (n - 1) * cs
    firsts = firsts_e.tolist()
    for first in firsts:
        # the same flags in each entry of the table (the offsets did not carry into them), none rare
        if first & rare or not first & C.L2E_OFFSET_MASK or (first ^ (first + span)) & ~C.L2E_OFFSET_MASK:
            return False
    if (max(firsts) & C.L2E_OFFSET_MASK) + span + cs - refs.file_len >= cs:
        return False  # past the end of the file: messages
    w_tab = tables.refs[batch.ids]
    if not bool((w_tab == 1).all()):
        return False  # a table named by several L1 entries: weighted counts
    a_tab = tables.active_refs[batch.ids]
    act_tab = (a_tab > 0) & (batch.offsets != 0)
    # Runs of consecutive clusters (tables one after another on the host join up).
    bits = h.cluster_bits
    run_first: list[int] = []
    run_len: list[int] = []
    for first in firsts:
        c = (first & C.L2E_OFFSET_MASK) >> bits
        if run_first and run_first[-1] + run_len[-1] == c:
            run_len[-1] += n
        else:
            run_first.append(c)
            run_len.append(n)
    runs = (np.array(run_first, np.int64), np.array(run_len, np.int64))
    copied.swept = int(batch.offsets.max()) + cs  # (as the entry-by-entry path sets it)
    if act_tab.all():
        if not copied.none_wrong(runs, (min(firsts), max(firsts) + span)):
            return False
    elif act_tab.any():
        return False
    res.allocated_clusters += int(a_tab.sum()) * n
    refs.add_runs(*runs)
    batch.by_runs = True
    return True


def _expand_runs(firsts: I64, lengths: I64) -> I64:
    """Every cluster of the runs [firsts[k], firsts[k] + lengths[k])."""
    return np.repeat(firsts, lengths) + (np.arange(int(lengths.sum()), dtype=np.int64)
                                         - np.repeat(np.cumsum(lengths) - lengths, lengths))


def _past_eof(refs: _Refs, offs: I64, sizes: I64, pos: I64,
              note: Callable[[I64, int, L2Message, Numbers, Numbers], None]) -> npt.NDArray[np.bool_]:
    """Regions a cluster or more past the end of the file become messages of their table (printed
    at each reference, in walk order); returns the mask of the others, which are counted."""
    past = offs + sizes - refs.file_len >= refs.cs
    if past.any():
        note(pos[past], 4, L2Message.PAST_EOF, offs[past], sizes[past])
    return ~past


def _bitmap_refs(img: Image, walk: RefWalk, refs: _Refs, res: CheckResult) -> bool:
    """qcow2_check_bitmaps_refcounts; False when it fails the check (a bitmap table entry that
    bitmap_table_load refuses: one corruption, and the check stops with EINVAL)."""
    for rr in walk.ranges:  # the directory and each bitmap's table (as far as the format allows)
        if rr.kind in (RefKind.BITMAP_DIRECTORY, RefKind.BITMAP_TABLE):
            refs.add_range(rr.offset, rr.size)
    cs = img.cluster_size
    good: list[tuple[I64, int]] = []
    for bt in walk.bitmap_tables:  # each distinct table once, counted for every bitmap using it
        table = bt.table
        offs = table & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
        bad = ((table & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
            (offs != 0) & (((table & np.uint64(1)) != 0) | ((offs % np.uint64(cs)) != 0)))
        if bad.any():  # whichever bitmap QEMU meets it through first, the check stops there
            res.corruptions += 1
            res.failed = "Invalid argument"
            return False
        good.append((offs[offs != 0].astype(np.int64), len(bt.bitmaps)))
    for clusters, times in good:
        refs.add_regions(clusters, cs, weights=np.full(len(clusters), times, np.int64) if times > 1 else None)
    return True
