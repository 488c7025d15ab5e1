"""Run fuzz cases in worker processes, each case under a time bound and a memory bound.

The parent forks `jobs` workers after loading the pristine images and their targets (shared
copy-on-write). It sends case indices; a worker builds the case deterministically, patches its
private copy of the image in place, runs every operation over it, puts the bytes back, and answers
with an `Outcome`. A worker that does not answer within the time bound is killed (by its pid) and
replaced; the case counts as a hang. Inside the worker, the peak resident set size of each case is
measured (the kernel's high-water mark `VmHWM`, reset before each case through
`/proc/self/clear_refs`; with QINSPECT_FUZZ_TRACEMALLOC=1, the `tracemalloc` peak instead, slower),
and `RLIMIT_AS` turns a runaway allocation into a `MemoryError` rather than a machine out of memory.

An operation may end in a result or a `Qcow2Error` (or subclass); anything else is a crash.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, open_image

from .mutate import Case, make_case
from .targets import Targets, find_targets

# Bounds. The time bound only catches hangs (a case normally takes milliseconds), so it is generous.
CASE_TIMEOUT = float(os.environ.get("QINSPECT_FUZZ_TIMEOUT", "60"))
# Peak memory growth during one case. Legitimate work is bounded by the format limits
# (a 32 MiB L1 table, an 8 MiB refcount table, per-cluster arrays of the file) and by the file size.
MEMORY_BOUND = int(os.environ.get("QINSPECT_FUZZ_MEMORY_MB", "512")) << 20
ADDRESS_SPACE_HEADROOM = 6 << 30
TRACEMALLOC = os.environ.get("QINSPECT_FUZZ_TRACEMALLOC", "") not in ("", "0")

READ_BYTES = 256 * 1024
# Every CLI_EVERY-th case also runs the CLI commands in-process (they cost ~7x a library-only case).
CLI_EVERY = 8


@dataclass
class Base:
    """A pristine sample image: its catalog name, file name, bytes and targets."""

    name: str
    file: str
    data: bytes
    targets: Targets
    tops: list[str] = field(default_factory=list)  # file names of images that have this one below them


@dataclass
class Outcome:
    """What one case did: status is ok, crash, hang, memory or died."""

    index: int
    description: str = ""
    status: str = "ok"
    detail: str = ""
    ops: dict[str, str] = field(default_factory=dict)
    compared: bool = False  # exit codes compared with qemu-img's
    not_compared: NotCompared | None = None  # why they could not be, when the case was meant to be
    peak: int = 0
    seconds: float = 0.0


def load_bases(sample_dir: Path, catalog: list[dict[str, Any]], names: Iterable[str] | None = None) -> list[Base]:
    """Read the pristine images (and find their targets) from a directory of materialised samples."""
    wanted = set(names) if names is not None else None
    files = {e["name"]: (e["file"][:-3] if e["file"].endswith(".gz") else e["file"]) for e in catalog}
    bases: list[Base] = []
    for e in catalog:
        if wanted is not None and e["name"] not in wanted:
            continue
        fname = files[e["name"]]
        path = sample_dir / fname
        tops = [files[o["name"]] for o in catalog if any(b == fname for b in o.get("backing", []))]
        bases.append(Base(e["name"], fname, path.read_bytes(), find_targets(str(path)), tops))
    return bases


FOCUS_EVERY = 4
"""Every FOCUS_EVERY-th case (index % FOCUS_EVERY == 0) mutates a region chosen in turn, on an
image that has it: a region only one or two samples have (a LUKS header, compressed data) is
reached every FOCUS_EVERY * (number of regions) cases whatever the seed, not when the random
image picks happen to land on those samples."""


def case_for(index: int, seed: int, bases: list[Base]) -> tuple[Base, Case]:
    """The image and the mutation of case `index` (deterministic in seed and index)."""
    rng = random.Random(f"pick:{seed}:{index}")
    focus: str | None = None
    if index % FOCUS_EVERY == 0:
        regions = sorted({r for b in bases for r in b.targets.regions})
        turn = index // FOCUS_EVERY + random.Random(f"turn:{seed}").randrange(len(regions))
        focus = regions[turn % len(regions)]
        having = [b for b in bases if focus in b.targets.regions]
        base = having[rng.randrange(len(having))]
    else:
        base = bases[rng.randrange(len(bases))]
    chain_tops = base.tops + [b.file for b in bases if b.tops and b.file != base.file][:3]
    case = make_case(index, seed, base.name, base.data, base.targets, base.file, chain_tops, focus)
    if base.tops and rng.random() < 0.25:
        case.steps.append(f"then inspect {rng.choice(base.tops)}, which has it below")
    return base, case


# -- the operations ---------------------------------------------------------------------------------
def _layout_fn() -> Callable[[Image], object] | None:
    """`qinspect.analysis.layout.compute_layout`, when that module exists."""
    try:
        from qinspect.analysis.layout import compute_layout
    except ImportError:
        return None
    return compute_layout


def _reads(img: Image) -> int:
    vs = img.virtual_size
    n = 0
    spots = {0, vs // 2, max(0, vs - 65536)}
    for ex in img.extents(0, min(vs, 1 << 34)):
        for k in range(min(len(ex), 8)):
            spots.add(int(ex.guest[k]))
        if len(spots) > 16:
            break
    for g in sorted(spots):
        if g >= vs:
            continue
        try:
            img.lookup(g)
            n += len(img.read(g, min(READ_BYTES, vs - g)))
        except Qcow2Error:
            n += 1
    return n


class _Sink(io.TextIOBase):
    """A text stream that keeps only the last `keep` characters written and whether a crash marker
    ("Traceback", "internal error") appeared anywhere in it. A check of a garbage image prints
    hundreds of MB of lines: kept in a StringIO they were the harness's memory (4 bytes a
    character), counted as the case's growth, not qinspect's."""

    MARKERS = ("Traceback", "internal error")

    def __init__(self, keep: int = 4096) -> None:
        super().__init__()
        self.keep = keep
        self.tail = ""
        self.crashed = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        seen = self.tail[-32:] + s  # (a marker cut between two writes is still seen)
        if not self.crashed and any(m in seen for m in self.MARKERS):
            self.crashed = True
        self.tail = (self.tail + s)[-self.keep :] if len(s) < self.keep else s[-self.keep :]
        return len(s)

    def getvalue(self) -> str:
        return self.tail


def _cli(args: list[str]) -> str:
    from qinspect.cli import main

    out, err = _Sink(), _Sink()
    saved = os.environ.get("QINSPECT_DEBUG")
    os.environ["QINSPECT_DEBUG"] = "1"  # guarded() re-raises: an "internal error" is a crash here
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        if saved is None:
            del os.environ["QINSPECT_DEBUG"]
        else:
            os.environ["QINSPECT_DEBUG"] = saved
    if err.crashed:
        raise AssertionError(f"qinspect {' '.join(args)}: {err.getvalue()[-500:]}")
    return f"exit {code}"


def exercise(path: str, with_cli: bool = True) -> dict[str, str]:
    """Run every operation over the image at `path`; Qcow2Error is a result, anything else raises."""
    ops: dict[str, str] = {}

    def op(name: str, fn: Callable[[], object]) -> None:
        try:
            r = fn()
            ops[name] = "ok" if r is None else f"ok: {str(r)[:80]}"
        except Qcow2Error as e:
            msg = str(e)
            if not msg.strip():
                raise AssertionError(f"{name}: Qcow2Error with an empty message") from e
            ops[name] = f"error: {msg[:200]}"

    try:
        img = open_image(path)
    except Qcow2Error as e:
        ops["open"] = f"error: {e}"
        if with_cli:
            op("cli info", lambda: _cli(["info", path]))
        return ops
    from qinspect.analysis.check import check_image
    from qinspect.analysis.info import chain_info, image_info
    from qinspect.analysis.map import iter_map

    with img:
        ops["open"] = "ok"
        op("problems", lambda: (len([str(p) for p in img.problems]), len(img.bitmaps), img.luks,
                                img.open_refusals))
        op("info", lambda: len(json.dumps(image_info(img))))
        op("map", lambda: sum(1 for _ in iter_map(img)))
        op("info chain", lambda: len(json.dumps(chain_info(img))))
        op("check", lambda: check_image(img).to_json())
        layout = _layout_fn()
        if layout is not None:
            op("layout", lambda: layout(img))
        op("read", lambda: _reads(img))
        op("problems after", lambda: len([str(p) for p in img.problems]))
    if with_cli:
        for cmd in _cli_commands(path):
            op(f"cli {cmd[0]}", lambda cmd=cmd: _cli(cmd))  # type: ignore[misc]
    return ops


def _cli_commands(path: str) -> list[list[str]]:
    """The CLI commands a case runs: the core ones, and the analysis commands that exist."""
    from qinspect.cli import COMMANDS

    cmds = [["info", path], ["check", path, "--output=json"], ["map", path, "--output=json"]]
    for name, args in (("layout", []), ("measure", ["--output=json"]), ("cache", []), ("diagnose", ["--deep"])):
        if name in COMMANDS:
            cmds.append([name, path, *args])
    return cmds


# -- exit codes against qemu-img ----------------------------------------------------------------------
# Where qemu-img is installed, every case compares the exit codes of info, map and check with live
# qemu-img's (QINSPECT_FUZZ_QEMU_EVERY=N compares every N-th case only, QINSPECT_FUZZ_QEMU=0 none).
# The three qemu-img runs of a case go in parallel, inside the worker, so the pool of workers keeps
# both CPUs busy with qinspect and qemu-img alike. Nothing is cached between runs.
_QEMU_MODE = os.environ.get("QINSPECT_FUZZ_QEMU", "")
QEMU_IMG = shutil.which("qemu-img") if _QEMU_MODE != "0" else None
QEMU_EVERY = 1 if _QEMU_MODE not in ("", "0") else int(os.environ.get("QINSPECT_FUZZ_QEMU_EVERY", "1"))
QEMU_OFFSET = 3  # with QEMU_EVERY 8: not the CLI_EVERY subset (index % 8 == 0), which runs the CLI in-process
EXIT_COMMANDS = ("info", "map", "check")
# The sample LUKS image's passphrase (sample_images/README.md): qemu-img's map and check unlock the
# key (info opens with BDRV_O_NO_IO and does not); qinspect reads metadata only and needs none. With
# the right key both read the same metadata; header rules are checked by both without one.
LUKS_SECRET = "qinspect"
# qemu-img has no loop check when it opens a backing chain (bdrv_open_backing_file recurses, one
# file descriptor and ~135 KiB per layer, and each layer costs more than the last): an image that
# is its own backing file is opened again and again until a resource runs out. Measured (QEMU 7.2,
# loaded machine): with 20000 descriptors `qemu-img map` gave up after 1290 s and 2.6 GB at 19991
# layers, "Too many open files", exit 1; with 1000/2000/4000, after 1.1/2.8/9.5 s, the same
# answer. A limit of 256 descriptors, 16x what the longest sample chain needs (it opens with 16),
# makes it give that answer at ~250 layers in 0.1 s, and changes nothing for real chains.
QEMU_NOFILE = 256
QEMU_TIMEOUT = float(os.environ.get("QINSPECT_FUZZ_QEMU_TIMEOUT", "30"))  # a hang detector: they take ms


class NotCompared(enum.StrEnum):
    """Why a case's exit codes could not be compared with qemu-img's (counted apart in the summary)."""

    QEMU_TIMEOUT = "qemu-img did not answer in time"
    QEMU_CRASHED = "qemu-img crashed (killed by a signal: its bug, no exit code to compare)"
    KEY_DOES_NOT_UNLOCK = "the passphrase no longer unlocks the damaged key material (qinspect reads no key)"
    KEY_DERIVATION_TOO_LONG = "PBKDF2 iteration counts damaged to hours of work to try the key (qinspect reads no key)"
    KEY_MATERIAL_OUTSIDE = ("a key slot's material moved outside the crypto header extension, which QEMU reads "
                            "only to unlock (qinspect reads no key)")


# qemu-img's map and check try the passphrase on every active key slot, in order: PBKDF2 with the
# slot's iteration count, then PBKDF2 with the master key's to verify the result (at some 10^6
# iterations a second). A mutated count of 2^31 means an hour of hashing before the answer, which
# is "Invalid password" anyway (any changed count derives another key); such cases are not run.
KDF_ITERATION_BUDGET = 10_000_000


def _kdf_iterations(path: str) -> int:
    """The PBKDF2 iterations qemu-img would spend trying the key on every active slot (0 when
    it refuses the LUKS header first). qcow2_read_extensions opens the LUKS header, key and all,
    when it reaches the crypto extension, before it looks at any later extension: damage QEMU
    refuses afterwards does not save the hashing."""
    from qinspect.qcow2.image import open_image
    from qinspect.qcow2.luks import luks_open_refusal

    try:
        with open_image(path) as img:
            ch = img.header.crypto_ext
            if ch is None or img.luks is None or luks_open_refusal(img.file, ch.offset, ch.length) is not None:
                return 0
            active = [s for s in img.luks.slots if s.active]
            return sum(s.iterations + img.luks.master_key_iters for s in active)
    except Qcow2Error:
        return 0


def compares_with_qemu(index: int) -> bool:
    """Whether case `index` compares its exit codes with qemu-img (when qemu-img is installed)."""
    return QEMU_IMG is not None and index % QEMU_EVERY == QEMU_OFFSET % QEMU_EVERY


def qinspect_exit_codes(path: str) -> dict[str, int]:
    """The exit codes of `qinspect info`, `map` and `check` (--output=json), from the same opening
    rules the CLI uses, without writing any output."""
    from qinspect.analysis.check import check_image
    from qinspect.analysis.map import iter_map_runs
    from qinspect.cli.core_cmds import open_checked

    codes: dict[str, int] = {}
    for cmd in EXIT_COMMANDS:
        try:
            with open_checked(path, need_files=cmd != "info", check=cmd == "check") as img:
                if cmd == "check":
                    codes[cmd] = check_image(img).exit_code
                else:
                    if cmd == "map":
                        for _ in iter_map_runs(img):  # map fails where QEMU's block status does
                            pass
                    codes[cmd] = 0
        except Qcow2Error:
            codes[cmd] = 1
    return codes


def _encrypted(path: str) -> bool:
    """crypt_method is not 0: qemu-img's map and check need the key."""
    with open(path, "rb") as f:
        head = f.read(36)
    return len(head) >= 36 and head[32:36] != bytes(4)


