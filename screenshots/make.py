#!/usr/bin/env python3
"""Render every view of the TUI on sample images to screenshots/*.svg and *.png.

    python3 screenshots/make.py            (from any directory; needs rsvg-convert for the PNGs)

Each picture runs the real app headless (`App.run_test`) on a sample image from sample_images/
(decompressed into a temporary directory), waits for every scan to finish, drives it to the
view shown, and saves the screen with `App.save_screenshot`. The PNGs are made from the SVGs by
`rsvg-convert` (librsvg2-bin).
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLES = ROOT / "sample_images"
SIZE = (120, 40)
sys.path.insert(0, str(ROOT))

from qinspect.tui.app import QInspectApp  # noqa: E402
from qinspect.tui.screens.main import MainScreen  # noqa: E402
from qinspect.tui.structs import StructKind, StructRef  # noqa: E402

Step = Callable[[Any, MainScreen], Awaitable[None]]


async def keys(pilot: Any, *k: str) -> None:
    await pilot.press(*k)
    await pilot.pause()


def press(*k: str) -> Step:
    async def step(pilot: Any, main: MainScreen) -> None:
        await keys(pilot, *k)

    return step


def guest_at(offset: int, zoom: int | None = None) -> Step:
    async def step(pilot: Any, main: MainScreen) -> None:
        view = main.view("guest")
        if zoom is not None:
            view.grid.set_zoom(zoom)  # type: ignore[attr-defined]
        view.show_offset(offset)  # type: ignore[attr-defined]
        await pilot.pause()

    return step


def l2_row(row: int) -> Step:
    async def step(pilot: Any, main: MainScreen) -> None:
        view = main.view("structures")
        img = main.session.img
        l2 = int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00
        view.show_ref(StructRef(StructKind.L2, index=0, offset=l2, row=row))  # type: ignore[attr-defined]
        view.table.focus()  # type: ignore[attr-defined]
        await pilot.pause()

    return step


def cache_input(field: str, value: str) -> Step:
    async def step(pilot: Any, main: MainScreen) -> None:
        from textual.widgets import Input

        main.view("cache").query_one(f"#cl-{field}", Input).value = value
        await pilot.pause()

    return step


def diag_evidence(finding: str) -> Step:
    """Select a finding in Diagnostics and follow its evidence (enter)."""
    async def step(pilot: Any, main: MainScreen) -> None:
        from textual.widgets import OptionList

        view = main.view("diagnostics")
        idx = next(i for i, it in enumerate(view.items) if it.id == finding)  # type: ignore[attr-defined]
        ol = view.query_one(OptionList)
        ol.highlighted = idx
        ol.focus()
        await pilot.pause()
        await keys(pilot, "enter")

    return step


# (file name, sample, first view, steps, what it shows[, terminal size])
SHOTS: list[tuple[Any, ...]] = [
    ("picker", "", "", [], "The picker: images below a directory, sizes, backing files, worst finding"),
    ("overview", "chain_top", "overview", [], "1 Overview of an extended-L2 overlay on a two-layer chain"),
    ("guest-map", "extl2_128k", "guest", [guest_at(2 * 131072 + 4 * 4096, zoom=0)],
     "2 Guest map: a cluster with mixed subclusters, its L2 entry and bitmap"),
    ("guest-map-chain", "chain_top", "guest", [guest_at(0x7FF000)],
     "2 Guest map of an overlay: clusters served by backing layers 1 and 2"),
    ("guest-map-zoomed", "fragmented", "guest", [], "2 Guest map of an 8 GiB disk, zoomed out"),
    ("host-layout", "fragmented", "host", [press("right", "right", "right", "right")],
     "3 Host layout: L2 tables scattered between data clusters"),
    ("structures", "extl2_128k", "structures", [l2_row(2)],
     "4 Structures: an extended L2 entry, its bytes coloured by field"),
    ("cache-lab", "big_empty", "cache", [cache_input("l2_cache_size", "64M")],
     "5 Cache lab: a 1 TiB disk with a 64 MiB L2 cache"),
    ("diagnostics", "lazy_dirty", "diagnostics", [], "6 Diagnostics: findings with evidence and fix"),
    ("chain", "longchain_4", "chain", [], "7 Chain: five layers and what each provides"),
    ("snapshots", "snapshots", "chain", [press("tab")], "7 Snapshots and what deleting each frees"),
    ("nav-evidence-to-host", "zstd", "diagnostics",
     [diag_evidence("compressed"), press("enter"), press("H")],
     "A finding's evidence → its guest cluster → its L2 entry → its host cluster (breadcrumb on top)"),
    ("small-80x24-guest", "chain_top", "guest", [], "2 Guest map at 80×24", (80, 24)),
    ("small-80x24-host", "fragmented", "host", [], "3 Host layout at 80×24: letters and colours", (80, 24)),
    ("small-80x24-structures", "extl2_128k", "structures", [l2_row(2)], "4 Structures at 80×24", (80, 24)),
    ("small-80x24-diagnostics", "refcount_corrupt", "diagnostics", [], "6 Diagnostics at 80×24", (80, 24)),
    ("large-200x60-guest", "chain_top", "guest", [], "2 Guest map at 200×60", (200, 60)),
    ("large-200x60-host", "fragmented", "host", [], "3 Host layout at 200×60", (200, 60)),
]


def materialise(out: Path) -> None:
    """Every sample image, decompressed, in `out` (relative backing names then resolve)."""
    for f in SAMPLES.iterdir():
        if f.is_dir() or f.suffix in (".sh", ".md", ".json", ".py"):
            continue
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as src, open(out / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(f, out / f.name)


async def shoot_picker(work: Path, name: str) -> Path:
    app = QInspectApp(str(work))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(3):
            await pilot.pause()
            await app.workers.wait_for_complete()
        await pilot.pause(0.2)
        return Path(app.save_screenshot(f"{name}.svg", str(HERE)))


async def shoot(work: Path, name: str, sample: str, view: str, steps: list[Step],
                size: tuple[int, int] = SIZE) -> Path:
    if not sample:
        return _preserve(await shoot_picker(work, name))
    app = QInspectApp(str(work / f"{sample}.qcow2"), name=f"{sample}.qcow2", view=view)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        main = app.screen
        assert isinstance(main, MainScreen), f"{sample}: {main}"
        for step in steps:
            await step(pilot, main)
            await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.pause(0.2)
        svg = Path(app.save_screenshot(f"{name}.svg", str(HERE)))
    return _preserve(svg)


def _preserve(svg: Path) -> Path:
    # librsvg collapses leading spaces of text runs unless told to preserve them.
    text = svg.read_text()
    text = text.replace('<svg class="rich-terminal"', '<svg xml:space="preserve" class="rich-terminal"', 1)
    svg.write_text(text)
    return svg


def main() -> int:
    only = set(sys.argv[1:])
    rsvg = shutil.which("rsvg-convert")
    with tempfile.TemporaryDirectory(prefix="qinspect-shots-") as tmp:
        work = Path(tmp)
        materialise(work)
        for name, sample, view, steps, what, *size in SHOTS:
            if only and name not in only:
                continue
            svg = asyncio.run(shoot(work, name, sample, view, steps, *size))
            line = f"{svg.relative_to(ROOT)}  ({what})"
            if rsvg:
                png = svg.with_suffix(".png")
                subprocess.run([rsvg, "-o", str(png), str(svg)], check=True)
                line += f"  + {png.name}"
            print(line)
    if not rsvg:
        print("rsvg-convert not found: SVGs only (apt-get install librsvg2-bin)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
