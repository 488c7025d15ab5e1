"""The base of the Line-API widgets (grid, entry table, hex view): rendered lines kept as Strips.

`render_line` is called for every visible line on every refresh; drawing a line means formatting
entries or counting cells, so each widget keeps the Strips it drew in a bounded cache (the first
kept is dropped first), keyed by everything the line's look depends on (row, scroll, width,
cursor, focus, data version). This class owns that cache; a widget says how many lines it keeps
and what a line's key is. The widgets with a cursor share their paging keys (`PAGE_KEYS`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from textual.binding import Binding
from textual.scroll_view import ScrollView
from textual.strip import Strip

PAGE_KEYS = (
    Binding("pageup", "page(-1)", "PgUp", show=False),
    Binding("pagedown", "page(1)", "PgDn", show=False),
    Binding("home", "edge(-1)", "Home", show=False),
    Binding("end", "edge(1)", "End", show=False),
)
"""Paging and the jumps to either end: the same keys in every widget with a cursor (each has
`action_page(direction)` and `action_edge(direction)`)."""


class CachedLineView(ScrollView):
    """A `ScrollView` whose lines are drawn once per key and then served from a cache."""

    MAX_CACHED_LINES: ClassVar[int] = 300

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._lines: OrderedDict[tuple[int, ...], Strip] = OrderedDict()

    def cached_line(self, key: tuple[int, ...], draw: Callable[[], Strip]) -> Strip:
        """The line drawn for `key`: from the cache, or drawn now and kept (the first kept is dropped
        when the cache is full)."""
        strip = self._lines.get(key)
        if strip is None:
            strip = draw()
            self._lines[key] = strip
            while len(self._lines) > self.MAX_CACHED_LINES:
                self._lines.popitem(last=False)
        return strip

    def forget_lines(self) -> None:
        """Drop every cached line (the data, the layout or the look changed)."""
        self._lines.clear()

    def on_focus(self) -> None:
        # The cursor is drawn differently with and without the focus.
        self.forget_lines()
        self.refresh()

    def on_blur(self) -> None:
        self.forget_lines()
        self.refresh()
