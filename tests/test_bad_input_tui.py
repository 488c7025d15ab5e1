"""Bad input in the TUI (issue #6): the error screen says what is wrong; hostile names never crash.

`qinspect FILE` on something that is not a usable qcow2 image shows the ErrorScreen with the same
message the CLI prints; an image whose snapshot, bitmap, backing file or own file name looks like
Rich markup (`[/x]`, `[red]...`) opens and every view renders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Samples

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.error import ErrorScreen
from qinspect.tui.screens.main import MainScreen

SIZE = (120, 40)
QEMU_IMG = shutil.which("qemu-img")


def _make(tmp_path: Path, kind: str, samples: Samples) -> Path:
    if kind == "missing":
        return tmp_path / "nope.qcow2"
    if kind == "directory":
        d = tmp_path / "dir.qcow2"
        d.mkdir()
        return d
    if kind == "fifo":
        p = tmp_path / "fifo.qcow2"
        os.mkfifo(p)
        return p
    p = tmp_path / f"bad.{kind}"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "raw":
        p.write_bytes(bytes(1 << 20))
    elif kind == "truncated":
        p.write_bytes(samples.path("basic64k").read_bytes()[:50])
    else:
        if QEMU_IMG is None:
            pytest.skip("qemu-img not installed")
        subprocess.run([QEMU_IMG, "create", "-q", "-f", kind, str(p), "1M"], check=True, capture_output=True)
    return p


@pytest.mark.parametrize(("kind", "says"), [
    ("missing", "no such file"), ("fifo", "FIFO"), ("empty", "empty file"),
    ("raw", "not a qcow2 image"), ("truncated", "truncated header"), ("qcow", "qcow (version 1)"),
    ("vmdk", "VMDK"), ("vdi", "VDI"), ("vpc", "VHD"), ("vhdx", "VHDX"), ("qed", "QED"),
])
async def test_error_screen_for_bad_input(tmp_path: Path, samples: Samples, kind: str, says: str) -> None:
    path = _make(tmp_path, kind, samples)
    app = QInspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ErrorScreen), type(screen)
        assert says in screen.message, screen.message
        assert "Traceback" not in screen.message
        await pilot.press("q")


async def test_a_directory_opens_the_picker_there(tmp_path: Path, samples: Samples) -> None:
    from qinspect.tui.screens.picker import PickerScreen

    path = _make(tmp_path, "directory", samples)  # `qinspect DIR`: the images below DIR, not an error
    app = QInspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        assert app.screen.root == str(path)
        await pilot.press("escape")


@pytest.mark.skipif(QEMU_IMG is None or shutil.which("qemu-io") is None, reason="qemu-img/qemu-io not installed")
async def test_markup_like_names_do_not_crash_the_views(tmp_path: Path) -> None:
    assert QEMU_IMG is not None
    base = tmp_path / "[red]base.qcow2"
    top = tmp_path / "[bold]top.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)], check=True,
                   cwd=tmp_path)
    subprocess.run([QEMU_IMG, "snapshot", "-c", "[/x]", str(top)], check=True)
    subprocess.run([QEMU_IMG, "bitmap", "--add", str(top), "[bold]b[/"], check=True)
    app = QInspectApp(str(top))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        assert isinstance(app.screen, MainScreen)
        for key in "2345671":
            await pilot.press(key)
            await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)


# Images qemu-img refuses to open (issue 9): the TUI still opens them and shows the header, with
# QEMU's reason among the problems (the error screen is only for files that are not qcow2 at all).
REFUSED = ["fid_l1_int64", "fid_l1_misaligned_empty", "fid_snap_misaligned_empty", "fid_ext_short",
           "fid_norefcount_table", "fid_features_named"]


@pytest.mark.parametrize("name", REFUSED)
async def test_refused_images_still_show_the_header(samples: Samples, name: str) -> None:
    app = QInspectApp(str(samples.path(name)))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        assert isinstance(app.screen, MainScreen), type(app.screen)
        img = app.screen.session.img  # type: ignore[attr-defined]
        assert img.open_refusals and img.header.cluster_size == 65536
        await pilot.press("q")
