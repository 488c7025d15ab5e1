"""`info`, `map` and `check`: qemu-img's JSON and human layouts for scripts, readable tables for people.

Every command says when another process holds the image's locks ("in use: contents may be
changing"): a line on stderr for human output, an extra `"in-use": "write"|"read"|null` key in JSON
objects. `check` of an image that another process is writing gives no verdict and exits 1, as
qemu-img's "check not completed" (qemu-img itself refuses to open it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from qinspect.analysis.info import chain_info, image_info
from qinspect.analysis.opening import require_files
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.hostfile import HostFile, InUse
from qinspect.qcow2.meta import ImageMeta, open_meta
from qinspect.termtext import for_terminal
from qinspect.units import format_size, format_size_exact

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    from qinspect.analysis.check import CheckResult
    from qinspect.analysis.map import MapRuns
    from qinspect.qcow2.image import Image
    from qinspect.qcow2.meta import MetaLayer

# Start-up is most of a small command's time, so this module imports only what `info` needs (the
# metadata: no numpy). `map` and `check` import the walks (and numpy) when they run, JSON output
# the json module, and human output qinspect.cli.render (which imports Rich only on a terminal).

# Bounds on human output: a hostile image can carry 65536 snapshots and as many problems.
MAX_WARNINGS = 50
MAX_SNAPSHOT_ROWS = 500

def open_checked(path: str, need_files: bool = False, check: bool = False, sweep: bool = False) -> Image:
    """Open like qemu-img does: fail on anything QEMU would refuse to open.

    With `need_files` (map, check), also fail when a backing file or the external data file cannot
    be opened, before any output, as qemu-img map and check do (qemu-img info does not need them).
    With `check`, open the image itself as qemu-img check does (BDRV_O_CHECK). With `sweep` (a
    command about to read every L2 table), start the tables' read-ahead before numpy is imported
    (`qinspect.qcow2.readahead`).
    """
    # The metadata first: a file that is missing or not an image QEMU opens fails here, before the
    # tables' machinery (numpy) is imported; then the image itself, on the same parse (parsed
    # again only if the file changed in between).
    with open_checked_meta(path, check=check) as meta:
        shared = meta.shared_metadata()
        if sweep:
            from qinspect.qcow2.readahead import start_table_read_ahead

            start_table_read_ahead(meta.file, meta.header)
    from qinspect.qcow2.image import open_image

    img = open_image(path, metadata=shared)
    try:
        img.require_openable(check=check)
        if need_files:
            require_files(img, check=check)  # the backing chain and data files (shared with scan)
    except Exception:
        img.close()
        raise
    return img


def open_checked_meta(path: str, check: bool = False) -> ImageMeta:
    """`open_checked` for what needs only metadata (`info`): no tables read, numpy not imported."""
    meta = open_meta(path)
    try:
        meta.require_openable(check=check)
    except Exception:
        meta.close()
        raise
    return meta


def in_use(layer: MetaLayer) -> InUse:
    """Whether another process holds the image's locks (NO for a layer that is not a file)."""
    file = getattr(layer, "file", None)
    return file.lock_state() if isinstance(file, HostFile) else InUse.NO


def in_use_message(state: InUse) -> str | None:
    if state is InUse.WRITER:
        return "in use: contents may be changing (another process, a running QEMU, holds the image's write lock)"
    if state is InUse.READER:
        return "in use: another process has the image open read-only"
    return None


def warn_in_use(path: str, state: InUse) -> None:
    """One line on stderr when the image is in use (human output)."""
    msg = in_use_message(state)
    if msg:
        sys.stderr.write(f"qinspect: {for_terminal(path)}: warning: {msg}\n")


def print_json(obj: object) -> None:
    """JSON the way qemu-img pretty-prints it (4-space indent); strings stay exact (escaped by
    JSON). Written as it is encoded: 65,536 snapshots must not cost a string of the whole answer
    and millions of pieces at once."""
    import json  # (human output needs none of it)

    out: list[str] = []
    for piece in json.JSONEncoder(indent=4).iterencode(obj):
        out.append(piece)
        if len(out) >= 1 << 14:
            sys.stdout.write("".join(out))
            out = []
    sys.stdout.write("".join(out) + "\n")