def qemu_argv(cmd: str, path: str) -> list[str]:
    """qemu-img CMD on the image (named relative to its directory, the cwd of the run).

    -U: no locks are taken against the fuzzer's own open files. The top image's format is given:
    qinspect reads qcow2 only, and qemu-img's probe would take a damaged magic for a raw disk. An
    encrypted image gets the key, as tests/test_golden.py gives it."""
    name = os.path.basename(path)
    if _encrypted(path):
        return [str(QEMU_IMG), cmd, "-U", "--output=json", "--object", f"secret,id=sec0,data={LUKS_SECRET}",
                "--image-opts", f"driver=qcow2,file.filename={name},encrypt.key-secret=sec0"]
    return [str(QEMU_IMG), cmd, "-U", "-f", "qcow2", "--output=json", name]


def _limited(argv: list[str]) -> list[str]:
    """argv under the descriptor limit, set by a shell (`ulimit -n`) rather than a preexec_fn: a
    preexec_fn makes Python fork the whole worker (its pristine images included) instead of
    vfork, which cost 35 ms a case, more than qemu-img's three runs themselves."""
    return ["/bin/sh", "-c", f'ulimit -n {QEMU_NOFILE} && exec "$0" "$@"', *argv]


def qemu_exit_codes(path: str, meanwhile: Callable[[], object] | None = None
                    ) -> tuple[dict[str, int] | None, NotCompared | None]:
    """The exit codes of qemu-img info, map and check (--output=json) on the same file, run in
    parallel; or None and why they cannot be compared. `meanwhile` runs while they do."""
    if _encrypted(path) and _kdf_iterations(path) > KDF_ITERATION_BUDGET:
        if meanwhile is not None:
            meanwhile()
        return None, NotCompared.KEY_DERIVATION_TOO_LONG
    # (cwd: QEMU 7.2 takes a relative data file name relative to the current directory)
    # stderr goes to files, not pipes: check on a damaged image may print thousands of lines
    codes: dict[str, int] = {}
    errors: dict[str, bytes] = {}
    why: NotCompared | None = None
    with contextlib.ExitStack() as stack:
        errs = {cmd: stack.enter_context(tempfile.TemporaryFile()) for cmd in EXIT_COMMANDS}
        procs = {cmd: subprocess.Popen(_limited(qemu_argv(cmd, path)), cwd=os.path.dirname(path) or None,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errs[cmd])
                 for cmd in EXIT_COMMANDS}
        deadline = time.monotonic() + QEMU_TIMEOUT
        if meanwhile is not None:
            meanwhile()
        for cmd, p in procs.items():
            try:
                codes[cmd] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                why = NotCompared.QEMU_TIMEOUT
        for cmd, f in errs.items():
            f.seek(max(0, f.seek(0, 2) - 4096))
            errors[cmd] = f.read()
    if why is not None:
        return None, why
    if any(code < 0 for code in codes.values()):
        return None, NotCompared.QEMU_CRASHED
    if codes["info"] == 0 and any(b"Invalid password, cannot unlock any keyslot" in e for e in errors.values()):
        return None, NotCompared.KEY_DOES_NOT_UNLOCK
    if codes["info"] == 0 and any(b"Request for data outside of extension header" in e for k, e in errors.items()
                                  if k != "info"):
        return None, NotCompared.KEY_MATERIAL_OUTSIDE
    return codes, None


