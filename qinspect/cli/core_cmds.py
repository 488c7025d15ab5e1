"""`info`, `map` and `check`: qemu-img's JSON for scripts, readable tables for people."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime

from qinspect._malloc import tune_for_bulk_work
from qinspect.analysis.check import CheckResult, check_image
from qinspect.analysis.info import chain_info, image_info
from qinspect.analysis.map import MapEntry, iter_map, iter_map_runs, write_map_json_runs
from qinspect.qcow2.image import Image, open_image

# Rich (qinspect.cli.render) is imported only for human output: it costs more start-up time than
# a whole `qemu-img check` of a small image, and the JSON paths do not need it.

# Bounds on human output: a hostile image can carry 65536 snapshots and as many problems.
MAX_WARNINGS = 50
MAX_SNAPSHOT_ROWS = 500


def open_checked(path: str, need_files: bool = False, check: bool = False) -> Image:
    """Open like qemu-img does: fail on anything QEMU would refuse to open.

    With `need_files` (map, check), also fail when a backing file or the external data file cannot
    be opened, before any output, as qemu-img map and check do (qemu-img info does not need them).
    With `check`, open the image itself as qemu-img check does (BDRV_O_CHECK).
    """
    img = open_image(path)
    try:
        img.require_openable(check=check)
        if need_files:
            for layer in img.chain():
                if isinstance(layer, Image):
                    layer.require_openable(check=check and layer is img)  # backing files: a normal open
                    layer.data_file()
    except Exception:
        img.close()
        raise
    return img


def print_json(obj: object) -> None:
    """JSON the way qemu-img pretty-prints it (4-space indent)."""
    sys.stdout.write(json.dumps(obj, indent=4) + "\n")


# -- info ---------------------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    with open_checked(args.image) as img:
        infos = chain_info(img, args.image) if args.backing_chain else [image_info(img, args.image)]
        if args.output == "json":
            print_json(infos if args.backing_chain else infos[0])
            return 0
        from rich.markup import escape

        from qinspect.cli.render import console, err_console

        for i, info in enumerate(infos):
            if args.backing_chain:
                what = "the image" if i == 0 else f"backing file of layer {i - 1}"
                console().rule(f"layer {i}: {escape(str(info['filename']))} ({what})", align="left")
            _print_info(info)
        err = err_console()
        for p in img.problems[:MAX_WARNINGS]:
            err.print(f"[yellow]warning:[/] {escape(str(p))}", soft_wrap=True)  # names come from the file
        if len(img.problems) > MAX_WARNINGS:
            err.print(f"[yellow]warning:[/] ... and {len(img.problems) - MAX_WARNINGS} more problems")
    return 0


def _print_info(info: dict[str, object]) -> None:
    from qinspect.cli.render import console, human_size, table

    c = console()
    rows: list[tuple[str, str]] = [
        ("image", str(info["filename"])),
        ("file format", str(info["format"])),
        ("virtual size", f"{human_size(int(info['virtual-size']))} ({info['virtual-size']} bytes)"),  # type: ignore[call-overload]
        ("disk size", human_size(int(info["actual-size"]))),  # type: ignore[call-overload]
    ]
    if "cluster-size" in info:
        rows.append(("cluster_size", str(info["cluster-size"])))
    if info.get("encrypted"):
        rows.append(("encrypted", "yes"))
    if info.get("dirty-flag"):
        rows.append(("cleanly shut down", "no"))
    if "backing-filename" in info:
        bf = str(info["backing-filename"])
        full = str(info.get("full-backing-filename", bf))
        rows.append(("backing file", bf if full == bf else f"{bf} (actual path: {full})"))
    if "backing-filename-format" in info:
        rows.append(("backing file format", str(info["backing-filename-format"])))
    t = table("field", "value")
    for k, v in rows:
        t.add_row(k, v)
    c.print(t)
    snaps = info.get("snapshots")
    if isinstance(snaps, list) and snaps:
        st = table("ID", "TAG", "VM SIZE#", "DATE", "VM CLOCK", "ICOUNT#", title="Snapshot list")
        for s in snaps[:MAX_SNAPSHOT_ROWS]:  # a table of 65536 rows takes minutes to render
            date = datetime.fromtimestamp(s["date-sec"], UTC).strftime("%Y-%m-%d %H:%M:%S")
            secs = s["vm-clock-sec"]
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 1_000_000:03d}"
            st.add_row(s["id"], s["name"], human_size(s["vm-state-size"]), date, clock,
                       str(s["icount"]) if "icount" in s else "")
        c.print(st)
        if len(snaps) > MAX_SNAPSHOT_ROWS:
            c.print(f"... and {len(snaps) - MAX_SNAPSHOT_ROWS} more snapshots (--output=json lists them all)")
    fs = info.get("format-specific")
    if isinstance(fs, dict):
        ft = table("format specific", "value")
        for k, v in fs["data"].items():
            if k == "bitmaps":
                for b in v:
                    flags = ", ".join(b["flags"]) or "-"
                    ft.add_row("bitmap", f"{b['name']}: granularity {human_size(b['granularity'])}, flags {flags}")
            elif k == "encrypt":
                ft.add_row("encrypt", _encrypt_summary(v))
            else:
                ft.add_row(k, json.dumps(v) if isinstance(v, bool) else str(v))
        c.print(ft)


def _encrypt_summary(enc: dict[str, object]) -> str:
    if enc.get("format") != "luks":
        return str(enc.get("format"))
    slots = enc.get("slots", [])
    active = sum(1 for s in slots if isinstance(s, dict) and s.get("active")) if isinstance(slots, list) else 0
    cipher = f"{enc.get('cipher-alg')}-{enc.get('cipher-mode')}-{enc.get('ivgen-alg')}"
    return (f"luks {cipher}, hash {enc.get('hash-alg')}, "
            f"uuid {enc.get('uuid')}, {active} active key slot(s), payload at {enc.get('payload-offset')}")


# -- map ----------------------------------------------------------------------------------------------
def run_map(args: argparse.Namespace) -> int:
    tune_for_bulk_work()
    with open_checked(args.image, need_files=True) as img:
        if args.output == "json":
            write_map_json_runs(iter_map_runs(img, start=args.start_offset, length=args.max_length), sys.stdout)
            return 0
        _print_map(img, iter_map(img, start=args.start_offset, length=args.max_length))
    return 0


def _state(e: MapEntry) -> str:
    if e.compressed:
        return "compressed"
    if e.data and e.zero:
        return "data (reads as zero)"
    if e.data:
        return "data"
    if e.zero and e.present:
        return "zero"
    return "unallocated" if not e.present else "zero"


def _host_file(layer: object) -> str:
    """The file a layer's host offsets point into (its external data file, if it has one)."""
    if isinstance(layer, Image) and layer.data_file_path:
        return layer.data_file_path
    return str(getattr(layer, "path", ""))


