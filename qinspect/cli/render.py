"""Shared Rich helpers for human output: one console, sizes, tables that degrade to plain text."""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console, RenderableType
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

_console: Console | None = None


def console() -> Console:
    """The stdout console (plain ASCII tables without colour when stdout is not a terminal)."""
    global _console
    if _console is None:
        _console = Console(highlight=False, soft_wrap=True)
    return _console


def err_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


class _LiteralTable(Table):
    """A table whose string cells are shown as they are: names read from an image are never markup."""

    def add_row(self, *renderables: RenderableType | None, style: StyleType | None = None,
                end_section: bool = False) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), style=style,
                        end_section=end_section)


def table(*columns: str, title: str | None = None) -> Table:
    """A table with the house style; right-aligns columns whose name ends in '#'."""
    plain = not console().is_terminal
    t = _LiteralTable(title=title, box=box.ASCII2 if plain else box.SIMPLE_HEAVY, title_justify="left",
              show_edge=not plain, pad_edge=False)
    for c in columns:
        right = c.endswith("#")
        t.add_column(c.rstrip("#"), justify="right" if right else "left", no_wrap=right)
    return t


def human_size(n: int) -> str:
    """qemu-img style sizes: 64 MiB, 1.5 GiB, 512 B."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.3g} {unit}" if value != int(value) else f"{int(value)} {unit}"
    return f"{n} B"
