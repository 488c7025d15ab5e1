"""The views' tab strip: one widget that draws every label and the underline under the active one.

Textual's `TabbedContent` builds a widget per tab and per pane (15 for seven views) before the
first frame, and their styles, layout and render are most of what the first frame costs beyond a
bare app. Here the labels are one renderable; the panes are mounted as views are first shown
(`MainScreen`). A click on a label posts `ShowView`, as the number keys do.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.color import Color
from textual.widgets import Static

from qinspect.tui.messages import ShowView
from qinspect.tui.palette import DIM


class ViewStrip(Static):
    """`ViewStrip(((id, label), ...), active)`; `active` is the id of the view shown."""

    DEFAULT_CSS = """
    ViewStrip { height: 2; width: 1fr; }
    """

    def __init__(self, views: tuple[tuple[str, str], ...], active: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.views = views
        self._active = active
        self._spans: list[tuple[int, int, str]] = []  # (first column, end column, view id)

    @property
    def active(self) -> str:
        return self._active

    @active.setter
    def active(self, vid: str) -> None:
        if vid != self._active:
            self._active = vid
            self.refresh()

    def render(self) -> Text:
        accent = Color.parse(self.app.get_css_variables().get("primary", "#0178d4")).rich_color
        muted = DIM
        width = max(1, self.size.width)
        labels = Text(" ", no_wrap=True, overflow="crop")
        self._spans = []
        col = 1
        for vid, label in self.views:
            cell = f" {label} "
            on = vid == self._active
            labels.append(cell, Style(bold=True) if on else Style(color=muted))
            self._spans.append((col, col + len(cell), vid))
            col += len(cell)
        under = Text(no_wrap=True, overflow="crop")
        lo, hi = next(((a, b) for a, b, v in self._spans if v == self._active), (0, 0))
        under.append("━" * min(lo, width), Style(color=muted, dim=True))
        under.append("━" * max(0, min(hi, width) - lo), Style(color=accent))
        under.append("━" * max(0, width - hi), Style(color=muted, dim=True))
        return Text("\n").join([labels, under])

    def on_click(self, event: events.Click) -> None:
        for a, b, vid in self._spans:
            if a <= event.x < b and event.y == 0:
                event.stop()
                self.post_message(ShowView(vid))
                return


__all__ = ["ViewStrip"]
