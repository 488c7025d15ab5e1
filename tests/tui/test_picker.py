"""The picker as a dashboard: it fills while it scans, lists sizes and backing files, groups chains,
sorts with `s`, opens with `qinspect DIR`, is reached with `o`, and shows each image's worst finding."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens import picker as picker_mod
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.screens.picker import PickerScreen, SortKey

from .conftest import make_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SIZE = (140, 30)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tree")
    make_image(d / "a-base.qcow2", "64M", "", ("write -P 1 0 1M",))
    make_image(d / "b-over.qcow2", "64M", "", ("write -P 2 0 64k",), backing="a-base.qcow2")
    make_image(d / "c-big.qcow2", "1G", "preallocation=metadata")
    junk = d / "junk"
    junk.mkdir()
    for i in range(400):
        (junk / f"f{i:04d}.txt").write_bytes(b"not an image" * 10)
    return d


async def settle(pilot, app: QInspectApp) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        await pilot.pause()
        await app.workers.wait_for_complete()
    await pilot.pause()


async def test_first_rows_show_before_a_slow_scan_finishes(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = picker_mod.probe

    def slow(root: str, rel: str) -> picker_mod.Entry | None:
        time.sleep(0.01)  # 400 junk files: about 4 s for the whole walk
        return real(root, rel)

    monkeypatch.setattr(picker_mod, "probe", slow)
    app = QInspectApp(str(tree))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, PickerScreen)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not screen.table.row_count:
            await pilot.pause(0.05)
        assert screen.table.row_count >= 1  # the images at the top of the tree are listed already...
        assert screen.scanning  # ...while the walk is still going through the junk
        screen.workers.cancel_all()


async def test_columns_chains_sort_and_worst_finding(tree: Path) -> None:
    app = QInspectApp(str(tree))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert isinstance(screen, PickerScreen)
        assert not screen.scanning
        by = {e.path: e for e in screen.entries}
        assert set(by) == {"a-base.qcow2", "b-over.qcow2", "c-big.qcow2"}
        big = by["c-big.qcow2"]
        assert big.virtual_size == 1 << 30 and big.file_size > big.disk_usage  # apparent size vs disk usage
        assert by["b-over.qcow2"].backing == "a-base.qcow2"
        # grouped by chain: the overlay right under its backing file
        rows = [screen.table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(screen.table.row_count)]
        assert rows.index("b-over.qcow2") == rows.index("a-base.qcow2") + 1
        assert by["b-over.qcow2"].depth == 1
        # every image got its quick diagnosis
        assert all(e.diagnosed for e in screen.entries)
        # s cycles the sort column: name, virtual, ... (largest first)
        await pilot.press("s", "s")
        await pilot.pause()
        assert screen.sort_key is SortKey.VIRTUAL
        first = screen.table.coordinate_to_cell_key((0, 0)).row_key.value
        assert first == "c-big.qcow2"
        await pilot.press("r")
        await pilot.pause()
        assert screen.table.coordinate_to_cell_key((0, 0)).row_key.value != "c-big.qcow2"
        # enter opens; o from the image comes back to the picker in its directory
        await pilot.press("enter")
        await settle(pilot, app)
        assert isinstance(app.screen, MainScreen)
        await pilot.press("o")
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        assert app.screen.root == str(tree)
