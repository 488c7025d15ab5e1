#!/usr/bin/env python3
"""qinspect against qemu-img on big images: wall time, peak RSS, bytes read at open, same answers.

Makes the images (sparse, cheap) in a work directory, then runs `qemu-img check/map/info
--output=json` and the same `qinspect` commands side by side, alternating which goes first, and
prints Markdown tables of medians. Every qinspect answer is compared with qemu-img's from the same
round (map: exact text once the `"compressed"` key is dropped; check: equal JSON); a mismatch is
printed loudly and makes the exit code 1.

    python3 bench/run.py                  # the full set (a 1 TiB image among them), 5 runs
    python3 bench/run.py --runs 9 --only prealloc-1t
    python3 bench/run.py --small --runs 1 # tiny images, under a minute (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


# -- the images ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    what: str
    size: int
    opts: str  # qemu-img create -o
    writes: int = 0  # scattered 4 KiB writes
    sparsify: bool = False  # copy with cp --sparse=always after writing (see make_image)
    commands: tuple[str, ...] = ("check", "map")


def specs(small: bool) -> list[Spec]:
    if small:
        return [
            Spec("prealloc-small", "preallocation=metadata, 4 GiB", 4 * GiB, "preallocation=metadata"),
            Spec("prealloc-1g", "preallocation=metadata, 1 GiB (info baseline)", GiB, "preallocation=metadata",
                 commands=()),
            Spec("scatter-64k-small", "1 GiB, 512 scattered 4 KiB writes, 64 KiB clusters", GiB, "", 512),
            Spec("scatter-extl2-256k-small", "1 GiB, 512 writes, 256 KiB clusters, extended L2", GiB,
                 "cluster_size=256k,extended_l2=on", 512, sparsify=True),
            Spec("extl2-2m-small", "8 GiB, 512 writes, 2 MiB clusters, extended L2", 8 * GiB,
                 "cluster_size=2M,extended_l2=on", 512, sparsify=True),
        ]
    return [
        Spec("prealloc-1t", "1 TiB, preallocation=metadata (16 Mi L2 entries)", 1 << 40, "preallocation=metadata"),
        Spec("prealloc-1g", "1 GiB, preallocation=metadata (info baseline)", GiB, "preallocation=metadata",
             commands=()),
        Spec("scatter-64k", "100 GiB, 32768 scattered 4 KiB writes, 64 KiB clusters", 100 * GiB, "", 32768),
        Spec("scatter-extl2-256k", "100 GiB, 32768 scattered 4 KiB writes, 256 KiB clusters, extended L2",
             100 * GiB, "cluster_size=256k,extended_l2=on", 32768, sparsify=True),
        Spec("extl2-2m-1t", "1 TiB, 32768 scattered 4 KiB writes, 2 MiB clusters, extended L2", 1 << 40,
             "cluster_size=2M,extended_l2=on", 32768, sparsify=True),
    ]


def make_image(spec: Spec, workdir: Path) -> Path:
    """Create the image once (kept in the work dir; delete it to rebuild)."""
    path = workdir / f"{spec.name}.qcow2"
    stamp = workdir / f"{spec.name}.spec"
    key = repr(spec)
    if path.exists() and stamp.exists() and stamp.read_text() == key:
        return path
    tmp = workdir / f"{spec.name}.tmp.qcow2"
    tmp.unlink(missing_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if spec.opts:
        cmd += ["-o", spec.opts]
    subprocess.run([*cmd, str(tmp), str(spec.size)], check=True)
    if spec.writes:
        # One qemu-io process, commands on stdin, no flushes (-t unsafe): seconds, not minutes.
        rng = random.Random(f"qinspect-bench:{spec.name}")
        script = "".join(f"write -P {i % 255 + 1} {rng.randrange(0, spec.size, 4096)} 4k\n"
                         for i in range(spec.writes))
        subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(tmp)], input=script, text=True,
                       check=True, stdout=subprocess.DEVNULL)
    if spec.sparsify:
        # With subclusters QEMU zeroes the rest of a subcluster with fallocate (unwritten extents);
        # whether SEEK_DATA calls those data or hole then depends on the page cache, so qemu-img's
        # own map output changes between runs. A sparse copy turns them into plain holes.
        sp = workdir / f"{spec.name}.sparse.qcow2"
        subprocess.run(["cp", "--sparse=always", str(tmp), str(sp)], check=True)
        tmp.unlink()
        sp.rename(tmp)
    tmp.rename(path)
    stamp.write_text(key)
    return path


# -- running things --------------------------------------------------------------------------------
def qinspect_cmd() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim), else -c main()."""
    script = Path(sys.executable).parent / "qinspect"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())"]


