#!/usr/bin/env python3
"""Where reading through a gap stops paying: the measurement behind `planner.GAP_BYTES`.

For each gap size, reads N pairs of 4 KiB pieces separated by that gap from a cold file (evicted
with POSIX_FADV_DONTNEED before each pass), once as two `pread`s and once as one `pread` through
the gap, and prints the median time per pair of each. Reading through wins while its time is
below the two-read time.

    python3 bench/gap.py [--file PATH] [--pairs 256]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIECE = 4096
GAPS = [4 << 10, 16 << 10, 32 << 10, 48 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20]


def evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def one_pass(fd: int, starts: list[int], gap: int, through: bool) -> float:
    evict(fd)
    t0 = time.perf_counter()
    for s in starts:
        if through:
            os.pread(fd, PIECE + gap + PIECE, s)
        else:
            os.pread(fd, PIECE, s)
            os.pread(fd, PIECE, s + PIECE + gap)
    return (time.perf_counter() - t0) / len(starts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=ROOT / "bench" / "work" / "gap.bin")
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path: Path = args.file
    if not path.exists() or path.stat().st_size < args.size:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # real data (no holes): what metadata with data between looks like
            block = os.urandom(1 << 20)
            for _ in range(args.size >> 20):
                f.write(block)
    fd = os.open(path, os.O_RDONLY)
    rng = random.Random(1)
    print("| gap | two reads, µs per pair | one read through, µs per pair | read through wins |")
    print("|---:|---:|---:|---|")
    for gap in GAPS:
        span = args.size - 2 * PIECE - gap
        starts = sorted(rng.randrange(0, span // PIECE) * PIECE for _ in range(args.pairs))
        two, one = [], []
        for _ in range(args.rounds):
            two.append(one_pass(fd, starts, gap, False))
            one.append(one_pass(fd, starts, gap, True))
        a, b = statistics.median(two) * 1e6, statistics.median(one) * 1e6
        print(f"| {gap >> 10} KiB | {a:.0f} | {b:.0f} | {'yes' if b < a else 'no'} |", flush=True)
    os.close(fd)


if __name__ == "__main__":
    main()
