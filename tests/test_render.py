"""The plain table writer (`qinspect.cli.render.plain_lines`) prints what Rich prints off a terminal.

Human output off a terminal is written without Rich (a scripted `qinspect info` must not pay for
importing it), so every table is held here to the bytes Rich's own table prints there: wide, empty,
unicode and escaped cells, right-aligned columns with blanks, titles, styled cells, and tables
generated at random. Where the writer declines (characters whose width needs Unicode's tables, a
table wider than the page, a header Rich reads as markup), `print_table` hands the table to Rich.
"""

from __future__ import annotations

import io
import random
import sys

import pytest
from rich.console import Console
from rich.text import Text

from qinspect.cli import render
from qinspect.cli.render import PIPE_WIDTH, Table, plain_lines, print_lines, print_table, styled, table, to_rich


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)


def rich_off_terminal(t: Table, width: int = PIPE_WIDTH) -> str:
    """What Rich prints for the table on a console that is not a terminal (as qinspect's stdout console)."""
    out = io.StringIO()
    c = Console(file=out, highlight=False, soft_wrap=True, width=width)
    assert not c.is_terminal
    c.print(to_rich(t, terminal=False))
    return out.getvalue()


def plain(t: Table, width: int = PIPE_WIDTH) -> str:
    lines = plain_lines(t, width)
    assert lines is not None, "the plain writer declined a table it should write"
    return "".join(line + "\n" for line in lines)


def make(columns: tuple[str, ...], rows: list[tuple[object, ...]], title: str | None = None) -> Table:
    t = table(*columns, title=title)
    for row in rows:
        t.add_row(*row)  # type: ignore[arg-type]
    return t


CASES: dict[str, Table] = {
    "info fields": make(("field", "value"), [("image", "disk.qcow2"), ("virtual size", "64 MiB (67108864 bytes)")]),
    "wide cells": make(("field", "value", "n#"), [("x" * 300, "y" * 1500, "1"), ("a", "b", "1" * 200)]),
    "empty cells": make(("a", "", "c#"), [("", "", ""), ("x", "", ""), ("", "", "7")]),
    "all empty": make(("", ""), [("", ""), ("", "")]),
    "one empty column": make(("",), [("",)]),
    "no rows": make(("ID", "TAG", "SIZE#"), []),
    "header wider than cells": make(("a long header", "another one#"), [("x", "1")]),
    "unicode one cell": make(("name", "size#"), [("café naïve ÆØÅ ß", "1"), ("Ελληνικά кириллица", "22"),
                                               ("box ─│┌┐ braille ⠁⠂", "333"), ("nbsp\xa0here", "4")]),
    "escaped cells": make(("name", "n#"), [("esc\x1b[31mred\x1b[0m", "1"), ("new\nline\ttab", "2"),
                                          ("back\\slash", "3"), ("bell\x07del\x7f c1\x85", "4"),
                                          ("surrogate \udcff", "5"), ("[bold]markup[/] :smile:", "6")]),
    "blanks around text": make(("left", "right#", "last"), [("  lead", "trail  ", "end  "), ("mid dle ", " 2 ", " ")]),
    "nbsp at the end of a right cell": make(("a", "b#"), [("x", "12\xa0"), ("y", "3")]),
    "short title": make(("ID", "TAG", "VM SIZE#", "DATE"), [("1", "snap", "0 B", "2024-01-01 00:00:00")],
                        title="Snapshot list"),
    "long title": make(("a", "b#"), [("1", "2")], title="A title much wider than the table it names, not wrapped"),
    "title with escapes": make(("a",), [("1",)], title="name\x1b with [markup]"),
    "styled cells": make(("", "owner", "clusters#"), [(styled(("#", "bold red")), "header", "1"),
                                                      (styled("plain ", ("dim", "dim")), "L1 table", "12")]),
}
CASES["row styles"] = make(("cluster#", "ext L2", "needs#"), [("64 KiB", "", "1 MiB")])
CASES["row styles"].add_row("* 2 MiB", "yes", "32 KiB", style="bold")
CASES["min width"] = make(("n#", "image"), [("1", "a.qcow2")])
CASES["min width"].columns[-1].min_width = 24


