#!/usr/bin/env python3
"""qinspect under the hostile images of tests/fuzz/amplify.py, at full scale: time and memory.

Each attack (one L2 table behind 2 Mi L1 entries, 65,536 snapshots sharing one L1 table, 2,048
snapshot L1 copies, a million alternating extents, 65,535 bitmaps naming one table) is built in
the work dir (bench/work/, git-ignored; a few MB each, rebuilt when missing). Every CLI command
runs on it in its own process, qemu-img's matching command beside it where there is one:

    info            qemu-img info
    map-json        qemu-img map --output=json       (qinspect map --output=json)
    check-json      qemu-img check --output=json     (qinspect check --output=json)
    layout          -
    diagnose        -
    diagnose-json   -                                (qinspect diagnose --output=json)
    map             qemu-img map                     (human map, stdout to /dev/null)

Output goes to /dev/null (stderr is read through a pipe and kept only for its first 4 KiB: check
of the shared L2 table prints ~20 M lines). Wall time is the median of `--runs` rounds, the two
tools alternating which goes first; peak RSS is GNU time's %M, the maximum over the rounds.

Bounds (a miss makes the exit code 1):
- memory: the engine's RSS budget, 2 x metadata + 150 MiB, with the file size standing in for the
  metadata (every byte of these files is metadata or one of a few data clusters);
- time: 20 s (the bound the issue used), or qemu-img's own time for the same command where that
  is longer (an answer that is legitimately tens of millions of lines long);
- the answer: an exit code qemu-img could give (0-3) and no Python traceback.

    python3 bench/amplify.py                   # full scale, 1 run per cell
    python3 bench/amplify.py --runs 3 --only shared_l2
    python3 bench/amplify.py --small --runs 1  # tiny versions: what tests/test_bench_amplify_smoke.py runs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from fuzz.amplify import GENERATORS  # noqa: E402
from run import CHILD_ENV, GNU_TIME, machine, precompile, qinspect_cmd  # noqa: E402

MiB = 1 << 20
TIME_BOUND = 20.0
SMALL_SCALE = 0.01
HANG_GUARD = 1800  # seconds: a command still running then is killed and counted as a miss

# name: (qinspect arguments, qemu-img arguments or None)
COMMANDS: dict[str, tuple[list[str], list[str] | None]] = {
    "info": (["info"], ["info"]),
    "map-json": (["map", "--output=json"], ["map", "--output=json"]),
    "check-json": (["check", "--output=json"], ["check", "--output=json"]),
    "layout": (["layout"], None),
    "diagnose": (["diagnose"], None),
    "diagnose-json": (["diagnose", "--output=json"], None),
    "map": (["map"], ["map"]),
}


@dataclass
class Run:
    seconds: float
    rss_kb: int
    rc: int
    err_head: str


def _wait(p: subprocess.Popen[bytes]) -> tuple[int, resource.struct_rusage]:
    """wait4 with a hang guard: a child still running after HANG_GUARD seconds is killed."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            return status, ru
        if time.monotonic() > deadline:
            p.kill()
            _pid, status, ru = os.wait4(p.pid, 0)
            return status, ru
        time.sleep(0.02)


def run(cmd: Sequence[str]) -> Run:
    """One child: wall time, peak RSS (GNU time), exit code, the first 4 KiB of stderr."""
    head = bytearray()

    def drain(pipe: IO[bytes]) -> None:
        while b := pipe.read(1 << 20):
            if len(head) < 4096:
                head.extend(b[: 4096 - len(head)])

    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else list(cmd)
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
        assert p.stderr is not None
        reader = threading.Thread(target=drain, args=(p.stderr,), daemon=True)
        reader.start()
        status, ru = _wait(p)
        dt = time.perf_counter() - t0
        reader.join(timeout=30)
        p.stderr.close()
        peak = int(ru.ru_maxrss)
        if GNU_TIME:
            text = Path(rss.name).read_text().split()
            peak = int(text[-1]) if text and text[-1].isdigit() else peak
    return Run(dt, peak, os.waitstatus_to_exitcode(status), head.decode(errors="replace"))


def build(name: str, workdir: Path, scale: float) -> Path:
    """The attack image in workdir/<name>-<scale>/ (kept between runs: a stamp marks it complete)."""
    d = workdir / f"{name}-{scale:g}"
    stamp = d / "built"
    if stamp.exists():
        return Path(stamp.read_text())
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    path: Path = GENERATORS[name](d, scale)
    stamp.write_text(str(path))
    return path


