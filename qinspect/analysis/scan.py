"""Many images at once: find the qcow2 files under some paths and inspect each in a process pool.

`find_images` walks the given paths and keeps the regular files that start with qcow2's magic
(`QFI\\xfb`); files named like images that are not qcow2, unreadable files and directories, and
dangling symlinks become entries with an error, so a scan reports them instead of skipping them
silently. Symlinks are followed only when they stay inside a scanned tree (their targets are
found there anyway, so they are skipped) unless `follow_symlinks` is given; every file is
inspected once (by device and inode).

`scan_images` inspects every candidate, in a pool of forked workers (the interpreter, numpy and
the analyses are imported once, before the fork), and yields one `ImageReport` per image as it
completes: the same JSON `qinspect info`, `check` and `diagnose` print for that image (made by
the same functions), plus a small `ImageSummary` for tables and metrics. Memory is that of the
`jobs` images being inspected plus one small summary per image.

An image another process holds QEMU's write lock on is in use by a running VM: its refcounts and
dirty bit are in flux, so it gets `info` only and is reported as in use, never diagnosed. A read
lock (a backing file under a running VM, a read-only user) changes nothing and the image is
inspected fully. An image replaced or modified between discovery and the end of its inspection
gets an error: its answers would mix two states of the file.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from qinspect.analysis.diagnose import SEVERITIES, Diagnosis, diagnose
from qinspect.analysis.info import image_info
from qinspect.analysis.opening import require_files
from qinspect.analysis.walks import check_and_layout
from qinspect.qcow2.errors import Qcow2Error, Severity
from qinspect.qcow2.hostfile import FileIdentity, InUse
from qinspect.qcow2.image import Image, open_image

QCOW2_MAGIC = b"QFI\xfb"
# Names that promise an image: such a file without the magic is reported, not skipped.
IMAGE_SUFFIXES = (".qcow2", ".qcow", ".qcow2c")
# Space parts that the guest can give back (fstrim with discard=unmap) rather than a conversion:
# the guest analysis (issue 13, `qinspect guest`) adds them to the space model when it runs; a scan
# counts them as reclaimable, under their own reason, whenever they are there.
GUEST_RECLAIMABLE_PARTS = ("guest-freed",)
ScanProgressFn = Callable[[int, int, "ImageReport | None"], None]


@dataclass(frozen=True)
class Candidate:
    """A file to inspect, as discovery saw it (identity, to notice a replacement later)."""

    path: str
    dev: int = 0
    ino: int = 0
    error: str | None = None
    """Set when discovery already knows the entry cannot be inspected."""


@dataclass
class ImageSummary:
    """The numbers of one image that tables and metrics need (small; one per image is kept)."""

    path: str
    error: str | None = None
    in_use: InUse = InUse.NO
    chain: tuple[str, ...] = ()
    """Paths of the image and its backing files, top first (as QEMU resolves them)."""
    chain_real: tuple[str, ...] = ()
    """The same as real paths, to group images by the chains they share."""
    chain_error: str | None = None
    virtual_size: int = 0
    file_size: int = 0
    disk_usage: int = 0
    dirty: bool = False
    checked: bool = False
    """True when check and diagnosis ran (not for images in use by a writer, nor on errors)."""
    reclaimable: dict[str, int] = field(default_factory=dict)
    """Bytes of the file a conversion would not copy, by space part."""
    reclaimable_disk: dict[str, int] = field(default_factory=dict)
    """The same parts' share of the disk usage (holes take none)."""
    leaks: int = 0
    corruptions: int = 0
    check_errors: int = 0
    l2_cache_coverage: float | None = None
    findings: dict[Severity, int] = field(default_factory=dict)
    """Number of findings per severity (every severity present, zeros included)."""
    worst: tuple[Severity, str, str] | None = None
    """(severity, id, title) of the worst finding."""
    seconds: float = 0.0

    @property
    def reclaimable_bytes(self) -> int:
        return sum(self.reclaimable.values())

    def reaches(self, threshold: Severity) -> bool:
        """True when a finding is at `threshold` severity or worse; an image that could not be
        inspected (error) counts as an error."""
        if self.error is not None:
            return True
        return any(n and sev.rank <= threshold.rank for sev, n in self.findings.items())