# -- the worker -------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, ctx: Any, workdir: Path, sample_dir: Path, bases: list[Base], seed: int) -> None:
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, workdir, sample_dir, bases, seed), daemon=True)
        self.proc.start()
        child.close()
        self.case: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.parent.close()


def _worker_main(conn: Connection, workdir: Path, sample_dir: Path, bases: list[Base], seed: int) -> None:
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        vm = _status_kib("VmSize") * 1024
        if vm:
            limit = vm + ADDRESS_SPACE_HEADROOM
            if hard == resource.RLIM_INFINITY or limit < hard:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass
    # Standard input is /dev/null for the worker and for qemu-img alike: a case whose backing file
    # is /dev/stdin or /proc/self/fd/0 then means the same file to both, whatever pytest was given.
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    workdir.mkdir(parents=True, exist_ok=True)
    for f in sample_dir.iterdir():
        link = workdir / f.name
        if not link.exists():
            link.symlink_to(f)
    private: set[str] = set()
    if TRACEMALLOC:
        tracemalloc.start(1)
    while True:
        try:
            index = conn.recv()
        except EOFError:
            return
        if index is None:
            return
        conn.send(_run_one(index, workdir, bases, seed, private))


def _run_one(index: int, workdir: Path, bases: list[Base], seed: int, private: set[str]) -> Outcome:
    t0 = time.perf_counter()
    out = Outcome(index)
    try:
        base, case = case_for(index, seed, bases)
    except Exception:  # a bug of the fuzzer itself, reported like a crash
        out.status, out.detail = "crash", "building the case failed:\n" + traceback.format_exc()
        return out
    out.description = case.describe()
    path = workdir / base.file
    if base.file not in private:
        path.unlink(missing_ok=True)
        path.write_bytes(base.data)
        private.add(base.file)
    target = path
    if case.steps and case.steps[-1].startswith("then inspect "):
        target = workdir / case.steps[-1].split()[2].rstrip(",")
    _apply(path, case)
    meter = _Meter()
    try:
        out.ops = exercise(str(target), with_cli=index % CLI_EVERY == 0)
        if compares_with_qemu(index):
            ours: dict[str, int] = {}
            theirs, out.not_compared = qemu_exit_codes(
                str(target), meanwhile=lambda: ours.update(qinspect_exit_codes(str(target))))
            out.compared = theirs is not None
            if theirs is not None and ours != theirs:
                out.status = "disagree"
                out.detail = f"exit codes: qinspect {ours}, qemu-img {theirs}"
    except BaseException as e:  # every escape is the finding
        out.status = "crash"
        out.detail = f"{type(e).__name__}: {e}\n" + traceback.format_exc()
    finally:
        out.peak = meter.peak()
        _revert(path, case, base.data)
    if out.status == "ok" and out.peak > MEMORY_BOUND:
        out.status = "memory"
        out.detail = f"memory grew by {out.peak >> 20} MiB during the case, more than {MEMORY_BOUND >> 20} MiB"
    out.seconds = time.perf_counter() - t0
    return out


