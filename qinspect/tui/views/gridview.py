"""The frame shared by the views that draw a file as a cluster grid (2 · guest map, 3 · host layout).

Both put a legend above a `ClusterGrid` and an inspector panel beside it that says what is under
the cursor; both toggle letters with `L`, start an inspector with the cursor's offset and cluster
number, and caption the legend with what one cell holds. That frame lives here; what the cells
mean, the legend's items and the inspector's body are each view's own.
"""

from __future__ import annotations

from typing import ClassVar

from rich.console import RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from qinspect.tui import fmt
from qinspect.tui.palette import DIM
from qinspect.tui.views.base import View
from qinspect.tui.widgets.grid import ClusterGrid


def rule(title: str) -> Text:
    """A section title of an inspector panel."""
    t = Text()
    t.append(f"── {title} ", Style(bold=True))
    t.append("─" * max(0, 26 - len(title)), Style(color=DIM))
    return t


def kv(key: str, value: str | Text, key_width: int = 9) -> Text:
    """One `key  value` line of an inspector panel."""
    t = Text(no_wrap=False)
    t.append(f"{key:<{key_width}}", Style(color=DIM))
    if isinstance(value, Text):
        t.append_text(value)
    else:
        t.append(value)
    return t


class GridView(View):
    """A legend above a cluster grid, and an inspector panel beside it.

    The widgets' ids are `{PREFIX}-legend`, `{PREFIX}-grid` and `{PREFIX}-inspect`."""

    PREFIX: ClassVar[str] = ""

    DEFAULT_CSS = """
    GridView .grid-left { width: 1fr; }
    GridView .grid-legend { height: auto; padding: 0 1; }
    GridView .grid-inspector { width: 30%; min-width: 32; max-width: 64; border-left: vkey $foreground 20%;
                               padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        p = self.PREFIX
        with Horizontal():
            with Vertical(id=f"{p}-left", classes="grid-left"):
                yield from self.compose_above_legend()
                yield Static(self._legend(), id=f"{p}-legend", classes="grid-legend")
                yield self.make_grid()
            with VerticalScroll(id=f"{p}-inspector", classes="grid-inspector"):
                yield Static("", id=f"{p}-inspect")

    def compose_above_legend(self) -> ComposeResult:
        """Widgets above the legend (none by default)."""
        yield from ()

    def make_grid(self) -> ClusterGrid:
        """The grid, with its source (id `{PREFIX}-grid`)."""
        raise NotImplementedError

    def _legend(self) -> RenderableType:
        """The legend above the grid."""
        raise NotImplementedError

    def _inspect(self) -> RenderableType:
        """The inspector panel: what is under the cursor (it starts with `inspector_head`)."""
        raise NotImplementedError

    @property
    def grid(self) -> ClusterGrid:
        return self.query_one(ClusterGrid)

    def main_widget(self) -> Widget | None:
        return self.grid

    def update_legend(self) -> None:
        self.query_one(f"#{self.PREFIX}-legend", Static).update(self._legend())

    def action_letters(self) -> None:
        """`L`: letters or blocks in the grid's cells."""
        grid = self.grid
        grid.letters = not grid.letters
        grid.data_changed()
        self.update_legend()

    def cell_caption(self, unit: str, cluster_size: int) -> str:
        """What one cell of the grid holds at its zoom: `1 cell = N {unit}s (size)`."""
        z = self.grid.zoom if self.is_mounted and self.query(ClusterGrid) else 0
        cpc = 1 << z
        return f"1 cell = {fmt.count(cpc)} {unit}{'s' if cpc > 1 else ''} ({fmt.size(cpc * cluster_size)})"

    def inspector_head(self, space: str, cluster_size: int, n_clusters: int) -> list[RenderableType]:
        """The first lines of the inspector: the cursor's offset in `space` ("guest", "host") and
        its cluster number."""
        grid = self.grid
        offset = grid.cursor * cluster_size
        head = Text()
        head.append(f"{space} {fmt.hexoff(offset)}", Style(bold=True))
        head.append(f"  ({fmt.size_exact(offset)})", Style(color=DIM))
        return [head, kv("cluster", f"{fmt.count(grid.cursor)} of {fmt.count(n_clusters)}")]

    def cell_line(self, cluster_size: int) -> Text:
        """The inspector's line saying how much the cursor's cell holds (when zoomed out)."""
        cpc = self.grid.cpc
        return kv("cell", f"{fmt.count(cpc)} clusters ({fmt.size(cpc * cluster_size)})")

    def show_offset(self, offset: int) -> None:
        """Move the cursor to `offset` of the space the grid draws."""
        raise NotImplementedError

    def offset_problem(self, offset: int) -> str | None:
        """Why the cursor cannot go to `offset` (outside the space the grid draws), or None."""
        raise NotImplementedError

    def goto(self, text: str) -> str | None:
        """`g`: go to an offset typed as a size (`0x10000`, `64k`, `1.5G`)."""
        try:
            off = fmt.parse_size(text)
        except ValueError as e:
            return str(e)
        problem = self.offset_problem(off)
        if problem is None:
            self.show_offset(off)
        return problem

    def find(self, text: str, forward: bool = True, from_start: bool = False) -> str | None:
        """Find the next match (from the start with `from_start`); an error message, or None."""
        raise NotImplementedError

    def find_first(self, text: str) -> str | None:
        return self.find(text, True, from_start=True)