# -- info ---------------------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    with open_checked_meta(args.image) as img:
        infos = chain_info(img, args.image) if args.backing_chain else [image_info(img, args.image)]
        states = _chain_in_use(img, len(infos))
        if args.output == "json":
            for info, state in zip(infos, states, strict=True):
                info["in-use"] = state.to_json()
            print_json(infos if args.backing_chain else infos[0])
            return 0
        from qinspect.cli.render import print_lines

        for i, info in enumerate(infos):
            if args.backing_chain:
                what = "the image" if i == 0 else f"backing file of layer {i - 1}"
                print_lines([[(f"-- layer {i}: ", "bold"), (for_terminal(str(info["filename"])), "bold"),
                              (f" ({what}) --", "bold")]])
            _print_info(info, states[i])
        # names come from the file: escaped
        warnings = [[("warning: ", "yellow"), (for_terminal(str(p)), "")] for p in img.problems[:MAX_WARNINGS]]
        if len(img.problems) > MAX_WARNINGS:
            warnings.append([(f"warning: ... and {len(img.problems) - MAX_WARNINGS} more problems", "yellow")])
        print_lines(warnings, sys.stderr)
    return 0


def _chain_in_use(img: ImageMeta, n: int) -> list[InUse]:
    """The lock state of the first `n` layers of the chain (the top image alone if it cannot be walked)."""
    if n == 1:
        return [in_use(img)]
    try:
        layers: list[MetaLayer] = list(img.chain())
    except Qcow2Error:
        layers = [img]
    states = [in_use(layer) for layer in layers[:n]]
    return states + [InUse.NO] * (n - len(states))


def _print_info(info: dict[str, object], state: InUse) -> None:
    from qinspect.cli.render import print_lines, print_table, table

    vs = int(info["virtual-size"])  # type: ignore[call-overload]
    rows: list[tuple[str, str]] = [
        ("image", str(info["filename"])),
        ("file format", str(info["format"])),
        ("virtual size", f"{format_size(vs)} ({vs} bytes)"),
        ("disk size", format_size_exact(int(info["actual-size"]))),  # type: ignore[call-overload]
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
    msg = in_use_message(state)
    if msg:
        rows.append(("in use", msg.removeprefix("in use: ")))
    t = table("field", "value")
    for k, v in rows:
        t.add_row(k, v)
    print_table(t)
    snaps = info.get("snapshots")
    if isinstance(snaps, list) and snaps:
        from datetime import UTC, datetime  # (only for snapshots: not at every start)

        st = table("ID", "TAG", "VM SIZE#", "DATE", "VM CLOCK", "ICOUNT#", title="Snapshot list")
        for s in snaps[:MAX_SNAPSHOT_ROWS]:  # a table of 65536 rows takes minutes to render
            date = datetime.fromtimestamp(s["date-sec"], UTC).strftime("%Y-%m-%d %H:%M:%S")
            secs = s["vm-clock-sec"]
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 1_000_000:03d}"
            st.add_row(s["id"], s["name"], format_size(s["vm-state-size"]), date, clock,
                       str(s["icount"]) if "icount" in s else "")
        print_table(st)
        if len(snaps) > MAX_SNAPSHOT_ROWS:
            print_lines([[(f"... and {len(snaps) - MAX_SNAPSHOT_ROWS} more snapshots (--output=json lists them all)",
                           "")]])
    fs = info.get("format-specific")
    if isinstance(fs, dict):
        ft = table("format specific", "value")
        for k, v in fs["data"].items():
            if k == "bitmaps":
                for b in v[:MAX_SNAPSHOT_ROWS]:  # a directory may name 65,535 bitmaps
                    flags = ", ".join(b["flags"]) or "-"
                    ft.add_row("bitmap", f"{b['name']}: granularity {format_size(b['granularity'])}, flags {flags}")
                if len(v) > MAX_SNAPSHOT_ROWS:
                    ft.add_row("bitmap", f"... and {len(v) - MAX_SNAPSHOT_ROWS} more bitmaps (--output=json lists "
                                         "them all)")
            elif k == "encrypt":
                ft.add_row("encrypt", _encrypt_summary(v))
            else:
                ft.add_row(k, ("true" if v else "false") if isinstance(v, bool) else str(v))  # as JSON spells them
        print_table(ft)


