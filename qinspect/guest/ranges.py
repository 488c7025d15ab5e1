"""Byte ranges as sorted numpy arrays: merge, intersect, shift, and the clusters wholly inside them.

Free space, data extents and partition extents are all lists of half-open byte ranges
`[start, end)`. They are kept as two parallel int64 arrays sorted by start and never overlapping,
so every operation is a few vectorised passes rather than a loop per range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Ranges:
    """Sorted, disjoint half-open ranges `[start[k], end[k])` of bytes (or blocks)."""

    start: I64
    end: I64

    @staticmethod
    def empty() -> Ranges:
        return Ranges(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def of(start: npt.ArrayLike, end: npt.ArrayLike) -> Ranges:
        """Ranges from any (possibly unsorted, overlapping or empty) start/end pairs."""
        s = np.asarray(start, dtype=np.int64).ravel()
        e = np.asarray(end, dtype=np.int64).ravel()
        keep = e > s
        s, e = s[keep], e[keep]
        if len(s) == 0:
            return Ranges.empty()
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        reach = np.maximum.accumulate(e)
        # A range starts a new group when it begins after everything before it has ended.
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] > reach[:-1]
        idx = np.flatnonzero(new)
        ends = reach[np.r_[idx[1:] - 1, len(s) - 1]]
        return Ranges(s[idx], ends)

    def __len__(self) -> int:
        return len(self.start)

    @property
    def total(self) -> int:
        return int((self.end - self.start).sum())

    def scaled(self, factor: int, offset: int = 0) -> Ranges:
        """Block ranges to byte ranges: `start * factor + offset`."""
        return Ranges(self.start * factor + offset, self.end * factor + offset)

    def shifted(self, offset: int) -> Ranges:
        return Ranges(self.start + offset, self.end + offset)

    def clip(self, lo: int, hi: int) -> Ranges:
        return Ranges.of(np.clip(self.start, lo, hi), np.clip(self.end, lo, hi))

    def union(self, other: Ranges) -> Ranges:
        return Ranges.of(np.r_[self.start, other.start], np.r_[self.end, other.end])

    def intersect(self, other: Ranges) -> Ranges:
        """The bytes in both: each range of `self` meets the ranges of `other` it overlaps."""
        if not len(self) or not len(other):
            return Ranges.empty()
        lo = np.searchsorted(other.end, self.start, side="right")
        hi = np.searchsorted(other.start, self.end, side="left")
        cnt = np.maximum(hi - lo, 0)
        if not cnt.sum():
            return Ranges.empty()
        a = np.repeat(np.arange(len(self)), cnt)
        # Index into `other` for every pair: lo[a] + position within the group.
        first = np.repeat(np.cumsum(cnt) - cnt, cnt)
        b = lo[a] + (np.arange(len(a)) - first)
        s = np.maximum(self.start[a], other.start[b])
        e = np.minimum(self.end[a], other.end[b])
        keep = e > s
        return Ranges(s[keep], e[keep])

    def complement(self, lo: int, hi: int) -> Ranges:
        """The parts of `[lo, hi)` not in these ranges."""
        r = self.clip(lo, hi)
        s = np.r_[np.int64(lo), r.end]
        e = np.r_[r.start, np.int64(hi)]
        keep = e > s
        return Ranges(s[keep], e[keep])

    def subtract(self, other: Ranges) -> Ranges:
        if not len(self) or not len(other):
            return self
        lo, hi = int(self.start[0]), int(self.end[-1])
        return self.intersect(other.complement(lo, hi))

    def inner_units(self, unit: int) -> Ranges:
        """The `unit`-aligned parts: every whole unit lying entirely inside one range (in bytes)."""
        s = -(-self.start // unit) * unit
        e = (self.end // unit) * unit
        keep = e > s
        return Ranges(s[keep], e[keep])

    def outer_units(self, unit: int) -> Ranges:
        """Every unit touched by a range, merged (in bytes)."""
        return Ranges.of((self.start // unit) * unit, -(-self.end // unit) * unit)

    def covers(self, offset: int) -> bool:
        k = int(np.searchsorted(self.start, offset, side="right")) - 1
        return k >= 0 and offset < int(self.end[k])

    def pairs(self) -> list[tuple[int, int]]:
        return [(int(s), int(e)) for s, e in zip(self.start, self.end, strict=True)]


def runs_of_zero_bits(bitmap: bytes | npt.NDArray[np.uint8], nbits: int, bitorder: str = "little") -> Ranges:
    """Ranges of bit indices in [0, nbits) whose bit is 0 (a free block in an allocation bitmap)."""
    arr = np.frombuffer(bitmap, dtype=np.uint8) if isinstance(bitmap, bytes | bytearray) else bitmap
    bits = np.unpackbits(arr, bitorder=bitorder)[:nbits]  # type: ignore[call-overload]
    return runs_of_true(bits == 0)


def runs_of_true(mask: npt.NDArray[np.bool_]) -> Ranges:
    """Ranges of indices where `mask` is True."""
    if not len(mask):
        return Ranges.empty()
    m = mask.astype(np.int8)
    d = np.diff(np.r_[np.int8(0), m, np.int8(0)])
    return Ranges(np.flatnonzero(d == 1).astype(np.int64), np.flatnonzero(d == -1).astype(np.int64))
