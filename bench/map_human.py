#!/usr/bin/env python3
"""Human `map` on big images: qinspect against `qemu-img map`, and how soon the first row comes.

Two images (sparse, kept in the work dir, rebuilt only when their recipe changes):
- `ranges-100k`: 100 GiB, 64 KiB clusters with extended L2, 100,000 scattered 4 KiB writes made
  by one qemu-io (~100k data ranges in qemu-img's human map, ~375k ranges in all).
- `alternating-1m`: 2^20 clusters of 512 bytes preallocated with fallocate by qemu-img, every other
  L2 entry then given QCOW_OFLAG_ZERO (a valid image: qemu-img check is clean): a million
  extents that alternate data / zero (issue 10's MemoryError case).

For each, in interleaved rounds (which tool goes first alternates): `qemu-img map IMG` and
`qinspect map --output=human IMG` (median wall time, ratio, peak RSS; the outputs must be
identical byte for byte), `qinspect map --table IMG` (time, RSS), and the time from start to the
first data row of each qinspect layout read from a pipe (streaming: the row must arrive before
the rest is computed). Targets (issue 15): ratio <= 2 on `ranges-100k`, first row < 1 s.
Exit code 1 on a mismatch or a missed target.

    python3 bench/map_human.py                 # both images, 5 rounds
    python3 bench/map_human.py --small --runs 1  # 2,000 writes: same output checked, no targets
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
RATIO_TARGET = 2.0
FIRST_ROW_TARGET = 1.0


def qinspect_cmd() -> list[str]:
    """The console script next to this interpreter (not a shim), else `python -c main()`."""
    script = Path(sys.executable).parent / "qinspect"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())"]


def _stamped(path: Path, recipe: str) -> bool:
    stamp = path.with_suffix(".spec")
    return path.exists() and stamp.exists() and stamp.read_text() == recipe


def make_scattered(workdir: Path, writes: int) -> Path:
    path = workdir / f"ranges-{writes}.qcow2"
    recipe = f"100G extended_l2=on {writes} writes v1"
    if _stamped(path, recipe):
        return path
    tmp = path.with_suffix(".tmp")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(tmp), str(100 * GiB)],
                   check=True)
    rng = random.Random(f"qinspect-bench:map-human:{writes}")
    script = "".join(f"write -P {i % 255 + 1} {rng.randrange(0, 100 * GiB, 4096)} 4k\n" for i in range(writes))
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(tmp)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    tmp.rename(path)
    path.with_suffix(".spec").write_text(recipe)
    return path


def make_alternating(workdir: Path, clusters: int) -> Path:
    path = workdir / f"alternating-{clusters}.qcow2"
    recipe = f"512-byte clusters, falloc, {clusters} clusters, odd entries zero v1"
    if _stamped(path, recipe):
        return path
    tmp = path.with_suffix(".tmp")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,preallocation=falloc",
                    str(tmp), str(clusters * 512)], check=True)
    with open(tmp, "r+b") as f:
        l1_size, l1_offset = struct.unpack(">IQ", f.read(48)[36:48])
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(l1_size * 8))
        for e in l1:
            l2 = e & 0x00FFFFFFFFFFFE00
            if not l2:
                continue
            f.seek(l2)
            table = list(struct.unpack(">64Q", f.read(512)))
            table[1::2] = [x | 1 for x in table[1::2]]  # QCOW_OFLAG_ZERO
            f.seek(l2)
            f.write(struct.pack(">64Q", *table))
    r = subprocess.run(["qemu-img", "check", "-q", str(tmp)], check=False)
    if r.returncode:
        raise SystemExit("the alternating image does not pass qemu-img check")
    tmp.rename(path)
    path.with_suffix(".spec").write_text(recipe)
    return path


def timed(cmd: list[str], out: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MB, exit code), stdout to `out` (GNU time for the RSS)."""
    rss_file = out.with_suffix(".rss")
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        p = subprocess.run(["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *cmd], stdout=f,
                           stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    try:
        rss = int(rss_file.read_text().split()[-1]) // 1024
    except (OSError, ValueError, IndexError):
        rss = -1
    return wall, rss, p.returncode


def first_row(cmd: list[str]) -> float:
    """Seconds from start until the first line after the heading arrives through a pipe."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    p.stdout.readline()
    p.stdout.readline()
    t = time.perf_counter() - t0
    p.kill()
    p.wait()
    return t


def bench(image: Path, runs: int, workdir: Path, check_ratio: bool,
          check_first_row: bool) -> tuple[list[str], list[str]]:
    qi = qinspect_cmd()
    subprocess.run([*qi, "--version"], check=True, stdout=subprocess.DEVNULL)  # bytecode cache written
    q_t: list[float] = []
    i_t: list[float] = []
    t_t: list[float] = []
    f_h: list[float] = []
    f_t: list[float] = []
    q_rss = i_rss = t_rss = 0
    problems: list[str] = []
    same = True
    for r in range(runs):
        order = ["q", "i"] if r % 2 == 0 else ["i", "q"]
        for who in order:
            if who == "q":
                w, m, _ = timed(["qemu-img", "map", str(image)], workdir / "q.out")
                q_t.append(w)
                q_rss = max(q_rss, m)
            else:
                w, m, code = timed([*qi, "map", "--output=human", str(image)], workdir / "i.out")
                i_t.append(w)
                i_rss = max(i_rss, m)
                if code:
                    problems.append(f"{image.name}: qinspect map exited {code}")
        same = same and (workdir / "q.out").read_bytes() == (workdir / "i.out").read_bytes()
        w, m, code = timed([*qi, "map", "--table", str(image)], workdir / "t.out")
        t_t.append(w)
        t_rss = max(t_rss, m)
        if code:
            problems.append(f"{image.name}: qinspect map --table exited {code}")
        f_h.append(first_row([*qi, "map", "--output=human", str(image)]))
        f_t.append(first_row([*qi, "map", "--table", str(image)]))
    rows = (workdir / "q.out").read_bytes().count(b"\n") - 1
    qm, im = statistics.median(q_t), statistics.median(i_t)
    ratio = im / qm if qm else float("inf")
    line = (f"| {image.name} | {rows:,} | {qm:.3f} | {im:.3f} | {ratio:.2f} | {q_rss} | {i_rss} | "
            f"{statistics.median(t_t):.3f} | {t_rss} | {max(f_h):.3f} | {max(f_t):.3f} | {'yes' if same else 'NO'} |")
    if not same:
        problems.append(f"{image.name}: qinspect's human map differs from qemu-img's")
    if check_ratio and ratio > RATIO_TARGET:
        problems.append(f"{image.name}: ratio {ratio:.2f} > {RATIO_TARGET}")
    if check_first_row and max(f_h + f_t) > FIRST_ROW_TARGET:
        problems.append(f"{image.name}: first row after {max(f_h + f_t):.3f} s > {FIRST_ROW_TARGET} s")
    return [line], problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="2,000 writes and 2^16 alternating clusters")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    images = ([make_scattered(args.workdir, 2000), make_alternating(args.workdir, 1 << 16)] if args.small
              else [make_scattered(args.workdir, 100_000), make_alternating(args.workdir, 1 << 20)])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.runs} rounds\n")
    print("| image | rows (qemu-img) | qemu-img map s | qinspect map --output=human s | ratio | qemu-img RSS MB | "
          "qinspect RSS MB | qinspect --table s | --table RSS MB | first row (human) s | first row (table) s | "
          "same output |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    problems: list[str] = []
    for k, image in enumerate(images):
        # Targets apply to the full-size images (the small set is a smoke test on a loaded CI).
        lines, probs = bench(image, args.runs, args.workdir, check_ratio=(k == 0 and not args.small),
                             check_first_row=not args.small)
        print("\n".join(lines), flush=True)
        problems += probs
    if problems:
        print("\nPROBLEMS\n" + "\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
