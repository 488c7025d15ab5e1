"""Human output: tables and styled lines, written plainly off a terminal and with Rich on one.

Off a terminal (a pipe, a file, a pager) Rich prints a table without colour or wrapping: ASCII
rules, every cell padded to its column's width. `plain_lines` writes exactly those bytes itself,
so that a scripted `qinspect info` (or `check`) never imports Rich, a fifth of its start-up. On a
terminal Rich renders as it always has (colour, heavy rules, cells folded to the screen's width);
so it does off a terminal for a table whose layout needs Rich's own rules: a cell with a character
whose width takes Unicode's tables (East Asian wide, combining, emoji), a table wider than the
page, a header Rich would read as markup. tests/test_render.py holds the two to the same bytes.

Sizes come from `qinspect.units` (one format for every layer). Text read from an image is data:
table cells that are plain strings are escaped for the terminal (`qinspect.termtext.for_terminal`)
and never read as Rich markup; `literal()` does the same for a Rich `Text`, and `styled()` cells
and `print_lines` segments are shown as given (their callers escape what comes from the image).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from qinspect.termtext import for_terminal

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:  # Rich is imported where it draws: on a terminal, or for a table only it can lay out
    from typing import IO, Literal

    from rich.console import Console
    from rich.style import StyleType
    from rich.table import Table as RichTable
    from rich.text import Text

# Off a terminal (a pipe, a file, a pager) lines are never cut: a name from the image must come out
# whole and exact, and scripts grep whole lines. On a terminal long cells fold instead of ellipsis.
PIPE_WIDTH = 4096


def on_terminal(stream: IO[str]) -> bool:
    """Whether Rich treats `stream` as a terminal (`Console.is_terminal`'s rules): TTY_COMPATIBLE=0|1
    and FORCE_COLOR decide before the stream's `isatty()`. Where this says no, Rich prints no colour."""
    env = os.environ
    tty_compatible = env.get("TTY_COMPATIBLE", "")
    if tty_compatible in ("0", "1"):
        return tty_compatible == "1"
    force_color = env.get("FORCE_COLOR")
    if force_color is not None:
        return force_color != ""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def console() -> Console:
    """The stdout console (plain ASCII tables without colour when stdout is not a terminal)."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=None if terminal else PIPE_WIDTH)


def err_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def literal(text: object, style: StyleType = "") -> Text:
    """`text` (from an image, or anything else) shown exactly: escaped, never read as markup."""
    from rich.text import Text

    return Text(for_terminal(str(text)), style=style)


# -- styled lines -------------------------------------------------------------------------------------
Segments = Sequence[tuple[str, str]]
"""A line as (text, Rich style) pieces; the text is shown as it is (escape what comes from an image)."""


def print_lines(lines: Sequence[Segments], stream: IO[str] | None = None) -> None:
    """Print each line of segments on `stream` (default stdout): the bare text off a terminal (what
    Rich prints there: no colour, no wrapping), with Rich's styles on one."""
    out = sys.stdout if stream is None else stream
    if not lines:
        return
    if not on_terminal(out) and all(_plain_line("".join(text for text, _style in line)) for line in lines):
        out.write("".join("".join(text for text, _style in line) + "\n" for line in lines))
        out.flush()  # as Rich does after each print: the order of stdout and stderr stays as it was
        return
    from rich.console import Console
    from rich.text import Text

    c = console() if out is sys.stdout else err_console() if out is sys.stderr else Console(
        file=out, highlight=False, soft_wrap=True)
    for line in lines:
        c.print(Text.assemble(*line))


def _plain_line(text: str) -> bool:
    """Whether Rich prints this line's text unchanged off a terminal: it expands tabs, and drops
    blanks at the end of a line longer than its console's width."""
    return "\t" not in text and not any(line[-1:].isspace() for line in text.split("\n"))


# -- tables -------------------------------------------------------------------------------------------
class Styled:
    """A table cell of styled segments, shown as given (the caller escapes text from an image)."""

    __slots__ = ("segments",)

    def __init__(self, segments: tuple[tuple[str, str], ...]) -> None:
        self.segments = segments

    @property
    def plain(self) -> str:
        return "".join(text for text, _style in self.segments)


def styled(*segments: str | tuple[str, str]) -> Styled:
    """A cell of (text, style) segments (a bare string has no style); `for_terminal` what comes from an image."""
    return Styled(tuple((s, "") if isinstance(s, str) else s for s in segments))


Cell = str | Styled


class Column:
    """A table column: its header, alignment and Rich's wrapping options (which matter when Rich
    has to fit the table into a narrower page)."""

    __slots__ = ("header", "justify", "min_width", "no_wrap", "overflow")

    def __init__(self, header: str, right: bool) -> None:
        self.header = header
        self.justify: Literal["left", "right"] = "right" if right else "left"
        self.no_wrap = right
        self.overflow: Literal["fold", "crop", "ellipsis"] = "fold"
        self.min_width: int | None = None


class Table:
    """qinspect's table: columns, rows of cells and an optional title; `print_table` prints it.

    String cells are escaped for the terminal (names read from an image are never markup nor
    control characters); `Styled` cells are shown as given."""

    def __init__(self, *columns: str, title: str | None = None) -> None:
        """Columns whose name ends in '#' are right-aligned (numbers) and never wrapped."""
        self.title = title
        self.columns = [Column(c.rstrip("#"), c.endswith("#")) for c in columns]
        self.rows: list[tuple[tuple[Cell, ...], str | None]] = []

    def add_row(self, *cells: Cell, style: str | None = None) -> None:
        """A row; missing cells at its end are empty. `style` is Rich's, for the whole row."""
        if len(cells) > len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(self.columns)} columns")
        self.rows.append((cells + ("",) * (len(self.columns) - len(cells)), style))