@pytest.mark.parametrize("name", list(CASES))
def test_plain_writer_prints_what_rich_prints_off_a_terminal(name: str) -> None:
    t = CASES[name]
    assert plain(t) == rich_off_terminal(t)


def test_random_tables_match_rich() -> None:
    """Tables of random cells (ASCII, blanks, one-cell unicode, characters that are escaped) and
    random shapes; the writer must agree with Rich on every one."""
    rng = random.Random(12)
    alphabet = "abc XYZ 0123-_./()" + "  " + "éßøΩж─⠿\xa0" + "\x00\x1b\n\t\\\x9b"
    for _ in range(300):
        ncols = rng.randint(1, 6)
        cols = tuple(rng.choice(["", "name", "size#", "a b", "value", "n#"]) for _ in range(ncols))
        rows = [tuple("".join(rng.choice(alphabet) for _ in range(rng.choice([0, 0, 1, 3, 8, 30])))
                      for _ in range(ncols)) for _ in range(rng.randint(0, 5))]
        t = make(cols, rows, title=rng.choice([None, "T", "a title of some length"]))
        assert plain(t) == rich_off_terminal(t), (cols, rows)


@pytest.mark.parametrize("cell", ["日本語", "emoji 😀", "e\u0301 combining", "zero\u200bwidth", "line\u2028sep"])
def test_cells_whose_width_needs_unicode_tables_go_to_rich(cell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make(("name", "n#"), [(cell, "1"), ("plain", "22")])
    assert plain_lines(t) is None
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_table(t)
    assert out.getvalue() == rich_off_terminal(t)


def test_a_table_wider_than_the_page_goes_to_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    t = make(("a", "b"), [("x" * 3000, "y" * 1500)])
    assert plain_lines(t) is None
    assert plain_lines(t, width=5000) is not None
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_table(t)
    assert out.getvalue() == rich_off_terminal(t)
    # a narrow page (scan's 200 columns): Rich folds the cells; within it, the writer matches Rich
    narrow = make(("n#", "image"), [("1", "i" * 150)])
    assert plain(narrow, 200) == rich_off_terminal(narrow, 200)
    assert plain_lines(make(("n#", "image"), [("1", "i" * 250)]), 200) is None


@pytest.mark.parametrize("header", ["[bold]x", "a:smile:"])
def test_headers_rich_reads_as_markup_go_to_rich(header: str) -> None:
    assert plain_lines(make((header, "b"), [("1", "2")])) is None


def test_print_table_on_a_terminal_uses_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal (here: Rich's TTY_COMPATIBLE=1 rule) the table is Rich's, heavy rules and all."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_table(make(("field", "value"), [("image", "x")]))
    assert "━" in out.getvalue() and "image" in out.getvalue()


@pytest.mark.parametrize("env", [{}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": ""}, {"TTY_COMPATIBLE": "1"},
                                 {"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "x"}])
def test_on_terminal_follows_rich(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stream = io.StringIO()
    assert render.on_terminal(stream) == Console(file=stream).is_terminal


def test_print_lines_off_a_terminal_match_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [[("-- layer 0: ", "bold"), ("top.qcow2", "bold"), (" (the image) --", "bold")],
             [("warning: ", "yellow"), ("snapshot table: something (offset 4096)", "")],
             [("\nThe image is ", ""), ("dirty", "bold"), (": 3 refcount inconsistencies\nline two", "")],
             [("", "")]]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_lines(lines)
    expected = io.StringIO()
    c = Console(file=expected, highlight=False, soft_wrap=True, width=PIPE_WIDTH)
    for line in lines:
        c.print(Text.assemble(*line))
    assert out.getvalue() == expected.getvalue()


def test_rows_are_padded_and_bounded() -> None:
    t = table("a", "b", "c")
    t.add_row("1")
    assert t.rows[0][0] == ("1", "", "")
    with pytest.raises(ValueError):
        t.add_row("1", "2", "3", "4")
