"""Shared Rich helpers for human output: one console, tables that degrade to plain text.

Sizes come from `qinspect.units` (one format for every layer). Text read from an image is data:
`literal()` escapes it for the terminal (`qinspect.termtext.for_terminal`) and wraps it in a Rich
`Text`, so neither control characters nor Rich markup in a name can do anything; table cells that
are plain strings get the same treatment.
"""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console, RenderableType
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

from qinspect.termtext import for_terminal

# Off a terminal (a pipe, a file, a pager) lines are never cut: a name from the image must come out
# whole and exact, and scripts grep whole lines. On a terminal long cells fold instead of ellipsis.
PIPE_WIDTH = 4096


def console() -> Console:
    """The stdout console (plain ASCII tables without colour when stdout is not a terminal)."""
    terminal = sys.stdout.isatty()
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=None if terminal else PIPE_WIDTH)


def err_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def literal(text: object, style: StyleType = "") -> Text:
    """`text` (from an image, or anything else) shown exactly: escaped, never read as markup."""
    return Text(for_terminal(str(text)), style=style)


class _LiteralTable(Table):
    """A table whose string cells are shown as they are: names read from an image are never markup."""

    def add_row(self, *renderables: RenderableType | None, style: StyleType | None = None,
                end_section: bool = False) -> None:
        super().add_row(*(literal(r) if isinstance(r, str) else r for r in renderables), style=style,
                        end_section=end_section)


def table(*columns: str, title: str | None = None) -> Table:
    """A table with the house style; right-aligns columns whose name ends in '#'."""
    plain = not console().is_terminal
    t = _LiteralTable(title=literal(title) if title is not None else None,
                      box=box.ASCII2 if plain else box.SIMPLE_HEAVY, title_justify="left",
                      show_edge=not plain, pad_edge=False)
    for c in columns:
        right = c.endswith("#")
        t.add_column(c.rstrip("#"), justify="right" if right else "left", no_wrap=right, overflow="fold")
    return t
