"""Persistent dirty bitmaps: the bitmap directory and each bitmap's table.

The directory is parsed without numpy (`qemu-img info` lists bitmaps); only reading a bitmap's
table imports it.
"""

from __future__ import annotations

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCOW2_BITMAP_DIR_ENTRY
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.value import Value

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

_DIR = QCOW2_BITMAP_DIR_ENTRY.struct()  # 24 bytes
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000


class Bitmap(Value):
    """One bitmap directory entry (an immutable `qinspect.qcow2.value.Value`)."""

    __slots__ = ("bitmap_table_offset", "bitmap_table_size", "entry_offset", "entry_size", "extra_data_size",
                 "flags", "granularity_bits", "name", "name_bytes", "type")
    FIELDS = ("entry_offset", "entry_size", "bitmap_table_offset", "bitmap_table_size", "flags", "type",
              "granularity_bits", "name", "extra_data_size", "name_bytes")

    entry_offset: int
    entry_size: int
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data_size: int
    name_bytes: bytes

    def __init__(self, entry_offset: int, entry_size: int, bitmap_table_offset: int, bitmap_table_size: int,
                 flags: int, type: int, granularity_bits: int, name: str, extra_data_size: int,
                 name_bytes: bytes = b"") -> None:
        self._assign(entry_offset, entry_size, bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits,
                     name, extra_data_size, name_bytes)

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
    f: HostFile, offset: int, size: int, count: int, cluster_size: int, problems: list[Problem],
    virtual_size: int = 0,
) -> list[Bitmap]:
    """Parse the bitmap directory as QEMU's bitmap_list_load does, at open: the first entry that
    breaks its rules (check_dir_entry's constraints, extra data, the count in the header, the
    directory's end) is a refusal with QEMU's message, and the walk stops there (entries before
    it are returned, for inspectors). `virtual_size` is bdrv_getlength for the table-size rule."""
    if size > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        return []  # the bitmaps extension is refused for it already
    if offset + size > C.BDRV_MAX_LENGTH:
        problems.append(Problem(Severity.ERROR, "bitmap directory", "Failed to read bitmap directory: Input/output "
                                f"error (it ends past {C.BDRV_MAX_LENGTH:#x})", offset, qemu_refuses_open=True))
        return []
    if f.is_past_end(offset, size):
        problems.append(Problem(Severity.ERROR, "bitmap directory",
                                f"bitmap directory ({size} bytes) lies past the end of the file; the missing bytes "
                                "read as zeros", offset))
    raw = f.pread(offset, size)  # (zeros past the end of the file, as block/io.c reads them)
    out: list[Bitmap] = []
    pos = 0

    def refuse(msg: str, at: int) -> list[Bitmap]:
        problems.append(Problem(Severity.ERROR, "bitmap directory", msg, offset + at, qemu_refuses_open=True))
        return out

    while pos < size:
        if pos + _DIR.size > size:
            return refuse(f"Broken bitmap directory (entry {len(out)} is cut off by its end, {size} bytes)", pos)
        if len(out) >= count:
            return refuse(f"More bitmaps found than specified in header extension ({count})", pos)
        tbl_off, tbl_size, flags, typ, gran, name_size, extra = _DIR.unpack_from(raw, pos)
        esize = (_DIR.size + extra + name_size + 7) & ~7
        if pos + esize > size:
            return refuse(f"Broken bitmap directory (entry {len(out)}, {esize} bytes with its name and extra "
                          f"data, runs past its end, {size} bytes)", pos)
        name_field = raw[pos + _DIR.size + extra : pos + _DIR.size + extra + name_size]
        name = name_field.decode("utf-8", "replace")
        if extra:
            return refuse(f"Bitmap extra data is not supported (bitmap '{name}', {extra} bytes)", pos)
        bad = []  # check_dir_entry
        if tbl_size == 0 or tbl_off == 0 or tbl_off % cluster_size or tbl_size > BME_MAX_TABLE_SIZE:
            bad.append(f"bitmap table offset {tbl_off} / size {tbl_size}")
        if not C.BME_MIN_GRANULARITY_BITS <= gran <= C.BME_MAX_GRANULARITY_BITS:
            bad.append(f"granularity bits {gran}")
        if flags & C.BME_RESERVED_FLAGS:
            bad.append(f"reserved flags 0x{flags:x}")
        if name_size > C.BME_MAX_NAME_SIZE:
            bad.append(f"name size {name_size}")
        if typ != 1:
            bad.append(f"type {typ}")
        phys = tbl_size * cluster_size
        if not bad and phys > BME_MAX_PHYS_SIZE:
            bad.append(f"bitmap table of {phys} bytes of clusters (more than {BME_MAX_PHYS_SIZE})")
        if not bad and not flags & C.BME_FLAG_IN_USE and virtual_size > (phys * 8) << gran:
            bad.append(f"a table of {tbl_size} clusters cannot cover the {virtual_size}-byte disk")
        if bad:
            return refuse(f"Bitmap '{name}' doesn't satisfy the constraints ({', '.join(bad)})", pos)
        out.append(Bitmap(offset + pos, esize, tbl_off, tbl_size, flags, typ, gran, name, extra,
                          name_field.split(b"\0", 1)[0]))
        pos += esize
    if len(out) != count:
        return refuse(f"Less bitmaps found than specified in header extension ({len(out)} of {count})", 0)
    return out


