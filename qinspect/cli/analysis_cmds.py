"""`layout`, `measure`, `cache` and `diagnose`: where the bytes are and why the image is slow.

`measure --output=json` prints exactly what `qemu-img measure --output=json -O qcow2` prints;
the other commands have their own JSON (documented in their help) and readable tables for people.
`diagnose --fail-on=warning|error` turns the findings into a CI gate: one PASS/FAIL line per rule
and exit code 1 when a finding reaches the threshold.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from rich.table import Table
from rich.text import Text

from qinspect.analysis.cache import CacheModel, cache_model, cache_table
from qinspect.analysis.diagnose import RULES, Diagnosis, Finding, Fix, Severity, diagnose, size_option
from qinspect.analysis.findings.model import EvidenceUnit, evidence_unit
from qinspect.analysis.layout import Layout, Owner, compute_layout
from qinspect.analysis.measure import MeasureResult, measure, parse_options
from qinspect.analysis.progress import ProgressFn, no_progress
from qinspect.analysis.space import PART_LABELS, Space, part_label
from qinspect.cli.core_cmds import in_use, open_checked, print_json, warn_in_use
from qinspect.cli.render import console, err_console, literal, print_table, styled, table
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.hostfile import InUse
from qinspect.qcow2.image import Image
from qinspect.shellquote import UnsafeArgument, command_line
from qinspect.termtext import LIST_LIMIT, bounded, for_terminal
from qinspect.units import format_size, format_size_exact

# -- shared -------------------------------------------------------------------------------------------


def _open(path: str) -> Image:
    """Open for inspection: like qemu-img, refuse what QEMU refuses to open."""
    return open_checked(path)


@contextmanager
def _progress(label: str) -> Iterator[ProgressFn]:
    """A transient progress bar on stderr when it is a terminal; silence otherwise."""
    if not sys.stderr.isatty():
        yield no_progress
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), console=err_console(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def _share(n: int, total: int) -> str:
    if not total:
        return "-"
    x = 100 * n / total
    return f"{x:.1f}%" if x >= 0.1 or n == 0 else "<0.1%"


# -- layout -------------------------------------------------------------------------------------------

OWNER_GLYPHS: dict[Owner, tuple[str, str]] = {
    Owner.HEADER: ("H", "bold white"), Owner.L1: ("1", "bold cyan"), Owner.SNAPSHOT_L1: ("s", "magenta"),
    Owner.L2: ("2", "cyan"), Owner.REFCOUNT_TABLE: ("T", "bold yellow"), Owner.REFCOUNT_BLOCK: ("R", "yellow"),
    Owner.DATA: ("D", "green"), Owner.COMPRESSED: ("C", "bright_green"), Owner.SNAPSHOT_TABLE: ("S", "bold magenta"),
    Owner.BITMAP_DIRECTORY: ("b", "bold blue"), Owner.BITMAP_TABLE: ("B", "blue"), Owner.BITMAP_DATA: ("m", "blue"),
    Owner.LUKS: ("K", "bold red"), Owner.LEAKED: ("!", "bold red"), Owner.FREE: (".", "dim"),
    Owner.PAST_END: ("_", "dim"), Owner.SHARED: ("=", "bright_magenta"), Owner.CONFLICT: ("X", "bold red reverse"),
}


def layout_json(lay: Layout, filename: str) -> dict[str, object]:
    """The layout as JSON: per-owner totals and the runs of equal owners in file order."""
    counts = lay.counts()
    nbytes = lay.bytes_by_owner()
    cs = lay.cluster_size
    runs = []
    for first, n, owner in lay.runs():
        start = first * cs
        runs.append({"start": start, "length": min((first + n) * cs, lay.file_size) - start,
                     "owner": owner.name.lower().replace("_", "-")})
    return {
        "filename": filename, "cluster-size": cs, "file-size": lay.file_size, "clusters": lay.nb_clusters,
        "image-end-offset": lay.image_end_offset,
        "owners": {o.name.lower().replace("_", "-"): {"clusters": counts[o], "bytes": nbytes[o]}
                   for o in Owner if counts[o]},
        "anomalies": dict(lay.anomalies),
        "runs": runs,
    }


def file_map(lay: Layout, width: int = 64, max_rows: int = 16) -> tuple[list[Text], int]:
    """Rows of glyphs, one per group of clusters (the group's main owner; leaks and conflicts win)."""
    n = lay.nb_clusters
    if not n:
        return [], 1
    width = max(8, width)
    per = max(1, -(-n // (width * max_rows)))
    groups = -(-n // per)
    owner = lay.owner.astype(np.int64)
    g = np.arange(n) // per
    nown = len(Owner)
    counts = np.bincount(g * nown + owner, minlength=groups * nown).reshape(groups, nown)
    main = counts.argmax(axis=1)
    for urgent in (Owner.CONFLICT, Owner.LEAKED):
        main[counts[:, urgent] > 0] = urgent
    rows: list[Text] = []
    for r in range(0, groups, width):
        t = Text()
        for o in main[r : r + width]:
            ch, style = OWNER_GLYPHS[Owner(int(o))]
            t.append(ch, style=style)
        rows.append(t)
    return rows, per


def run_layout(args: argparse.Namespace) -> int:
    with _open(args.image) as img, _progress("layout") as prog:
        state = in_use(img)
        if args.output != "json":
            warn_in_use(args.image, state)
        lay = compute_layout(img, prog)
        if args.offset is not None:
            return _print_lookup(lay, args.offset, args.output == "json", state)
        if args.output == "json":
            print_json({**layout_json(lay, args.image), "in-use": state.to_json()})
            return 0
        _print_layout(lay, args.image, args.width)
    return 0


def _print_layout(lay: Layout, filename: str, width: int) -> None:
    c = console()
    cs = lay.cluster_size
    head = literal(filename, "bold")
    head.append(f": {format_size_exact(lay.file_size)} file, {format_size(cs)} clusters, "
                f"{lay.nb_clusters} host clusters; last cluster in use ends at {lay.image_end_offset:#x}")
    c.print(head, soft_wrap=True)
    counts = lay.counts()
    nbytes = lay.bytes_by_owner()
    t = table("", "owner", "clusters#", "bytes#", "of file#")
    for o in Owner:
        if counts[o]:
            ch, style = OWNER_GLYPHS[o]
            t.add_row(styled((ch, style)), o.label, f"{counts[o]:,}", format_size(nbytes[o]),
                      _share(nbytes[o], lay.file_size))
    print_table(t)
    rows, per = file_map(lay, width)
    if rows:
        scale = "1 cluster" if per == 1 else f"{per} clusters ({format_size(per * cs)})"
        c.print(f"File map, one character = {scale}, offset 0 at top left:")
        for i, row in enumerate(rows):
            line = Text(f"{i * width * per * cs:>#14x} ", style="dim")
            line.append_text(row)
            c.print(line, soft_wrap=True)
    if lay.anomalies or lay.refs_past_eof:
        c.print("[yellow]Anomalies:[/] " + ", ".join(f"{v} {k}" for k, v in lay.anomalies.items() if v)
                + (f", {lay.refs_past_eof} references past the end of the file" if lay.refs_past_eof else ""))
    if lay.leaks or lay.refcount_errors:
        c.print(f"Refcounts: {lay.leaks} clusters above their references (leaks), {lay.refcount_errors} below "
                "(corruption); see 'qinspect check'.")


def _print_lookup(lay: Layout, offset: int, as_json: bool, state: InUse = InUse.NO) -> int:
    cs = lay.cluster_size
    owner = lay.owner_at(offset)
    kind = lay.kind_at(offset)
    total = lay.count_references(offset)  # (one table can be named by millions of entries)
    cl = offset // cs
    stored = int(lay.stored_refcount[cl]) if 0 <= cl < len(lay.stored_refcount) else 0
    reference = int(lay.reference[cl]) if 0 <= cl < len(lay.reference) else 0
    if as_json:
        # every reference, encoded as it is made: the list is streamed, not built
        refs_json = _Streamed(total, ({"kind": r.kind, "table-offset": r.table_offset, "entry-index": r.entry_index,
                                       "entry-offset": r.entry_file_offset, "guest-offset": r.guest_offset,
                                       "snapshot": r.snapshot} for r in lay.iter_references(offset)))
        print_json({"offset": offset, "cluster": cl, "cluster-offset": cl * cs,
                    "owner": owner.name.lower().replace("_", "-"), "kind": kind.name.lower().replace("_", "-"),
                    "refcount": stored, "references-counted": reference,
                    "references": refs_json, "in-use": state.to_json()})
        return 0
    refs = lay.references(offset, MAX_LOOKUP_ROWS)
    c = console()
    what = owner.label if kind == owner else f"{owner.label}: {kind.label}"
    c.print(f"Offset {offset:#x} is in host cluster {cl} ({cl * cs:#x}..{(cl + 1) * cs - 1:#x}): [bold]{what}[/]")
    c.print(f"Stored refcount {stored}, references found {reference}")
    if not refs:
        c.print("Nothing points here." if owner not in (Owner.HEADER,) else "The header is found at offset 0.")
        return 0
    t = table("pointed to by", "entry offset#", "table offset#", "index#", "guest offset#", "snapshot")
    for r in refs:
        t.add_row(r.kind, f"{r.entry_file_offset:#x}", f"{r.table_offset:#x}", str(r.entry_index),
                  f"{r.guest_offset:#x}" if r.guest_offset is not None else "", r.snapshot or "")
    print_table(t)
    if total > len(refs):
        c.print(f"... and {total - len(refs)} more references (--output=json lists them all)")
    return 0


MAX_LOOKUP_ROWS = 500
"""References in the human lookup table (a table of millions of rows takes minutes to render)."""


class _Streamed(list[dict[str, object]]):
    """A JSON array whose items are made while it is encoded: `json`'s encoder (with an indent, as
    `print_json` uses) asks a list whether it is empty and then iterates it, so this one answers
    from a count and iterates a generator, and the references of a table named by millions of
    entries are never all in memory at once."""

    def __init__(self, count: int, items: Iterator[dict[str, object]]) -> None:
        super().__init__()
        self._count = count
        self._items = items

    def __bool__(self) -> bool:
        return self._count > 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict[str, object]]:
        return self._items


# -- measure ------------------------------------------------------------------------------------------


def run_measure(args: argparse.Namespace) -> int:
    if args.target_format != "qcow2":
        raise Qcow2Error(f"-O {args.target_format}: qinspect measures qcow2 targets only (-O qcow2); "
                         f"for other formats run qemu-img measure -O {args.target_format}")
    opts = parse_options(args.options)
    if args.size is not None and args.image:
        raise Qcow2Error("--size and an image are mutually exclusive")
    if args.size is None and not args.image:
        raise Qcow2Error("either --size or an image must be given")
    state = InUse.NO
    if args.size is not None:
        res = measure(None, opts, size=args.size)
        img_name = None
    else:
        with _open(args.image) as img, _progress("measure") as prog:
            state = in_use(img)
            res = measure(img, opts, progress=prog)
        img_name = args.image
    if args.output == "json":
        # The extra "in-use" key describes the image measured (none with --size).
        print_json(res.to_json() if img_name is None else {**res.to_json(), "in-use": state.to_json()})
    else:
        warn_in_use(args.image or "", state)
        _print_measure(res, args.options, img_name, args.size)
    return 0


def _print_measure(res: MeasureResult, options: str, image: str | None, size: int | None) -> None:
    c = console()
    opts = literal(f" with -o {options}" if options else "")
    if image:
        head = literal("Converting ")
        head.append_text(literal(image))
        head.append(" to qcow2")
    else:
        head = literal(f"A new {format_size_exact(size or 0)} qcow2 image")
    head.append_text(opts)
    head.append(" needs:")
    c.print(head, soft_wrap=True)
    t = table("", "size#", "bytes#", "meaning")
    t.add_row("required", format_size(res.required), f"{res.required:,}",
              "file size of the new image (its metadata sized for a full disk)")
    t.add_row("fully allocated", format_size(res.fully_allocated), f"{res.fully_allocated:,}",
              "once every guest byte has been written")
    if res.bitmaps is not None:
        t.add_row("bitmaps", format_size(res.bitmaps), f"{res.bitmaps:,}",
                  "more, to copy the persistent dirty bitmaps (convert --bitmaps)")
    print_table(t)


# -- cache --------------------------------------------------------------------------------------------


def run_cache(args: argparse.Namespace) -> int:
    with _open(args.image) as img:
        state = in_use(img)
        h = img.header
        try:
            m = cache_model(h.size, h.cluster_size, h.extended_l2, h.refcount_bits, args.l2_cache_size,
                            args.l2_cache_entry_size, args.refcount_cache_size, not args.non_linux,
                            cache_size=args.cache_size, write_size=args.write_size)
            rows = cache_table(h.size, h.refcount_bits, args.l2_cache_size, args.l2_cache_entry_size,
                               args.refcount_cache_size, not args.non_linux, cache_size=args.cache_size,
                               write_size=args.write_size)
        except ValueError as e:
            raise Qcow2Error(str(e)) from None
    if args.output == "json":
        print_json({"filename": args.image, "model": m.to_json(), "other-cluster-sizes": [r.to_json() for r in rows],
                    "in-use": state.to_json()})
        return 0
    warn_in_use(args.image, state)
    _print_cache(m, rows, args)
    return 0


def _print_cache(m: CacheModel, rows: list[CacheModel], args: argparse.Namespace) -> None:
    c = console()
    geometry = f"{format_size(m.cluster_size)} clusters" + (" with extended L2 (16-byte entries)" if m.extended_l2
                                                            else "")
    head = literal(args.image, "bold")
    head.append(f": {format_size_exact(m.virtual_size)} virtual disk, {geometry}, {m.refcount_bits}-bit refcounts")
    c.print(head, soft_wrap=True)
    host = "Linux" if m.linux else "non-Linux"
    t = table("", "value")
    t.add_row("L2 cache to cover the whole disk", f"{format_size_exact(m.max_l2_cache)}")
    t.add_row(f"QEMU's default ({host}, at most {format_size(m.default_l2_cache_max)})",
              f"{format_size(m.default_l2_cache_size)} in {format_size(m.default_l2_cache_entry_size)} slices, covers "
              f"{format_size(m.default_coverage_bytes)} ({_pct(m.default_coverage)})")
    given = [f"{k}={size_option(v)}" for k, v in (("l2-cache-size", args.l2_cache_size),
                                                   ("l2-cache-entry-size", args.l2_cache_entry_size),
                                                   ("refcount-cache-size", args.refcount_cache_size),
                                                   ("cache-size", args.cache_size)) if v is not None]
    if given:
        t.add_row("with " + ",".join(given),
                  f"{format_size(m.l2_cache_size)} = {m.l2_cache_entries} x {format_size(m.l2_cache_entry_size)}, "
                  f"covers {format_size(m.coverage_bytes)} ({_pct(m.coverage)})")
    t.add_row("refcount cache", f"{format_size(m.refcount_cache_size)}, covers "
                                f"{format_size(m.refcount_cache_coverage_bytes)} of image file")
    t.add_row(f"{format_size(m.cow_write_size)} write into a fresh cluster over a backing file",
              f"writes {format_size(m.cow_bytes_written)} (x{m.cow_factor:g})")
    print_table(t)
    if m.coverage < 1:
        c.print("To cover the whole disk:")
        # QEMU's option syntax doubles commas in values; the argument is quoted for the shell.
        drive = f"file={args.image.replace(',', ',,')},format=qcow2,l2-cache-size={size_option(m.max_l2_cache)}"
        try:
            c.print(literal(f"  {command_line(['-drive', drive])}", "bold green"), soft_wrap=True)
        except UnsafeArgument:
            c.print(f"  (no -drive line: the file name holds control characters; l2-cache-size="
                    f"{size_option(m.max_l2_cache)})")
    else:
        c.print("[green]The L2 cache covers the whole disk.[/]")
    given_col = "given covers#" if given else ""
    tt = table("cluster#", "ext L2", "needs#", "default#", "covers#", *([given_col] if given else []),
               f"CoW {format_size(m.cow_write_size)}#",
               title="The same disk with other cluster sizes: L2 cache needed, QEMU's default and what it covers")
    for r in rows:
        mark = r.cluster_size == m.cluster_size and r.extended_l2 == m.extended_l2
        cells = [("* " if mark else "") + format_size(r.cluster_size), "yes" if r.extended_l2 else "",
                 format_size(r.max_l2_cache),
                 format_size(r.default_l2_cache_size), _pct(r.default_coverage)]
        if given:
            cells.append(_pct(r.coverage))
        tt.add_row(*cells, f"x{r.cow_factor:g}", style="bold" if mark else None)
    print_table(tt)
    c.print("* this image's geometry")


def _pct(x: float) -> str:
    return "100%" if x >= 1 else (f"{x * 100:.1f}%" if x >= 0.001 else "<0.1%")


# -- diagnose -----------------------------------------------------------------------------------------

SEVERITY_STYLES = {Severity.ERROR: "bold red", Severity.WARNING: "bold yellow", Severity.INFO: "bold blue"}


def _evidence_text(ev: dict[str, int | float | str]) -> str:
    """Evidence as `key value` pairs; byte counts in the one size format (units.format_size_exact)."""
    parts = []
    for k, v in ev.items():
        unit = evidence_unit(k, v)
        if unit is EvidenceUnit.BYTES:
            parts.append(f"{k} {format_size_exact(int(v))}")
        elif unit is EvidenceUnit.OFFSET:
            parts.append(f"{k} {int(v):#x}")
        elif unit is EvidenceUnit.RATIO:
            parts.append(f"{k} {v:g}")
        else:
            parts.append(f"{k} {for_terminal(str(v))}")
    # Evidence naming every snapshot of 65,536 stays a line here (--output=json has every pair).
    return bounded(parts, limit=2 * LIST_LIMIT)


def _prediction_text(fix: Fix, sp: Space) -> str:
    """`3.05 GiB → 1.21 GiB on disk, 4 GiB → 4 GiB apparent` (today's numbers, then the prediction)."""
    p = fix.predicts
    out = []
    if "disk-usage" in p:
        out.append(f"{format_size(sp.allocated_size)} → {format_size(int(p['disk-usage']))} on disk")
    if "file-size" in p:
        out.append(f"{format_size(sp.file_size)} → {format_size(int(p['file-size']))} apparent")
    where = "in place" if fix.in_place else (f"writes {for_terminal(fix.output)}" if fix.output else "not in place")
    return f"{where}; " + ", ".join(out)


def run_diagnose(args: argparse.Namespace) -> int:
    with _open(args.image) as img, _progress("diagnose") as prog:
        d = diagnose(img, deep=args.deep, progress=prog)
    threshold = Severity(args.fail_on) if args.fail_on else None
    failed = d.fails(threshold) if threshold else []
    if args.output == "json":
        out = d.to_json()
        if threshold:
            out["fail-on"] = {"threshold": args.fail_on, "passed": not failed,
                              "rules": _rule_results(d, threshold)}
        print_json(out)
    else:
        if threshold:
            _print_gate(d, threshold)
        _print_diagnosis(d, args.image)
    return 1 if failed else 0


def _rule_results(d: Diagnosis, threshold: Severity) -> list[dict[str, str]]:
    by_id = {f.id: f for f in d.findings}
    limit = threshold.rank
    out = []
    for rid in RULES:
        f = by_id.get(rid)
        if rid not in d.rules_run:
            out.append({"rule": rid, "result": "skip", "why": "needs --deep"})
        elif f is None:
            out.append({"rule": rid, "result": "pass"})
        else:
            res = "fail" if f.severity.rank <= limit else "pass"
            out.append({"rule": rid, "result": res, "severity": f.severity.value, "title": f.title})
    for f in d.findings:  # findings outside the fixed rule list (none today)
        if f.id not in RULES:
            res = "fail" if f.severity.rank <= limit else "pass"
            out.append({"rule": f.id, "result": res, "severity": f.severity.value, "title": f.title})
    return out


def _print_gate(d: Diagnosis, threshold: Severity) -> None:
    """The PASS/FAIL summary line, then one line per rule (text from the image never as markup)."""
    c = console()
    results = _rule_results(d, threshold)
    failed = [r for r in results if r["result"] == "fail"]
    verdict = Text()
    if failed:
        verdict.append("FAIL", style="bold red")
        verdict.append(f": {len(failed)} rule(s) at {threshold} or worse")
    else:
        verdict.append("PASS", style="bold green")
        verdict.append(f": no finding at {threshold} or worse")
    c.print(verdict)
    for r in results:
        line = Text()
        if r["result"] == "skip":
            line.append("SKIP", style="dim")
            line.append(f"  {r['rule']} ({r['why']})")
        elif r["result"] == "pass":
            line.append("PASS", style="green")
            note = f" ({r['severity']}: {for_terminal(r['title'])})" if "severity" in r else ""
            line.append(f"  {r['rule']}{note}")
        else:
            line.append("FAIL", style="bold red")
            line.append(f"  {r['rule']} ({r['severity']}): {for_terminal(r['title'])}")
        c.print(line)
    c.print()


def _print_diagnosis(d: Diagnosis, filename: str) -> None:
    c = console()
    n = len(d.findings)
    by_sev = {s: sum(1 for f in d.findings if f.severity is s) for s in Severity}
    summary = ", ".join(f"{v} {k}" for k, v in by_sev.items() if v) or "nothing to report"
    deep = "" if d.deep is not None else "  (metadata only; --deep also reads the data)"
    head = Text(for_terminal(filename), style="bold")
    head.append(f": {n} finding{'s' if n != 1 else ''} ({summary}){deep}", style="")
    c.print(head, soft_wrap=True)
    if d.in_use is not InUse.NO:
        c.print(Text("in use: contents may be changing" if d.in_use is InUse.WRITER else
                     "in use: a running QEMU has the image open read-only", style="yellow"))
    if d.deep is not None and d.deep.skipped:
        c.print(Text(f"Deep scan skipped: {for_terminal(d.deep.skipped)}", style="yellow"))
    first_with: dict[str, str] = {}  # a command (the merged conversion) -> the finding that printed it
    for f in d.findings:
        cmd = f.fix.command if f.fix is not None else None
        _print_finding(f, d.space, first_with.get(cmd) if cmd else None)
        if cmd:
            first_with.setdefault(cmd, f.id)
    _print_space(d.space)
    m = d.cache
    c.print(f"\nL2 cache: the whole disk needs {format_size(m.max_l2_cache)}; QEMU's default "
            f"{format_size(m.default_l2_cache_size)} covers {_pct(m.default_coverage)}.")
    if d.deep is not None and not d.deep.skipped:
        dd = d.deep
        c.print(f"Deep scan: {dd.data_clusters} data clusters read ({format_size(dd.data_bytes)}); {dd.zero_clusters} "
                f"all zero, {dd.duplicate_clusters} equal to the backing file. A conversion would write about "
                f"{format_size(dd.convert_size)} ({format_size(dd.convert_reclaim)} less than now).")


def _print_finding(f: Finding, sp: Space, same_fix_as: str | None = None) -> None:
    """One finding; `same_fix_as` names the finding above that printed the same command (one merged
    conversion answers several findings): its prediction and command are not repeated."""
    c = console()
    c.print()
    head = Text()
    head.append(f"{f.severity.value.upper():<8}", style=SEVERITY_STYLES[f.severity])
    head.append(f" {f.id}", style="bold")
    head.append(f"  {for_terminal(f.title)}")
    c.print(head, soft_wrap=True)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row("  evidence", Text(_evidence_text(f.evidence)))
    grid.add_row("  impact", Text(for_terminal(f.impact)))
    fix = f.fix
    if fix is not None and same_fix_as is not None:
        grid.add_row("  fix", Text(f"the same command as {same_fix_as}'s, above (one conversion for both)"))
        fix = None
    if fix is not None:
        grid.add_row("  predicts", Text(_prediction_text(fix, sp)))
        for label, value in (("  cost", fix.cost), ("  loses", fix.loses), ("  note", fix.note)):
            if value:
                grid.add_row(label, Text(for_terminal(value)))
    with c.capture() as captured:  # a grid pads every cell to its column's width: no trailing blanks
        c.print(grid)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    if fix is None:
        return
    c.print(Text("  fix", style="dim"))
    cmd = fix.command
    # On its own line and never wrapped, so that it can be copied as it is.
    if cmd is not None:
        c.print(Text(f"    {cmd}", style="bold green"), soft_wrap=True)
    else:
        c.print(Text(f"    {for_terminal(fix.blocked)}", style="yellow"), soft_wrap=True)


def _print_space(sp: Space) -> None:
    c = console()
    c.print()
    t = table("part", "bytes#", "of file#", "on disk#",
              title=f"Where the {format_size_exact(sp.file_size)} of the file go")
    for k, v in sp.parts.items():
        if v:
            t.add_row(part_label(k, sp.parts), format_size(v), _share(v, sp.file_size),
                      format_size(sp.allocated_parts.get(k, 0)))
    fs = sp.allocated_parts.get("filesystem", 0)
    if fs:
        t.add_row(PART_LABELS["filesystem"], "", "", format_size(fs))
    t.add_row("total", format_size(sp.file_size), "100%", format_size(sp.allocated_size), style="bold")
    print_table(t)
    gc = sp.guest_clusters
    method = str(sp.extents.get("method", ""))
    how = "FIEMAP" if method == "fiemap" else ("SEEK_DATA/SEEK_HOLE: this file system has no FIEMAP, so unwritten "
                                               "extents count as data and may change with the page cache"
                                               if method == "seek-hole" else "no extent information")
    if gc:
        c.print(Text(f"Data clusters: {format_size(gc.get('written', 0))} written, "
                     f"{format_size(gc.get('unwritten', 0))} "
                     f"reserved as zeroed space (unwritten extents), {format_size(gc.get('hole', 0))} holes "
                     f"(host extents by {how})."))
    if sp.snapshots:
        items = list(sp.snapshots.items())
        if len(items) > LIST_LIMIT:  # the ones freeing the most, in table order (--output=json: all)
            keep = {s for s, _b in sorted(items, key=lambda kv: -kv[1])[:LIST_LIMIT]}
            items = [kv for kv in items if kv[0] in keep]
        st = table("snapshot", "name", "deleting it frees#")
        for sid, b in items:
            st.add_row(sid, sp.snapshot_names.get(sid, ""), format_size(b))  # table() escapes the name
        print_table(st)
        if len(sp.snapshots) > len(items):
            c.print(Text(f"… and {len(sp.snapshots) - len(items):,} more snapshots (the {len(items)} freeing the most "
                         "are shown; --output=json lists all)"))


__all__ = ["file_map", "layout_json", "run_cache", "run_diagnose", "run_layout", "run_measure"]