@dataclass
class Run:
    seconds: float
    rss_kb: int
    rc: int
    out: str
    err: str


def _gnu_time() -> str | None:
    """GNU time, if installed: it starts the measured command from its own small process."""
    path = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if path is None:
        return None
    r = subprocess.run([path, "-f", "%M", "true"], capture_output=True, text=True, check=False)
    return path if r.returncode == 0 and r.stderr.strip().isdigit() else None


GNU_TIME = _gnu_time()
# Children run as a user's would: with cached bytecode. (Some sandboxes set PYTHONDONTWRITEBYTECODE,
# which makes every qinspect run compile its modules again: ~0.1-0.3 s of start-up.)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def precompile() -> None:
    """Write qinspect's bytecode cache once, before anything is timed."""
    code = "import os, qinspect; print(os.path.dirname(qinspect.__file__))"
    pkg = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=CHILD_ENV).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], capture_output=True, check=False, env=CHILD_ENV)


def run(cmd: Sequence[str], cwd: Path) -> Run:
    """One child process: wall time, its own peak RSS, exit code, output.

    The peak RSS comes from GNU time when it is there: a child forked from this (big) Python
    process would count this process's pages in its ru_maxrss. Without it, wait4's figure is used.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else list(cmd)
        t0 = time.perf_counter()
        p = subprocess.Popen(full, cwd=cwd, stdout=out, stderr=err, env=CHILD_ENV)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        maxrss = int(ru.ru_maxrss)
        if GNU_TIME:
            text = Path(rss.name).read_text().split()
            maxrss = int(text[-1]) if text and text[-1].isdigit() else maxrss
        out.seek(0)
        err.seek(0)
        return Run(dt, maxrss, p.returncode, out.read().decode(), err.read().decode())


def strip_compressed(text: str) -> str:
    return re.sub(r', "compressed": (true|false)', "", text)


def same_answer(command: str, q: Run, i: Run) -> str | None:
    """None when qinspect's output is qemu-img's, else what differs."""
    if q.rc != i.rc:
        return f"exit code {i.rc} vs qemu-img {q.rc}"
    if command == "map":
        a, b = q.out, strip_compressed(i.out)
        if a == b:
            return None
        la, lb = a.splitlines(), b.splitlines()
        k = next((k for k in range(min(len(la), len(lb))) if la[k] != lb[k]), min(len(la), len(lb)))
        return (f"map differs at line {k + 1} ({len(lb)} lines vs {len(la)}): "
                f"qinspect {lb[k] if k < len(lb) else '<end>'!r} / qemu-img {la[k] if k < len(la) else '<end>'!r}")
    try:
        ja, jb = json.loads(q.out), json.loads(i.out)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    if isinstance(jb, dict):
        jb.pop("in-use", None)  # qinspect's extra key (the image's lock state)
    return None if ja == jb else f"{command} JSON differs: qinspect {jb} / qemu-img {ja}"


@dataclass
class Row:
    image: str
    command: str
    q: list[Run] = field(default_factory=list)
    i: list[Run] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def med(self, runs: list[Run]) -> float:
        return statistics.median(r.seconds for r in runs)

    def rss(self, runs: list[Run]) -> float:
        return max(r.rss_kb for r in runs) / 1024


def compare(spec: Spec, path: Path, command: str, runs: int, cwd: Path) -> Row:
    row = Row(spec.name, command)
    q_cmd = ["qemu-img", command, "--output=json", path.name]
    i_cmd = [*qinspect_cmd(), command, "--output=json", path.name]
    for k in range(runs):
        order = [("q", q_cmd), ("i", i_cmd)] if k % 2 == 0 else [("i", i_cmd), ("q", q_cmd)]
        got: dict[str, Run] = {}
        for who, cmd in order:
            got[who] = run(cmd, cwd)
        row.q.append(got["q"])
        row.i.append(got["i"])
        bad = same_answer(command, got["q"], got["i"])
        if bad is not None:
            row.mismatches.append(f"run {k + 1}: {bad}")
    return row


# -- open cost ---------------------------------------------------------------------------------------
def bytes_read_strace(cmd: Sequence[str], image: Path, cwd: Path) -> int | None:
    """Bytes the process read from `image` (read/pread/preadv on its descriptors), from strace."""
    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        r = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=read,pread64,readv,preadv,preadv2",
                            "-o", log.name, *cmd], cwd=cwd, capture_output=True, check=False, env=CHILD_ENV)
        if r.returncode:
            return None
        text = Path(log.name).read_text(errors="replace")
    real = os.path.realpath(image)
    total = 0
    pending: dict[str, str] = {}  # pid -> path of a call that strace split (threads: "<unfinished ...>")
    for line in text.splitlines():
        pid = line.split(" ", 1)[0]
        m = re.search(r"\((\d+)<([^>]*)>", line)
        if m and line.rstrip().endswith("<unfinished ...>"):
            pending[pid] = m.group(2)
            continue
        path = pending.pop(pid, None) if "resumed>" in line else (m.group(2) if m else None)
        ret = re.search(r"= (\d+)$", line.rstrip())
        if path is not None and ret and os.path.realpath(path) == real:
            total += int(ret.group(1))
    return total


def bytes_read_inprocess(image: Path) -> int:
    """qinspect's own count (HostFile.bytes_read) for what `qinspect info` does."""
    code = ("import sys; from qinspect.qcow2.image import open_image; from qinspect.analysis.info import image_info\n"
            "img = open_image(sys.argv[1]); image_info(img, sys.argv[1]); print(img.file.bytes_read)")
    r = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, check=True)
    return int(r.stdout.strip())


