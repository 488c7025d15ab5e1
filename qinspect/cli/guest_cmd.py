"""`qinspect guest IMAGE`: the guest's partitions and filesystems, their free space, and how much of it
the image still holds (what `fstrim` with discard=unmap would give back).

Human output is a table per volume plus one line per backing layer; `--output=json` prints
`qinspect.guest.report.guest_json` (keys documented there and in the README). The command and its
options are declared in `qinspect.cli`.
"""

from __future__ import annotations

import argparse

from qinspect.cli.core_cmds import open_checked, print_json
from qinspect.guest import inspect_guest
from qinspect.guest.model import GuestView
from qinspect.guest.report import guest_json
from qinspect.termtext import for_terminal
from qinspect.units import format_size


def run_guest(args: argparse.Namespace) -> int:
    with open_checked(args.image, need_files=True) as img:
        view = inspect_guest(img)
        if args.output == "json":
            print_json(guest_json(view))
        else:
            print_human(view, args.image)
    return 0


def _sz(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def print_human(view: GuestView, name: str) -> None:
    from qinspect.cli.render import console, print_table, table

    c = console()
    pt = (view.partition_table.value.upper() if view.partition_table
          else "none (whole disk)" if view.volumes else "unreadable")
    c.print(f"{for_terminal(name)}: {format_size(view.virtual_size)} guest disk, partition table {pt}")
    t = table("#", "start#", "size#", "contents", "block#", "used#", "free#", "reclaimable#")
    for v in view.volumes:
        fs = v.fs
        what = v.filesystem.value if v.filesystem else f"({v.type_name or 'nothing recognised'})"
        if fs and fs.label:
            what += f' "{fs.label}"'
        if v.name and v.kind.value == "lvm-lv":
            what += f" in {v.name}"
        first = {"lvm-lv": f"lv{v.index}", "whole-disk": "disk"}.get(v.kind.value, str(v.index))
        t.add_row(first, _sz(v.start),
                  _sz(v.length), for_terminal(what), str(fs.block_size) if fs and fs.block_size else "-",
                  _sz(v.used_bytes), _sz(v.free_bytes),
                  _sz(v.reclaimable_bytes) if v.free_bytes is not None else "-")
    if view.volumes:
        print_table(t)
    for v in view.volumes:
        if v.fs and v.fs.note:
            c.print(f"  {v.label}: {for_terminal(v.fs.note)}")
        for p in v.problems:
            c.print(f"  {v.label}: problem: {for_terminal(p)}")
    for p in view.problems:
        c.print(f"  problem: {for_terminal(p)}")
    c.print(f"Free in the guest: {format_size(view.free_bytes)}; still allocated in the image "
            f"(reclaimable by fstrim with discard=unmap): {format_size(view.reclaimable_bytes)}")
    for layer in view.layers[1:]:
        c.print(f"  backing layer {layer.depth} ({for_terminal(layer.path)}): {format_size(layer.reclaimable_bytes)} "
                "of data in guest-free blocks (not reclaimable by fstrim on the top image)")
