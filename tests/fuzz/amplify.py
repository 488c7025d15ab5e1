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


def _snapshot_table(path: Path, n: int, l1_offsets: list[int] | None = None) -> bytes:
    """`n` copies of the image's first snapshot table entry, with ids 1..n (and the L1 offsets given)."""
    with open_image(path) as img:
        sn = img.snapshots[0]
        raw = img.file.pread(sn.entry_offset, sn.entry_size)
    fixed, extra = raw[:40], raw[40 : 40 + sn.extra_data_size]
    out = bytearray()
    for k in range(n):
        ident = str(k + 1).encode()
        name = b"s"
        l1_off = struct.unpack_from(">Q", fixed, 0)[0] if l1_offsets is None else l1_offsets[k]
        head = struct.pack(">QIHH", l1_off, struct.unpack_from(">I", fixed, 8)[0], len(ident), len(name)) + fixed[16:]
        entry = head + extra + ident + name
        out += entry + bytes(-len(entry) % 8)
    return bytes(out)


def _set_snapshots(path: Path, table: bytes, n: int, align: int) -> None:
    end = -(-path.stat().st_size // align) * align
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(table)
        f.seek(60)
        f.write(struct.pack(">IQ", n, end))


def _full_tables_image(path: Path) -> None:
    """4 KiB clusters, 4 MiB of data: 4 L2 tables of 512 entries, every entry allocated; one snapshot."""
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "64M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(path))
    _run("qemu-img", "snapshot", "-c", "s", str(path))


def shared_snapshots(tmp: Path, scale: float = 1.0) -> Path:
    """65,536 snapshots (at scale 1) all naming one L1 table whose L2 tables are full."""
    n = max(2048, int(65536 * scale))
    path = tmp / "shared_snapshots.qcow2"
    _full_tables_image(path)
    _set_snapshots(path, _snapshot_table(path, n), n, 4096)
    return path


def snapshot_l1_copies(tmp: Path, scale: float = 1.0) -> Path:
    """2,048 snapshots, each with its own copy of the L1 table, all naming the same full L2 tables."""
    n = 2048
    path = tmp / "snapshot_l1_copies.qcow2"
    _full_tables_image(path)
    with open_image(path) as img:
        sn = img.snapshots[0]
        l1 = img.file.pread(sn.l1_table_offset, sn.l1_size * 8)
    cs = 4096
    base = -(-path.stat().st_size // cs) * cs
    with open(path, "r+b") as f:
        for k in range(n):
            f.seek(base + k * cs)
            f.write(l1.ljust(cs, b"\0"))
    table = _snapshot_table(path, n, [base + k * cs for k in range(n)])
    _set_snapshots(path, table, n, cs)
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
    """A bitmap directory of 65,535 entries (at scale 1), each of its own name, every one naming the
    same bitmap table."""
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
    # Each entry its own name ("00000" .. "0fffe"): bitmaps of one name are refused at open
    # ("Bitmap already exists"), and the attack is the table they all share.
    head = bytearray(raw[:24])
    struct.pack_into(">H", head, 18, 5)  # name_size
    directory = b"".join(bytes(head) + f"{i:05x}".encode() + b"\0" * 3 for i in range(n))
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
    "snapshot_l1_copies": snapshot_l1_copies,
    "alternating_extents": alternating_extents,
    "shared_bitmap_tables": shared_bitmap_tables,
}
