"""What the guest's filesystems have freed but the image still holds (for the `guest-freed` finding).

The guest deleted files; their blocks are on the filesystem's free list, but without discard the
clusters behind them stay allocated (`qinspect.guest` finds them from each filesystem's own
allocation map). The fix is online — let discards through (`discard=unmap`) and run `fstrim` in the
guest — or offline, with the VM stopped, `virt-sparsify --in-place`. Both free exactly the clusters
counted here, so the prediction is: disk usage after = now − the host bytes of those clusters.
`split_space` splits the space breakdown's "guest data" into what the guest uses and what it freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from qinspect.analysis.space import Space
from qinspect.guest import inspect_guest
from qinspect.guest.model import GuestError, GuestView
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image
from qinspect.units import format_size

PART = "guest-freed"


@dataclass
class GuestFreed:
    """The numbers behind the finding."""

    view: GuestView
    file_size: int
    disk_usage: int

    @property
    def reclaimable(self) -> int:
        return self.view.reclaimable_bytes

    @property
    def reclaimable_disk_usage(self) -> int:
        return self.view.reclaimable_disk_usage

    @property
    def disk_usage_after(self) -> int:
        return max(0, self.disk_usage - self.reclaimable_disk_usage)


def guest_freed(img: Image, space: Space, view: GuestView | None = None) -> GuestFreed | None:
    """What the guest freed that `img` still holds, or None (nothing, or no filesystem qinspect reads)."""
    if view is None:
        try:
            view = inspect_guest(img)
        except (GuestError, Qcow2Error, MemoryError):
            return None
    if view.reclaimable_bytes <= 0:
        return None
    return GuestFreed(view, space.file_size, space.allocated_size)


def split_space(space: Space, g: GuestFreed) -> None:
    """Split "guest data" into what the guest uses and what it freed (parts still add up)."""
    if "guest-data" not in space.parts:
        return
    moved = min(g.reclaimable, space.parts["guest-data"])
    space.parts = _insert_after(space.parts, "guest-data", space.parts["guest-data"] - moved, moved)
    if "guest-data" in space.allocated_parts:
        moved_alloc = min(g.reclaimable_disk_usage, space.allocated_parts["guest-data"])
        space.allocated_parts = _insert_after(space.allocated_parts, "guest-data",
                                              space.allocated_parts["guest-data"] - moved_alloc, moved_alloc)


def _insert_after(parts: dict[str, int], key: str, kept: int, moved: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in parts.items():
        if k == PART:
            continue
        out[k] = kept if k == key else v
        if k == key:
            out[PART] = moved
    return out


def evidence(g: GuestFreed) -> dict[str, int | float | str]:
    ev: dict[str, int | float | str] = {
        "reclaimable-bytes": g.reclaimable,
        "reclaimable-disk-usage": g.reclaimable_disk_usage,
        "guest-free-bytes": g.view.free_bytes,
        "disk-usage": g.disk_usage,
    }
    for v in g.view.volumes:
        if v.free_bytes is None:
            continue
        key = {"whole-disk": "disk", "lvm-lv": v.name or f"lv{v.index}"}.get(v.kind.value, f"part{v.index}")
        ev[f"{key}-filesystem"] = v.filesystem.value if v.filesystem else "unknown"
        ev[f"{key}-free-bytes"] = v.free_bytes
        ev[f"{key}-reclaimable-bytes"] = v.reclaimable_bytes
    for layer in g.view.layers[1:]:
        ev[f"backing-{layer.depth}-reclaimable-bytes"] = layer.reclaimable_bytes
    return ev


def title(g: GuestFreed) -> str:
    return f"{format_size(g.reclaimable)} the guest has freed is still allocated in the image"


def impact(g: GuestFreed) -> str:
    per = ", ".join(f"{v.label} ({v.filesystem.value if v.filesystem else '?'}): {format_size(v.reclaimable_bytes)}"
                    for v in g.view.volumes if v.reclaimable_bytes)
    text = (f"Files deleted in the guest left {format_size(g.reclaimable)} of clusters allocated that lie wholly "
            f"in free filesystem blocks ({per}). Discarding them brings the disk usage from "
            f"{format_size(g.disk_usage)} to {format_size(g.disk_usage_after)}.")
    base = [lay for lay in g.view.layers[1:] if lay.reclaimable_bytes]
    if base:
        text += (" Backing files hold another " + ", ".join(f"{format_size(b.reclaimable_bytes)} (layer {b.depth})"
                                                            for b in base)
                 + " in guest-free blocks; only a conversion of the chain drops that.")
    return text
