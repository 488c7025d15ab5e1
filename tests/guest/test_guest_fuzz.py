"""Hostile guest disks: partition tables and filesystems that lie give problems on their volume,
never an exception, a hang or unbounded memory.

Hand-made lies (overlapping and out-of-disk partitions, an EBR chain that loops, a GPT claiming a
huge entry array, ext4 bitmaps past the filesystem, an XFS bnobt that points at itself), then
random mutations of the metadata of the real sample filesystems, run in a child process with a
time bound so that a hang or a crash in a library is a failure naming the case.

    QINSPECT_GUEST_FUZZ_CASES=2000 pytest tests/guest/test_guest_fuzz.py   # a longer run
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from qinspect.guest import inspect_guest
from qinspect.guest.model import GuestView
from qinspect.qcow2.image import RawLayer
from tests.guest.conftest import GuestSamples

CASES = int(os.environ.get("QINSPECT_GUEST_FUZZ_CASES", "240"))
MiB = 1 << 20


def view_raw(path: Path) -> GuestView:
    layer = RawLayer(str(path))
    try:
        return inspect_guest(layer)
    finally:
        layer.close()


def _gpt(path: Path, size: int, parts: list[tuple[int, int]], n_entries: int = 128) -> None:
    entries = bytearray(n_entries * 128)
    for i, (first, last) in enumerate(parts):
        struct.pack_into("<16s16sQQ", entries, i * 128, b"\xaf\x3d\xc6\x0f\x83\x84\x72\x47\x8e\x79\x3d\x69\xd8\x47"
                         b"\x7d\xe4", os.urandom(16), first, last)
    hdr = bytearray(92)
    struct.pack_into("<8sIIIIQQQQ16sQIII", hdr, 0, b"EFI PART", 0x10000, 92, 0, 0, 1, size // 512 - 1, 34,
                     size // 512 - 34, os.urandom(16), 2, n_entries, 128, zlib.crc32(entries[: 128 * 128]))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, b"", 0xEE, b"", 1, size // 512 - 1) + b"\0" * 48 + b"\x55\xaa")
        f.seek(512)
        f.write(hdr)
        f.seek(1024)
        f.write(entries[: 128 * 128])


def test_overlapping_and_out_of_disk_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    _gpt(disk, 64 * MiB, [(2048, 40959), (20480, 61439), (100000, 300000), (1 << 40, (1 << 40) + 10)])
    view = view_raw(disk)
    probs = {v.index: " ".join(v.problems) for v in view.volumes}
    assert "overlaps partition 2" in probs[1] and "overlaps partition 1" in probs[2]
    assert "past the end of the disk" in probs[3] and "past the end of the disk" in probs[4]
    assert "CRC" not in " ".join(view.problems)


def test_gpt_with_a_huge_entry_array(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    _gpt(disk, 8 * MiB, [(2048, 4095)])
    with open(disk, "r+b") as f:  # claim 2^32-1 entries of 128 bytes
        f.seek(512 + 80)
        f.write(struct.pack("<I", 0xFFFFFFFF))
    view = view_raw(disk)
    assert view.volumes == [] or all(v.index == 0 for v in view.volumes)
    assert any("too large" in p for p in view.problems)


def test_ebr_chain_that_loops(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 2048, 30000) + b"\0" * 48 + b"\x55\xaa")
        # EBR at 2048: one logical partition, next EBR at offset 0 from the extended start = itself.
        f.seek(2048 * 512 + 446)
        f.write(struct.pack("<B3sB3sII", 0, b"", 0x83, b"", 64, 100) + struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 0,
                                                                                  100) + b"\0" * 32 + b"\x55\xaa")
    view = view_raw(disk)
    ext = next(v for v in view.volumes if v.index == 1)
    assert any("loops" in p for p in ext.problems)
    assert [v.index for v in view.volumes] == [1, 5]


def _patch(path: Path, offset: int, data: bytes) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def test_ext4_bitmap_past_the_filesystem(guest_samples: GuestSamples, tmp_path: Path) -> None:
    part = tmp_path / "p2"
    subprocess.run(["cp", "--sparse=always", str(guest_samples.part_file("cloud", 2)), str(part)], check=True)
    good = view_raw(part).volumes[0]
    # Group 3's descriptor (1 KiB blocks: the GDT is block 2; 64-byte descriptors) -> block bitmap at 2^31.
    desc = 2 * 1024 + 3 * 64
    _patch(part, desc, struct.pack("<I", 1 << 31))
    _patch(part, desc + 18, b"\0\0")  # and clear BLOCK_UNINIT so the bitmap is used
    vol = view_raw(part).volumes[0]
    assert any("group 3: block bitmap" in p for p in vol.problems)
    assert vol.free_bytes is not None and good.free_bytes is not None and vol.free_bytes < good.free_bytes


def test_xfs_bnobt_loop(guest_samples: GuestSamples, tmp_path: Path) -> None:
    part = tmp_path / "x1"
    subprocess.run(["cp", "--sparse=always", str(guest_samples.part_file("xfs", 1)), str(part)], check=True)
    raw = part.read_bytes()[:8192]
    bs = struct.unpack_from(">I", raw, 4)[0]
    root = struct.unpack_from(">I", raw, 512 + 16)[0]
    # Make AG 0's bnobt two levels deep with the root block pointing at itself.
    _patch(part, 512 + 28, struct.pack(">I", 2))
    maxrecs_node = (bs - 56) // 12
    _patch(part, root * bs + 4, struct.pack(">HH", 1, 1))
    _patch(part, root * bs + 56 + maxrecs_node * 8, struct.pack(">I", root))
    vol = view_raw(part).volumes[0]
    assert any("AG 0" in p and ("loops" in p or "level" in p) for p in vol.problems), vol.problems
    assert vol.free_bytes is not None  # the other AGs are still counted


CHILD = r'''
import json, os, random, sys
from qinspect.guest import inspect_guest
from qinspect.guest.report import guest_json
from qinspect.qcow2.image import RawLayer
path, regions = sys.argv[1], json.loads(sys.argv[2])
start, count, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, os.O_RDWR)
for case in range(start, start + count):
    rng = random.Random(seed * 1000003 + case)
    saved = []
    for _ in range(rng.randint(1, 6)):
        lo, hi = regions[rng.randrange(len(regions))]
        off = rng.randrange(lo, hi)
        n = rng.choice([1, 2, 4, 8, 16])
        data = rng.choice([b"\0" * n, b"\xff" * n, bytes(rng.randrange(256) for _ in range(n))])
        saved.append((off, os.pread(fd, n, off)))
        os.pwrite(fd, data, off)
    print("case", case, flush=True)
    layer = RawLayer(path)
    try:
        json.dumps(guest_json(inspect_guest(layer)))
    finally:
        layer.close()
    for off, old in reversed(saved):
        os.pwrite(fd, old, off)
print("done", flush=True)
'''


def _regions(name: str, part: Path) -> list[tuple[int, int]]:
    """Where the metadata of each sample filesystem is (the first MiB holds the most of it)."""
    size = part.stat().st_size
    out = [(0, min(size, MiB))]
    if name == "xfs":  # the other AG headers
        raw = part.read_bytes()[:512]
        bs, agblocks, agcount = struct.unpack_from(">I", raw, 4)[0], *struct.unpack_from(">II", raw, 84)
        out += [(ag * agblocks * bs, ag * agblocks * bs + 4 * bs) for ag in range(1, agcount)]
    return out


def test_random_mutations_of_real_filesystems(guest_samples: GuestSamples, tmp_path: Path) -> None:
    targets = [("cloud", 2), ("cloud", 1), ("mbr", 5), ("mbr", 1), ("xfs", 1), ("ntfs", 0)]
    if guest_samples.has("lvm"):
        targets.append(("lvm", 1))
    per = max(1, CASES // len(targets))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for k, (name, index) in enumerate(targets):
        part = tmp_path / f"{name}.{index}"
        subprocess.run(["cp", "--sparse=always", str(guest_samples.part_file(name, index)), str(part)], check=True)
        regions = _regions(name, part)
        r = subprocess.run([sys.executable, "-c", CHILD, str(part), json.dumps(regions), "0", str(per), str(k)],
                           capture_output=True, text=True, timeout=120, env=env)
        last = [ln for ln in r.stdout.splitlines() if ln.startswith("case")][-1:] or ["before the first case"]
        assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), (
            f"{name} partition {index}: {last[0]} (seed {k}) failed:\n{r.stderr[-3000:]}")
        part.unlink()