class _Meter:
    """Peak memory growth from now on: RSS high-water mark (reset here) or the tracemalloc peak."""

    def __init__(self) -> None:
        if TRACEMALLOC:
            tracemalloc.reset_peak()
            self.base = tracemalloc.get_traced_memory()[0]
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM of this (worker) process to its current RSS
        except OSError:
            pass
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if TRACEMALLOC:
            return max(0, tracemalloc.get_traced_memory()[1] - self.base)
        return max(0, _status_kib("VmHWM") * 1024 - self.base)


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _apply(path: Path, case: Case) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, b in case.patches:
            os.pwrite(fd, b, off)
        if case.truncate is not None:
            os.ftruncate(fd, case.truncate)
    finally:
        os.close(fd)


def _revert(path: Path, case: Case, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, b in case.patches:
            if off < len(data):
                os.pwrite(fd, data[off : off + len(b)], off)
        if case.truncate is not None:
            os.pwrite(fd, data[case.truncate :], case.truncate)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


# -- the pool ---------------------------------------------------------------------------------------
def run_cases(indices: Iterable[int], *, seed: int, bases: list[Base], sample_dir: Path, workdir: Path,
              jobs: int = 2, timeout: float = CASE_TIMEOUT,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run the cases in `jobs` workers; returns every outcome (in completion order)."""
    ctx = mp.get_context("fork")
    todo = list(indices)
    todo.reverse()
    outcomes: list[Outcome] = []
    serial = 0

    def spawn() -> _Worker:
        nonlocal serial
        serial += 1
        return _Worker(ctx, workdir / f"w{serial}", sample_dir, bases, seed)

    workers = [spawn() for _ in range(max(1, min(jobs, len(todo) or 1)))]

    def dispatch(w: _Worker) -> None:
        if todo:
            w.case = todo.pop()
            w.deadline = time.monotonic() + timeout
            w.parent.send(w.case)
        else:
            w.case = None

    for w in workers:
        dispatch(w)
    try:
        while any(w.case is not None for w in workers):
            busy = [w for w in workers if w.case is not None]
            wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.parent for w in busy], timeout=wait_for)
            for i, w in enumerate(workers):
                if w.case is None:
                    continue
                o: Outcome | None = None
                if w.parent in ready:
                    try:
                        o = w.parent.recv()
                    except (EOFError, OSError):
                        o = Outcome(w.case, status="died", detail=f"worker exited with code {w.proc.exitcode}")
                elif time.monotonic() >= w.deadline:
                    o = Outcome(w.case, status="hang", detail=f"no result within {timeout:g} s")
                if o is None:
                    continue
                outcomes.append(o)
                if on_outcome is not None:
                    on_outcome(o)
                if o.status in ("hang", "died"):
                    w.kill()
                    workers[i] = w = spawn()
                dispatch(w)
    finally:
        for w in workers:
            if w.proc.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    w.parent.send(None)
                w.proc.join(2)
            w.kill()
    return outcomes


def describe_hang(outcome: Outcome, seed: int, bases: list[Base]) -> str:
    """A hang's outcome carries no description (the worker was killed): rebuild it."""
    if outcome.description:
        return outcome.description
    return case_for(outcome.index, seed, bases)[1].describe()
