"""Which file owns a filesystem block: a reverse map built once by walking the tree with The Sleuth Kit.

`build_owner_map(disk, volume)` lists every file's data runs (ext2/3/4, FAT, NTFS; deleted
entries too, where TSK still finds their runs, named "(deleted) PATH") as sorted block ranges, so
`OwnerMap.owner(disk_offset)` is a binary search. The walk is bounded (files, depth, directories
visited once) and reports progress; it is meant for a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qinspect.guest.disk import DiskReader, VolumeReader
from qinspect.guest.model import CancelledFn, Filesystem, GuestError, ProgressFn, Volume, never_cancelled, no_progress
from qinspect.guest.ntfs import tsk_image

MAX_FILES = 500_000
MAX_DEPTH = 64
TSK_FILESYSTEMS = (Filesystem.EXT2, Filesystem.EXT3, Filesystem.EXT4, Filesystem.VFAT, Filesystem.NTFS)


@dataclass
class OwnerMap:
    """Sorted disk byte ranges [start, end) and, for each, the index of its file in `names`."""

    start: npt.NDArray[np.int64]
    end: npt.NDArray[np.int64]
    file: npt.NDArray[np.int64]
    names: list[str]
    block_size: int
    volume_start: int
    truncated: bool = False

    def owner(self, disk_offset: int) -> str | None:
        k = int(np.searchsorted(self.start, disk_offset, side="right")) - 1
        if k < 0 or disk_offset >= int(self.end[k]):
            return None
        return self.names[int(self.file[k])]

    def block(self, disk_offset: int) -> int:
        """The filesystem block number (TSK's unit) holding `disk_offset` (first segment of the volume)."""
        return (disk_offset - self.volume_start) // self.block_size


def build_owner_map(disk: DiskReader, volume: Volume, progress: ProgressFn = no_progress,
                    cancelled: CancelledFn = never_cancelled) -> OwnerMap:
    """Walk `volume`'s filesystem; raises GuestError if TSK cannot open it."""
    if volume.filesystem not in TSK_FILESYSTEMS:
        raise GuestError(f"no file lookup for {volume.filesystem.value if volume.filesystem else 'this volume'}")
    import pytsk3

    vol = VolumeReader(disk, volume.segments)
    try:
        fs = pytsk3.FS_Info(tsk_image(vol), offset=0)
    except OSError as e:
        raise GuestError(f"The Sleuth Kit cannot open the filesystem: {str(e).strip()}") from None
    bsize = int(fs.info.block_size)
    starts: list[int] = []
    lens: list[int] = []
    owners: list[int] = []
    names: list[str] = []
    seen_dirs: set[int] = set()
    truncated = False
    stack: list[tuple[str, int]] = [("", 0)]
    total_guess = max(1, int(fs.info.last_inum) if hasattr(fs.info, "last_inum") else 1)
    while stack and not cancelled():
        path, depth = stack.pop()
        try:
            d = fs.open_dir(path=path or "/")
        except OSError:
            continue
        for entry in d:
            name_b = entry.info.name.name
            if name_b in (b".", b"..") or entry.info.meta is None:
                continue
            name = name_b.decode("utf-8", "replace")
            full = f"{path}/{name}"
            meta = entry.info.meta
            deleted = bool(int(entry.info.name.flags) & int(pytsk3.TSK_FS_NAME_FLAG_UNALLOC))
            if meta.type == pytsk3.TSK_FS_META_TYPE_DIR:
                if meta.addr not in seen_dirs and depth < MAX_DEPTH and not deleted:
                    seen_dirs.add(meta.addr)
                    stack.append((full, depth + 1))
                continue
            if meta.type != pytsk3.TSK_FS_META_TYPE_REG or name.endswith("(Volume Label Entry)"):
                continue
            if len(names) >= MAX_FILES:
                truncated = True
                break
            idx = len(names)
            names.append(("(deleted) " if deleted else "") + full)
            try:
                for attr in entry:
                    for run in attr:
                        if run.len and not int(run.flags) & int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE):
                            starts.append(int(run.addr))
                            lens.append(int(run.len))
                            owners.append(idx)
            except OSError:
                continue
            if idx % 256 == 0:
                progress(min(idx, total_guess), total_guess)
    s = np.array(starts, np.int64)
    ln = np.array(lens, np.int64)
    f = np.array(owners, np.int64)
    # Live files win over deleted ones that TSK thinks used the same blocks: sort live first, keep the first.
    live = np.array([not names[i].startswith("(deleted) ") for i in f.tolist()], bool) if len(f) else np.zeros(0, bool)
    order = np.lexsort((~live, s))
    s, ln, f = s[order], ln[order], f[order]
    base = volume.start
    return OwnerMap(s * bsize + base, (s + ln) * bsize + base, f, names, bsize, base, truncated)