def metadata_bytes(image: Path) -> dict[str, int]:
    """L1 + L2 tables + refcount table + allocated refcount blocks, as the RSS target counts them."""
    code = """
import sys, json
import numpy as np
from qinspect.qcow2.image import open_image
with open_image(sys.argv[1]) as img:
    h = img.header
    cs = h.cluster_size
    l2 = int(np.count_nonzero(img.l1_table & np.uint64(0x00fffffffffffe00))) * cs
    rb = int(np.count_nonzero(img.refcount_table & np.uint64(0xfffffffffffffe00))) * cs
    print(json.dumps({"l1": h.l1_size * 8, "l2": l2, "reftable": h.refcount_table_clusters * cs, "refblocks": rb}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, check=True)
    d: dict[str, int] = json.loads(r.stdout)
    d["total"] = sum(d.values())
    return d


TUI_PROBE = r"""
import asyncio, os, sys, time
t_launch = float(os.environ["QINSPECT_BENCH_T0"])
t_start = time.time()
from qinspect.tui.app import QInspectApp
t_import = time.time()
times = {}
original_on_mount = QInspectApp.on_mount
original_display = QInspectApp._display
def on_mount(self) -> None:
    times.setdefault("mount", time.time())
    original_on_mount(self)
def _display(self, screen, renderable) -> None:
    # The first update of the image's screen (not Textual's blank default screen) is the first frame.
    if renderable is not None and "frame" not in times and type(screen).__name__ != "Screen":
        times["frame"] = time.time()
    original_display(self, screen, renderable)
QInspectApp.on_mount = on_mount
QInspectApp._display = _display
async def main() -> None:
    app = QInspectApp(sys.argv[1])
    async with app.run_test(size=(140, 45)) as pilot:
        deadline = time.time() + 60
        while "frame" not in times and time.time() < deadline:
            await pilot.pause(0.005)
        app.exit(0)
asyncio.run(main())
print(t_start - t_launch, t_import - t_launch, times["mount"] - t_launch, times["frame"] - t_launch)
"""


def tui_first_frame(image: Path, cwd: Path) -> tuple[float, ...] | str:
    """Seconds from launching the process to: the interpreter running, the TUI imported, the app's
    on_mount, and the first update of the image's screen (the first frame)."""
    env = dict(CHILD_ENV, QINSPECT_BENCH_T0=repr(time.time()))
    r = subprocess.run([sys.executable, "-c", TUI_PROBE, str(image)], cwd=cwd, capture_output=True, text=True,
                       env=env, check=False, timeout=120)
    if r.returncode:
        return f"error: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return tuple(float(x) for x in r.stdout.split()[-4:])


# -- the report --------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    try:
        import numpy

        npv = numpy.__version__
    except ImportError:
        npv = "-"
    qv = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": ram, "kernel": platform.release(),
            "python": platform.python_version(), "numpy": npv, "qemu-img": qv[0] if qv else "?",
            "load average at start": load}


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


