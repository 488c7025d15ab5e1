"""Pilot tests of the TUI: every view, keys, links between views, scans and errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from qinspect.qcow2.image import Image, open_image
from qinspect.tui import guestmap as guestmap_mod
from qinspect.tui import session as session_mod
from qinspect.tui.app import QInspectApp
from qinspect.tui.palette import G
from qinspect.tui.screens.error import ErrorScreen
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.screens.picker import PickerScreen
from qinspect.tui.structs import L2Model, StructKind, StructRef
from qinspect.tui.views.cache import CacheLabView
from qinspect.tui.views.guest import GuestMapView
from qinspect.tui.views.host import HostLayoutView
from qinspect.tui.views.structures import StructuresView
from qinspect.tui.widgets.grid import ClusterGrid

SIZE = (120, 40)


def plain(renderable: object, width: int = 60) -> str:
    """What a Rich renderable says, as plain text."""
    console = Console(width=width, record=True, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def inspector_text(view: GuestMapView) -> str:
    return plain(view._inspect())


async def settle(pilot, app: QInspectApp) -> None:  # type: ignore[no-untyped-def]
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def main_screen(app: QInspectApp) -> MainScreen:
    screen = app.screen
    assert isinstance(screen, MainScreen), type(screen)
    return screen


async def test_views_switch_on_number_keys(made: dict[str, Path]) -> None:
    app = QInspectApp(str(made["ext"]))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        for key, vid in zip("2345671", ("guest", "host", "structures", "cache", "diagnostics", "chain", "overview"),
                            strict=True):
            await pilot.press(key)
            await pilot.pause()
            assert main.active_view == vid


async def test_guest_map_keys_move_the_cursor(made: dict[str, Path]) -> None:
    app = QInspectApp(str(made["ext"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = main_screen(app).view("guest")
        assert isinstance(view, GuestMapView)
        grid = view.grid
        assert grid.has_focus
        while grid.zoom:  # zoom in to one cluster per cell
            await pilot.press("plus")
        await pilot.press("plus")  # past 1:1, cells get wider
        assert grid.cpc == 1 and grid.cell_w >= 2
        while grid.cell_w > 1:
            await pilot.press("minus")
        assert grid.cpc == 1
        await pilot.press("right", "right", "l")
        assert grid.cursor == 3
        await pilot.press("left", "h")
        assert grid.cursor == 1
        await pilot.press("down")
        assert grid.cursor == 1 + grid.cols
        await pilot.press("k")
        assert grid.cursor == 1
        await pilot.press("minus")
        assert grid.zoom == 1 and grid.cursor_cell == 0
        await pilot.press("end")
        assert grid.cursor_cell == grid.n_cells - 1
        await pilot.press("home")
        assert grid.cursor == 0


async def test_inspector_shows_the_l2_entry_and_subcluster_bitmap(samples) -> None:  # type: ignore[no-untyped-def]
    path = samples.path("extl2_64k")
    app = QInspectApp(str(path), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = main_screen(app).view("guest")
        assert isinstance(view, GuestMapView)
        await pilot.press("g")
        await pilot.press(*"0x20000", "enter")
        await pilot.pause()
        assert view.grid.cursor == 2
        text = inspector_text(view)
        with open_image(path) as img:
            lk = img.lookup(0x20000)
        assert lk.l2_bitmap
        assert "L2 entry 2" in text
        assert f"{lk.l2_entry:016x}" in text
        assert f"{lk.l2_bitmap:016x}" in text
        assert f"at       {lk.l2_entry_offset:#x}" in text
        # the A and Z rows of the subcluster bitmap, bit 0 first
        a_bits = "".join(str(lk.l2_bitmap >> k & 1) for k in range(32))
        z_bits = "".join(str(lk.l2_bitmap >> (32 + k) & 1) for k in range(32))
        lines = text.splitlines()
        a_line = next(ln for ln in lines if ln.startswith("A "))
        z_line = next(ln for ln in lines if ln.startswith("Z "))
        assert a_line[2:].replace(" ", "") == a_bits
        assert z_line[2:].replace(" ", "") == z_bits
        # the subcluster cursor moves with ] and names the subcluster's state
        await pilot.press("right_square_bracket")
        assert view.sc == 1
        assert "subcluster 1" in inspector_text(view)


async def test_inspector_for_a_zoomed_out_cell_counts_states(made: dict[str, Path]) -> None:
    app = QInspectApp(str(made["ext"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = main_screen(app).view("guest")
        assert isinstance(view, GuestMapView)
        view.grid.set_zoom(4)
        await pilot.pause()
        text = inspector_text(view)
        assert "16 clusters" in text
        assert "data" in text and "unallocated" in text


async def test_enter_on_the_map_opens_the_l2_entry_in_structures(samples) -> None:  # type: ignore[no-untyped-def]
    path = samples.path("basic64k")
    app = QInspectApp(str(path), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        assert view.goto("2M") is None
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        await pilot.pause()
        assert main.active_view == "structures"
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        model = st.model
        assert isinstance(model, L2Model)
        with open_image(path) as img:
            lk = img.lookup(2 << 20)
        assert model.start == lk.l2_offset
        assert st.table.cursor == lk.l2_index == 32
        assert model.span(st.table.cursor) == (lk.l2_entry_offset, lk.l2_entry_offset + 8)
        assert int(model.entries[st.table.cursor]) == lk.l2_entry
        # the hex view highlights the entry's 8 bytes
        hexview = st.query_one("#st-hex")
        assert hexview.highlight == (lk.l2_entry_offset, lk.l2_entry_offset + 8)
        # and back: enter on an L2 entry goes to the guest map at its offset
        await pilot.press("down", "enter")
        await pilot.pause()
        assert main.active_view == "guest"
        assert view.grid.cursor == lk.l2_index + 1


async def test_selecting_an_l2_entry_moves_the_map_cursor(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("basic64k")), view="structures")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        img = main.session.img
        l2 = int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00
        st.show_ref(StructRef(StructKind.L2, index=0, offset=l2, row=16))
        st.table.focus()
        await pilot.pause()
        await pilot.press("down", "down")
        await pilot.pause()
        gm = main.view("guest")
        assert isinstance(gm, GuestMapView)
        assert gm.grid.cursor == 18
        assert main.active_view == "structures"


async def test_structures_tree_expands_l1_into_l2_tables(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("c512")), view="structures")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        st = main_screen(app).view("structures")
        assert isinstance(st, StructuresView)
        tree = st.struct_tree
        tree.focus()
        l1_node = next(n for n in st._walk(tree.root) if n.data is not None and n.data.kind is StructKind.L1)
        tree.move_cursor(l1_node)
        await pilot.pause()
        assert st.model is not None and st.model.kind == "l1"
        await pilot.press("space")
        await pilot.pause()
        kids = [n for n in l1_node.children if n.data is not None]
        img = main_screen(app).session.img
        assert len(kids) == int((img.l1_table != 0).sum())
        await pilot.press("down")
        await pilot.pause()
        assert isinstance(st.model, L2Model)
        # enter on an L1 row drills into its L2 table
        st.show_ref(StructRef(StructKind.L1, offset=img.header.l1_table_offset))
        st.table.focus()
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(st.model, L2Model) and st.model.l1_index == 0


async def test_refcount_block_rows_and_host_link(samples) -> None:  # type: ignore[no-untyped-def]
    path = samples.path("refcount1")
    app = QInspectApp(str(path), view="structures")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        img = main.session.img
        blk = int(img.refcount_table[0]) & ~0x1FF
        st.show_ref(StructRef(StructKind.REFCOUNT_BLOCK, index=0, offset=blk, row=3))
        st.table.focus()
        await pilot.pause()
        assert st.model is not None
        row = st.model.row(3)
        assert row[2][0] == str(img.refcount(3))
        await pilot.press("enter")
        await pilot.pause()
        assert main.active_view == "host"
        host = main.view("host")
        assert isinstance(host, HostLayoutView)
        assert host.grid.cursor == 3


async def test_cache_lab_recomputes_when_an_input_changes(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("big_empty")), view="cache")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = main_screen(app).view("cache")
        assert isinstance(view, CacheLabView)
        before = view.model
        assert before is not None and before.l2_cache_size == 32 << 20  # 1 TiB: capped at 32 MiB
        assert before.coverage < 1
        field = view.query_one("#cl-l2_cache_size")
        field.focus()
        await pilot.press(*"128M")
        await pilot.pause()
        after = view.model
        assert after is not None and after.l2_cache_size == 128 << 20
        assert after.coverage == 1.0
        assert "128 MiB" in plain(view.render_result(), 100)
        # a geometry change: extended L2 needs twice the cache
        view.query_one("#cl-extended_l2").toggle()
        await pilot.pause()
        assert view.model is not None and view.model.max_l2_cache == 256 << 20
        # an impossible value is said in words, not raised
        field.value = "12q"
        await pilot.pause()
        assert "not a size" in plain(view.render_result(), 100)
        # esc leaves the input; number keys switch views again
        field.focus()
        await pilot.press("escape", "2")
        await pilot.pause()
        assert main_screen(app).active_view == "guest"


async def test_escape_cancels_a_scan_and_keeps_partial_results(made: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(session_mod, "SCAN_STEP_CLUSTERS", 512)  # one 4k-cluster L2 table per step
    real = guestmap_mod.GuestMap.compute

    def slow(self, img: Image, t0: int, t1: int) -> None:  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.01)
        real(self, img, t0, t1)

    monkeypatch.setattr(guestmap_mod.GuestMap, "compute", slow)
    app = QInspectApp(str(made["many"]))
    async with app.run_test(size=SIZE) as pilot:
        main = main_screen(app)
        gm = main.session.guest
        for _ in range(200):
            await pilot.pause(0.02)
            if gm.scanned_tables >= 5:
                break
        assert main.scanning
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not main.scanning
        done = gm.scanned_tables
        assert 0 < done < gm.n_tables
        assert "guest" in main.session.cancelled
        assert main.session.layout is None
        # partial results stay usable: the scanned part of the map is there
        assert int(gm.totals()[G.DATA]) == done * gm.l2_size
        await pilot.press("2")
        await pilot.pause()
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        assert "0x0" in inspector_text(view)
        # r resumes where it stopped
        monkeypatch.setattr(guestmap_mod.GuestMap, "compute", real)
        await pilot.press("r")
        await settle(pilot, app)
        assert gm.complete


async def test_first_frame_reads_no_l2_table_and_no_refcount_block(made: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    for name in ("read_l2_table", "read_l2_batch", "refcount_block", "stored_refcounts"):
        real = getattr(Image, name)

        def spy(self, *a, _real=real, _name=name):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(Image, name, spy)
    app = QInspectApp(str(made["many"]), scan=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        assert calls == []
        await pilot.press("r")  # the scans, once asked for, do read them
        await settle(pilot, app)
        assert "read_l2_batch" in calls


async def test_visible_region_is_read_before_the_scan(made: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ClusterGrid, "fit_zoom", lambda self: self.set_zoom(0))  # open at 1 cluster per cell
    app = QInspectApp(str(made["many"]), scan=False, view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        gm = main.session.guest
        # only the tables on screen were classified (about 40 rows of 64 clusters of 4 KiB)
        assert 0 < gm.scanned_tables <= 8 < gm.n_tables
        assert gm.state_of(0) == G.DATA
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        await pilot.press("pagedown", "pagedown")
        await settle(pilot, app)
        assert gm.state_of(view.grid.cursor) == G.DATA


async def test_command_palette_goes_to_an_l2_table(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("c512")))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"l2 32")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.pause()
        main = main_screen(app)
        assert main.active_view == "structures"
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        assert isinstance(st.model, L2Model) and st.model.l1_index == 32


async def test_command_palette_goes_to_a_snapshot(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("snapshots")))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+p")
        await pilot.press(*"snapshot second")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.pause()
        main = main_screen(app)
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        assert st.ref is not None and st.ref.kind is StructKind.SNAPSHOT_L1
        assert main.session.img.snapshots[st.ref.owner].name == "second"


async def test_find_moves_to_the_next_cluster_in_a_state(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("zstd")), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        view.grid.set_zoom(0)
        await pilot.pause()
        await pilot.press("slash", *"compressed", "enter")
        await pilot.pause()
        first = view.grid.cursor
        assert main.session.guest.state_of(first) == G.COMPRESSED
        await pilot.press("n")
        await pilot.pause()
        assert view.grid.cursor > first
        assert main.session.guest.state_of(view.grid.cursor) == G.COMPRESSED


async def test_host_layout_names_owner_and_guest_offsets(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("basic64k")), view="host")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        view = main.view("host")
        assert isinstance(view, HostLayoutView)
        lay = main.session.layout
        assert lay is not None
        with open_image(samples.path("basic64k")) as img:
            host = img.lookup(2 << 20).host_offset
        assert host is not None
        assert view.goto(hex(host)) is None
        await pilot.pause()
        text = plain(view._inspect())
        assert "data" in text
        assert "guest 0x200000" in text
        await pilot.press("enter")  # the one entry that points here: the L2 entry, in Structures
        await settle(pilot, app)
        assert main.active_view == "structures"
        st = main.view("structures")
        assert isinstance(st, StructuresView) and isinstance(st.model, L2Model)
        assert st.table.cursor == (2 << 20) // (64 << 10) % st.model.img.header.l2_size
        await pilot.press("enter")  # and from the entry to the guest map
        await settle(pilot, app)
        assert main.active_view == "guest"
        gm = main.view("guest")
        assert isinstance(gm, GuestMapView)
        assert gm.grid.cursor == (2 << 20) // (64 << 10)


async def test_help_panel_toggles(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("basic64k")), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause()
        assert app.screen.query("HelpPanel")
        await pilot.press("f1")
        await pilot.pause()
        assert not app.screen.query("HelpPanel")


async def test_mouse_click_selects_a_cell(samples) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("basic64k")), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = main_screen(app).view("guest")
        assert isinstance(view, GuestMapView)
        grid = view.grid
        grid.set_zoom(0)
        await pilot.pause()
        await pilot.click(ClusterGrid, offset=(grid.label_width + 5 * grid.cell_w, 1))
        await pilot.pause()
        assert grid.cursor == grid.cols + 5


async def test_not_qcow2_shows_an_error_screen(made: dict[str, Path]) -> None:
    app = QInspectApp(str(made["raw"]))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, ErrorScreen)
        assert "not a qcow2 image" in app.screen.message
        await pilot.press("q")
    assert app.return_code == 0


async def test_missing_backing_file_is_shown_not_raised(made: dict[str, Path]) -> None:
    app = QInspectApp(str(made["orphan"]))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        main = main_screen(app)
        assert main.session.chain_error is not None
        assert "base.qcow2" in main.session.chain_error
        assert str(made["orphan"].parent) not in main.session.chain_error
        for key in "2345671":
            await pilot.press(key)
            await pilot.pause()
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        assert view.goto("0") is None
        assert "backing chain broken" in inspector_text(view)


async def test_file_picker_lists_qcow2_files_by_magic(made: dict[str, Path]) -> None:
    root = made["ext"].parent
    app = QInspectApp(None, root=str(root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert isinstance(screen, PickerScreen)
        names = [p for p, _s in screen.files]
        assert "ext.qcow2" in names and "many.qcow2" in names
        assert "raw.img" not in names
        await pilot.press("slash", *"ext")
        await pilot.pause()
        assert screen.table.row_count == 1
        await pilot.press("enter")
        await settle(pilot, app)
        assert isinstance(app.screen, MainScreen)
        assert app.screen.session.name.endswith("ext.qcow2")


@pytest.mark.parametrize("key", ["g", "slash"])
async def test_prompts_cancel_with_escape(samples, key: str) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path("basic64k")), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press(key)
        await pilot.pause()
        assert not isinstance(app.screen, MainScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