def table(*columns: str, title: str | None = None) -> Table:
    """A table with the house style; right-aligns columns whose name ends in '#'."""
    return Table(*columns, title=title)


def print_table(t: Table) -> None:
    """Print `t` on stdout: plain lines off a terminal (`plain_lines`, without importing Rich),
    Rich's table on one, or where only Rich can lay it out. (`scan`, which writes to a file of
    its choosing, calls `plain_lines` and `to_rich` itself.)"""
    # (A terminal Rich is told is none, TTY_COMPATIBLE=0, still sets its console's width: Rich's.)
    if not on_terminal(sys.stdout) and not sys.stdout.isatty():
        lines = plain_lines(t, PIPE_WIDTH)
        if lines is not None:
            sys.stdout.write("".join(line + "\n" for line in lines))
            sys.stdout.flush()  # as Rich does after each print
            return
    c = console()
    c.print(to_rich(t, c.is_terminal))


# Characters Rich measures as one cell without its Unicode tables (rich.cells' single-cell ranges,
# less the C1 controls, which `for_terminal` escapes anyway): text made of them has len() cells.
_ONE_CELL_RANGES = ((0x20, 0x7E), (0xA0, 0xAC), (0xAE, 0x2FF), (0x370, 0x482), (0x2500, 0x25FC), (0x2800, 0x28FF))
_one_cell_chars: frozenset[str] | None = None  # made when a cell first holds more than printable ASCII


def _one_cell(text: str) -> bool:
    """Whether every character of `text` is one cell wide for Rich, without its Unicode tables."""
    global _one_cell_chars
    if text.isascii() and text.isprintable():
        return True
    if _one_cell_chars is None:
        _one_cell_chars = frozenset(chr(c) for lo, hi in _ONE_CELL_RANGES for c in range(lo, hi + 1))
    return _one_cell_chars.issuperset(text)


def plain_lines(t: Table, width: int = PIPE_WIDTH) -> list[str] | None:
    """The lines Rich prints for `t` off a terminal on a console `width` cells wide (ASCII rules, no
    colour, every cell padded to its column), or None where its layout takes Rich's own rules: a
    character whose width needs Unicode's tables, a table wider than `width` (Rich folds its cells),
    a header Rich would read as markup or emoji."""
    cols = t.columns
    n = len(cols)
    if not n or any("[" in c.header or ":" in c.header for c in cols):
        return None
    rows = [[for_terminal(cell) if isinstance(cell, str) else cell.plain for cell in cells] for cells, _ in t.rows]
    title = None if t.title is None else for_terminal(t.title)
    texts = [c.header for c in cols] + [x for row in rows for x in row] + ([title] if title is not None else [])
    if not all(_one_cell(x) for x in texts):
        return None
    # Rich's layout with padding (0, 1), pad_edge=False and no outer edge: a column is as wide as its
    # widest cell (header included) plus its padding (none at the table's two outer edges), at least
    # one cell; columns are joined by '|'.
    pad_left = [0] + [1] * (n - 1)
    pad_right = [1] * (n - 1) + [0]
    widths = []
    for i, col in enumerate(cols):
        pad = pad_left[i] + pad_right[i]
        w = max([len(col.header), *(len(row[i]) for row in rows)]) + pad
        if col.min_width is not None:
            w = max(w, col.min_width + pad)
        widths.append(w or 1)
    if sum(widths) + n - 1 > width:
        return None  # Rich folds cells to fit
    right = [c.justify == "right" for c in cols]

    def line(cells: list[str]) -> str:
        out = []
        for i, text in enumerate(cells):
            inner = widths[i] - pad_left[i] - pad_right[i]
            # Rich strips the blanks after right-aligned text; left-aligned text keeps them.
            body = text.rstrip().rjust(inner) if right[i] else text.ljust(inner)
            out.append(" " * pad_left[i] + body + " " * pad_right[i])
        return "|".join(out)

    lines = [] if title is None else [title]  # not wrapped, not padded (Rich's title under soft_wrap)
    lines.append(line([c.header for c in cols]))
    lines.append("+".join("-" * w for w in widths))
    lines += [line(row) for row in rows]
    return lines


def to_rich(t: Table, terminal: bool) -> RichTable:
    """`t` as a Rich table in the house style (heavy rules on a terminal, ASCII ones off it)."""
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    rt = RichTable(title=literal(t.title) if t.title is not None else None,
                   box=box.SIMPLE_HEAVY if terminal else box.ASCII2, title_justify="left",
                   show_edge=terminal, pad_edge=False)
    for c in t.columns:
        rt.add_column(c.header, justify=c.justify, no_wrap=c.no_wrap, overflow=c.overflow, min_width=c.min_width)
    for cells, style in t.rows:
        rt.add_row(*(literal(x) if isinstance(x, str) else Text.assemble(*x.segments) for x in cells), style=style)
    return rt
