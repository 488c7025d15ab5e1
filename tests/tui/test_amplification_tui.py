"""The TUI under the amplification attacks of tests/fuzz/amplify.py: every view on each image
renders (or shows an error view), the scans finish or are cancelled, the app keeps answering keys
and quits within a bound, and (in a child process, measured by GNU time) its peak RSS stays within
the engine's budget of 2 x metadata + 150 MiB (the file size stands in for the metadata).

Each attack runs in its own child process (Pilot, `App.run_test`, headless), at full scale (the
counts of tests/fuzz/amplify.py; `CHILD_SCALE` can scale one down, the same structure with fewer
entries). What keeps each within the budget: `shared_snapshots` (65,536 snapshots on one L1 table)
and `shared_bitmap_tables` (65,535 bitmaps): every image the TUI opens (the main thread's, the
scans' pool's, the guest filesystems' worker's) shares one parse of the snapshot table and bitmap
directory (`SharedMetadata`), the snapshot table stored compactly; `shared_l2` (one L2 table behind
2 Mi L1 entries): the check's and layout's work per L1 entry is done in bounded chunks, and the
L1 table is read once for all open images.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_qemu
from fuzz.amplify import GENERATORS
from textual.worker import WorkerState

MiB = 1 << 20
SCAN_WAIT = 60.0  # seconds the scans may take before the test cancels them (Escape)
QUIT_BOUND = 10.0  # seconds from `q` to the app having exited
CANCEL_BOUND = 20.0  # seconds from Escape to every scan having stopped
GNU_TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
CHILD_SCALE = {"shared_l2": 1.0, "shared_snapshots": 1.0, "snapshot_l1_copies": 1.0,
               "alternating_extents": 1.0, "shared_bitmap_tables": 1.0}

ESC, BEL = "\x1b", "\x07"
_BUSY = (WorkerState.PENDING, WorkerState.RUNNING)


async def _settled(app: Any, timeout: float) -> bool:
    """True once no worker of the app is pending or running (finished, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while any(w.state in _BUSY for w in app.workers):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


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
        if await _settled(app, scan_wait):
            out["scans"] = "finished"
        else:
            # Still scanning: Escape must stop every scan (cancellable, not merely abandoned).
            await pilot.press("escape")
            assert await _settled(app, CANCEL_BOUND), [w.name for w in app.workers if w.state in _BUSY]
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


CHILD = r"""
import asyncio, json, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from test_amplification_tui import drive
print(json.dumps(asyncio.run(drive(sys.argv[1]))))
"""


@needs_qemu
@pytest.mark.parametrize("name", list(GENERATORS))
def test_tui_under_attack(tmp_path: Path, name: str) -> None:
    path = GENERATORS[name](tmp_path, CHILD_SCALE[name])
    here = Path(__file__).resolve().parent
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        timed = [GNU_TIME, "-f", "%M", "-o", rss.name] if GNU_TIME else []
        r = subprocess.run([*timed, sys.executable, "-c", CHILD, str(path), str(here), str(here.parent)],
                           capture_output=True, text=True, timeout=300, check=False)
        words = Path(rss.name).read_text().split()
        peak_kb = int(words[-1]) if words and words[-1].isdigit() else 0
    assert r.returncode == 0, r.stderr[-3000:]  # Pilot re-raises any exception of the app
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error-screen" in res or res["scans"] in ("finished", "cancelled"), res
    if "quit-seconds" in res:
        assert res["quit-seconds"] < QUIT_BOUND, res
    budget_kb = (2 * path.stat().st_size + 150 * MiB) // 1024
    assert peak_kb <= budget_kb or not GNU_TIME, f"peak RSS {peak_kb} KiB > budget {budget_kb} KiB ({r.stdout.strip()})"
