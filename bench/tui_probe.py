"""TUI probes: first frame next to a bare Textual app, and key latency while the full scans run.

    python3 bench/tui_probe.py IMAGE [--runs 5]

First frame: a child process is launched for each app, alternately (qinspect, bare, qinspect, …),
both started the same way (`python -c`, `App.run_test`, 140×45), and the time from launching the
process to the first update of the app's own screen (`App._display`, not Textual's blank default
screen) is taken; the bare app is `App` with `Header`, `Static`, `Footer`. The report gives the
medians and their ratio (target ≤ 1.5).

Key latency: in one process the qinspect app opens IMAGE with its scans running; every 50 ms a
key (`right` in the guest map) is pressed and the time until the grid's cursor has moved is
taken, for as long as the scans run (at most 300 s), grouped by the scan step running. The report
gives the median, 95th percentile and maximum (target: ≤ 100 ms), and how many keys were pressed
during the scans.

Peak RSS: the same process's VmHWM (/proc/self/status) once every scan has finished, next to the
budget of issue 12: 2 x the image's metadata (L1 + L2 tables + refcount table + allocated refcount
blocks, counted as bench/run.py counts them) + 150 MiB.

The machine these numbers come from may be shared: quote ratios of interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
# Seconds the latency probe lets the scans run (then it cancels them and says so).
SCAN_LIMIT = 300.0

FRAME_PROBE = r"""
import asyncio, os, sys, time
t_launch = float(os.environ["QINSPECT_BENCH_T0"])
kind = sys.argv[1]
if kind == "bare":
    from textual.app import App
    from textual.widgets import Footer, Header, Static

    class Bare(App):
        def compose(self):
            yield Header()
            yield Static("a bare Textual app")
            yield Footer()

    cls = Bare
else:
    from qinspect.tui.app import QInspectApp as cls
times = {}
original_display = cls._display
def _display(self, screen, renderable) -> None:
    # qinspect: the image's screen, not Textual's blank default screen; the bare app draws on that one.
    if renderable is not None and "frame" not in times and (kind == "bare" or type(screen).__name__ != "Screen"):
        times["frame"] = time.time()
    original_display(self, screen, renderable)
cls._display = _display
async def main() -> None:
    app = cls() if kind == "bare" else cls(sys.argv[2])
    async with app.run_test(size=(140, 45)) as pilot:
        deadline = time.time() + 60
        while "frame" not in times and time.time() < deadline:
            await pilot.pause(0.005)
        app.exit(0)
