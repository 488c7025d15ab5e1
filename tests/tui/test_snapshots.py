"""SVG snapshots of every view on sample images (pytest-textual-snapshot).

Fixed terminal size, scans run to completion before the picture, files named by their relative
sample names: the pictures are the same on every machine. Update with `--snapshot-update` after
checking the report.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.structs import StructKind, StructRef
from qinspect.tui.views.cache import CacheLabView
from qinspect.tui.views.guest import GuestMapView
from qinspect.tui.views.structures import StructuresView

SIZE = (120, 40)


def app_for(samples: Any, name: str, view: str = "overview") -> QInspectApp:
    return QInspectApp(str(samples.path(name)), name=f"{name}.qcow2", view=view)


def settled(then: Callable[[Any, MainScreen], Awaitable[None]] | None = None) -> Callable[[Any], Awaitable[None]]:
    """A run_before: wait for every scan, then run `then(pilot, main_screen)`."""

    async def run_before(pilot: Any) -> None:
        app = pilot.app
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        await app.workers.wait_for_complete()
        if then is not None:
            screen = app.screen
            assert isinstance(screen, MainScreen)
            await then(pilot, screen)
            await pilot.pause()
            await app.workers.wait_for_complete()
        await pilot.pause()

    return run_before


def test_overview_chain(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "chain_top"), terminal_size=SIZE, run_before=settled())


def test_overview_luks(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "luks"), terminal_size=SIZE, run_before=settled())


def test_guest_map_subclusters(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        view.grid.set_zoom(0)
        view.show_offset(2 * 65536 + 4 * 2048)  # cluster 2, subcluster 4: zero inside data

    assert snap_compare(app_for(samples, "extl2_64k", "guest"), terminal_size=SIZE, run_before=settled(then))


def test_guest_map_chain(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        view.show_offset(0x7FF000)  # from backing layer 1... or 2

    assert snap_compare(app_for(samples, "chain_top", "guest"), terminal_size=SIZE, run_before=settled(then))


def test_guest_map_zoomed_out(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "fragmented", "guest"), terminal_size=SIZE, run_before=settled())


def test_host_layout(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        await pilot.press("right", "right", "right", "right")

    assert snap_compare(app_for(samples, "fragmented", "host"), terminal_size=SIZE, run_before=settled(then))


def test_host_layout_leaked(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        await pilot.press("slash", *"leaked", "enter")

    assert snap_compare(app_for(samples, "leaked", "host"), terminal_size=SIZE, run_before=settled(then))


def test_structures_header(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "basic64k", "structures"), terminal_size=SIZE, run_before=settled())


def test_structures_l2_entry(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("structures")
        assert isinstance(view, StructuresView)
        img = main.session.img
        l2 = int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00
        view.show_ref(StructRef(StructKind.L2, index=0, offset=l2, row=2))
        view.table.focus()

    assert snap_compare(app_for(samples, "extl2_128k", "structures"), terminal_size=SIZE,
                        run_before=settled(then))


def test_structures_snapshot_table(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("structures")
        assert isinstance(view, StructuresView)
        view.show_ref(StructRef(StructKind.SNAPSHOT_TABLE, offset=main.session.img.header.snapshots_offset, row=1))
        view.table.focus()

    assert snap_compare(app_for(samples, "snapshots", "structures"), terminal_size=SIZE, run_before=settled(then))


def test_cache_lab(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("cache")
        assert isinstance(view, CacheLabView)
        from textual.widgets import Input

        view.query_one("#cl-l2_cache_size", Input).value = "64M"

    assert snap_compare(app_for(samples, "big_empty", "cache"), terminal_size=SIZE, run_before=settled(then))


def test_diagnostics(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "refcount_corrupt", "diagnostics"), terminal_size=SIZE,
                        run_before=settled())


def test_chain_and_snapshots(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "longchain_4", "chain"), terminal_size=SIZE, run_before=settled())


def test_snapshots_and_bitmaps(snap_compare: Any, samples: Any) -> None:
    assert snap_compare(app_for(samples, "bitmaps", "chain"), terminal_size=SIZE, run_before=settled())


def test_help_panel(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        await pilot.press("question_mark")

    assert snap_compare(app_for(samples, "basic64k", "guest"), terminal_size=SIZE, run_before=settled(then))


def test_error_screen(snap_compare: Any, tmp_path: Path) -> None:
    bad = tmp_path / "disk.vmdk"
    bad.write_bytes(b"KDMV" + bytes(1020))
    app = QInspectApp(str(bad), name="disk.vmdk")
    assert snap_compare(app, terminal_size=SIZE)


def test_file_picker(snap_compare: Any, samples: Any, tmp_path: Path) -> None:
    (tmp_path / "vms").mkdir()
    for name in ("basic64k", "chain_top", "snapshots"):
        shutil.copyfile(samples.path(name), tmp_path / "vms" / f"{name}.qcow2")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "raw.img").write_bytes(bytes(4096))
    app = QInspectApp(None, root=str(tmp_path))

    async def run_before(pilot: Any) -> None:
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