# -- cold and warm, with the floor (the engine's targets) ------------------------------------------
def engine_specs(small: bool) -> list[Spec]:
    if small:
        return [Spec("scatter-4k-small", "1 GiB, 4 KiB clusters, 1024 scattered 4 KiB writes", GiB,
                     "cluster_size=4096", 1024),
                Spec("prealloc-small", "preallocation=metadata, 4 GiB", 4 * GiB, "preallocation=metadata")]
    return [Spec("scatter-4k-100g", "100 GiB, 4 KiB clusters, 51,200 scattered 4 KiB writes (25,600 L2 tables)",
                 100 * GiB, "cluster_size=4096", 51200),
            Spec("prealloc-1t", "1 TiB, preallocation=metadata (16 Mi L2 entries)", 1 << 40, "preallocation=metadata")]


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (POSIX_FADV_DONTNEED), so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def settle(path: Path) -> None:
    """Evict the file, read it once in order, evict it again: every cold run starts from the same
    state, whichever command ran before it.

    Needed on the development VM: right after `qemu-img check` or `map` has read a cold image's
    tables one by one (tens of thousands of scattered 4 KiB reads), the next cold read of that file
    runs 2.5-3x slower, whatever reads it, once; a sequential pass clears it. Measured on the
    4 KiB-cluster 100 GiB image, quiet machine, 3 runs each, cold sequential read of the whole
    file: after nothing 0.101-0.102 s, after qinspect check 0.105-0.107 s, after `qemu-img info`
    0.100-0.101 s, after `qemu-img check` 0.241-0.265 s, after `qemu-img map` 0.279-0.308 s. Since
    runs alternate, an unsettled median charged qinspect for qemu-img's wake in two of three
    rounds (0.43-0.70 s against 0.24-0.29 s for the same command run after itself)."""
    evict(path)
    floor_read(path)
    evict(path)


def floor_read(path: Path) -> float:
    """Seconds to read the file's allocated extents once, in order (SEEK_DATA/SEEK_HOLE, 1 MiB reads)."""
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        size = os.fstat(fd).st_size
        off = 0
        buf = bytearray(1 << 20)
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            while d < h:
                n = os.preadv(fd, [memoryview(buf)[: min(len(buf), h - d)]], d)
                if n <= 0:
                    break
                d += n
            off = h
    finally:
        os.close(fd)
    return time.perf_counter() - t0


# Issue 12's targets for the engine table: (image, command, cache) -> (most x qemu-img, most x floor).
ENGINE_TARGETS: dict[tuple[str, str, str], tuple[float, float | None]] = {
    ("scatter-4k-100g", "check", "cold"): (0.25, 2.0),
    ("scatter-4k-100g", "map", "cold"): (0.25, 2.0),
    ("scatter-4k-100g", "check", "warm"): (0.5, None),
    ("scatter-4k-100g", "map", "warm"): (0.5, None),
    ("prealloc-1t", "check", "cold"): (0.35, 2.0),
    ("prealloc-1t", "check", "warm"): (0.5, None),
    ("prealloc-1t", "map", "warm"): (0.25, None),
}


def target_verdict(key: tuple[str, str, str], q: float, i: float, floor: float) -> str:
    """"met"/"MISSED" against ENGINE_TARGETS, with the limits, or "" where there is no target."""
    t = ENGINE_TARGETS.get(key)
    if t is None:
        return ""
    most_q, most_floor = t
    ok = i <= most_q * q and (most_floor is None or i <= most_floor * floor)
    limit = f"<= {most_q}x qemu-img" + (f" and <= {most_floor:g}x floor" if most_floor is not None else "")
    return f"{'met' if ok else 'MISSED'} ({limit})"


IDLE_SECONDS = 3.0
"""How long the machine idles after an eviction in the "idle" rows: this VM hands freed memory back
to its host (free page reporting, 2 s after the pages are freed), and page cache built on such
memory costs the host a fault per page; 3 s makes sure the evicted pages have gone."""


def prepare(path: Path, cache: str, idle_seconds: float) -> None:
    """Put `path` in the state a row measures: "cold" evicted from a settled state (`settle`),
    "idle" evicted and then left alone for `idle_seconds` (the realistic first look: nothing of the
    file cached, the memory for its pages not even mapped), "warm" untouched."""
    if cache == "cold":
        settle(path)
    elif cache == "idle":
        evict(path)
        time.sleep(idle_seconds)


