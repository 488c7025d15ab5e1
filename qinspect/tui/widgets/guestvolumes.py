"""The guest's volumes as bars (used / freed-but-held / free) and the guest map cursor's description.

`GuestVolumes.show(view)` renders a `qinspect.guest.GuestView`; `describe_offset` names the volume,
the filesystem block and (with an `OwnerMap` built in a worker) the file at a guest offset, or says
the block is free and whether the image still holds it ("freed by the guest").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import Static

from qinspect.termtext import for_terminal
from qinspect.units import format_size

if TYPE_CHECKING:  # the guest package imports numpy: not before the first frame, where this widget is
    from qinspect.guest.model import GuestView
    from qinspect.guest.owners import OwnerMap

BAR = 30
USED, FREED, FREE = "█", "▓", "░"


def volume_bar(used: int, freed: int, free: int, width: int = BAR) -> Text:
    total = max(1, used + free)
    n_used = round(width * used / total)
    n_freed = min(width - n_used, round(width * freed / total))
    t = Text()
    t.append(USED * n_used, style="green")
    t.append(FREED * n_freed, style="bold yellow")
    t.append(FREE * (width - n_used - n_freed), style="grey50")
    return t


def render_volumes(view: GuestView) -> Text:
    out = Text()
    table = view.partition_table.value.upper() if view.partition_table else "no partition table"
    out.append(f"Guest disk: {table}, {len(view.volumes)} volume(s); freed by the guest and still held: "
               f"{format_size(view.reclaimable_bytes)}\n", style="bold")
    for v in view.volumes:
        fs = v.filesystem.value if v.filesystem else (v.type_name or "unknown")
        out.append(f"{v.label:>8} {for_terminal(fs):<11} {format_size(v.length):>8} ")
        if v.free_bytes is not None and v.fs is not None and v.fs.size_bytes:
            used = v.used_bytes or 0
            freed = v.reclaimable_bytes
            out.append_text(volume_bar(used, freed, max(0, v.free_bytes - freed)))
            out.append(f" used {format_size(used)} · free {format_size(v.free_bytes)}")
            if freed:
                out.append(f" · freed, still held {format_size(freed)}", style="bold yellow")
        elif v.fs is not None and v.fs.note:
            out.append(for_terminal(v.fs.note), style="grey50")
        if v.problems:
            out.append(f"  ! {for_terminal(v.problems[0])}", style="red")
        out.append("\n")
    return out


class GuestVolumes(Static):
    """The Overview's volume list: one line with a used / freed / free bar per volume (hidden until a
    partition table or filesystem is found)."""

    DEFAULT_CSS = "GuestVolumes { height: auto; display: none; }"

    def show(self, view: GuestView) -> None:
        content = any(v.filesystem is not None or v.kind.value != "whole-disk" for v in view.volumes)
        self.display = content
        if content:
            self.update(render_volumes(view))


def describe_offset(view: GuestView, offset: int, owners: dict[int, OwnerMap] | None = None) -> str:
    """`part 2 (ext4) block 81234: /usr/lib/...`, `... free, freed by the guest (image holds it)`."""
    v = view.volume_at(offset)
    if v is None:
        return "outside every volume"
    what = f"{v.label} ({v.filesystem.value if v.filesystem else v.type_name or 'unknown'})"
    bs = v.fs.block_size if v.fs and v.fs.block_size else None
    if bs:
        what += f" block {(offset - v.start) // bs}"
    om = (owners or {}).get(view.volumes.index(v))
    if v.free_disk is not None and v.free_disk.covers(offset):
        held = view.reclaimable.covers(offset)
        return what + (": free, freed by the guest (the image still holds it)" if held else ": free")
    if om is not None:
        name = om.owner(offset)
        return what + f": {for_terminal(name)}" if name else what + ": in use (filesystem metadata)"
    return what