@dataclass
class Row:
    image: str
    command: str
    file_size: int
    qemu: list[Run]
    mine: list[Run]

    @property
    def budget_kb(self) -> int:
        return (2 * self.file_size + 150 * MiB) // 1024

    def bound_s(self) -> float:
        q = statistics.median(r.seconds for r in self.qemu) if self.qemu else 0.0
        return max(TIME_BOUND, q)

    def problems(self) -> list[str]:
        out = []
        t = statistics.median(r.seconds for r in self.mine)
        if t > self.bound_s():
            out.append(f"{t:.1f} s > {self.bound_s():.1f} s")
        peak = max(r.rss_kb for r in self.mine)
        if GNU_TIME and peak > self.budget_kb:
            out.append(f"peak RSS {peak // 1024} MiB > budget {self.budget_kb // 1024} MiB")
        for r in self.mine:
            if r.rc not in (0, 1, 2, 3):
                out.append(f"exit code {r.rc}")
            if "Traceback" in r.err_head or "internal error" in r.err_head:
                out.append("traceback: " + r.err_head.strip().splitlines()[-1][:120])
        return sorted(set(out))


def measure(image: str, path: Path, command: str, runs: int) -> Row:
    mine_args, qemu_args = COMMANDS[command]
    row = Row(image, command, path.stat().st_size, [], [])
    for k in range(runs):
        order = [0, 1] if k % 2 == 0 else [1, 0]
        for who in order:
            if who == 0:
                row.mine.append(run([*qinspect_cmd(), *mine_args, str(path)]))
            elif qemu_args is not None:
                row.qemu.append(run(["qemu-img", *qemu_args, str(path)]))
    return row


def _s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table(rows: list[Row]) -> list[str]:
    out = ["| image | command | qemu-img s | qemu-img rc | qinspect s | ratio | qinspect rc | qinspect peak MiB "
           "| budget MiB | time bound s | within |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = statistics.median(x.seconds for x in r.mine)
        peak = max(x.rss_kb for x in r.mine) / 1024
        if r.qemu:
            q = statistics.median(x.seconds for x in r.qemu)
            qs, qrc, ratio = _s(q), str(r.qemu[-1].rc), f"{t / q:.2f}x" if q > 0 else "-"
        else:
            qs, qrc, ratio = "-", "-", "-"
        bad = r.problems()
        within = "yes" if not bad else "NO: " + "; ".join(bad)
        out.append(f"| {r.image} | {r.command} | {qs} | {qrc} | {_s(t)} | {ratio} | {r.mine[-1].rc} | {peak:.0f} "
                   f"| {r.budget_kb / 1024:.0f} | {r.bound_s():.0f} | {within} |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=1, help="rounds per cell (median time, max RSS)")
    ap.add_argument("--small", action="store_true", help=f"the attacks at scale {SMALL_SCALE} (a smoke test)")
    ap.add_argument("--only", nargs="*", choices=sorted(GENERATORS), help="these attacks only")
    ap.add_argument("--commands", nargs="*", choices=list(COMMANDS), help="these commands only")
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "amplify")
    args = ap.parse_args(argv)
    scale = SMALL_SCALE if args.small else 1.0
    precompile()
    print("# qinspect under amplification attacks (tests/fuzz/amplify.py)\n")
    for k, v in machine().items():
        print(f"- {k}: {v}")
    print(f"- scale: {scale:g}; runs per cell: {args.runs}, alternating which tool goes first (median wall time, "
          f"max peak RSS {'from GNU time' if GNU_TIME else 'from wait4'}); output to /dev/null")
    print(f"- bounds: peak RSS <= 2 x file size + 150 MiB; time <= {TIME_BOUND:g} s or qemu-img's own time "
          "when longer; exit code 0-3, no traceback\n")
    rows: list[Row] = []
    for name in args.only or list(GENERATORS):
        path = build(name, args.workdir, scale)
        for command in args.commands or list(COMMANDS):
            row = measure(name, path, command, args.runs)
            rows.append(row)
            print(f"  {name} {command}: {_s(statistics.median(x.seconds for x in row.mine))} s", file=sys.stderr,
                  flush=True)
    print("\n".join(table(rows)))
    missed = [r for r in rows if r.problems()]
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if missed:
        print(f"\nMISSED: {len(missed)} of {len(rows)} cells outside their bounds")
        return 1
    print(f"\nall {len(rows)} cells within their bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
