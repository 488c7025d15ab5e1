"""The TUI under the amplification attacks of tests/fuzz/amplify.py: every view on each image
renders (or shows an error view), the scans finish or are cancelled, the app keeps answering keys
and quits within a bound, and (in a child process, measured by GNU time) its peak RSS stays within
the engine's budget of 2 x metadata + 150 MiB (the file size stands in for the metadata).

The in-process Pilot test uses small versions (counts scaled down, the same structure); the child
process runs somewhat larger ones (`CHILD_SCALE`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import needs_qemu
from fuzz.amplify import GENERATORS

MiB = 1 << 20
SMALL = 0.02
SCAN_WAIT = 60.0  # seconds the scans may take before the test cancels them (Escape)
QUIT_BOUND = 10.0  # seconds from `q` to the app having exited
GNU_TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
# Counts the child runs at: the same structure, scaled so that a loaded 2-core CI machine stays
# within seconds per attack (the full-scale TUI figures are in the benchmark report).
CHILD_SCALE = {"shared_l2": 0.01, "shared_snapshots": 0.05, "snapshot_l1_copies": 1.0,
               "alternating_extents": 0.05, "shared_bitmap_tables": 0.05}

ESC, BEL = "\x1b", "\x07"


async def drive(path: str, scan_wait: float = SCAN_WAIT) -> dict[str, float | bool | str]:
    """Open `path` in the app, visit every view, wait for (or cancel) the scans, check that keys are
    answered, quit. Returns what happened; raises on a crash (Pilot re-raises app exceptions)."""
    from qinspect.tui.app import QInspectApp
    from qinspect.tui.screens.error import ErrorScreen
    from qinspect.tui.screens.main import VIEWS, MainScreen

    out: dict[str, float | bool | str] = {}
    app = QInspectApp(path, name=Path(path).name)
    t0 = time.monotonic()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        screen = app.screen
        if isinstance(screen, ErrorScreen):
            out["error-screen"] = screen.message
            await pilot.press("q")
            return out
        assert isinstance(screen, MainScreen)
        for idx, (vid, _label) in enumerate(VIEWS):
            await pilot.press(str(idx + 1))
            await pilot.pause()
            assert screen.active_view == vid, (vid, screen.active_view)
        try:
            await asyncio.wait_for(app.workers.wait_for_complete(), scan_wait)
            out["scans"] = "finished"
        except TimeoutError:
            await pilot.press("escape")
            await asyncio.wait_for(app.workers.wait_for_complete(), 20)
            out["scans"] = "cancelled"
        out["scan-seconds"] = time.monotonic() - t0
        await pilot.pause()
        # Still answering: every view again, each switch taking effect.
        for idx, (vid, _label) in enumerate(VIEWS):
            t = time.monotonic()
            await pilot.press(str(idx + 1))
            await pilot.pause()
            assert screen.active_view == vid
            out["slowest-key"] = max(float(out.get("slowest-key", 0.0)), time.monotonic() - t)
        assert app.screen is screen
        # Nothing from the image reaches the screen as a control character.
        for idx in range(len(VIEWS)):
            await pilot.press(str(idx + 1))
            await pilot.pause()
            shot = app.export_screenshot()
            assert ESC not in shot and BEL not in shot, VIEWS[idx]
        t = time.monotonic()
        await pilot.press("q")
        await pilot.pause()
    out["quit-seconds"] = time.monotonic() - t
    out["total-seconds"] = time.monotonic() - t0
    return out


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-img and qemu-io")
    d = tmp_path_factory.mktemp("amplify-tui")
    out = {}
    for name, gen in GENERATORS.items():
        (d / name).mkdir()
        out[name] = gen(d / name, SMALL)
    return out


@needs_qemu
@pytest.mark.parametrize("name", list(GENERATORS))
async def test_every_view_under_attack(small_images: dict[str, Path], name: str) -> None:
    res = await drive(str(small_images[name]))
    assert "error-screen" in res or res["scans"] in ("finished", "cancelled"), res
    if "quit-seconds" in res:
        assert float(res["quit-seconds"]) < QUIT_BOUND, res


CHILD = r"""
import asyncio, json, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from test_amplification_tui import drive
print(json.dumps(asyncio.run(drive(sys.argv[1]))))
"""


@needs_qemu
@pytest.mark.skipif(GNU_TIME is None, reason="needs GNU time for the peak RSS")
@pytest.mark.parametrize("name", list(GENERATORS))
def test_tui_memory_under_attack(tmp_path: Path, name: str) -> None:
    path = GENERATORS[name](tmp_path, CHILD_SCALE[name])
    here = Path(__file__).resolve().parent
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        r = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss.name, sys.executable, "-c", CHILD, str(path), str(here),
                            str(here.parent)], capture_output=True, text=True, timeout=300, check=False)
        peak_kb = int(Path(rss.name).read_text().split()[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    budget_kb = (2 * path.stat().st_size + 150 * MiB) // 1024
    assert peak_kb <= budget_kb, f"peak RSS {peak_kb} KiB > budget {budget_kb} KiB ({r.stdout.strip()})"
