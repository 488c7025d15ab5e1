"""Number and offset formatting for the views. Sizes are formatted and parsed by `qinspect.units`
(the one way for every layer); this module adds what only screens need: exact hex offsets,
counts, shares, and how a file is named on screen.

Wherever rounding could make two different values read the same (rows of an L2 table, the row
labels of a map, offsets in a panel), the views print `hexoff`, which is exact.
"""

from __future__ import annotations

import os
import re

from qinspect.units import SizeError, format_size, size_option
from qinspect.units import parse_size as _units_parse_size

_SPELLED_UNIT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgtpe])(?:i?b)\s*$", re.I)

__all__ = ["SizeError", "count", "display_name", "hex_width", "hexoff", "option_size", "parse_size", "pct", "size",
           "size_exact"]


def parse_size(text: str) -> int:
    """What users type in the TUI: everything `qinspect.units.parse_size` reads, and units spelled
    out as they are printed ('2 GiB', '64 KB'). Raises SizeError (a ValueError)."""
    m = _SPELLED_UNIT.match(text)
    if m and not text.strip().lower().startswith("0x"):
        text = m.group(1) + m.group(2)
    return _units_parse_size(text)


def size(n: int | float) -> str:
    """1536 -> '1.5 KiB' (qinspect.units.format_size)."""
    return format_size(n)


def size_exact(n: int) -> str:
    """The size when the short form is exact ('64 KiB'), else the short form marked as rounded
    and the exact byte count ('≈1.5 GiB, 1,610,612,737 B')."""
    short = format_size(n)
    try:
        exact = parse_size(short.replace(" ", "").replace("iB", "").replace("B", ""))
    except SizeError:
        exact = -1
    return short if exact == n else f"≈{short}, {n:,} B"


def option_size(n: int) -> str:
    """A size as QEMU options take it, exactly: 256M, 64k, or plain bytes (qinspect.units.size_option)."""
    return size_option(n)


def hexoff(n: int | None, width: int = 0) -> str:
    if n is None:
        return "-"
    return f"0x{n:0{width}x}"


def hex_width(largest: int) -> int:
    """Hex digits needed for every value up to `largest` (row labels line up and stay exact)."""
    return max(1, (max(0, largest).bit_length() + 3) // 4)


def count(n: int) -> str:
    return f"{n:,}"


def pct(part: int | float, whole: int | float) -> str:
    if not whole:
        return "0%"
    p = 100.0 * part / whole
    if p and p < 0.1:
        return "<0.1%"
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def display_name(path: str) -> str:
    """How a file is named on screen: relative to the cwd when inside it, else its base name.

    Never an absolute path, so screenshots and snapshot tests look the same on every machine.
    """
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return os.path.basename(path)
    if rel.startswith(".."):
        return os.path.basename(path)
    return rel
