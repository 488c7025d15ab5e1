"""Persistent dirty bitmaps: the bitmap directory and each bitmap's table.

The directory is parsed without numpy (`qemu-img info` lists bitmaps); only reading a bitmap's
table imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCOW2_BITMAP_DIR_ENTRY
from qinspect.qcow2.hostfile import HostFile

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

_DIR = QCOW2_BITMAP_DIR_ENTRY.struct()  # 24 bytes
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000


@dataclass(frozen=True)
class Bitmap:
    """One bitmap directory entry."""

    entry_offset: int
    entry_size: int
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data_size: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & C.BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & C.BME_FLAG_AUTO)

    @property
    def flag_names(self) -> list[str]:
        """As qemu-img info prints them."""
        names = []
        if self.in_use:
            names.append("in-use")
        if self.auto:
            names.append("auto")
        return names


def read_bitmap_directory(
    f: HostFile, offset: int, size: int, count: int, cluster_size: int, problems: list[Problem]
) -> list[Bitmap]:
    """Parse the bitmap directory; a broken entry ends the walk with a problem."""
    if size > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE or f.is_past_end(offset, size):
        problems.append(Problem(Severity.ERROR, "bitmap directory",
                                f"bitmap directory ({size} bytes) lies past the end of the file", offset))
        return []
    raw = f.pread(offset, size)
    out: list[Bitmap] = []
    pos = 0
    while pos < size:
        if pos + _DIR.size > size:
            problems.append(Problem(Severity.ERROR, "bitmap directory",
                                    f"broken bitmap directory: entry {len(out)} is cut off by the end of the "
                                    f"directory ({size} bytes)", offset + pos))
            break
        tbl_off, tbl_size, flags, typ, gran, name_size, extra = _DIR.unpack_from(raw, pos)
        esize = (_DIR.size + extra + name_size + 7) & ~7
        if pos + esize > size:
            problems.append(Problem(Severity.ERROR, "bitmap directory",
                                    f"broken bitmap directory: entry {len(out)} ({esize} bytes with its name and "
                                    f"extra data) runs past the end of the directory ({size} bytes)", offset + pos))
            break
        name = raw[pos + _DIR.size + extra : pos + _DIR.size + extra + name_size].decode("utf-8", "replace")
        bm = Bitmap(offset + pos, esize, tbl_off, tbl_size, flags, typ, gran, name, extra)
        bad = []
        if tbl_size == 0 or tbl_off == 0 or tbl_off % cluster_size or tbl_size > BME_MAX_TABLE_SIZE:
            bad.append(f"bitmap table offset {tbl_off} / size {tbl_size}")
        if not C.BME_MIN_GRANULARITY_BITS <= gran <= C.BME_MAX_GRANULARITY_BITS:
            bad.append(f"granularity bits {gran}")
        if flags & C.BME_RESERVED_FLAGS:
            bad.append(f"reserved flags 0x{flags:x}")
        if name_size == 0 or name_size > C.BME_MAX_NAME_SIZE:
            bad.append(f"name size {name_size}")
        if typ != 1:
            bad.append(f"type {typ}")
        if tbl_size * cluster_size > BME_MAX_PHYS_SIZE:
            bad.append("bitmap too large")
        if bad:
            problems.append(Problem(Severity.ERROR, "bitmap directory",
                                    f"bitmap '{name}' is invalid: {', '.join(bad)}", offset + pos))
        out.append(bm)
        pos += esize
        if len(out) >= count:
            break
    if len(out) != count:
        problems.append(Problem(Severity.ERROR, "bitmap directory",
                                f"directory holds {len(out)} bitmaps, the header says {count}", offset))
    return out


def read_bitmap_table(f: HostFile, bm: Bitmap) -> npt.NDArray[np.uint64]:
    """The bitmap table entries (bounded by the file's size, not by the claimed size)."""
    import numpy as np
    n = min(bm.bitmap_table_size, BME_MAX_TABLE_SIZE, max(0, f.size - bm.bitmap_table_offset) // 8)
    return np.frombuffer(f.pread(bm.bitmap_table_offset, n * 8), dtype=">u8").astype(np.uint64)