def _encrypt_summary(enc: dict[str, object]) -> str:
    if enc.get("format") != "luks":
        return str(enc.get("format"))
    slots = enc.get("slots", [])
    active = sum(1 for s in slots if isinstance(s, dict) and s.get("active")) if isinstance(slots, list) else 0
    cipher = f"{enc.get('cipher-alg')}-{enc.get('cipher-mode')}-{enc.get('ivgen-alg')}"
    return (f"luks {cipher}, hash {enc.get('hash-alg')}, "
            f"uuid {enc.get('uuid')}, {active} active key slot(s), payload at {enc.get('payload-offset')}")


# -- map ----------------------------------------------------------------------------------------------
def host_file(layer: MetaLayer) -> str:
    """The file a layer's host offsets point into (its external data file, if it has one), as QEMU names it."""
    if isinstance(layer, ImageMeta) and layer.data_file_path:
        return layer.data_file_path
    return layer.path


def map_layout(args: argparse.Namespace, stdout_is_terminal: bool) -> str:
    """"json", "qemu" (qemu-img's human layout) or "table" (qinspect's)."""
    if args.output == "json":
        return "json"
    if getattr(args, "table", False):
        return "table"
    if args.output == "human":
        return "qemu"
    return "table" if stdout_is_terminal else "qemu"


def _or_empty_entry(runs: Iterator[MapRuns], start: int) -> Iterator[MapRuns]:
    """qemu-img map prints one entry of length 0 when the range asked for is empty (start past the end)."""
    from qinspect.analysis.map import MapRuns

    empty = True
    for b in runs:
        empty = False
        yield b
    if empty:
        yield MapRuns.one(start, 0, 0, -1, 0)


def run_map(args: argparse.Namespace) -> int:
    with open_checked(args.image, need_files=True, sweep=True) as img:
        from qinspect.analysis.map import iter_map_runs, write_map_json_runs
        from qinspect.cli.map_output import write_qemu_human, write_table
        from qinspect.malloc import tune_for_bulk_work

        tune_for_bulk_work()
        warn_in_use(args.image, in_use(img))
        runs = iter_map_runs(img, start=args.start_offset, length=args.max_length)
        layout = map_layout(args, sys.stdout.isatty())
        if layout == "json":
            write_map_json_runs(_or_empty_entry(runs, args.start_offset), sys.stdout)
            return 0
        chain = img.chain()
        files = [host_file(layer) for layer in chain]
        if layout == "qemu":
            write_qemu_human(runs, files, sys.stdout)
            return 0
        start = args.start_offset
        end = img.virtual_size if args.max_length is None else min(img.virtual_size, start + args.max_length)
        write_table(runs, files, [layer.path for layer in chain], sys.stdout, start, max(end, start))
    return 0


# -- check --------------------------------------------------------------------------------------------
def repair_command(args: argparse.Namespace) -> str:
    """The qemu-img command that does the repair qinspect refuses to do (one pasteable line)."""
    from qinspect.shellquote import command_line

    argv = ["qemu-img", "check", "-r", args.repair]
    if args.format:
        argv += ["-f", args.format]
    return command_line([*argv, args.image])