def check_bitmap_tables(f: HostFile, bitmaps: list[Bitmap], cluster_size: int, problems: list[Problem],
                        virtual_size: int) -> None:
    """qcow2_load_dirty_bitmaps at open: a second bitmap of one name is refused ("Bitmap already
    exists"), and the table of every bitmap not in use is loaded
    (bitmap_table_load) and an entry that check_table_entry refuses makes the open fail;
    load_bitmap_data also wants exactly the table size the disk needs. In-use bitmaps are skipped.
    Each distinct table is read once (65,535 entries sharing one maximal table cost one read)."""
    import numpy as np

    seen: dict[tuple[int, int], bool] = {}
    names: set[bytes] = set()
    for bm in bitmaps:
        # qcow2_load_dirty_bitmaps: an in-use bitmap whose name is loaded already is passed over;
        # load_bitmap then creates the BdrvDirtyBitmap first (bdrv_create_dirty_bitmap refuses a
        # name it has), before an in-use bitmap is skipped and before its table is read.
        if bm.name_bytes in names:
            if bm.in_use:
                continue
            problems.append(Problem(Severity.ERROR, "bitmap directory", f"Bitmap already exists: {bm.name}",
                                    bm.entry_offset, qemu_refuses_open=True))
            return
        names.add(bm.name_bytes)
        if bm.in_use:
            # load_bitmap: "Data is unusable, skip loading it" -- an in-use bitmap's table is not
            # read at open (only `qemu-img check` walks it, for refcounts).
            continue
        key = (bm.bitmap_table_offset, bm.bitmap_table_size)
        if key not in seen:
            if bm.bitmap_table_offset + bm.bitmap_table_size * 8 > C.BDRV_MAX_LENGTH:
                seen[key] = False
            else:
                t = read_bitmap_table(f, bm)
                offs = t & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)
                seen[key] = not bool((((t & np.uint64(C.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
                    (offs != 0) & (((t & np.uint64(1)) != 0) | ((offs % np.uint64(cluster_size)) != 0)))).any())
        if not seen[key]:
            problems.append(Problem(Severity.ERROR, "bitmap table", "Could not read bitmap_table table from image "
                                    f"for bitmap '{bm.name}': Invalid argument", bm.bitmap_table_offset,
                                    qemu_refuses_open=True))
            return
        # hbitmap serialization: one bit per granule, in 64-bit words, in whole clusters
        bits = -(-virtual_size // bm.granularity)
        need = -(-(-(-bits // 64) * 8) // cluster_size)
        if need != bm.bitmap_table_size:
            problems.append(Problem(Severity.ERROR, "bitmap table", f"Could not read bitmap '{bm.name}' from "
                                    f"image: Invalid argument (its table has {bm.bitmap_table_size} entries, "
                                    f"the disk needs {need})", bm.entry_offset, qemu_refuses_open=True))
            return


def read_bitmap_table(f: HostFile, bm: Bitmap) -> npt.NDArray[np.uint64]:
    """The bitmap table entries (bounded by the file's size, not by the claimed size)."""
    import numpy as np
    n = min(bm.bitmap_table_size, BME_MAX_TABLE_SIZE, max(0, f.size - bm.bitmap_table_offset) // 8)
    return np.frombuffer(f.pread(bm.bitmap_table_offset, n * 8), dtype=">u8").astype(np.uint64)
