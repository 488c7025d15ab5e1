"""The first frame is drawn from the image's metadata alone; scans do each thing once and keep
only what the views read (issue 12's TUI targets: first frame, memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from qinspect.tui import session as session_mod
from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.session import Step
from qinspect.tui.widgets.viewstrip import ViewStrip
from tests.tui.conftest import make_image

SIZE = (120, 40)

FIRST_FRAME = textwrap.dedent(r"""
    import asyncio, sys
    from qinspect.tui.app import QInspectApp
    seen = {}
    def text_of(update):
        # a full update holds the screen's lines; a partial one rows of chops (x -> strip)
        strips = getattr(update, "strips", None)
        if strips is not None:  # each line: the strips of one row
            return "\n".join("".join(st.text for st in line) for line in strips)
        return "\n".join("".join(st.text for _x, st in sorted(row.items()) if st is not None)
                         for row in getattr(update, "chops", []))
    original = QInspectApp._display
    def _display(self, screen, renderable):
        if renderable is not None and "frame" not in seen and type(screen).__name__ == "MainScreen":
            seen["frame"] = True
            seen["numpy"] = "numpy" in sys.modules
            seen["loaded"] = screen.session.loaded
            seen["text"] = text_of(renderable)
        original(self, screen, renderable)
    QInspectApp._display = _display
    async def main():
        app = QInspectApp(sys.argv[1], scan=False)
        async with app.run_test(size=(120, 40)) as pilot:
            while "frame" not in seen:
                await pilot.pause(0.01)
            await pilot.pause(0.2)
            seen["loaded_after"] = app.screen.session.loaded
            seen["sections"] = bool(app.screen.query("#ov-header"))
            app.exit(0)
    asyncio.run(main())
    print(seen)
""")


def test_first_frame_needs_no_numpy_and_no_tables(tmp_path: Path) -> None:
    img = make_image(tmp_path / "ff.qcow2", "3G", "cluster_size=128k", ("write -P 0x5a 0 64k",))
    r = subprocess.run([sys.executable, "-c", FIRST_FRAME, str(img)], capture_output=True, text=True, timeout=120,
                       check=True)
    seen = eval(r.stdout.strip().splitlines()[-1])  # a dict literal printed by the child
    assert seen["frame"]
    assert not seen["numpy"], "numpy was imported before the first frame"
    assert not seen["loaded"], "the tables were read before the first frame"
    # ... and the first frame is the real first screen, with the header's data
    text = seen["text"]
    assert "3 GiB virtual" in text and "cluster 128 KiB" in text  # the header line
    assert "1 Overview" in text and "7 Chain" in text  # the views' strip
    assert "qcow2 v3 (compat 1.1)" in text and "16-bit, 65,536 per block" in text  # the Image section
    assert seen["loaded_after"] and seen["sections"]


def test_importing_the_tui_imports_no_numpy() -> None:
    code = "import sys, qinspect.tui.app; print('numpy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert r.stdout.strip() == "False"


async def test_scans_run_each_step_once_and_drop_what_no_view_reads(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    img = make_image(tmp_path / "s.qcow2", "256M", "cluster_size=64k",
                     ("write -P 1 0 1M", "write -P 2 100M 64k"))
    calls: list[str] = []
    import qinspect.analysis.check as check_mod
    import qinspect.analysis.space as space_mod

    real_check, real_space = check_mod.check_image, space_mod.compute_space
    monkeypatch.setattr(check_mod, "check_image", lambda *a, **k: calls.append("check") or real_check(*a, **k))
    monkeypatch.setattr(space_mod, "compute_space", lambda *a, **k: calls.append("space") or real_space(*a, **k))
    app = QInspectApp(str(img))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(200):
            await pilot.pause(0.05)
            if isinstance(app.screen, MainScreen) and app.screen.session.scanning is False \
                    and not app.screen.session.pending_steps():
                break
        s = app.screen.session
        assert not s.pending_steps() and not s.errors
        # check comes from the layout's walk, space from diagnose: neither runs again
        assert "check" not in calls
        assert calls.count("space") <= 1
        assert s.check is not None and s.layout is not None
        assert len(s.check.reference) == 0 and len(s.check.stored) == 0  # the layout holds them
        assert s.layout.stored_refcount.dtype == np.uint16  # the image's 16-bit refcounts
        assert s.check.leaks == 0 and s.check.corruptions == 0
        n = min(len(s.layout.reference), len(s.layout.stored_refcount))
        assert n and (s.layout.reference[:n] == s.layout.stored_refcount[:n]).all()


async def test_the_view_strip_follows_keys_and_clicks(tmp_path: Path) -> None:
    img = make_image(tmp_path / "v.qcow2", "64M")
    app = QInspectApp(str(img), scan=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        main = app.screen
        assert isinstance(main, MainScreen)
        strip = main.query_one(ViewStrip)
        await pilot.press("3")
        await pilot.pause(0.1)
        assert main.active_view == "host" and strip.active == "host"
        # a click on the label of view 6 shows it
        col = next(a for a, _b, vid in strip._spans if vid == "diagnostics")
        await pilot.click(ViewStrip, offset=(col + 2, 0))
        await pilot.pause(0.2)
        assert main.active_view == "diagnostics" and strip.active == "diagnostics"
        await pilot.press("backspace")
        await pilot.pause(0.1)
        assert main.active_view == "host"


def test_session_without_load_reads_metadata_only(tmp_path: Path) -> None:
    img = make_image(tmp_path / "m.qcow2", "1G")
    s = session_mod.Session(str(img), load=False)
    try:
        assert not s.loaded and s.meta.header.size == 1 << 30 and s.depth == 1
        assert Step.LAYOUT in s.pending_steps()  # asking about the guest map loads the tables
        assert s.loaded
    finally:
        s.close()
