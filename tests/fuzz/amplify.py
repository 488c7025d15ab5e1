"""Generated attacks that mutation does not find: sharing that amplifies work, maximal counts.

Each generator makes a real image with qemu-img / qemu-io and then patches its tables (the
malformed part is hand-built on purpose), so the file stays a few MB while what it claims is huge:

- `shared_l2`: one L2 table named by every entry of an L1 table of a million entries or more;
- `shared_snapshots`: thousands of snapshots whose table entries all name one L1 table, whose L2
  tables are full (4 KiB clusters, every entry allocated);
- `alternating_extents`: L2 tables whose entries alternate allocated / unallocated, a million guest
  extents that `map` must stream;
- `shared_bitmap_tables`: a bitmap directory of thousands of entries naming one bitmap table.

`GENERATORS` maps a name to a function `(dir, scale) -> path`; `scale` in (0, 1] shrinks the counts
for quick runs. Used by tests/test_amplification.py.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qinspect.qcow2.image import open_image


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


def _write_u64s(path: Path, offset: int, values: np.ndarray) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(values.astype(">u8").tobytes())


def shared_l2(tmp: Path, scale: float = 1.0) -> Path:
    """Every L1 entry (2 Mi at scale 1) names the one L2 table of guest cluster 0."""
    n = max(1024, int((1 << 21) * scale))
    path = tmp / "shared_l2.qcow2"
    # 64 KiB clusters: one L1 entry maps 512 MiB.
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(n * (512 << 20)))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 256k", str(path))
    with open_image(path) as img:
        l1_off = img.header.l1_table_offset
        first = int(img.l1_table[0])
        assert len(img.l1_table) >= n
    _write_u64s(path, l1_off, np.full(n, first, dtype=np.uint64))
    return path


def _snapshot_entries(path: Path) -> tuple[int, bytes]:
    """(header offset of nb_snapshots, bytes of the first snapshot table entry)."""
    with open_image(path) as img:
        sn = img.snapshots[0]
        h = img.header
        raw = img.file.pread(h.snapshots_offset, img.snapshot_table.size)
    size = sn.entry_size if hasattr(sn, "entry_size") else len(raw) // h.nb_snapshots
    return h.snapshots_offset, raw[:size]


def shared_snapshots(tmp: Path, scale: float = 1.0) -> Path:
    """65,536 snapshots (at scale 1) all naming one L1 table whose L2 tables are full."""
    n = max(2048, int(65536 * scale))
    path = tmp / "shared_snapshots.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "64M")
    # 4 MiB of data: 4 L2 tables of 512 entries, every entry allocated.
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(path))
    _run("qemu-img", "snapshot", "-c", "s", str(path))
    with open_image(path) as img:
        h = img.header
        sn = img.snapshots[0]
        raw = img.file.pread(h.snapshots_offset, img.snapshot_table.size)
        entry = raw[: img.snapshot_table.size]
        del sn
        end = -(-img.file.size // 4096) * 4096
    # One entry repeated n times (entries are 8-byte aligned already), appended at the end.
    table = entry * n
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(table)
        f.seek(60)
        f.write(struct.pack(">IQ", n, end))
    return path


def alternating_extents(tmp: Path, scale: float = 1.0) -> Path:
    """A million guest clusters alternating allocated / unallocated (every other L2 entry)."""
    clusters = max(1 << 14, int((1 << 20) * scale))
    path = tmp / "alternating.qcow2"
    cs = 65536
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(path), str(2 * clusters * cs))
    # Allocate the first cluster of every L2 table's range: qemu allocates the tables themselves.
    l2_span = (cs // 8) * cs
    tables = -(-2 * clusters * cs // l2_span)
    cmds: list[str] = []
    for t in range(tables):
        cmds += ["-c", f"write -P 0x33 {t * l2_span} 64k"]
    _run("qemu-io", "-f", "qcow2", *cmds, str(path))
    with open_image(path) as img:
        l1 = img.l1_table
        offs = [int(e) & 0x00FFFFFFFFFFFE00 for e in l1[:tables]]
        data = [int(img.read_l2_table(o)[0][0]) for o in offs]
    for o, d in zip(offs, data, strict=True):
        entries = np.zeros(cs // 8, dtype=np.uint64)
        entries[0::2] = d  # every even entry names the table's one data cluster
        _write_u64s(path, o, entries)
    return path


def shared_bitmap_tables(tmp: Path, scale: float = 1.0) -> Path:
    """A bitmap directory of 65,535 entries (at scale 1), every one naming the same bitmap table."""
    n = max(1024, int(65535 * scale))
    path = tmp / "shared_bitmaps.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G")
    _run("qemu-img", "bitmap", "--add", str(path), "b")
    with open_image(path) as img:
        ext = img.header.bitmaps_ext
        assert ext is not None
        raw = img.file.pread(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        ext_off = next(e.offset for e in img.header.extensions if e.magic == 0x23852875)
        end = -(-img.file.size // 65536) * 65536
    directory = raw * n
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(directory)
        # bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64, directory offset u64
        f.seek(ext_off + 8)
        f.write(struct.pack(">IIQQ", n, 0, len(directory), end))
    return path


GENERATORS: dict[str, Callable[[Path, float], Path]] = {
    "shared_l2": shared_l2,
    "shared_snapshots": shared_snapshots,
    "alternating_extents": alternating_extents,
    "shared_bitmap_tables": shared_bitmap_tables,
}
