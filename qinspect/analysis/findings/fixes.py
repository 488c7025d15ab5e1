"""Fix planning: one conversion per image, never harmful, and nothing in place on a live image.

Every finding whose fix is a `qemu-img convert` states a `ConvertWish`; `plan_converts` merges
them into one command (options of all wishes; a conflicting option keeps the value of the most
severe finding and says why), predicts its result with the space model (`predict_convert`) and
drops the wish of a space finding the conversion would not help (disk usage not smaller, or the
apparent size more than doubled): that finding is then not shown, since nothing gives its space
back. Performance findings keep the conversion with its cost stated. `apply_lock` removes
in-place fixes while a VM holds the write lock.
"""

from __future__ import annotations

from qinspect.analysis.deep import predict_convert
from qinspect.analysis.findings.common import path_arg, size_text
from qinspect.analysis.findings.model import Category, Context, Finding, Fix
from qinspect.analysis.measure import MeasureOptions
from qinspect.units import parse_size, size_option

MIN_GAIN = 1 << 20
"""A conversion offered for a space finding must give back at least this much (disk or apparent)."""
IN_USE_BLOCK = ("not offered while the image is in use: stop the VM (it holds the write lock), then run "
                "diagnose again")


def _geometry(c: Context) -> dict[str, str]:
    h = c.h
    opts = {"cluster_size": size_option(h.cluster_size)}
    if h.extended_l2:
        opts["extended_l2"] = "on"
    if h.refcount_bits != 16:
        opts["refcount_bits"] = str(h.refcount_bits)
    if h.lazy_refcounts:
        opts["lazy_refcounts"] = "on"
    return opts


def convert_argv(c: Context, options: dict[str, str], flags: tuple[str, ...], out: str) -> list[str]:
    """`qemu-img convert` of the image into `out`, keeping its backing file (-B) and bitmaps."""
    img = c.img
    argv = ["qemu-img", "convert", *flags]
    src = path_arg(c.path)
    opts = dict(options)
    if img.encrypted:
        argv += ["--object", "secret,id=sec0,file=PASSPHRASE_FILE", "--image-opts"]
        src = f"driver=qcow2,file.filename={c.path.replace(',', ',,')},encrypt.key-secret=sec0"
        opts.setdefault("encrypt.format", "luks")
        opts.setdefault("encrypt.key-secret", "sec0")
    else:
        argv += ["-f", "qcow2"]
    if img.active_bitmaps and "--salvage" not in flags:
        argv += ["--bitmaps"] + (["--skip-broken-bitmaps"] if any(b.in_use for b in img.active_bitmaps) else [])
    argv += ["-O", "qcow2"]
    if opts:
        argv += ["-o", ",".join(f"{k}={v.replace(',', ',,')}" for k, v in opts.items())]
    if c.h.backing_file is not None:
        argv += ["-B", path_arg(c.h.backing_file), "-F", c.h.backing_format or "qcow2"]
    return [*argv, src, path_arg(out)]


def _merge(c: Context, wanting: list[Finding]) -> tuple[dict[str, str], tuple[str, ...], list[str]]:
    opts = _geometry(c)
    chosen: dict[str, tuple[str, Finding]] = {}
    flags: list[str] = []
    conflicts: list[str] = []
    for f in sorted(wanting, key=lambda f: f.severity.rank):  # stable: registry order breaks ties
        w = f.convert
        assert w is not None
        for k, v in w.options.items():
            if k not in chosen:
                chosen[k] = (v, f)
            elif chosen[k][0] != v:
                keep, by = chosen[k]
                conflicts.append(f"{f.id} wanted {k}={v}; {k}={keep} kept for {by.id} ({by.severity.value}, "
                                 f"{by.convert.reason if by.convert else ''})")
        flags += [x for x in w.flags if x not in flags]
    for k, (v, _f) in chosen.items():
        opts[k] = v
    return opts, tuple(flags), conflicts


def _target(opts: dict[str, str]) -> MeasureOptions:
    return MeasureOptions(cluster_size=parse_size(opts.get("cluster_size", "64k")),
                          extended_l2=opts.get("extended_l2") == "on",
                          refcount_bits=int(opts.get("refcount_bits", "16")))


def plan_converts(c: Context, findings: list[Finding]) -> list[Finding]:
    """Give every finding that wants a conversion the same merged, predicted fix; returns the
    findings to show (space findings a conversion would not help are dropped)."""
    wanting = [f for f in findings if f.convert is not None]
    dropped: set[int] = set()
    while wanting:
        opts, flags, conflicts = _merge(c, wanting)
        pred = predict_convert(c.img, _target(opts), c.deep)
        gain = max(c.disk_usage - pred.disk_usage, c.file_size - pred.file_size)
        harmful = [f for f in wanting if f.category == Category.SPACE
                   and (gain < MIN_GAIN or pred.disk_usage > c.disk_usage or pred.file_size > 2 * max(1, c.file_size))]
        if harmful:
            dropped |= {id(f) for f in harmful}
            wanting = [f for f in wanting if id(f) not in dropped]
            continue
        out = f"{c.path}.new"
        reasons = "; ".join(f"{f.id}: {f.convert.reason}" for f in wanting if f.convert is not None)
        note = f"then replace the image with {out} (VM stopped). One conversion for {reasons}"
        if conflicts:
            note += ". Conflicts: " + "; ".join(conflicts)
        if c.img.snapshots:
            note += f". It does not copy the {len(c.img.snapshots)} internal snapshot(s)"
        cost = ""
        if pred.disk_usage > c.disk_usage or pred.file_size > c.file_size:
            cost = (f"the new file takes {size_text(c.disk_usage)} -> {size_text(pred.disk_usage)} on disk "
                    f"({size_text(c.file_size)} -> {size_text(pred.file_size)} apparent)")
        predicts: dict[str, int | float | str] = {"file-size": pred.file_size, "disk-usage": pred.disk_usage,
                                                  "l2-tables": pred.l2_tables, "data-clusters": pred.data_clusters,
                                                  "cluster-size": _target(opts).cluster_size,
                                                  "extended-l2": int(_target(opts).extended_l2)}
        loses = ""
        if "--salvage" in flags:
            lost = sum(int(f.evidence.get("unreadable-bytes", 0)) for f in wanting)
            loses = f"{size_text(lost)} of unreadable guest data become zeros; everything else is kept"
        fix = Fix(convert_argv(c, opts, flags, out), False, predicts, note=note, cost=cost, loses=loses,
                  output=out)
        for f in wanting:
            f.fix = fix
        break
    return [f for f in findings if id(f) not in dropped]


def apply_lock(c: Context, findings: list[Finding]) -> None:
    """While a VM holds the write lock: no in-place fix; conversions say to stop the VM first."""
    if not c.write_locked:
        return
    for f in findings:
        if f.fix is None:
            continue
        if f.fix.in_place and not f.fix.in_guest:
            f.fix.blocked = IN_USE_BLOCK
        elif "stop the VM first" not in f.fix.note:
            f.fix.note = "stop the VM first; " + f.fix.note
