"""What the guest sees on its disk: volumes (partitions, whole-disk filesystems, logical volumes),
their filesystems and free space, and how much of that free space the image still holds.

Plain dataclasses and enums, shared by the readers in this package, the CLI and the TUI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from qinspect.guest.ranges import Ranges

ProgressFn = Callable[[int, int], None]
CancelledFn = Callable[[], bool]


def no_progress(done: int, total: int) -> None:
    """A progress callback that ignores progress."""


def never_cancelled() -> bool:
    return False


class GuestError(Exception):
    """A guest structure cannot be used; `offset` is the guest-disk byte offset at fault, if known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        return self.message if self.offset is None else f"{self.message} (offset {self.offset})"


class PartitionTable(Enum):
    GPT = "gpt"
    MBR = "mbr"


class VolumeKind(Enum):
    """Where a volume comes from."""

    WHOLE_DISK = "whole-disk"  # a filesystem (or PV, swap, LUKS) on the disk itself, index 0
    PARTITION = "partition"  # a GPT or MBR primary partition
    LOGICAL = "logical"  # an MBR logical partition inside the extended one (index 5 and up)
    EXTENDED = "extended"  # the MBR extended partition itself: a container, no filesystem
    LVM_LV = "lvm-lv"  # an LVM2 logical volume, mapped through its segments


class Filesystem(Enum):
    """What a volume holds, in blkid's words."""

    EXT2 = "ext2"
    EXT3 = "ext3"
    EXT4 = "ext4"
    VFAT = "vfat"
    NTFS = "ntfs"
    XFS = "xfs"
    SWAP = "swap"
    LUKS = "crypto_LUKS"
    LVM2 = "LVM2_member"

    @property
    def has_free_map(self) -> bool:
        return self in (Filesystem.EXT2, Filesystem.EXT3, Filesystem.EXT4, Filesystem.VFAT, Filesystem.NTFS,
                        Filesystem.XFS)


@dataclass(frozen=True)
class Segment:
    """`length` bytes of a volume at volume offset `volume_offset` live at disk offset `disk_offset`."""

    volume_offset: int
    disk_offset: int
    length: int


@dataclass
class FsInfo:
    """What a filesystem reader found: its size, block size and free blocks (volume byte ranges)."""

    filesystem: Filesystem
    block_size: int | None = None
    size_bytes: int | None = None  # the filesystem's own idea of its size
    free: Ranges | None = None  # volume-relative byte ranges the allocation map says are free
    label: str | None = None
    uuid: str | None = None
    # Free blocks that `fstrim` does not discard (the XFS AG free lists): in free-bytes, not reclaimable.
    untrimmed: Ranges | None = None
    detail: dict[str, object] = field(default_factory=dict)  # per-filesystem extras (fat-type, groups, ...)
    problems: list[str] = field(default_factory=list)
    note: str | None = None


@dataclass
class Volume:
    """One volume of the guest disk."""

    index: int
    kind: VolumeKind
    start: int  # disk byte offset of the volume's first byte
    length: int
    segments: list[Segment]
    type_name: str | None = None  # GPT type GUID name, MBR type byte, LVM segment type
    name: str | None = None  # GPT partition name or LV name (vg/lv)
    fs: FsInfo | None = None
    free_disk: Ranges | None = None  # free bytes as disk ranges (through the segments)
    trim_disk: Ranges | None = None  # the part of free_disk a guest fstrim discards
    reclaimable: Ranges | None = None  # top-layer data clusters lying wholly in free_disk (disk bytes)
    reclaimable_by_layer: list[int] = field(default_factory=list)  # bytes, top layer first
    problems: list[str] = field(default_factory=list)
    parent: int | None = None  # the PV volume's position in GuestView.volumes, for logical volumes

    @property
    def filesystem(self) -> Filesystem | None:
        return self.fs.filesystem if self.fs else None

    @property
    def free_bytes(self) -> int | None:
        return None if self.fs is None or self.fs.free is None else self.fs.free.total

    @property
    def used_bytes(self) -> int | None:
        if self.fs is None or self.fs.free is None or self.fs.size_bytes is None:
            return None
        return max(0, self.fs.size_bytes - self.fs.free.total)

    @property
    def reclaimable_bytes(self) -> int:
        return self.reclaimable_by_layer[0] if self.reclaimable_by_layer else 0

    @property
    def label(self) -> str:
        """How people name it: `1`, `5 (logical)`, `vg/lv`, `disk`."""
        if self.kind == VolumeKind.WHOLE_DISK:
            return "disk"
        if self.kind == VolumeKind.LVM_LV:
            return self.name or f"lv{self.index}"
        return f"part {self.index}"


@dataclass(frozen=True)
class LayerReclaim:
    """Free-in-the-guest data one layer of the chain holds (depth 0 = the image itself)."""

    path: str
    depth: int
    reclaimable_bytes: int
    cluster_size: int | None
    disk_usage_bytes: int = 0  # of those clusters, what the host file has allocated (the drop in `du`)


@dataclass
class GuestView:
    """The whole guest disk."""

    virtual_size: int
    cluster_size: int
    partition_table: PartitionTable | None
    volumes: list[Volume]
    layers: list[LayerReclaim]
    problems: list[str] = field(default_factory=list)  # about the disk as a whole (table CRCs, ...)
    reclaimable: Ranges = field(default_factory=Ranges.empty)  # top-layer clusters (disk bytes)

    @property
    def reclaimable_bytes(self) -> int:
        return self.layers[0].reclaimable_bytes if self.layers else 0

    @property
    def reclaimable_disk_usage(self) -> int:
        return self.layers[0].disk_usage_bytes if self.layers else 0

    @property
    def free_bytes(self) -> int:
        return sum(v.free_bytes or 0 for v in self.volumes)

    def volume_at(self, offset: int) -> Volume | None:
        """The innermost volume holding disk byte `offset` (a logical volume before its PV)."""
        best: Volume | None = None
        for v in self.volumes:
            if v.kind == VolumeKind.EXTENDED:
                continue
            if any(s.disk_offset <= offset < s.disk_offset + s.length for s in v.segments) and (
                    best is None or v.kind == VolumeKind.LVM_LV):
                best = v
        return best
