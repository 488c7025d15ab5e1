"""Number and offset formatting for the views, and parsing what users type (sizes, offsets)."""

from __future__ import annotations

import os
import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size(n: int | float) -> str:
    """1536 -> '1.5 KiB'; exact multiples print without decimals ('64 KiB')."""
    n = float(n)
    neg = n < 0
    n = abs(n)
    i = 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    if i == 0:
        s = f"{int(n)} B"
    elif n == int(n):
        s = f"{int(n)} {_UNITS[i]}"
    elif n < 10:
        s = f"{n:.2f}".rstrip("0").rstrip(".") + f" {_UNITS[i]}"
    elif n < 100:
        s = f"{n:.1f}".rstrip("0").rstrip(".") + f" {_UNITS[i]}"
    else:
        s = f"{n:.0f} {_UNITS[i]}"
    return "-" + s if neg else s


def short_size(n: int) -> str:
    """A compact size for row labels: '0', '64K', '1.5M', '2G'."""
    if n == 0:
        return "0"
    units = "BKMGTPE"
    v = float(n)
    i = 0
    while v >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    if i == 0:
        return f"{n}"
    if v == int(v):
        return f"{int(v)}{units[i]}"
    return f"{v:.1f}{units[i]}" if v < 100 else f"{v:.0f}{units[i]}"


def hexoff(n: int | None, width: int = 0) -> str:
    if n is None:
        return "-"
    return f"0x{n:0{width}x}"


def count(n: int) -> str:
    return f"{n:,}"


def pct(part: int | float, whole: int | float) -> str:
    if not whole:
        return "0%"
    p = 100.0 * part / whole
    if p and p < 0.1:
        return "<0.1%"
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def option_size(n: int) -> str:
    """A size as QEMU options take it, exactly: 256M, 64k, or plain bytes."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


_SIZE_RE = re.compile(r"^\s*(0x[0-9a-f]+|\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'4096', '0x1000', '64k', '1.5M', '2 GiB' -> bytes (powers of 1024). Raises ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size or offset: {text!r}")
    num, unit = m.group(1), m.group(2).lower()
    mult = 1 << (10 * "_kmgtpe".index(unit)) if unit else 1
    value = int(num, 16) if num.lower().startswith("0x") else float(num)
    return int(value * mult)


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