def _print_map(img: Image, entries: object) -> None:
    from qinspect.cli.render import console, human_size, table

    c = console()
    t = table("guest offset#", "length#", "state", "layer#", "host offset#", "file")
    chain = img.chain()
    n = 0
    for e in entries:  # type: ignore[attr-defined]
        n += 1
        t.add_row(f"{e.start:#x}", human_size(e.length), _state(e) if e.present or e.zero else "unallocated",
                  str(e.depth), f"{e.offset:#x}" if e.offset is not None else "-",
                  _host_file(chain[e.depth]) if e.offset is not None else "")
    c.print(t)
    c.print(f"{n} ranges over {human_size(img.virtual_size)} of guest space")


# -- check --------------------------------------------------------------------------------------------
def run_check(args: argparse.Namespace) -> int:
    tune_for_bulk_work()
    with open_checked(args.image, need_files=True, check=True) as img:
        res = check_image(img, filename=args.image)
    # The ERROR/Leaked lines exactly as qemu-img prints them (plain, unwrapped), for grep and diff:
    # on stderr in both output formats (QEMU prints them from inside the check), every one of them.
    lines = res.stderr_lines()
    tail = lines[-1:] if res.failed is not None or res.check_errors else []  # "Check failed" comes last
    sys.stderr.writelines(line + "\n" for line in lines[: len(lines) - len(tail)])
    sys.stderr.flush()
    if res.failed is None:  # qemu-img prints no counts when the check itself failed
        if args.output == "json":
            print_json(res.to_json())
        else:
            _print_check(res)
    sys.stdout.flush()
    sys.stderr.writelines(line + "\n" for line in tail)
    return res.exit_code


def _print_check(res: CheckResult) -> None:
    from qinspect.cli.render import console

    c = console()
    if not (res.corruptions or res.leaks or res.check_errors):
        c.print("No errors were found on the image.")
    else:
        if res.corruptions and res.dirty:
            c.print(f"\nThe image is [bold]dirty[/] (dirty bit set{', lazy refcounts' if res.lazy_refcounts else ''}): "
                    f"{res.corruptions} refcount inconsistencies were found, as expected after an unclean shutdown.\n"
                    "This is not corruption: QEMU rebuilds the refcounts on the next read-write open, "
                    "or run 'qemu-img check -r all' now.")
        elif res.corruptions:
            c.print(f"\n{res.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            c.print(f"\n{res.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n"
                    f"Fix: qemu-img check -r leaks {shlex.quote(res.filename)}")
        if res.check_errors:
            c.print(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        a = res.allocated_clusters
        c.print(f"{a}/{res.total_clusters} = {a * 100 / res.total_clusters:0.2f}% allocated, "
                f"{res.fragmented_clusters * 100 / a:0.2f}% fragmented, "
                f"{res.compressed_clusters * 100 / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        c.print(f"Image end offset: {res.image_end_offset}")
