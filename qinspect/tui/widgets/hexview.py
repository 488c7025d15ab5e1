"""A Line-API hex dump of one structure's bytes, coloured by field, with the selected entry
highlighted. Bytes are read from the image file a page at a time, only for lines on screen."""

from __future__ import annotations

from collections import OrderedDict

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.strip import Strip

from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.palette import DIM
from qinspect.tui.structs import TableModel
from qinspect.tui.widgets.lineview import CachedLineView

BYTES_PER_LINE = 16
PAGE = 4096
# A structure larger than this shows its first bytes only (an L1 table can be 32 MiB).
MAX_HEX = 64 << 20


class HexView(CachedLineView, can_focus=False):
    """Offset, 16 hex bytes (8 or 4 when the pane is narrower: rows are never cut), ASCII;
    colours from the model, the highlighted span reversed."""

    DEFAULT_CSS = """
    HexView { height: 12; overflow-x: hidden; scrollbar-size-vertical: 1; }
    """
    MAX_CACHED_LINES = 200

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.model: TableModel | None = None
        self.highlight: tuple[int, int] | None = None
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._gen = 0
        self.base = 0
        self.length = 0

    @property
    def bpl(self) -> int:
        """Bytes per line: as many of 16, 8, 4 as fit (offset 12 + 3 per byte + gaps + ASCII)."""
        width = self.size.width or 80
        for n in (16, 8):
            if 12 + 4 * n + 2 <= width:
                return n
        return 4

    def on_resize(self) -> None:
        self.forget_lines()
        self._layout()
        self.refresh()

    def _layout(self) -> None:
        model = self.model
        if model is None:
            self.base, self.length = 0, 0
        else:
            self.base = model.start - model.start % BYTES_PER_LINE
            self.length = min(model.start + model.length, model.start + MAX_HEX) - self.base
        self.virtual_size = Size(12 + 4 * self.bpl + 2, -(-self.length // self.bpl))

    def set_model(self, model: TableModel | None) -> None:
        self.model = model
        self._gen += 1
        self.forget_lines()
        self._pages.clear()
        self.highlight = None
        self._layout()
        self.scroll_to(0, 0, animate=False, immediate=True)
        self.refresh()

    def set_highlight(self, span: tuple[int, int] | None) -> None:
        self.highlight = span
        self.forget_lines()
        if span is not None:
            line = (span[0] - self.base) // self.bpl
            top = int(self.scroll_offset.y)
            h = max(1, self.size.height)
            if not top <= line < top + h:
                self.scroll_to(y=max(0, line - h // 3), animate=False, immediate=True)
        self.refresh()

    def _read(self, off: int, n: int) -> bytes:
        assert self.model is not None
        out = b""
        pos = off
        while pos < off + n:
            page = pos - pos % PAGE
            data = self._pages.get(page)
            if data is None:
                try:
                    data = self.model.img.file.pread(page, PAGE)
                except Qcow2Error:
                    data = bytes(PAGE)
                self._pages[page] = data
                while len(self._pages) > 64:
                    self._pages.popitem(last=False)
            take = min(off + n, page + PAGE) - pos
            out += data[pos - page : pos - page + take]
            pos += take
        return out

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        line = self.scroll_offset.y + y
        bpl = self.bpl
        n_lines = -(-self.length // bpl)
        if self.model is None or line >= n_lines:
            return Strip.blank(width, self.rich_style)
        return self.cached_line((self._gen, line, width, bpl), lambda: self._draw_line(line, bpl, width))

    def _draw_line(self, line: int, bpl: int, width: int) -> Strip:
        model = self.model
        assert model is not None
        off = self.base + line * bpl
        data = self._read(off, bpl)
        colours = model.byte_colours(off, data)
        lo, hi = self.highlight if self.highlight is not None else (-1, -1)
        start, end = model.start, model.start + model.length
        segs = [Segment(f"{off:010x}  ", Style(color=DIM))]
        asc: list[Segment] = []
        for k, b in enumerate(data):
            pos = off + k
            if not start <= pos < end:
                segs.append(Segment("   "))
                asc.append(Segment(" "))
                continue
            st = Style(color=colours[k]) if colours[k] else Style()
            if lo <= pos < hi:
                st = st + Style(reverse=True, bold=True)
            sep = "  " if k == 7 and bpl == 16 else " "
            segs.append(Segment(f"{b:02x}", st))
            segs.append(Segment(sep, st if lo <= pos + 1 < hi and k != bpl - 1 else Style()))
            asc.append(Segment(chr(b) if 32 <= b < 127 else ".", st))
        segs.append(Segment(" "))
        segs.extend(asc)
        return Strip(segs).adjust_cell_length(width, self.rich_style)
