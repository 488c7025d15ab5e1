"""The frame the guest map and the host layout share (views/gridview.py) and the line cache of the
Line-API widgets (widgets/lineview.py): go to, letters, the inspector's first lines, the legend's
cell caption, each in both views."""

from __future__ import annotations

import os

from rich.console import Console
from textual.strip import Strip

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.views.gridview import GridView
from qinspect.tui.widgets.lineview import CachedLineView

SIZE = (120, 40)


def plain(renderable: object, width: int = 200) -> str:
    console = Console(width=width, record=True, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def grid_text(view: GridView) -> str:
    return "\n".join("".join(seg.text for seg in view.grid.render_line(y)) for y in range(view.grid.size.height))


async def test_both_grid_views_share_goto_letters_and_the_inspector_head(samples) -> None:  # type: ignore[no-untyped-def]
    path = samples.path("basic64k")
    for vid, space, past in (("guest", "guest", "is outside the virtual disk"),
                             ("host", "host", "is past the end of the file")):
        app = QInspectApp(str(path), view=vid)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, MainScreen)
            view = screen.view(vid)
            assert isinstance(view, GridView)
            img = screen.session.img
            cs = img.cluster_size
            end = img.header.size if vid == "guest" else img.file.size

            assert view.goto("0x30000") is None
            assert view.grid.cursor == 0x30000 // cs
            err = view.goto("not a size")
            assert err is not None and "not a size" in err
            err = view.goto(hex(end + cs))
            assert err is not None and err.startswith(f"{hex(end + cs)} {past}")
            assert view.grid.cursor == 0x30000 // cs  # a refused go-to leaves the cursor

            text = plain(view._inspect())
            assert f"{space} 0x30000" in text
            assert f"cluster  {0x30000 // cs} of " in text
            assert "cell " not in text
            view.grid.set_zoom(2)
            await pilot.pause()
            text = plain(view._inspect())
            assert "cell     4 clusters (256 KiB)" in text
            assert "1 cell = 4 " in plain(view._legend())

            view.grid.set_zoom(0)
            await pilot.pause()
            letters = view.grid.letters
            before = grid_text(view)
            await pilot.press("L")
            await pilot.pause()
            assert view.grid.letters is not letters
            assert grid_text(view) != before  # allocated cells change between letters and blocks


class TwoLines(CachedLineView):
    MAX_CACHED_LINES = 2


def test_line_cache_draws_a_line_once_per_key_and_keeps_the_newest() -> None:
    view = TwoLines()
    drawn: list[int] = []

    def draw(n: int) -> Strip:
        drawn.append(n)
        return Strip.blank(n)

    for key in (1, 1, 2, 1, 3, 2, 1):
        strip = view.cached_line((key,), lambda key=key: draw(key))  # type: ignore[misc]
        assert strip.cell_length == key
    # 1, 2 drawn; 1 cached; 3 evicts 1 (oldest inserted); 2 cached; 1 drawn again
    assert drawn == [1, 2, 3, 1]
    view.forget_lines()
    view.cached_line((2,), lambda: draw(2))
    assert drawn == [1, 2, 3, 1, 2]