@dataclass
class ImageReport:
    """One inspected image: its summary and (when asked for) its JSON Lines record, serialised."""

    summary: ImageSummary
    line: str | None = None


# -- discovery ----------------------------------------------------------------------------------------
def _has_magic(path: str) -> bool | str:
    """True/False for a readable file; an error message when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        return "permission denied (cannot open for reading)"
    except OSError as e:
        return f"cannot open: {e.strerror or e}"
    try:
        return os.pread(fd, 4, 0) == QCOW2_MAGIC
    except OSError as e:
        return f"read error: {e.strerror or e}"
    finally:
        os.close(fd)


def _inside(real: str, roots: Sequence[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def find_images(paths: Iterable[str], follow_symlinks: bool = False) -> list[Candidate]:
    """The qcow2 files under `paths` (files or directories), in walk order, each once.

    A path named on the command line is always taken (an error entry if it is not a qcow2
    file); inside directories only files with the magic, plus bad entries that look like images.
    """
    roots = [str(p) for p in paths]
    real_roots = [os.path.realpath(r) for r in roots]
    seen: set[tuple[int, int]] = set()
    out: list[Candidate] = []

    def add_file(path: str, st: os.stat_result, named: bool) -> None:
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        # Opening it again says what is wrong, in the words `qinspect info` uses for that file.
        if named or _has_magic(path) is not False or path.endswith(IMAGE_SUFFIXES):
            seen.add(key)
            out.append(Candidate(path, st.st_dev, st.st_ino))

    def entries_of(directory: str) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.append(Candidate(directory, error=f"cannot read directory: {e.strerror or e}"))
            return iter(())
        return iter(entries)

    def walk(directory: str, st: os.stat_result) -> None:
        """Depth first, in name order, with a stack rather than recursion (a tree may be deep)."""
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        stack = [entries_of(directory)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            path = entry.path
            try:
                if entry.is_symlink():
                    real = os.path.realpath(path)
                    if not os.path.exists(real):
                        if path.endswith(IMAGE_SUFFIXES):
                            out.append(Candidate(path, error="dangling symlink (its target does not exist)"))
                        continue
                    if _inside(real, real_roots) or not follow_symlinks:
                        continue  # in the tree: found there; out of the tree: not asked to follow
                    st = os.stat(path)
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError as e:
                out.append(Candidate(path, error=f"cannot stat: {e.strerror or e}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    stack.append(entries_of(path))
            elif stat.S_ISREG(st.st_mode):
                add_file(path, st, named=False)
            elif path.endswith(IMAGE_SUFFIXES):  # a FIFO, socket or device named like an image
                out.append(Candidate(path, st.st_dev, st.st_ino))

    for root in roots:
        try:
            st = os.stat(root)
        except OSError as e:
            why = "no such file or directory" if isinstance(e, FileNotFoundError) else f"cannot stat: {e.strerror}"
            out.append(Candidate(root, error=why))
            continue
        if stat.S_ISDIR(st.st_mode):
            walk(root, st)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            add_file(root, st, named=True)
        else:
            out.append(Candidate(root, st.st_dev, st.st_ino, error="not a regular file, block device or directory"))
    return out


# -- one image ----------------------------------------------------------------------------------------
def _error_message(e: BaseException, path: str) -> str:
    """The text after `qinspect: FILE: ` that the per-image command prints for this failure."""
    if isinstance(e, Qcow2Error):
        text = str(e)
        return text if e.path in (None, path) else f"{e.path}: {text}"
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"internal error: {type(e).__name__}: {e}"


def inspect_image(cand: Candidate, deep: bool = False, want_json: bool = True) -> ImageReport:
    """Inspect one image (never raises): info, check, space and the diagnosis, or an error."""
    t0 = time.monotonic()
    s = ImageSummary(cand.path)
    record: dict[str, object] = {"path": cand.path}
    try:
        _inspect_into(cand, deep, s, record)
    except Exception as e:  # every failure is this image's, never the scan's
        s.error = _error_message(e, cand.path)
    s.seconds = time.monotonic() - t0
    if s.error is not None and "info" not in record:
        record = {"path": cand.path, "error": s.error}
    elif s.error is not None:
        record["error"] = s.error
    line = json.dumps(record) if want_json else None
    return ImageReport(s, line)


def _inspect_into(cand: Candidate, deep: bool, s: ImageSummary, record: dict[str, object]) -> None:
    path = cand.path
    if cand.error is not None:
        s.error = cand.error
        return
    st_path = os.stat(path)
    if cand.ino and (st_path.st_dev, st_path.st_ino) != (cand.dev, cand.ino):
        s.error = "changed during the scan: replaced by another file after it was found"
        return
    with open_image(path) as img:
        opened = FileIdentity.of_fd(img.file.fd)
        if not opened.same_file(FileIdentity.of_stat(st_path)):
            s.error = "changed during the scan: replaced by another file while it was opened"
            return
        img.require_openable()
        _inspect_open(img, deep, s, record)
        if s.in_use is InUse.WRITER:
            return  # a running VM writes it all the time; it was only described, not checked
        # Answers from a file that changed under us mix two states of it: say so, and only that.
        why = FileIdentity.of_fd(img.file.fd).change_since(opened)
        if why is None:
            now = FileIdentity.of_path(path)
            why = "removed" if now is None else now.change_since(opened)
        if why is not None:
            s.error = f"changed during the scan: {why} while it was read"
            record.clear()


def _inspect_open(img: Image, deep: bool, s: ImageSummary, record: dict[str, object]) -> None:
    path = img.path
    lock = img.file.lock_state()
    s.in_use = lock
    info = image_info(img, path)
    s.virtual_size = img.virtual_size
    s.file_size = img.file.size
    s.disk_usage = img.file.allocated_size
    s.dirty = bool(img.header.dirty)
    layers, chain_error = img.open_chain()
    s.chain = tuple(layer.path for layer in layers)
    s.chain_real = tuple(os.path.realpath(p) for p in s.chain)
    if chain_error is None:
        # What `qinspect check` needs besides the image: every layer openable, data files present.
        try:
            require_files(img, check=True)
        except Qcow2Error as e:
            chain_error = e
    state = s.in_use.to_json()
    info["in-use"] = state  # as `qinspect info --output=json` adds it
    record.update({"chain": list(s.chain), "in-use": state, "info": info})
    if s.in_use is InUse.WRITER:
        # A running VM writes this image: its refcounts, leaks and dirty bit are in flux.
        record.update({"check": None, "findings": None, "space": None,
                       "skipped": "in use: a running QEMU holds the write lock; not checked nor diagnosed"})
        return
    lay = None
    if chain_error is not None:
        s.chain_error = _error_message(chain_error, path)
        s.error = s.chain_error
        record["check"] = None
    else:
        res, lay = check_and_layout(img, filename=path)  # one walk for check and the diagnosis
        s.leaks, s.corruptions, s.check_errors = res.leaks, res.corruptions, res.check_errors
        if res.failed is not None:  # qemu-img (and qinspect) check print no counts then
            s.error = f"check failed: {res.failed}"
            record["check"] = None
        else:
            record["check"] = {**res.to_json(), "in-use": state}
    d = diagnose(img, deep=deep, layout=lay)
    _summarise(d, s)
    record.update(d.to_json())
    s.checked = chain_error is None and record["check"] is not None


def _summarise(d: Diagnosis, s: ImageSummary) -> None:
    sp = d.space
    s.reclaimable = dict(sp.reclaimable_parts)
    for part in GUEST_RECLAIMABLE_PARTS:
        if part in sp.parts:
            s.reclaimable[part] = sp.parts[part]
    s.reclaimable_disk = {k: max(0, sp.allocated_parts.get(k, 0)) for k in s.reclaimable}
    s.l2_cache_coverage = float(d.cache.default_coverage)
    counts = dict.fromkeys(SEVERITIES, 0)
    for f in d.findings:
        counts[f.severity] += 1
    s.findings = counts
    if d.findings:
        f = d.findings[0]
        s.worst = (f.severity, f.id, f.title)


# -- many images --------------------------------------------------------------------------------------
def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    """The CPUs this process may run on (issue 16: the default is the CPU count). On a host whose
    CPUs are busy with its VMs, pass a smaller `--jobs` (or run the scan under `nice`)."""
    return cpu_count()


WORKER_DIED = "the worker process inspecting it died (killed, or out of memory?)"


def scan_images(cands: Sequence[Candidate], jobs: int | None = None, deep: bool = False, want_json: bool = True,
                progress: ScanProgressFn | None = None) -> Iterator[ImageReport]:
    """Inspect every candidate; reports come in completion order.

    With one job (or one image) everything runs in this process, lazily; otherwise in a pool of
    `jobs` forked workers, with at most a few images per worker queued (so finished reports do
    not pile up in memory). A worker that dies takes only its own image down: the images that
    were queued with it are inspected again, each alone, and the one that kills its worker again
    gets an error.
    """
    jobs = default_jobs() if jobs is None else max(1, jobs)
    total = len(cands)
    done = 0
    if progress:
        progress(0, total, None)

    def report(rep: ImageReport) -> ImageReport:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, rep)
        return rep

    if jobs == 1 or total <= 1:
        for cand in cands:
            yield report(inspect_image(cand, deep, want_json))
        return
    # Imported lazily by numpy itself (np.unique imports numpy.ma, ~40 ms): here, once, rather than
    # once in every worker.
    import numpy.ma  # noqa: F401

    workers = min(jobs, total)
    # Several images per task: fewer round trips to this process, which matters on a loaded machine
    # (each one waits for the scheduler); small enough to keep the workers evenly busy.
    chunk = max(1, min(16, total // (workers * 8)))
    chunks = [list(cands[i:i + chunk]) for i in range(0, total, chunk)]
    retry: list[Candidate] = []
    for reps, lost in _pool_run(chunks, workers, deep, want_json, window=2 * workers):
        retry.extend(lost)
        for rep in reps:
            yield report(rep)
    for cand in retry:  # alone, so that a crash is this image's
        [(reps, lost)] = list(_pool_run([[cand]], 1, deep, want_json, window=1))
        if lost:
            s = ImageSummary(cand.path, error=WORKER_DIED)
            reps = [ImageReport(s, json.dumps({"path": cand.path, "error": WORKER_DIED}) if want_json else None)]
        yield report(reps[0])


def _work(chunk: list[Candidate], deep: bool, want_json: bool) -> list[ImageReport]:
    return [inspect_image(cand, deep, want_json) for cand in chunk]


def _pool_run(chunks: Sequence[list[Candidate]], workers: int, deep: bool, want_json: bool,
              window: int) -> Iterator[tuple[list[ImageReport], list[Candidate]]]:
    """(reports, candidates lost) per chunk from a pool of forked workers; when the pool breaks (a
    worker died), the chunks it held and every chunk not yet run come back as lost."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("fork")  # start-up (imports) is paid once, in this process
    pending: dict[Future[list[ImageReport]], list[Candidate]] = {}
    todo = iter(chunks)
    broken = False
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        try:
            while True:
                while not broken and len(pending) < window:
                    chunk = next(todo, None)
                    if chunk is None:
                        break
                    try:
                        pending[pool.submit(_work, chunk, deep, want_json)] = chunk
                    except BrokenProcessPool:
                        broken = True
                        yield [], chunk
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    chunk = pending.pop(fut)
                    try:
                        yield fut.result(), []
                    except BrokenProcessPool:
                        broken = True
                        yield [], chunk
            for chunk in todo:
                yield [], chunk
        finally:
            for fut in pending:
                fut.cancel()


def chain_bases(summaries: Iterable[ImageSummary]) -> dict[str, list[str]]:
    """For every scanned image that other scanned images stand on: the real paths of those images.

    Keys and values are real paths (`ImageSummary.chain_real`); an image in several chains'
    lower layers is listed under each layer it is above.
    """
    scanned = {s.chain_real[0]: s for s in summaries if s.chain_real}
    out: dict[str, list[str]] = {}
    for real, s in scanned.items():
        for lower in s.chain_real[1:]:
            if lower in scanned:
                out.setdefault(lower, []).append(real)
    return out


__all__ = [
    "Candidate", "ImageReport", "ImageSummary", "InUse", "chain_bases", "cpu_count", "default_jobs", "find_images",
    "inspect_image", "scan_images",
]
