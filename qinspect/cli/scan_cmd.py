"""`qinspect scan PATH...`: every qcow2 image under some paths, ranked, as JSON Lines or as metrics.

The engine (`qinspect.analysis.scan`) finds the images and inspects them in a process pool; this
module renders what it yields: an ncdu-style table sorted by reclaimable bytes (human), one JSON
object per image (json, streamed as images complete), or Prometheus' text exposition format for
node_exporter's textfile collector (prometheus, written with `prometheus_client`). `--output-file`
replaces the file atomically (a temporary file in the same directory, then a rename), as the
textfile collector requires. The exit code is 1 when an image reached `--fail-on`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

from qinspect.analysis.diagnose import SEVERITIES, Severity
from qinspect.analysis.scan import (
    ImageReport,
    ImageSummary,
    InUse,
    chain_bases,
    find_images,
    scan_images,
)
from qinspect.termtext import for_terminal
from qinspect.units import format_size

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily


# -- output files -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _destination(path: str | None) -> Iterator[IO[str]]:
    """stdout, or a temporary file next to `path` that replaces it only when all was written."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # readable by the exporter's user, like a file made by '>'
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int, ImageReport | None], None] | None]:
    """A transient bar on stderr when it is a terminal (Rich is imported only then)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qinspect.cli.render import err_console

    with Progress(TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), console=err_console(), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, rep: ImageReport | None) -> None:
            name = for_terminal(os.path.basename(rep.summary.path)) if rep else ""
            bar.update(task, completed=done, total=total, description=name[-40:])

        yield update


# -- the command --------------------------------------------------------------------------------------
def run_scan(args: argparse.Namespace) -> int:
    from qinspect.qcow2.errors import Qcow2Error

    if args.jobs is not None and args.jobs < 1:
        raise Qcow2Error("--jobs must be at least 1")
    if args.fail_on is not None and args.fail_on not in SEVERITIES:
        raise Qcow2Error(f"--fail-on: unknown severity {args.fail_on!r} (known: {', '.join(SEVERITIES)})")
    t0 = time.monotonic()
    cands = find_images(args.paths, follow_symlinks=args.follow_symlinks)
    want_json = args.output == "json"
    summaries: list[ImageSummary] = []
    with _destination(args.output_file) as out:
        with _progress_bar(True) as prog:
            for rep in scan_images(cands, jobs=args.jobs, deep=args.deep, want_json=want_json, progress=prog):
                if rep.line is not None:
                    out.write(rep.line + "\n")
                summaries.append(rep.summary)
        duration = time.monotonic() - t0  # the bar is gone before the table or the metrics are written
        if args.output == "prometheus":
            out.write(prometheus_text(summaries, duration))
        elif args.output == "human":
            _print_table(summaries, out, duration)
    missing = [c for c in cands if c.path in args.paths and c.error == "no such file or directory"]
    for c in missing:
        print(f"qinspect: {for_terminal(c.path)}: no such file or directory", file=sys.stderr)
    failed = bool(args.fail_on) and any(s.reaches(Severity(args.fail_on)) for s in summaries)
    return 1 if failed or missing else 0


# -- human --------------------------------------------------------------------------------------------
def _bar(n: int, top: int, width: int = 10) -> str:
    if top <= 0 or n <= 0:
        return " " * width
    full = max(1, round(width * n / top))
    return "#" * full + " " * (width - full)


def _status(s: ImageSummary) -> tuple[str, str]:
    """(short state for the worst-finding column, longer note after the path)."""
    if s.in_use is InUse.WRITER:
        return "in use", "in use by a running VM (write lock held): not checked"
    if s.error is not None:
        return ("broken chain" if s.chain_error == s.error else "error"), s.error
    if s.worst is None:
        return "-", ""
    sev, fid, _title = s.worst
    return f"{sev} {fid}", ""


def _chain_text(s: ImageSummary, bases: dict[str, list[str]]) -> str:
    parts = []
    if len(s.chain) > 1:
        parts.append("over " + os.path.basename(s.chain[1]) + (f" (+{len(s.chain) - 2})" if len(s.chain) > 2 else ""))
    over = bases.get(s.chain_real[0], []) if s.chain_real else []
    if over:
        parts.append(f"base of {len(over)}")
    if s.in_use is InUse.READER:
        parts.append("in use, read-only")
    return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n:,} image" if n == 1 else f"{n:,} images"


def _print_table(summaries: list[ImageSummary], out: IO[str], duration: float) -> None:
    from rich.console import Console

    from qinspect.cli.render import console as stdout_console
    from qinspect.cli.render import plain_lines, styled, table, to_rich

    console = stdout_console() if out is sys.stdout else Console(file=out, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # a file or a pipe: long lines rather than cells wrapped at 80 columns
    def rank(s: ImageSummary) -> tuple[int, bool, int, str]:  # most to reclaim, then the worst finding
        sev = s.worst[0].rank if s.worst else len(SEVERITIES)
        return -s.reclaimable_bytes, s.error is not None, sev, s.path

    rows = sorted(summaries, key=rank)
    top = max((s.reclaimable_bytes for s in rows), default=0)
    bases = chain_bases(rows)
    t = table("reclaimable#", "", "file#", "disk#", "virtual#", "leaks#", "worst", "image")
    for col in t.columns[:-2]:
        col.no_wrap = True
    t.columns[-1].overflow = "fold"
    t.columns[-1].min_width = 24
    for s in rows:
        state, note = _status(s)
        extra = "; ".join(x for x in (_chain_text(s, bases), note) if x)
        name = styled(for_terminal(s.path), *([(f"  ({for_terminal(extra)})", "dim")] if extra else []))
        if not s.chain:  # not even opened
            t.add_row("", "", "", "", "", "", state, name)
            continue
        known = bool(s.reclaimable)
        t.add_row(format_size(s.reclaimable_bytes) if known else "?", _bar(s.reclaimable_bytes, top),
                  format_size(s.file_size), format_size(s.disk_usage), format_size(s.virtual_size),
                  f"{s.leaks:,}" if s.checked else "?", state, name)
    t.add_row(format_size(sum(s.reclaimable_bytes for s in rows)), "", format_size(sum(s.file_size for s in rows)),
              format_size(sum(s.disk_usage for s in rows)), format_size(sum(s.virtual_size for s in rows)),
              f"{sum(s.leaks for s in rows):,}", "", f"total of {_count(len(rows))}", style="bold")
    lines = None if console.is_terminal else plain_lines(t, console.width)
    if console.is_terminal:
        console.print(to_rich(t, terminal=True))
    elif lines is not None:  # a file or a pipe: no cell padding after the last column
        console.file.write("".join(line.rstrip() + "\n" for line in lines))
    else:  # cells folded to the width: Rich lays them out
        with console.capture() as cap:
            console.print(to_rich(t, terminal=False))
        console.file.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
    bad = sum(1 for s in rows if s.error is not None)
    busy = sum(1 for s in rows if s.in_use is InUse.WRITER)
    by_sev = {sev: sum(1 for s in rows if s.worst and s.worst[0] is sev and s.error is None) for sev in SEVERITIES}
    worst = ", ".join(f"{n} with {sev} at worst" for sev, n in by_sev.items() if n) or "no findings"
    console.print(f"{_count(len(rows))} in {duration:.1f} s: {worst}; {bad} could not be fully inspected"
                  + (f"; {busy} in use by a running VM, not checked" if busy else "") + ".", soft_wrap=True)
    if any(s.worst for s in rows):
        console.print("Details of one image: qinspect diagnose IMAGE; of all: qinspect scan --output=json PATH...",
                      soft_wrap=True)


# -- prometheus ---------------------------------------------------------------------------------------
def _label(path: str) -> str:
    """A path as a label value: absolute (the same series whatever the scan's working directory)
    and valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return os.path.abspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _families(summaries: list[ImageSummary], duration: float) -> list[GaugeMetricFamily]:
    from prometheus_client.core import GaugeMetricFamily

    def fam(name: str, doc: str, labels: tuple[str, ...] = ("path",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    file_b = fam("qinspect_image_file_bytes", "Size of the image file (st_size).")
    disk_b = fam("qinspect_image_disk_bytes", "Disk space the image file occupies (st_blocks * 512).")
    virt_b = fam("qinspect_image_virtual_bytes", "Virtual disk size the guest sees.")
    recl = fam("qinspect_image_reclaimable_bytes",
               "Bytes of the file a qemu-img convert would not copy, by reason (space part).", ("path", "reason"))
    recl_d = fam("qinspect_image_reclaimable_disk_bytes",
                 "Disk space those reclaimable parts occupy (holes take none), by reason.", ("path", "reason"))
    leaks = fam("qinspect_image_leaked_clusters", "Leaked clusters (refcount above references), as qemu-img check.")
    corr = fam("qinspect_image_corruptions", "Refcount corruptions found by the check, as qemu-img check.")
    cover = fam("qinspect_image_l2_cache_coverage_ratio",
                "Share of the virtual disk QEMU's default L2 cache covers (1 = all).")
    finds = fam("qinspect_image_findings", "Findings of the diagnosis, by severity.", ("path", "severity"))
    dirty = fam("qinspect_image_dirty", "1 when the image's dirty bit is set (not cleanly closed).")
    in_use = fam("qinspect_image_in_use", "1 when another process (a running QEMU) holds the image's locks "
                 "(lock: write or read; none with 0).",
                 ("path", "lock"))
    checked = fam("qinspect_image_checked", "1 when check and diagnosis ran (not for images in use or broken).")
    errors = fam("qinspect_image_error", "1 when the image could not be fully inspected (see the JSON output).")
    chain = fam("qinspect_image_chain_length", "Layers of the backing chain, this image included.")
    for s in summaries:
        p = _label(s.path)
        errors.add_metric([p], 1.0 if s.error is not None else 0.0)
        if not s.chain:
            continue  # could not even be opened: only the error
        file_b.add_metric([p], s.file_size)
        disk_b.add_metric([p], s.disk_usage)
        virt_b.add_metric([p], s.virtual_size)
        dirty.add_metric([p], 1.0 if s.dirty else 0.0)
        in_use.add_metric([p, s.in_use.to_json() or "none"], 0.0 if s.in_use is InUse.NO else 1.0)
        checked.add_metric([p], 1.0 if s.checked else 0.0)
        chain.add_metric([p], len(s.chain))
        if s.in_use is InUse.WRITER:
            continue  # in flux: no numbers rather than wrong ones
        for reason, n in s.reclaimable.items():
            recl.add_metric([p, reason], n)
        for reason, n in s.reclaimable_disk.items():
            recl_d.add_metric([p, reason], n)
        if s.l2_cache_coverage is not None:
            cover.add_metric([p], s.l2_cache_coverage)
        for sev, n in s.findings.items():
            finds.add_metric([p, sev], n)
        if s.checked:
            leaks.add_metric([p], s.leaks)
            corr.add_metric([p], s.corruptions)
    images = fam("qinspect_scan_images", "Images found by the last scan, by state.", ("state",))
    states = {"ok": 0, "error": 0, "in-use": 0}
    for s in summaries:
        states["error" if s.error is not None else "in-use" if s.in_use is InUse.WRITER else "ok"] += 1
    for state, n in states.items():
        images.add_metric([state], n)
    dur = fam("qinspect_scan_duration_seconds", "Wall time of the last scan.", ())
    dur.add_metric([], duration)
    when = fam("qinspect_scan_timestamp_seconds", "When the last scan finished (Unix time).", ())
    when.add_metric([], time.time())
    return [file_b, disk_b, virt_b, recl, recl_d, leaks, corr, cover, finds, dirty, in_use, checked, errors, chain,
            images, dur, when]


def prometheus_text(summaries: list[ImageSummary], duration: float) -> str:
    """The text exposition format of every family (via prometheus_client's own writer)."""
    from prometheus_client import CollectorRegistry, generate_latest

    fams = _families(summaries, duration)

    class _Collector:
        def collect(self) -> list[GaugeMetricFamily]:
            return fams

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    text: str = generate_latest(registry).decode("utf-8")
    return text


__all__ = ["prometheus_text", "run_scan"]
