"""A zoomable cluster grid (Line API): one character per cell, one cell per 2**zoom clusters.

The grid knows nothing about qcow2: a `GridSource` gives it, for a range of cells at a zoom
level, a state code and a fill glyph per cell (numpy arrays) and the colour of each code. A row
is rendered as one Segment per run of equal cells, and rows are cached as Strips until the data,
the zoom, the width or the cursor changes.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip

from qinspect.tui.fmt import hex_width
from qinspect.tui.guestmap import GLYPHS
from qinspect.tui.palette import DIM, PaletteState
from qinspect.tui.widgets.lineview import PAGE_KEYS, CachedLineView

U8 = npt.NDArray[np.uint8]
MARK_STYLE = Style(underline=True, bold=True)


class GridSource(Protocol):
    """What the grid draws: cells of `2**zoom` units each."""

    @property
    def unit_bytes(self) -> int: ...

    @property
    def n_units(self) -> int: ...

    @property
    def version(self) -> int: ...

    @property
    def max_zoom(self) -> int: ...

    def n_cells(self, zoom: int) -> int: ...

    def cells(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8, list[int]]: ...

    def colour(self, code: int) -> str: ...


class ClusterGrid(CachedLineView, can_focus=True):
    """The grid. `cursor` is a unit (cluster) index; moving it posts `CursorMoved`."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left,h", "move(-1, 0)", "←", show=False),
        Binding("right,l", "move(1, 0)", "→", show=False),
        Binding("up,k", "move(0, -1)", "↑", show=False),
        Binding("down,j", "move(0, 1)", "↓", show=False),
        *PAGE_KEYS,
        Binding("plus,equals_sign", "zoom(-1)", "Zoom in", key_display="+", show=False),
        Binding("minus", "zoom(1)", "Zoom out", key_display="-", show=False),
        Binding("enter", "activate", "Follow", key_display="⏎"),
    ]
    MAX_CACHED_LINES = 400

    DEFAULT_CSS = """
    ClusterGrid { height: 1fr; width: 1fr; overflow-x: hidden; scrollbar-size-vertical: 1; }
    """

    cursor: reactive[int] = reactive(0, always_update=False, init=False)
    zoom: reactive[int] = reactive(0, init=False)

    class CursorMoved(Message):
        def __init__(self, grid: ClusterGrid, unit: int) -> None:
            super().__init__()
            self.grid = grid
            self.unit = unit

    class Activated(Message):
        def __init__(self, grid: ClusterGrid, unit: int) -> None:
            super().__init__()
            self.grid = grid
            self.unit = unit

    class NeedData(Message):
        """Rendering met tables (source-defined ids) whose data is not loaded."""

        def __init__(self, grid: ClusterGrid, tables: list[int]) -> None:
            super().__init__()
            self.grid = grid
            self.tables = tables

    def __init__(self, source: GridSource, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.source = source
        self.cols = 64
        self.cell_w = 1  # characters per cell: small images get wide cells (zoom in past 1:1)
        self._styles: dict[int, Style] = {}
        self._need: set[int] = set()
        self._need_posted = False
        self._fitted = False
        self.letters = False  # draw each cell's letter (the source's `letter(code)`) instead of its glyph
        self._highlight = np.zeros(0, dtype=np.int64)  # units drawn underlined (new in a followed image)
        self._highlight_version = 0

    # -- geometry -------------------------------------------------------------------------------
    @property
    def cpc(self) -> int:
        return 1 << self.zoom

    @property
    def cursor_cell(self) -> int:
        return self.cursor >> self.zoom

    @property
    def n_cells(self) -> int:
        return self.source.n_cells(self.zoom)

    @property
    def n_rows(self) -> int:
        return -(-self.n_cells // self.cols)

    @property
    def label_width(self) -> int:
        """Row labels are exact hex offsets: as many digits as the largest one needs, and a space."""
        return hex_width(max(1, self.source.n_units * self.source.unit_bytes - 1)) + 1

    @property
    def draws_letters(self) -> bool:
        return (self.letters or PaletteState.letters) and hasattr(self.source, "letter")

    def _update_virtual_size(self) -> None:
        self.virtual_size = Size(self.label_width + self.cols * self.cell_w, self.n_rows)

    def _cols_for(self, cell_w: int) -> int:
        width = max(16, self.size.width - self.label_width) // cell_w
        pow2 = 1 << (max(1, width).bit_length() - 1)
        return pow2 if pow2 >= width * 3 // 4 else max(8, width // 8 * 8)

    def set_cell_width(self, cell_w: int) -> None:
        self.cell_w = cell_w
        self.cols = self._cols_for(cell_w)
        self.forget_lines()
        self._update_virtual_size()

    def fit_zoom(self) -> None:
        """The smallest zoom at which the whole disk fits in the visible rows; a disk that fits
        easily gets cells several characters wide."""
        rows = max(1, self.size.height)
        self.set_cell_width(1)
        z = 0
        while z < self.source.max_zoom and self.source.n_cells(z) > self.cols * rows:
            z += 1
        if z == 0:
            for w in (4, 2):
                if self.source.n_cells(0) <= self._cols_for(w) * rows:
                    self.set_cell_width(w)
                    break
        self.set_zoom(z)

    def on_resize(self, event: events.Resize) -> None:
        self.cols = self._cols_for(self.cell_w)
        self.forget_lines()
        if not self._fitted and self.size.height > 0:
            self._fitted = True
            self.fit_zoom()
        self._update_virtual_size()
        self._scroll_cursor_visible()

    # -- data -------------------------------------------------------------------------------------
    def set_source(self, source: GridSource) -> None:
        self.source = source
        self._fitted = False
        self.cursor = 0
        self.data_changed()
        if self.size.height > 0:
            self._fitted = True
            self.fit_zoom()

    def set_highlight(self, units: set[int] | npt.NDArray[np.int64]) -> None:
        """Units to mark (underlined, bold): what a followed image newly allocated."""
        self._highlight = np.sort(units) if isinstance(units, np.ndarray) else np.array(sorted(units), dtype=np.int64)
        self._highlight_version += 1
        self.forget_lines()
        self.refresh()

    def replace_source(self, source: GridSource) -> None:
        """The same data, newer (a followed image): keep the cursor and the zoom."""
        self.source = source
        self.data_changed()

    def data_changed(self) -> None:
        self.forget_lines()
        self._styles.clear()
        self._update_virtual_size()
        self.refresh()

    def _style(self, code: int) -> Style:
        st = self._styles.get(code)
        if st is None:
            st = Style(color=self.source.colour(code))
            self._styles[code] = st
        return st

    # -- rendering -------------------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        row = self.scroll_offset.y + y
        width = self.size.width
        if row >= self.n_rows or row < 0:
            return Strip.blank(width, self.rich_style)
        cur = self.cursor_cell
        cur_in_row = cur - row * self.cols if row * self.cols <= cur < (row + 1) * self.cols else -1
        key = (row, self.zoom, self.cols, self.cell_w, self.source.version, cur_in_row, width, int(self.has_focus),
               self.draws_letters, self._highlight_version)
        return self.cached_line(key, lambda: self._render_row(row, cur_in_row, width))

    def _render_row(self, row: int, cur_in_row: int, width: int) -> Strip:
        c0 = row * self.cols
        codes, glyphs, need = self.source.cells(self.zoom, c0, c0 + self.cols)
        if need:
            self._need.update(need)
            if not self._need_posted:
                self._need_posted = True
                self.call_after_refresh(self._post_need)
        lw = self.label_width
        label = f"{c0 * self.cpc * self.source.unit_bytes:x}"
        segs = [Segment(f"{label:>{lw - 1}} ", Style(color=DIM))]
        letter = getattr(self.source, "letter", None) if self.draws_letters else None
        n = len(codes)
        marked = np.zeros(n, dtype=np.int32)
        if len(self._highlight) and n:
            cells = (self._highlight >> self.zoom) - c0
            cells = cells[(cells >= 0) & (cells < n)]
            marked[cells] = 1
        if n:
            keys = codes.astype(np.int32) * 8 + glyphs + (marked << 12)
            brk = np.flatnonzero(keys[1:] != keys[:-1]) + 1
            starts = [0, *brk.tolist()]
            ends = [*brk.tolist(), n]
            for s, e in zip(starts, ends, strict=True):
                code, glyph = int(codes[s]), int(glyphs[s])
                style = self._style(code) + (MARK_STYLE if marked[s] else Style())
                cell = self._cell_text(glyph) if letter is None or glyph == 0 else self._letter_text(letter(code))
                if s <= cur_in_row < e:
                    if cur_in_row > s:
                        segs.append(Segment(cell * (cur_in_row - s), style))
                    segs.append(self._cursor_segment(code))
                    if e > cur_in_row + 1:
                        segs.append(Segment(cell * (e - cur_in_row - 1), style))
                else:
                    segs.append(Segment(cell * (e - s), style))
        strip = Strip(segs)
        return strip.adjust_cell_length(width, self.rich_style)

    def _cell_text(self, glyph: int) -> str:
        """One cell, `cell_w` characters: wide cells keep a gap so that cells can be counted."""
        g = GLYPHS[glyph]
        if self.cell_w >= 4:
            return g * (self.cell_w - 1) + " "
        return g * self.cell_w

    def _letter_text(self, ch: str) -> str:
        if self.cell_w >= 4:
            return ch * (self.cell_w - 1) + " "
        return ch * self.cell_w

    def _cursor_segment(self, code: int) -> Segment:
        """The cursor cell: a diamond on the cell's colour (hollow when the grid is not focused)."""
        colour = self.source.colour(code)
        mark = "◆" if self.has_focus else "◇"
        text = mark.center(self.cell_w - (1 if self.cell_w >= 4 else 0))
        style = Style(color="#000000", bgcolor=colour, bold=True)
        if self.cell_w >= 4:
            return Segment(text + " ", style)
        return Segment(text, style)

    def _post_need(self) -> None:
        self._need_posted = False
        if self._need:
            tables = sorted(self._need)
            self._need.clear()
            self.post_message(self.NeedData(self, tables))

    # -- cursor ---------------------------------------------------------------------------------------
    def watch_cursor(self, old: int, new: int) -> None:
        self._refresh_cursor_rows(old >> self.zoom, new >> self.zoom)
        self._scroll_cursor_visible()
        self.post_message(self.CursorMoved(self, new))

    def _refresh_cursor_rows(self, old_cell: int, new_cell: int) -> None:
        for cell in (old_cell, new_cell):
            self.refresh_line(cell // self.cols)

    def _scroll_cursor_visible(self) -> None:
        row = self.cursor_cell // self.cols
        self.scroll_to_region(Region(0, row, 1, 1), animate=False, immediate=True)

    def move_to(self, unit: int) -> None:
        self.cursor = max(0, min(unit, self.source.n_units - 1))

    def set_zoom(self, zoom: int) -> None:
        zoom = max(0, min(zoom, self.source.max_zoom))
        self.zoom = zoom

    def watch_zoom(self, old: int, new: int) -> None:
        self.forget_lines()
        self._update_virtual_size()
        self.refresh()
        self._scroll_cursor_visible()
        self.call_after_refresh(self._scroll_cursor_visible)  # once the new virtual size is laid out
        self.post_message(self.CursorMoved(self, self.cursor))

    def action_move(self, dx: int, dy: int) -> None:
        cell = self.cursor_cell + dx + dy * self.cols
        if 0 <= cell < self.n_cells:
            self.move_to(cell << self.zoom)

    def action_page(self, direction: int) -> None:
        rows = max(1, self.size.height - 1)
        cell = self.cursor_cell + direction * rows * self.cols
        cell = max(0, min(cell, self.n_cells - 1))
        self.move_to(cell << self.zoom)

    def action_edge(self, direction: int) -> None:
        self.move_to(0 if direction < 0 else (self.n_cells - 1) << self.zoom)

    def action_zoom(self, delta: int) -> None:
        if delta < 0 and self.zoom == 0:  # past one cluster per cell: wider cells
            if self.cell_w < 8:
                self.set_cell_width(self.cell_w * 2)
                self.refresh()
                self.call_after_refresh(self._scroll_cursor_visible)
            return
        if delta > 0 and self.cell_w > 1:
            self.set_cell_width(self.cell_w // 2)
            self.refresh()
            self.call_after_refresh(self._scroll_cursor_visible)
            return
        self.set_zoom(self.zoom + delta)

    def action_activate(self) -> None:
        self.post_message(self.Activated(self, self.cursor))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        x, y = offset
        if x < self.label_width:
            return
        col = (x - self.label_width) // self.cell_w
        if col >= self.cols:
            return
        cell = (self.scroll_offset.y + y) * self.cols + col
        if 0 <= cell < self.n_cells:
            self.move_to(cell << self.zoom)
            if event.chain >= 2:
                self.action_activate()
