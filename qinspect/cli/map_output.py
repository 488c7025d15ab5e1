"""Human `map` output, streamed a batch of ranges at a time in constant memory.

Two layouts:
- `write_qemu_human`: exactly what `qemu-img map` (human) prints — `Offset Length Mapped to File`,
  hex, data ranges only — byte for byte, formatted a whole batch per `%` operation (fast enough
  for millions of ranges). Like qemu-img, it stops with an error at the first data range that has
  no host offset (compressed or encrypted clusters), after printing the rows before it.
- `write_table`: qinspect's table, every range with its state, the file that serves it (or
  "zeros" when no layer has it), the host offset, and lengths exact and rounded; then a summary
  of what the mapped range (after --start-offset/--max-length) holds. Colour only on a terminal.

Neither buffers: each batch is written as soon as it is merged, so `| head` and pagers see the
first rows at once. File names come from the image (backing and data-file names) and are
escaped for the terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO

import numpy as np

from qinspect.analysis.map import ALLOCATED, COMPRESSED, DATA, ZERO, MapRuns
from qinspect.qcow2.errors import Qcow2Error
from qinspect.termtext import for_terminal
from qinspect.units import format_size_exact

QEMU_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"

# C's "%#-16x" prints 0 as "0" (no 0x); Python's "%#x" gives "0x0". One template per
# (start is 0, offset is 0); a batch is then one `%` operation.
_QEMU_ROW = np.array([
    ("%-16d" if code & 1 else "%#-16x") + "%#-16x" + ("%-16d" if code & 2 else "%#-16x") + "%s\n"
    for code in range(4)], dtype=object)

NO_OFFSET_MESSAGE = ("File contains external, encrypted or compressed clusters (qemu-img's human map "
                     "cannot show them: use --table or --output=json)")


def write_qemu_human(batches: Iterable[MapRuns], files: Sequence[str], out: IO[str]) -> None:
    """`qemu-img map`'s human output; `files[depth]` is the file a layer's offsets point into."""
    names = np.array([for_terminal(f) for f in files], dtype=object)
    out.write(QEMU_HEADER)
    out.flush()
    for b in _chunks(batches):
        data = (b.flags & DATA) != 0
        bad = np.flatnonzero(data & (b.offset < 0))
        stop = int(bad[0]) if len(bad) else len(b)
        sel = np.flatnonzero(data[:stop] & ((b.flags[:stop] & ZERO) == 0))
        if len(sel):
            start, length, offset = b.start[sel], b.length[sel], b.offset[sel]
            codes = (start == 0).astype(np.intp) + 2 * (offset == 0).astype(np.intp)
            values = np.empty(4 * len(sel), dtype=object)
            values[0::4] = start.tolist()
            values[1::4] = length.tolist()
            values[2::4] = offset.tolist()
            values[3::4] = names[b.depth[sel]]
            out.write("".join(_QEMU_ROW[codes].tolist()) % tuple(values.tolist()))
            out.flush()
        if len(bad):
            raise Qcow2Error(f"{NO_OFFSET_MESSAGE}; guest offset {int(b.start[stop]):#x}")


CHUNK = 1 << 14  # rows formatted per write: bounded text and temporaries whatever the batch size


def _chunks(batches: Iterable[MapRuns]) -> Iterator[MapRuns]:
    for b in batches:
        if len(b) <= CHUNK:
            yield b
        else:
            for k in range(0, len(b), CHUNK):
                yield b.take(slice(k, k + CHUNK))


class MapState(StrEnum):
    """What a mapped guest range holds (the value is the word the table prints)."""

    DATA = "data"
    COMPRESSED = "compressed"
    DATA_ZERO = "data (reads as zero)"
    """Allocated data that reads as zeros."""
    ZERO = "zero"
    UNALLOCATED = "unallocated"


@dataclass
class MapSummary:
    """What a mapped guest range holds, by state (bytes and ranges)."""

    start: int
    end: int
    ranges: int = 0
    bytes: dict[MapState, int] = field(default_factory=dict)
    counts: dict[MapState, int] = field(default_factory=dict)

    def add(self, state: MapState, length: int) -> None:
        self.bytes[state] = self.bytes.get(state, 0) + length
        self.counts[state] = self.counts.get(state, 0) + 1
        self.ranges += 1

    def text(self) -> str:
        span = self.end - self.start
        whole = (f"{self.ranges} range{'s' if self.ranges != 1 else ''} over {format_size_exact(span)} of "
                 f"guest space ({self.start:#x}..{self.end:#x})")
        parts = [f"{s} {format_size_exact(self.bytes[s])} in {self.counts[s]}" for s in STATE_COLOURS
                 if s in self.bytes]
        return whole + (": " + "; ".join(parts) if parts else "")


STATE_COLOURS = {MapState.DATA: "32", MapState.COMPRESSED: "36", MapState.DATA_ZERO: "33", MapState.ZERO: "2",
                 MapState.UNALLOCATED: "2"}
"""The terminal colour of each state, in the summary's order."""


def _state(flags: int) -> MapState:
    if flags & COMPRESSED:
        return MapState.COMPRESSED
    if flags & DATA:
        return MapState.DATA_ZERO if flags & ZERO else MapState.DATA
    return MapState.ZERO if flags & ALLOCATED else MapState.UNALLOCATED


_STATE_OF = tuple(_state(f) for f in range(256))
"""The state of each value of the uint8 flags (a row's state is one index, not three tests)."""


def write_table(batches: Iterable[MapRuns], files: Sequence[str], layers: Sequence[str], out: IO[str], start: int,
                end: int, colour: bool | None = None) -> MapSummary:
    """qinspect's streamed map table and its summary line; returns the summary.

    `files[depth]` is where a layer's data lives (its external data file, if any), `layers[depth]`
    the layer's own file (which holds its zero and compressed clusters).
    """
    if colour is None:
        colour = out.isatty() and not os.environ.get("NO_COLOR")
    names = [for_terminal(f) for f in files]
    layer_names = [for_terminal(f) for f in layers]
    ow = max(len(f"{max(end, 1) - 1:#x}"), len("guest offset"))
    lw = len(f"{max(end - start, 1024):,}") + len("1023 KiB ( bytes)")  # the widest a length can be
    sw = max(len(s) for s in STATE_COLOURS)
    hw = max(ow, len("host offset"))
    out.write(f"{'guest offset':<{ow}}  {'length':<{lw}}  {'state':<{sw}}  {'host offset':<{hw}}  served by\n")
    out.flush()
    summary = MapSummary(start, end)
    on = off = ""
    for b in _chunks(batches):
        lines = []
        for s, n, f, o, d in zip(b.start.tolist(), b.length.tolist(), b.flags.tolist(), b.offset.tolist(),
                                 b.depth.tolist(), strict=True):
            state = _STATE_OF[f]
            summary.add(state, n)
            # Data lives in the data file; zero and compressed clusters in the layer's own file;
            # a range no layer has reads as zeros.
            served = ("zeros" if not f & ALLOCATED else names[d] if f & DATA and not f & COMPRESSED
                      else layer_names[d])
            if colour:
                on, off = f"\x1b[{STATE_COLOURS[state]}m", "\x1b[0m"
            length = format_size_exact(n) if n >= 1024 else f"{n} B"
            host = f"{o:#x}" if o >= 0 else "-"
            lines.append(f"{s:>#{ow}x}  {length:<{lw}}  {on}{state:<{sw}}{off}  {host:>{hw}}  {served}\n")
        out.write("".join(lines))
        out.flush()
    out.write(summary.text() + "\n")
    return summary