def run_check(args: argparse.Namespace) -> int:
    from qinspect.shellquote import UnsafeArgument

    if args.repair is not None:
        try:
            cmd = f"run: {repair_command(args)}"
        except UnsafeArgument:
            cmd = f"run qemu-img check -r {for_terminal(args.repair)} on it (its name cannot be pasted safely)"
        raise Qcow2Error(f"qinspect never writes to an image, so it does not repair; to repair it, {cmd}",
                         path=args.image)
    with open_checked(args.image, need_files=True, check=True, sweep=True) as img:
        from qinspect.analysis.check import check_image
        from qinspect.malloc import tune_for_bulk_work

        tune_for_bulk_work()
        state = in_use(img)
        # qemu-img check names the image as given, --image-opts string included.
        res = check_image(img, filename=getattr(args, "image_spec", None) or args.image)
    # Another process writing while we read: what we saw may be mid-update. No verdict; qemu-img's
    # exit code for "check not completed" (qemu-img itself refuses to open the image).
    live = state is InUse.WRITER
    if args.output != "json":
        warn_in_use(args.image, state)
    # The ERROR/Leaked lines exactly as qemu-img prints them (plain, unwrapped), for grep and diff:
    # on stderr in both output formats (QEMU prints them from inside the check), every one of them.
    tail = [for_terminal(line) for line in res.final_lines()]  # "Check failed" comes last
    # streamed a block of lines at a time, in constant memory: there may be tens of millions
    for block in res.iter_stderr_blocks(for_terminal):
        sys.stderr.write(block)
    sys.stderr.flush()
    if res.failed is None:  # qemu-img prints no counts when the check itself failed
        if args.output == "json":
            print_json({**res.to_json(), "in-use": state.to_json()})
        elif not args.quiet:
            _print_check(res, live, args.image)
    sys.stdout.flush()
    sys.stderr.writelines(line + "\n" for line in tail)
    return 1 if live else res.exit_code


def _print_check(res: CheckResult, live: bool, path: str) -> None:
    """qemu-img check's human report. Off a terminal it is written as plain lines (what Rich prints
    there anyway: no colour, no wrapping), so a scripted `qinspect check` never imports Rich."""
    from qinspect.cli.render import print_lines

    print_lines(_check_lines(res, live, path))


def _check_lines(res: CheckResult, live: bool, path: str) -> list[list[tuple[str, str]]]:
    """The report as lines of (text, Rich style) segments; text from the image is escaped here."""
    from qinspect.shellquote import UnsafeArgument, command_line

    out: list[list[tuple[str, str]]] = []

    def line(*segments: str | tuple[str, str]) -> None:
        out.append([(x, "") if isinstance(x, str) else x for x in segments])

    if live:
        line(f"\nSeen while another process is writing the image: {res.corruptions} refcount "
             f"differences, {res.leaks} leaked clusters.\n"
             "No verdict: the image is in use and its contents may be changing, so these counts can "
             "be mid-update rather than corruption.\nCheck it again when the image is not in use "
             "(qemu-img refuses to check it while it is: \"Failed to get shared 'write' lock\").")
    elif not (res.corruptions or res.leaks or res.check_errors):
        line("No errors were found on the image.")
    else:
        if res.corruptions and res.dirty:
            line("\nThe image is ", ("dirty", "bold"),
                 f" (dirty bit set{', lazy refcounts' if res.lazy_refcounts else ''}): "
                 f"{res.corruptions} refcount inconsistencies were found, as expected after an unclean shutdown.\n"
                 "This is not corruption: QEMU rebuilds the refcounts on the next read-write open, "
                 "or run 'qemu-img check -r all' now.")
        elif res.corruptions:
            line(f"\n{res.corruptions} errors were found on the image.\n"
                 "Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            try:
                fix = "Fix: " + command_line(["qemu-img", "check", "-r", "leaks", path])
            except UnsafeArgument:
                fix = "Fix: qemu-img check -r leaks on this file (its name cannot be pasted into a shell safely)"
            line(f"\n{res.leaks} leaked clusters were found on the image.\n"
                 "This means waste of disk space, but no harm to data.")
            line(for_terminal(fix))
        if res.check_errors:
            line(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        a = res.allocated_clusters
        line(f"{a}/{res.total_clusters} = {a * 100 / res.total_clusters:0.2f}% allocated, "
             f"{res.fragmented_clusters * 100 / a:0.2f}% fragmented, "
             f"{res.compressed_clusters * 100 / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        line(f"Image end offset: {res.image_end_offset}")
    return out
