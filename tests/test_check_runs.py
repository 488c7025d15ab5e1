"""check's batch decoding (issue 12) against live qemu-img, on images where every entry is in use.

The L2 walk decodes only the entries in use, finds the rare kinds (compressed, zero flag, reserved
bits, unaligned offsets) with one OR over a batch, counts runs of consecutive data clusters a slice
at a time and answers "is any COPIED flag wrong?" with reductions over the stored refcounts. These
images exercise exactly those paths: metadata-preallocated tables (one long run per table), with
extended L2, 4 KiB clusters, 1-bit and 8-bit refcounts, snapshots sharing every table (weights > 1,
COPIED clear), an external data file; and the same tables with entries damaged in the middle of a
run (COPIED cleared, an unaligned offset, an entry zeroed, reserved bits, two entries naming one
cluster). qinspect's counts, stderr lines and exit code must be qemu-img's.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_qemu

QINSPECT = shutil.which("qinspect") or str(Path(sys.executable).with_name("qinspect"))

IMAGES: dict[str, tuple[str, str, list[list[str]]]] = {
    # name: (size, create options, commands run after creation)
    "prealloc": ("3G", "preallocation=metadata", []),
    "prealloc_extl2": ("3G", "preallocation=metadata,extended_l2=on", []),
    "prealloc_4k": ("1G", "preallocation=metadata,cluster_size=4096", []),
    "prealloc_rc1": ("1G", "preallocation=metadata,refcount_bits=1", []),
    "prealloc_rc8_snapshots": ("2G", "preallocation=metadata,refcount_bits=8",
                               [["snapshot", "-c", "a"], ["snapshot", "-c", "b"]]),
    "prealloc_snapshots": ("2G", "preallocation=metadata", [["snapshot", "-c", "s1"], ["snapshot", "-c", "s2"]]),
    "prealloc_data_file": ("1G", "preallocation=metadata,data_file={dir}/data.raw", []),
}
DAMAGED = ["prealloc", "prealloc_extl2", "prealloc_4k", "prealloc_rc1"]


def _make(tmp_path: Path, name: str) -> Path:
    size, opts, cmds = IMAGES[name]
    path = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts.format(dir=tmp_path), str(path), size],
                   check=True)
    for c in cmds:
        subprocess.run(["qemu-img", *c, str(path)], check=True)
    return path


def _damage(path: Path) -> None:
    """Damage entries in the middle of the first table's run and the second L1 entry's COPIED flag."""
    with open(path, "r+b") as f:
        h = f.read(104)
        l1 = struct.unpack(">Q", h[40:48])[0]
        incompat = struct.unpack(">Q", h[72:80])[0]
        es = 16 if incompat & (1 << 4) else 8  # extended L2
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00

        def edit(i: int, fn: Callable[[int, int], int]) -> None:
            f.seek(l2 + es * i)
            e = struct.unpack(">Q", f.read(8))[0]
            f.seek(l2 + es * i)
            f.write(struct.pack(">Q", fn(e, i)))

        edit(5, lambda e, i: e & ~(1 << 63))  # COPIED cleared on a refcount-1 cluster
        edit(9, lambda e, i: e | 0x200)  # unaligned data cluster offset
        edit(20, lambda e, i: 0)  # unallocated: its cluster leaks
        f.seek(l2 + es * 41)
        e41 = struct.unpack(">Q", f.read(8))[0]
        edit(40, lambda e, i: e41)  # two entries naming one cluster
        edit(60, lambda e, i: e | (1 << 56))  # a reserved bit
        f.seek(l1 + 8)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1 + 8)
        f.write(struct.pack(">Q", e & ~(1 << 63)))  # an L2 table's COPIED flag cleared


def _set_refcount(path: Path, l2_index: int, value: int) -> None:
    """Store `value` as the refcount of the data cluster named by entry `l2_index` of the first table
    (16- or 8-bit refcounts): a COPIED flag that no longer matches, in the middle of a run."""
    with open(path, "r+b") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1, rt = struct.unpack(">Q", h[40:48])[0], struct.unpack(">Q", h[48:56])[0]
        bits = 1 << struct.unpack(">I", h[96:100])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * l2_index)
        cluster = (struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00) >> cluster_bits
        per = (1 << cluster_bits) * 8 // bits
        f.seek(rt + 8 * (cluster // per))
        block = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(block + (cluster % per) * bits // 8)
        f.write(value.to_bytes(bits // 8, "big"))


def _both(path: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if k != "QINSPECT_DEBUG"}
    args = ["check", "--output=json", path.name]
    q = subprocess.run(["qemu-img", *args], cwd=path.parent, capture_output=True, text=True, check=False)
    i = subprocess.run([QINSPECT, *args], cwd=path.parent, capture_output=True, text=True, check=False, env=env)
    return q, i


def _as_qinspect(text: str) -> list[str]:
    return [("qinspect: " + ln[len("qemu-img: "):]) if ln.startswith("qemu-img: ") else ln for ln in text.splitlines()]


def _same_as_qemu(path: Path) -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
    """Check `path` with both tools: the same exit code, JSON (but for "in-use") and stderr lines
    (in QEMU's walk order). Returns qinspect's JSON and run."""
    q, i = _both(path)
    assert i.returncode == q.returncode, (i.stderr, q.stderr)
    got = json.loads(i.stdout)
    assert got.pop("in-use") is None
    assert got == json.loads(q.stdout)
    assert i.stderr.splitlines() == _as_qinspect(q.stderr)
    return got, i


@needs_qemu
@pytest.mark.parametrize("damaged", [False, True])
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_check_agrees_with_qemu_img(tmp_path: Path, name: str, damaged: bool) -> None:
    if damaged and name not in DAMAGED:
        pytest.skip("undamaged only")
    path = _make(tmp_path, name)
    if damaged:
        _damage(path)
    # in QEMU's walk order, overflows of a doubly named cluster (prealloc_rc1, damaged) included
    got, _ = _same_as_qemu(path)
    if damaged:
        assert got["corruptions"] and got["leaks"]


@needs_qemu
@pytest.mark.parametrize(("name", "value"), [("prealloc", 2), ("prealloc_4k", 0), ("prealloc_snapshots", 1),
                                             ("prealloc_rc8_snapshots", 1)])
def test_copied_flags_against_changed_refcounts(tmp_path: Path, name: str, value: int) -> None:
    # Every entry of a run has COPIED (or none has, after a snapshot) but one stored refcount says
    # otherwise: the reductions must send that run to the entry-by-entry check.
    path = _make(tmp_path, name)
    _set_refcount(path, 100, value)
    _, i = _same_as_qemu(path)
    assert "OFLAG_COPIED data cluster" in i.stderr


@needs_qemu
@pytest.mark.parametrize("name", ["prealloc_rc1", "prealloc"])
def test_cluster_named_twice_in_a_run(tmp_path: Path, name: str) -> None:
    # Two entries of a run name one cluster (with 1-bit refcounts: an overflow) and another leaks;
    # counted run by run, the double reference must still be seen.
    path = _make(tmp_path, name)
    with open(path, "r+b") as f:
        h = f.read(104)
        f.seek(struct.unpack(">Q", h[40:48])[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * 41)
        e41 = f.read(8)
        f.seek(l2 + 8 * 40)
        f.write(e41)
    got, _ = _same_as_qemu(path)
    assert got["corruptions"] and got["leaks"]


@needs_qemu
def test_active_tables_without_allocated_entries(tmp_path: Path) -> None:
    # One batch holds the snapshot's table (one allocated entry) and the active table, whose only
    # entry in use is a zero cluster without an offset: no allocated entry of the active tree to
    # check COPIED flags on (this once raised on an empty array).
    path = tmp_path / "z.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-c", "write 0 64k", str(path)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", str(path)], check=True)
    subprocess.run(["qemu-io", "-c", "write -z -u 0 64k", str(path)], check=True, capture_output=True)
    q, i = _both(path)
    assert i.returncode == q.returncode == 0, (i.stderr, q.stderr)
    got = json.loads(i.stdout)
    assert got.pop("in-use") is None
    assert got == json.loads(q.stdout)
    assert i.stderr == q.stderr == ""


@needs_qemu
@pytest.mark.parametrize("damage", [False, True])
def test_refcount_block_ahead_of_the_table(tmp_path: Path, damage: bool) -> None:
    # The first L2 table's second entry names a data cluster written much later, so that its
    # refcount block lies after the table in the file: check judges that entry's COPIED flag after
    # its sweep (StoredRefcounts), and must still find it wrong when it is.
    # 3000 tables, each followed by its one data cluster (a dense sweep, ~24 MB), then a cluster for
    # the first table's entry 1 at the end, whose refcount block (8 MiB of 4 KiB clusters each) was
    # allocated ahead of that table, inside the sweep.
    path = tmp_path / "ahead.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "8G"],
                   check=True)
    script = "".join(f"write {k * 2}M 4k\n" for k in range(3000)) + "write 4k 4k\n"
    subprocess.run(["qemu-io", "-t", "unsafe", str(path)], input=script, text=True, check=True, capture_output=True)
    if damage:
        with open(path, "r+b") as f:
            h = f.read(104)
            f.seek(struct.unpack(">Q", h[40:48])[0])
            l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
            f.seek(l2 + 8)
            e = struct.unpack(">Q", f.read(8))[0]
            assert e & 0x00FFFFFFFFFFFE00 > l2 + (16 << 20)  # far after the table: another refcount block
            f.seek(l2 + 8)
            f.write(struct.pack(">Q", e & ~(1 << 63)))
    _, i = _same_as_qemu(path)
    assert ("OFLAG_COPIED data cluster" in i.stderr) == damage
