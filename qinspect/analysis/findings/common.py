"""Small helpers the rule modules share: sizes, plurals, path arguments for commands."""

from __future__ import annotations

from qinspect.units import format_size


def size_text(n: int) -> str:
    """The one human size (qinspect.units.format_size)."""
    return format_size(n)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def pct(x: float) -> str:
    return f"{x * 100:.1f}%" if x < 0.1 else f"{x * 100:.0f}%"


def path_arg(path: str) -> str:
    """A file name as a command argument: `./-x` for names that start with '-' (never an option)."""
    return f"./{path}" if path.startswith("-") else path
