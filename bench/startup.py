#!/usr/bin/env python3
"""Start-up cost of the small commands, as a multiple of a bare `python -c pass`.

Runs, interleaved round by round (so that machine load hits every command alike), `python -c pass`
and `qinspect` commands on a small image: `info` (JSON and human), `--help`, an error path (a file
that does not exist), and `check` and `map` of a small image. Prints the median wall time of each
and its ratio to `python -c pass` (the issue's targets: info <= 3x, small checks <= 5x).

    python bench/startup.py [--rounds 40] [--image sample_images/basic64k.qcow2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"info --output=json": 3.0, "info": 3.0, "check --output=json": 5.0, "check": 5.0}


def qinspect() -> list[str]:
    """The installed console script next to this interpreter (what a user runs), else -m."""
    exe = shutil.which("qinspect", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "qinspect.cli"]


def commands(image: str) -> dict[str, list[str]]:
    q = qinspect()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import numpy' (floor of any numpy command)": [sys.executable, "-c", "import numpy"],
        "info --output=json": [*q, "info", "--output=json", image],
        "info": [*q, "info", image],
        "--help": [*q, "--help"],
        "info (no such file)": [*q, "info", "/nonexistent/image.qcow2"],
        "check --output=json": [*q, "check", "--output=json", image],
        "check": [*q, "check", image],
        "map --output=json": [*q, "map", "--output=json", image],
    }


# As installed: bytecode caches written (this environment may set PYTHONDONTWRITEBYTECODE).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def precompile() -> None:
    """Write qinspect's bytecode cache once, before anything is timed (what pip install does)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qinspect")], capture_output=True,
                   check=False, env=CHILD_ENV)


def once(cmd: Sequence[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=CHILD_ENV)
    return time.perf_counter() - t


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--image", default=str(ROOT / "sample_images" / "basic64k.qcow2"))
    args = ap.parse_args(argv)
    cmds = commands(args.image)
    precompile()
    for cmd in cmds.values():  # warm the page cache and the bytecode caches
        once(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            times[name].append(once(cmd))
    base = statistics.median(times["python -c pass"])
    print(f"{args.rounds} interleaved rounds, medians; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs\n")
    print("| command | median ms | × python -c pass | target |")
    print("|---|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"≤ {target:g}× {'met' if med / base <= target else 'missed'}"
        print(f"| `{name}` | {med * 1000:.1f} | {med / base:.2f} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
