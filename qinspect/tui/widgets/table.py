"""A Line-API table over a `TableModel`: rows are formatted only when they are on screen.

A structure may have millions of entries (an L1 table of 4 Mi entries, a refcount block of
half a million 1-bit refcounts); the table renders the header line and the visible rows and
caches their Strips, never building a widget or a Python object per entry.
"""

from __future__ import annotations

from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip

from qinspect.tui.palette import CURSOR_STYLE, DIM
from qinspect.tui.structs import TableModel
from qinspect.tui.widgets.lineview import PAGE_KEYS, CachedLineView


class EntryTable(CachedLineView, can_focus=True):
    """Rows of a structure; the first line is a fixed column header."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "move(-1)", "↑", show=False),
        Binding("down,j", "move(1)", "↓", show=False),
        *PAGE_KEYS,
        Binding("enter", "activate", "Follow"),
    ]

    DEFAULT_CSS = """
    EntryTable { height: 1fr; overflow-x: auto; scrollbar-size-vertical: 1; scrollbar-size-horizontal: 1; }
    """

    cursor: reactive[int] = reactive(0, init=False)

    class Highlighted(Message):
        def __init__(self, table: EntryTable, row: int) -> None:
            super().__init__()
            self.table = table
            self.row = row

    class Activated(Message):
        def __init__(self, table: EntryTable, row: int) -> None:
            super().__init__()
            self.table = table
            self.row = row

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.model: TableModel | None = None
        self._gen = 0

    def set_model(self, model: TableModel | None, row: int = 0) -> None:
        self.model = model
        self._gen += 1
        self.forget_lines()
        n = len(model) if model is not None else 0
        self.widths = self._fit_widths(model)
        width = sum(w + 1 for w in self.widths)
        self.virtual_size = Size(width, n + 1)
        self.scroll_to(0, 0, animate=False, immediate=True)
        self.set_reactive(EntryTable.cursor, max(0, min(row, n - 1)))
        self._scroll_cursor_visible()
        self.refresh()
        self.post_message(self.Highlighted(self, self.cursor))

    @staticmethod
    def _fit_widths(model: TableModel | None, sample: int = 256) -> list[int]:
        """Column widths: the declared ones, widened to the longest value among the first and last
        rows (offsets and counts are never cut; long names still are, with …)."""
        if model is None:
            return []
        widths = [w for _t, w in model.columns]
        n = len(model)
        rows = list(range(min(n, sample))) + list(range(max(sample, n - sample), n))
        for i in rows:
            try:
                cells = model.row(i)
            except Exception:  # a row that cannot be decoded shows its error when drawn
                continue
            for k, (text, _c) in enumerate(cells[: len(widths)]):
                widths[k] = min(max(widths[k], len(text)), 64)
        return widths

    @property
    def n_rows(self) -> int:
        return len(self.model) if self.model is not None else 0

    def _line(self, cells: list[tuple[str, str | None]], style: Style | None = None) -> list[Segment]:
        assert self.model is not None
        segs: list[Segment] = []
        widths = getattr(self, "widths", None) or [w for _t, w in self.model.columns]
        for (raw, colour), w in zip(cells, widths, strict=False):
            text = raw  # display text: the model escaped what came from the file (for_terminal)
            t = text if len(text) <= w else text[: max(0, w - 1)] + "…"
            st = Style(color=colour) if colour else Style()
            if style is not None:
                st = st + style
            segs.append(Segment(t.ljust(w) + " ", st))
        return segs

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        sx = self.scroll_offset.x
        model = self.model
        if model is None:
            return Strip.blank(width, self.rich_style)
        if y == 0:
            key: tuple[int, ...] = (self._gen, -1, sx, width)
        else:
            row = self.scroll_offset.y + y - 1
            if row >= self.n_rows:
                return Strip.blank(width, self.rich_style)
            key = (self._gen, row, sx, width, int(row == self.cursor), int(self.has_focus))

        def draw() -> Strip:
            if y == 0:
                segs = self._line([(t, None) for t, _w in model.columns], Style(bold=True, underline=True))
            else:
                row = key[1]
                cur = None
                if row == self.cursor:
                    cur = CURSOR_STYLE if self.has_focus else Style(reverse=True, color=DIM)
                segs = self._line(model.row(row), cur)
            return Strip(segs).crop(sx, sx + width).adjust_cell_length(width, self.rich_style)

        return self.cached_line(key, draw)

    def watch_cursor(self, old: int, new: int) -> None:
        self._scroll_cursor_visible()
        self.refresh()
        self.post_message(self.Highlighted(self, new))

    def _scroll_cursor_visible(self) -> None:
        visible = max(1, self.size.height - 1 - (1 if self.show_horizontal_scrollbar else 0))
        top = int(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    def on_resize(self) -> None:
        self.forget_lines()
        self._scroll_cursor_visible()

    def move_to(self, row: int) -> None:
        if self.n_rows:
            self.cursor = max(0, min(row, self.n_rows - 1))

    def action_move(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor + direction * max(1, self.size.height - 2))

    def action_edge(self, direction: int) -> None:
        self.move_to(0 if direction < 0 else self.n_rows - 1)

    def action_activate(self) -> None:
        if self.n_rows:
            self.post_message(self.Activated(self, self.cursor))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y == 0:
            return
        row = self.scroll_offset.y + offset.y - 1
        if 0 <= row < self.n_rows:
            self.move_to(row)
            if event.chain >= 2:
                self.action_activate()