def engine_bench(small: bool, runs: int, wd: Path, idle_seconds: float = IDLE_SECONDS) -> list[str]:
    """Cold, idle-cold and warm check/map, qemu-img and qinspect interleaved, each cold kind with
    its own floor measured in the same state; returns mismatches."""
    bad: list[str] = []
    caches = ("cold", "idle", "warm") if idle_seconds > 0 else ("cold", "warm")
    print("\n## Cold and warm, with the floor\n")
    print("cold: the image is evicted from the page cache (POSIX_FADV_DONTNEED) before every run, after one "
          "sequential pass (`settle`: the same state whichever command ran before). idle: evicted, then "
          f"{idle_seconds:g} s of idling before the run (this VM has handed the freed memory back to its host "
          "by then: `IDLE_SECONDS`). Floor: reading the file's allocated extents once, in order, in the "
          "same state as the row.\n")
    print("| image | command | cache | qemu-img s | qinspect s | ratio | floor s | qinspect / floor "
          "| qemu-img RSS MB | qinspect RSS MB | target |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for spec in engine_specs(small):
        path = make_image(spec, wd)
        floors: dict[str, float] = {}
        for cache in caches[:-1]:
            got_floors = []
            for _ in range(runs):
                prepare(path, cache, idle_seconds)
                got_floors.append(floor_read(path))
            floors[cache] = statistics.median(got_floors)
        for command in ("check", "map"):
            for cache in caches:
                row = Row(spec.name, command)
                q_cmd = ["qemu-img", command, "--output=json", path.name]
                i_cmd = [*qinspect_cmd(), command, "--output=json", path.name]
                if cache == "warm":
                    run(q_cmd, wd)  # fill the cache
                for k in range(runs):
                    order = [("q", q_cmd), ("i", i_cmd)] if k % 2 == 0 else [("i", i_cmd), ("q", q_cmd)]
                    got: dict[str, Run] = {}
                    for who, cmd in order:
                        prepare(path, cache, idle_seconds)
                        got[who] = run(cmd, wd)
                    row.q.append(got["q"])
                    row.i.append(got["i"])
                    m = same_answer(command, got["q"], got["i"])
                    if m is not None:
                        bad.append(f"{spec.name} {command} {cache} run {k + 1}: {m}")
                q, i = row.med(row.q), row.med(row.i)
                floor = floors.get(cache, 0.0)
                fl = f"{floor:.3f}" if floor else ""
                rel = f"{i / floor:.2f}" if floor else ""
                verdict = target_verdict((spec.name, command, "cold" if cache == "idle" else cache), q, i, floor)
                print(f"| {spec.name} | {command} | {cache} | {q:.3f} | {i:.3f} | {i / q:.2f} | {fl} | {rel} "
                      f"| {row.rss(row.q):.0f} | {row.rss(row.i):.0f} | {verdict} |", flush=True)
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work", help="where the images go")
    ap.add_argument("--runs", type=int, default=5, help="runs per command and tool (medians are reported)")
    ap.add_argument("--small", action="store_true", help="tiny images: a smoke test that takes seconds")
    ap.add_argument("--only", nargs="*", default=None, help="only these images (names as in the table)")
    ap.add_argument("--no-tui", action="store_true", help="skip the TUI first-frame measurement")
    ap.add_argument("--engine", action="store_true",
                    help="only the cold/warm table with the floor (scattered 4 KiB 100 GiB and 1 TiB preallocated)")
    ap.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS,
                    help="idle time before each run of the engine table's 'idle' rows (0: no such rows)")
    args = ap.parse_args(argv)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    wd: Path = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    precompile()
    if args.engine:
        load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
        bad = engine_bench(args.small, args.runs, wd, args.idle_seconds)
        print(f"\nLoad average (1, 5, 15 min): {load0} at the start, "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end ({os.cpu_count()} CPUs).")
        for b in bad:
            print(f"MISMATCH {b}")
        return 1 if bad else 0
    chosen = [s for s in specs(args.small) if args.only is None or s.name in args.only]
    m = machine()
    print("## Machine\n")
    for k, v in m.items():
        print(f"- {k}: {v}")
    print(f"- qinspect command: `{' '.join(qinspect_cmd())}`")
    print(f"- runs per cell: {args.runs}, alternating which tool goes first (median wall time; peak RSS is "
          f"the max over runs, {'from GNU time' if GNU_TIME else 'from wait4'})\n")

    paths: dict[str, Path] = {}
    for s in chosen:
        t0 = time.perf_counter()
        paths[s.name] = make_image(s, wd)
        dt = time.perf_counter() - t0
        if dt > 1:
            print(f"(made {s.name} in {dt:.1f} s)", file=sys.stderr)

    rows: list[Row] = []
    for s in chosen:
        for c in s.commands:
            rows.append(compare(s, paths[s.name], c, args.runs, wd))

    print("## check and map (qemu-img vs qinspect, --output=json)\n")
    print("| image | command | qemu-img s | qinspect s | ratio | qemu-img RSS MB | qinspect RSS MB | same answer |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    failed = False
    for r in rows:
        qm, im = r.med(r.q), r.med(r.i)
        ok = "yes" if not r.mismatches else f"**NO** ({len(r.mismatches)} of {len(r.q)} runs)"
        print(f"| {r.image} | {r.command} | {fmt_s(qm)} | {fmt_s(im)} | {im / qm:.2f} | {r.rss(r.q):.0f} "
              f"| {r.rss(r.i):.0f} | {ok} |")
        failed |= bool(r.mismatches)

    print("\n## info and the cost of opening\n")
    print("| image | qemu-img info s | qinspect info s | bytes read at open: qemu-img | qinspect (strace) "
          "| qinspect (HostFile.bytes_read) |")
    print("|---|---:|---:|---:|---:|---:|")
    info_rows: dict[str, tuple[float, float]] = {}
    for s in chosen:
        p = paths[s.name]
        r = compare(s, p, "info", args.runs, wd)
        rows.append(r)
        failed |= bool(r.mismatches)
        qb = bytes_read_strace(["qemu-img", "info", "--output=json", p.name], p, wd)
        ib = bytes_read_strace([*qinspect_cmd(), "info", "--output=json", p.name], p, wd)
        hb = bytes_read_inprocess(p)
        info_rows[s.name] = (r.med(r.q), r.med(r.i))
        same = "" if not r.mismatches else " **(answer differs)**"
        print(f"| {s.name}{same} | {fmt_s(r.med(r.q))} | {fmt_s(r.med(r.i))} | {qb if qb is not None else 'n/a'} "
              f"| {ib if ib is not None else 'n/a'} | {hb} |")

    print("\n## Start-up floor: processes that do no image work\n")
    print("| command | median s |")
    print("|---|---:|")
    floor = [("qemu-img --version", ["qemu-img", "--version"]),
             ("python3 -S -c pass", [sys.executable, "-S", "-c", "pass"]),
             ("python3 -c pass", [sys.executable, "-c", "pass"]),
             ("python3 -c 'import numpy'", [sys.executable, "-c", "import numpy"]),
             ("qinspect --version", [*qinspect_cmd(), "--version"])]
    for label, cmd in floor:
        print(f"| `{label}` | {statistics.median(run(cmd, wd).seconds for _ in range(args.runs)):.3f} |")

    if not args.no_tui:
        print("\n## TUI: time from process start to the first frame\n")
        print("| image | interpreter up s | TUI imported s | on_mount s | first frame s |")
        print("|---|---:|---:|---:|---:|")
        for s in chosen:
            if not s.commands:
                continue
            res = [tui_first_frame(paths[s.name], wd) for _ in range(max(1, min(args.runs, 3)))]
            good = [x for x in res if isinstance(x, tuple)]
            if good:
                cells = " | ".join(f"{statistics.median(x[k] for x in good):.3f}" for k in range(4))
                print(f"| {s.name} | {cells} |")
            else:
                print(f"| {s.name} | {res[0]} | | | |")

    print("\n## Peak RSS of check against its budget (2 x metadata + 150 MB)\n")
    print("| image | metadata MB | budget MB | qinspect check peak RSS MB | within |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if r.command != "check":
            continue
        md = metadata_bytes(paths[r.image])
        budget = 2 * md["total"] / MiB + 150
        peak = r.rss(r.i)
        within = "yes" if peak <= budget else "NO"
        print(f"| {r.image} | {md['total'] / MiB:.1f} | {budget:.0f} | {peak:.0f} | {within} |")

    mism = [(r.image, r.command, x) for r in rows for x in r.mismatches]
    if mism:
        print("\n## MISMATCHES (qinspect's answer is not qemu-img's)\n")
        for img, c, x in mism:
            print(f"- {img} {c}: {x}")
        print("\n*** qinspect disagreed with qemu-img: the timings above do not count ***", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