asyncio.run(main())
print(times["frame"] - t_launch)
"""

LATENCY_PROBE = r"""
import asyncio, sys, time
SCAN_LIMIT = float(sys.argv[2])
from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
async def main() -> None:
    app = QInspectApp(sys.argv[1], view="guest")
    lat = []
    steps = []
    async with app.run_test(size=(140, 45)) as pilot:
        t_start = time.time()
        t_end = t_start + SCAN_LIMIT
        while not isinstance(app.screen, MainScreen) and time.time() < t_end:
            await pilot.pause(0.01)
        screen = app.screen
        while not screen.scanning and time.time() < t_end:
            await pilot.pause(0.01)
        grid = screen.query_one("#gm-grid")
        while screen.scanning and time.time() < t_end:
            before = grid.cursor
            t0 = time.perf_counter()
            # the key is posted as the terminal driver posts it; latency = until the cursor moved
            app.simulate_key("right")
            while grid.cursor == before and time.perf_counter() - t0 < 10:
                await asyncio.sleep(0.001)
            lat.append(time.perf_counter() - t0)
            steps.append(str(screen.query_one("#scan-label").render()).split(":")[0].strip("…") or "?")
            await asyncio.sleep(0.05)
        finished = not screen.scanning
        # every scan's result is held now: the peak RSS of the whole run (VmHWM) is the figure
        await pilot.pause(0.2)
        with open("/proc/self/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        screen.scan_worker and screen.scan_worker.cancel()
        app.exit(0)
    print(f"{hwm} {int(finished)} {time.time() - t_start:.1f}")
    print(" ".join(f"{x:.4f}" for x in lat))
    print("|".join(steps))
asyncio.run(main())
"""


from run import CHILD_ENV, metadata_bytes, precompile  # noqa: E402  (bench/run.py: one definition of each)


def first_frame(kind: str, image: str) -> float:
    env = dict(CHILD_ENV, QINSPECT_BENCH_T0=repr(time.time()))
    r = subprocess.run([sys.executable, "-c", FRAME_PROBE, kind, image], capture_output=True, text=True, env=env,
                       check=True, timeout=120)
    return float(r.stdout.split()[-1])


@dataclass
class LatencyRun:
    """What one run of the latency probe measured."""

    latencies: list[float]  # seconds, one per key
    steps: list[str]  # the scan step running when each key was pressed
    peak_rss: int  # VmHWM of the TUI process (bytes), read once every scan had finished
    finished: bool  # the scans finished within the limit
    seconds: float  # how long the scans ran


def key_latency(image: str, limit: float = SCAN_LIMIT) -> LatencyRun:
    r = subprocess.run([sys.executable, "-c", LATENCY_PROBE, image, str(limit)], capture_output=True, text=True,
                       check=True, timeout=limit + 120, env=CHILD_ENV)
    lines = r.stdout.splitlines()[-3:]
    hwm, finished, seconds = lines[0].split()
    return LatencyRun([float(x) for x in lines[1].split()], lines[2].split("|") if lines[2] else [], int(hwm),
                      finished == "1", float(seconds))


def rss_budget(image: str) -> tuple[float, float]:
    """The image's metadata (MiB: L1 + L2 tables + refcount table + allocated refcount blocks, as
    bench/run.py counts it) and the RSS budget, 2 x metadata + 150 MiB."""
    md = float(metadata_bytes(Path(image))["total"]) / MiB
    return md, 2 * md + 150


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    precompile()
    first_frame("qinspect", args.image)  # warm the page cache for both
    first_frame("bare", args.image)
    q: list[float] = []
    b: list[float] = []
    for i in range(args.runs):
        for kind in (("qinspect", "bare") if i % 2 == 0 else ("bare", "qinspect")):
            (q if kind == "qinspect" else b).append(first_frame(kind, args.image))
    mq, mb = statistics.median(q), statistics.median(b)
    print("## TUI first frame (process launch → first update of the app's screen), medians of "
          f"{args.runs} interleaved runs\n")
    print("| app | first frame s | ratio |")
    print("|---|---:|---:|")
    print(f"| bare Textual (Header, Static, Footer) | {mb:.3f} | 1.00 |")
    print(f"| qinspect {os.path.basename(args.image)} | {mq:.3f} | {mq / mb:.2f} |")
    if not args.no_latency:
        run = key_latency(args.image)
        raw, steps = run.latencies, run.steps
        md, budget = rss_budget(args.image)
        peak = run.peak_rss / MiB
        print("\n## Peak RSS of the TUI after every scan (VmHWM), against its budget (2 x metadata + 150 MiB)\n")
        print("| image | scans | metadata MiB | budget MiB | peak RSS MiB | within |")
        print("|---|---|---:|---:|---:|---|")
        scans = f"finished in {run.seconds:.1f} s" if run.finished else f"NOT finished in {run.seconds:.0f} s"
        print(f"| {os.path.basename(args.image)} | {scans} | {md:.1f} | {budget:.0f} | {peak:.0f} "
              f"| {'yes' if peak <= budget and run.finished else 'NO'} |")
        print("\n## Key latency while the full scans run (`right` in the guest map, every 50 ms)\n")
        if not raw:
            print("(the scans finished before a key could be pressed)")
        else:
            print("| scan step | keys | median ms | p95 ms | max ms |")
            print("|---|---:|---:|---:|---:|")
            groups: dict[str, list[float]] = {"all": raw}
            for x, st in zip(raw, steps, strict=False):
                groups.setdefault(st, []).append(x)
            for name, xs in groups.items():
                lat = sorted(xs)
                p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
                print(f"| {name} | {len(lat)} | {statistics.median(lat) * 1000:.0f} | {p95 * 1000:.0f} "
                      f"| {lat[-1] * 1000:.0f} |")
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
