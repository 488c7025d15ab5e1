#!/usr/bin/env python3
"""`qinspect scan` of many small images against a shell loop of `qemu-img check`, side by side.

Makes N small images (default 300) with qemu-img/qemu-io in a work directory — plain ones with a
few writes, internal snapshots, overlays on shared bases, fully preallocated ones, lazy-refcount
images left dirty by a crash (`qemu-io -c abort`) and a few with a leaked cluster — then times, in
interleaved rounds (each round alternates which goes first):

- `for f in DIR/*.qcow2; do qemu-img check "$f"; done` in bash (output discarded), and
- `qinspect scan DIR --output=json` (no --deep; default --jobs), and the same with --jobs 1 and 2.

Peak memory is the sum of the proportional set size (Pss, /proc/PID/smaps_rollup) of the scan's
whole process tree, sampled every 10 ms; it is measured for the N images with --jobs 1 and 2, and
for a third of them, to show that it follows --jobs and not the number of images.

    python3 bench/scan.py                 # 300 images, 5 rounds
    python3 bench/scan.py --images 60 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "scan-v2"
# Children run as a user's would: with cached bytecode (some sandboxes set PYTHONDONTWRITEBYTECODE,
# which makes every qinspect run compile its modules again).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def qemu_io(path: Path, *cmds: str, check: bool = True) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def host_offset(path: Path, guest: int) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    for e in json.loads(out):
        if e["start"] <= guest < e["start"] + e["length"] and e.get("offset") is not None:
            return int(e["offset"]) + guest - int(e["start"])
    raise ValueError(f"guest offset {guest} not allocated in {path}")


def set_refcount(path: Path, host: int, value: int) -> None:
    """Patch one 16-bit refcount in the first refcount block (to make a leak; qemu has no tool for it)."""
    with open(path, "r+b") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_offset = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(rt_offset)
        rb = struct.unpack(">Q", f.read(8))[0]
        index = host >> cluster_bits
        assert index < (1 << cluster_bits) // 2, "cluster outside the first refcount block"
        f.seek(rb + 2 * index)
        f.write(struct.pack(">H", value))


def make_leaked(path: Path, size: str = "64M") -> None:
    """An image with one leaked cluster: write two clusters, discard one, put its refcount back to 1."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k")
    leaked = host_offset(path, 1 << 20)
    qemu_io(path, "discard 1M 64k")
    set_refcount(path, leaked, 1)


def make_tree(directory: Path, n: int) -> list[Path]:
    """N small images of several kinds (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    bases = []
    for b in range(max(1, n // 50)):
        base = directory / f"base-{b:02d}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), "256M")
        qemu_io(base, "write -P 0x5a 0 2M")
        bases.append(base)
    made: list[Path] = list(bases)
    i = 0
    while len(made) < n:
        kind = i % 10
        p = directory / f"img-{i:04d}.qcow2"
        if kind in (0, 1, 2, 3):
            qemu_img("create", "-q", "-f", "qcow2", str(p), "128M")
            qemu_io(p, f"write -P 0x{i % 250 + 1:02x} {(i % 7) * 3}M 192k", "write 64M 64k")
        elif kind == 4:
            qemu_img("create", "-q", "-f", "qcow2", str(p), "128M")
            qemu_io(p, "write -P 0x41 0 2M")
            qemu_img("snapshot", "-c", "s1", str(p))
            qemu_io(p, "write -P 0x42 0 2M")
        elif kind in (5, 6):
            base = bases[i % len(bases)]
            qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(p))
            qemu_io(p, f"write -P 0x61 {(i % 5)}M 64k")
        elif kind == 7:
            qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(p), "8M")
        elif kind == 8:
            qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "64M")
            qemu_io(p, "write 0 128k", "abort", check=False)  # dirty, refcounts not written
        else:
            make_leaked(p)
        made.append(p)
        i += 1
    return made


def ensure_tree(workdir: Path, n: int) -> Path:
    d = workdir / f"scan-{n}"
    stamp = d / ".recipe"
    if stamp.exists() and stamp.read_text() == f"{RECIPE} {n}":
        return d
    if d.exists():
        shutil.rmtree(d)
    t0 = time.monotonic()
    make_tree(d, n)
    stamp.write_text(f"{RECIPE} {n}")
    print(f"made {n} images in {d} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return d


# -- measuring ----------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _tree_pss(pid: int) -> int:
    kids = _children()
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run(cmd: list[str], *, shell: bool = False, sample: bool = False) -> tuple[float, int]:
    """(wall seconds, peak Pss of the process tree in bytes, 0 unless `sample`)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd if not shell else ["bash", "-c", cmd[0]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=CHILD_ENV)
    peak = 0
    if sample:
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_pss(proc.pid))
                time.sleep(0.01)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        proc.wait()
        done.set()
        th.join()
    else:
        proc.wait()
    return time.monotonic() - t0, peak


