"""Sizes, printed and parsed one way for every layer (CLI, analyses, TUI).

`format_size` is the one human rendering of a byte count (binary units, at most three significant
digits, exact multiples without decimals); `format_size_exact` adds the exact count where a reader
or a script needs it; `size_option` is the spelling qemu-img accepts back in `-o`/`-drive` options;
`parse_size` reads what users type, with qemu-img's suffixes (k/M/G/T/P/E, powers of 1024) and hex.
This module imports nothing heavy: `info` and error paths use it at start-up.
"""

from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DEC = r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]?)"
_HEX = r"0x([0-9a-f]+)\s*([kmgtp]?)"   # b and e are hex digits: no byte/exa suffix on hex
# (patterns, compiled by `re` when a size is first parsed: not at every start)
MAX_SIZE = (1 << 63) - 1                             # what QEMU's int64 sizes can hold


class SizeError(ValueError):
    """Text that is not a size; the message says what was given."""


def format_size(n: int | float) -> str:
    """1536 -> '1.5 KiB', 65536 -> '64 KiB', 1000 -> '1000 B'; negative sizes keep their sign."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    i = 0
    while value >= 1024 and i < len(_UNITS) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{sign}{int(value)} B"
    if value == int(value):
        text = f"{int(value)}"
    elif value < 10:
        text = f"{value:.2f}".rstrip("0").rstrip(".")
    elif value < 100:
        text = f"{value:.1f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:.0f}"
    return f"{sign}{text} {_UNITS[i]}"


def format_size_exact(n: int) -> str:
    """'1.5 GiB (1,610,612,736 bytes)'; below 1 KiB just '512 B'."""
    if abs(n) < 1024:
        return f"{n} B"
    return f"{format_size(n)} ({n:,} bytes)"


def size_option(n: int) -> str:
    """The shortest exact spelling qemu-img accepts in options: 65536 -> '64k', 2097152 -> '2M'."""
    for shift, letter in ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "k")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{letter}"
    return str(n)


def parse_size(text: str, *, maximum: int = MAX_SIZE) -> int:
    """'64k', '1.5G', '0x3000b' (hex: all hex digits belong to the number), '512' -> bytes.

    Raises SizeError for anything else, for negative sizes and for sizes above `maximum`.
    """
    t = text.strip().lower()
    m = re.fullmatch(_HEX, t)
    if m:
        value = int(m.group(1), 16) << _SUFFIX[m.group(2)]
    else:
        m = re.fullmatch(_DEC, t)
        if m is None or m.group(2) not in _SUFFIX:
            raise SizeError(f"invalid size '{text}'")
        number, shift = m.group(1), _SUFFIX[m.group(2)]
        if "." in number:
            whole, _, frac = number.partition(".")
            value = (int(whole or "0") << shift) + (int(frac or "0") << shift) // (10 ** len(frac or "0"))
        else:
            value = int(number) << shift
    if value > maximum:
        raise SizeError(f"size '{text}' is too large (at most {maximum})")
    return value
