"""Following a live image: only what changed is re-read, new allocations are found (and underlined
on the host map), a replaced file is reported instead of mixed in (tui/follow.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qinspect.analysis.layout import Owner
from qinspect.tui.app import QInspectApp
from qinspect.tui.follow import refresh_changed
from qinspect.tui.palette import G
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.session import Session
from qinspect.tui.views.host import HostLayoutView
from qinspect.tui.widgets.grid import ClusterGrid

from .conftest import make_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


def write(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def test_new_writes_are_found_and_nothing_is_read_when_nothing_changed(tmp_path: Path) -> None:
    img = make_image(tmp_path / "live.qcow2", "64M", "", ("write -P 1 0 64k",))
    s = Session(str(img))
    try:
        s.scan_guest(lambda d, t: None, lambda: False)
        assert int(s.guest.totals()[G.DATA]) == 1
        assert refresh_changed(s) is None  # same size and mtime: nothing read
        write(img, "write -P 2 1M 128k", "write -P 3 40M 64k")
        changes = refresh_changed(s)
        assert changes is not None and not changes.replaced
        assert changes.new_clusters == 3
        assert int(s.guest.totals()[G.DATA]) == 4
        assert s.layout is None and s.pending_steps()  # whole-file analyses are recomputed
        assert (1 << 20) // 65536 in s.fresh_clusters
        assert refresh_changed(s) is None
    finally:
        s.close()


def test_a_new_l2_table_past_the_old_ones_grows_the_map(tmp_path: Path) -> None:
    img = make_image(tmp_path / "grow.qcow2", "8G", "", ("write -P 1 0 64k",))
    s = Session(str(img))
    try:
        s.scan_guest(lambda d, t: None, lambda: False)
        write(img, "write -P 2 6G 64k")
        changes = refresh_changed(s)
        assert changes is not None and changes.new_clusters >= 1
        assert s.guest.state_of((6 << 30) // 65536) == G.DATA
    finally:
        s.close()


def test_a_replaced_file_is_reported(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "64M", "", ("write -P 1 0 64k",))
    other = make_image(tmp_path / "b.qcow2", "64M", "", ("write -P 1 0 1M",))
    s = Session(str(img))
    try:
        os.replace(other, img)
        changes = refresh_changed(s)
        assert changes is not None and changes.replaced
        assert "replaced" in (s.changed() or "")
    finally:
        s.close()


def underlined(grid: ClusterGrid, unit: int) -> bool:
    """Whether the grid draws host cluster `unit` underlined (as it is on screen)."""
    cell = unit >> grid.zoom
    row, col = divmod(cell, grid.cols)
    grid.scroll_to(y=row, animate=False, immediate=True)
    x = grid.label_width + col * grid.cell_w
    at = 0
    for seg in grid.render_line(row - grid.scroll_offset.y):
        if at <= x < at + seg.cell_length:
            return bool(seg.style and seg.style.underline)
        at += seg.cell_length
    raise AssertionError(f"cluster {unit} is not on screen")


async def test_following_underlines_new_host_clusters_on_the_host_map(tmp_path: Path) -> None:
    src = make_image(tmp_path / "orig.qcow2", "1G", "", ("write -P 1 0 64k",))
    img = tmp_path / "live.qcow2"
    shutil.copyfile(src, img)  # written below: a copy, never the original
    app = QInspectApp(str(img), view="host")
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(3):
            await pilot.pause()
            await app.workers.wait_for_complete()
        screen = app.screen
        assert isinstance(screen, MainScreen)
        view = screen.query_one(HostLayoutView)
        s = view.session
        assert s.layout is not None
        old_data = [i for i in range(s.layout.nb_clusters) if s.layout.owner_at(i * 65536) == Owner.DATA]
        assert len(old_data) == 1
        await pilot.press("f")
        # new data clusters and a new L2 table (the 2nd, for guest 600M..) with its data
        write(img, "write -P 2 1M 128k", "write -P 3 600M 64k")
        for _ in range(30):  # the follow timer looks every second; then the layout is rescanned
            await pilot.pause(0.2)
            await app.workers.wait_for_complete()
            if s.layout is not None and s.follow_host_base is not None and not s.scanning:
                break
        await pilot.pause()
        lay = s.layout
        assert lay is not None
        mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(img)],
                                           check=True, capture_output=True, text=True).stdout)
        new_data = sorted({(m["offset"] + k) // 65536 for m in mapped if m["data"] and m["start"] >= 1 << 20
                           for k in range(0, m["length"], 65536)})
        assert len(new_data) == 3
        new_l2 = [i for i in range(lay.nb_clusters) if lay.owner_at(i * 65536) == Owner.L2][-1:]
        grid = view.grid
        assert grid.zoom == 0
        for unit in new_data + new_l2:
            assert lay.owner_at(unit * 65536) in (Owner.DATA, Owner.L2)
            assert underlined(grid, unit), unit
        for unit in range(lay.nb_clusters):
            if unit not in new_data + new_l2 and unit != grid.cursor:
                assert not underlined(grid, unit), (unit, lay.owner_at(unit * 65536))