def qinspect_exe() -> str:
    exe = Path(sys.executable).parent / "qinspect"
    return str(exe) if exe.exists() else shutil.which("qinspect") or "qinspect"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    args = ap.parse_args()
    d = ensure_tree(args.workdir, args.images)
    q = qinspect_exe()
    files = sorted(str(p) for p in d.glob("*.qcow2"))
    # Write qinspect's bytecode cache and warm the page cache before anything is timed.
    pkg = subprocess.run([sys.executable, "-c", "import os, qinspect; print(os.path.dirname(qinspect.__file__))"],
                         capture_output=True, text=True, check=True, env=CHILD_ENV).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], capture_output=True, check=False, env=CHILD_ENV)
    out = subprocess.run([q, "scan", str(d), "--output=json"], check=False, capture_output=True, text=True,
                         env=CHILD_ENV).stdout
    assert len(out.splitlines()) == len(files), "the scan did not report every image"
    loop = f'for f in {d}/*.qcow2; do qemu-img check "$f" >/dev/null 2>&1; done'
    cells: dict[str, list[float]] = {"qemu-img check loop": [], "qinspect scan": [], "qinspect scan --jobs 1": [],
                                     "qinspect scan --jobs 2": []}
    load0 = os.getloadavg()[0]
    for r in range(args.runs):
        order = list(cells)
        if r % 2:
            order.reverse()
        for name in order:
            if name == "qemu-img check loop":
                t, _ = run([loop], shell=True)
            elif name == "qinspect scan":
                t, _ = run([q, "scan", str(d), "--output=json"])
            else:
                t, _ = run([q, "scan", str(d), "--output=json", "--jobs", name.rsplit(" ", 1)[1]])
            cells[name].append(t)
    base = statistics.median(cells["qemu-img check loop"])
    print(f"\n{len(files)} images in {d}, {args.runs} interleaved rounds, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| command | median s | min s | ratio to the qemu-img loop |")
    print("|---|---:|---:|---:|")
    for name, ts in cells.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {statistics.median(ts) / base:.2f} |")
    third = files[: max(1, len(files) // 3)]
    mem = []
    cases = [(f"{len(ps)} images, --jobs {j}", ps, j) for j in (1, 2) for ps in (third, files)]
    for label, paths, jobs in cases:
        peaks = [run([q, "scan", *paths, "--output=json", "--jobs", str(jobs)], sample=True)[1] for _ in range(3)]
        mem.append((label, max(peaks)))
    print("\n| scan | peak Pss of the process tree, MiB |")
    print("|---|---:|")
    for label, peak in mem:
        print(f"| {label} | {peak / (1 << 20):.1f} |")
    ratio = statistics.median(cells["qinspect scan"]) / base
    print(f"\ntarget: qinspect scan <= 0.5 x the qemu-img loop: {'met' if ratio <= 0.5 else 'NOT met'} ({ratio:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
