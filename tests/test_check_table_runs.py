"""check's run-by-run path (issue 12): batches of L2 tables that each map one run of consecutive
host clusters are judged from each table's first and last entries (`L2Batch.table_runs`), and
the walk then hands out larger batches. These images mix such batches with batches that must go
entry by entry (damage in a later batch, or in the first one; a zero flag, a snapshot's copied
table, entries past the end of the file, a sequentially written image whose runs are broken by
refcount blocks), and qinspect's counts, stderr lines and exit code must stay qemu-img's.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_qemu
from test_check_runs import _same_as_qemu

from qinspect.analysis.refwalk import L2Batch

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


def _batch(entries: list[list[int]]) -> L2Batch:
    """A batch of standard tables with these entries (big-endian, as read)."""
    raw = np.array(entries, dtype=">u8").reshape(-1).view(np.uint8)
    ids = np.arange(len(entries), dtype=np.int64)
    return L2Batch(ids, ids * 4096, raw, False)


def _run(first: int, n: int, step: int) -> list[int]:
    return [first + k * step for k in range(n)]


def test_table_runs_finds_each_tables_run() -> None:
    step = 1 << 16
    tables = [_run(COPIED | (5 << 16), 8, step), _run(COPIED | (14 << 16), 8, step), _run(1 << 16, 8, step)]
    b = _batch(tables)
    firsts = b.table_runs(step)
    assert firsts is not None and firsts.tolist() == [t[0] for t in tables]
    assert b.used_count() == 24
    pos, entries, _ = b.used()
    assert pos is None and entries.tolist() == [e for t in tables for e in t]


@pytest.mark.parametrize("where", [1, 3, 6, 7])
def test_table_runs_sees_one_entry_out_of_its_run(where: int) -> None:
    step = 1 << 16
    changes: list[Callable[[int], int]] = [lambda e: e ^ (1 << 9), lambda e: e ^ 1, lambda e: e ^ COPIED,
                                           lambda e: e + step, lambda e: e - step]
    for change in changes:
        t = _run(COPIED | (5 << 16), 8, step)
        t[where] = change(t[where])
        b = _batch([_run(COPIED | (100 << 16), 8, step), t])
        assert b.table_runs(step) is None


def test_table_runs_edge_cases() -> None:
    step = 1 << 16
    assert _batch([[0] * 8]).table_runs(step) is None  # unallocated entries are no run
    # a run from entry 0 (offset 0): found, but its first entry is not in use
    b = _batch([_run(0, 8, step)])
    assert b.table_runs(step) is not None
    assert b.used_count() == 7
    pos, entries, _ = b.used()
    assert pos is not None and pos.tolist() == list(range(1, 8)) and entries.tolist() == _run(step, 7, step)
    # no run wraps past 2^64 (the last entry would have to be smaller than the first)
    top = (1 << 64) - 4 * step
    wrapped = [(top + k * step) % (1 << 64) for k in range(8)]
    assert _batch([wrapped]).table_runs(step) is None
    # extended L2 entries are never looked at as runs
    raw = np.array([[e, 0] for e in _run(COPIED | step, 8, step)], dtype=">u8").reshape(-1).view(np.uint8)
    assert L2Batch(np.zeros(1, np.int64), np.zeros(1, np.int64), raw, True).table_runs(step) is None


def _create(path: Path, size: str, opts: str = "preallocation=metadata") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), size], check=True)
    return path


def _l2_offsets(path: Path) -> list[int]:
    with open(path, "rb") as f:
        h = f.read(104)
        l1_size = struct.unpack(">I", h[36:40])[0]
        f.seek(struct.unpack(">Q", h[40:48])[0])
        return [e & OFFSET_MASK for e in struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))]


def _edit(path: Path, table: int, index: int, fn: Callable[[int], int]) -> None:
    l2 = _l2_offsets(path)[table]
    with open(path, "r+b") as f:
        f.seek(l2 + 8 * index)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2 + 8 * index)
        f.write(struct.pack(">Q", fn(e)))


@needs_qemu
@pytest.mark.parametrize("table", [0, 9, 23])
@pytest.mark.parametrize("opts", ["preallocation=metadata", "preallocation=metadata,refcount_bits=1"])
def test_damage_among_batches_of_runs(tmp_path: Path, table: int, opts: str) -> None:
    # 24 tables: a first batch of 8, then (runs found) batches of up to 32. The damaged table is in
    # the first batch, in the middle of the second or at its end: that batch goes entry by entry,
    # the others run by run, and the messages come out in QEMU's order either way.
    path = _create(tmp_path / "big.qcow2", "12G", opts)
    _edit(path, table, 3, lambda e: e & ~COPIED)  # COPIED cleared on a refcount-1 cluster
    _edit(path, table, 4000, lambda e: e | (1 << 57))  # a reserved bit
    with open(path, "rb") as f:
        f.seek(_l2_offsets(path)[table] + 8 * 4002)
        e4002 = struct.unpack(">Q", f.read(8))[0]
    _edit(path, table, 4001, lambda e: e4002)  # two entries naming one cluster (1-bit: an overflow)
    got, _ = _same_as_qemu(path)
    assert got["corruptions"] and got["leaks"]


@needs_qemu
def test_zero_flag_in_a_run(tmp_path: Path) -> None:
    # A preallocated cluster written as zeros keeps its offset and gains the zero flag: the table's
    # first and last entries still make a run, the bytes between do not.
    path = _create(tmp_path / "z.qcow2", "2G")
    subprocess.run(["qemu-io", "-c", "write -z 1M 64k", str(path)], check=True, capture_output=True)
    _, i = _same_as_qemu(path)
    assert i.returncode == 0


@needs_qemu
def test_snapshot_then_a_write(tmp_path: Path) -> None:
    # After a snapshot and one write, the active tree names a copy of the first table (COPIED set,
    # refcount 1) and the snapshot alone the original (COPIED clear); the other tables are named by
    # both trees (weights 2): batches mixing those kinds go entry by entry.
    path = _create(tmp_path / "s.qcow2", "4G")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(path)], check=True)
    subprocess.run(["qemu-io", "-c", "write 0 64k", str(path)], check=True, capture_output=True)
    _, i = _same_as_qemu(path)
    assert i.returncode == 0


@needs_qemu
@pytest.mark.parametrize("cut", [1, 3, 8193])
def test_runs_past_the_end_of_the_file(tmp_path: Path, cut: int) -> None:
    # The file cut short by `cut` clusters: the last table's run (or, cut by more than a table, the
    # last table itself) reaches past the end of the file, which a run by run judgement must not
    # hide (QEMU prints one message per reference it refuses to count).
    path = _create(tmp_path / "t.qcow2", "3G")
    os.truncate(path, os.path.getsize(path) - cut * 65536)
    got, i = _same_as_qemu(path)
    assert got["corruptions"] and i.stderr


@needs_qemu
def test_sequentially_written(tmp_path: Path) -> None:
    # Written front to back: each table maps a run, broken where QEMU put a refcount block or the
    # next table between the data clusters.
    path = _create(tmp_path / "w.qcow2", "2G", "cluster_size=65536")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 1200M", str(path)], check=True, capture_output=True)
    _, i = _same_as_qemu(path)
    assert i.returncode == 0


def _rewritten_after_snapshot(tmp_path: Path) -> Path:
    """Four tables of runs (4 KiB clusters): a snapshot's two (named by it alone), then the active
    tree's two, written after the snapshot, at the end of the file."""
    path = _create(tmp_path / "r.qcow2", "4M", "cluster_size=4096")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 4M", str(path)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(path)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 2 0 4M", str(path)], check=True, capture_output=True)
    return path


@needs_qemu
def test_copied_cleared_in_a_whole_active_run(tmp_path: Path) -> None:
    # A batch of snapshot-only and active tables, each a run; the active ones lose COPIED in every
    # entry (still runs, with the same flags throughout) while their refcounts are 1: 1024 wrong
    # flags, which only the entry-by-entry path can name.
    path = _rewritten_after_snapshot(tmp_path)
    for table in range(len(_l2_offsets(path))):
        for k in range(512):
            _edit(path, table, k, lambda e: e & ~COPIED)
    _, i = _same_as_qemu(path)
    assert i.stderr.count("OFLAG_COPIED data cluster") == 1024


@needs_qemu
def test_reserved_bit_in_every_entry_of_a_table(tmp_path: Path) -> None:
    # Every entry of the second table has the same reserved bit: still a run of one set of flags.
    path = _create(tmp_path / "rb.qcow2", "3G")
    l2 = _l2_offsets(path)[1]
    with open(path, "r+b") as f:
        f.seek(l2)
        t = np.frombuffer(f.read(65536), dtype=">u8") | np.uint64(1 << 57)
        f.seek(l2)
        f.write(t.astype(">u8").tobytes())
    _, i = _same_as_qemu(path)
    assert i.stderr.count("reserved bits set") == 8192


@needs_qemu
def test_snapshot_only_run_past_the_end_of_the_file(tmp_path: Path) -> None:
    # Tables named by a snapshot alone (the active L1 table emptied by hand), one of them moved as a
    # whole past the end of the file (every entry shifted by 64 MiB: still a run). No COPIED check
    # reaches them (not in the active tree): only the end of the file tells.
    path = _create(tmp_path / "e.qcow2", "4M", "cluster_size=4096")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 4M", str(path)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(path)], check=True)
    tables = _l2_offsets(path)
    with open(path, "r+b") as f:
        h = f.read(104)
        f.seek(struct.unpack(">Q", h[40:48])[0])
        f.write(bytes(8 * struct.unpack(">I", h[36:40])[0]))  # the active tree names nothing
        f.seek(tables[1])
        t = np.frombuffer(f.read(4096), dtype=">u8").astype(np.uint64) + np.uint64(64 << 20)
        f.seek(tables[1])
        f.write(t.astype(">u8").tobytes())
    got, i = _same_as_qemu(path)
    assert got["corruptions"] and i.stderr.count("exceeding the end of the file") == 512


@needs_qemu
def test_walk_hands_out_larger_batches_after_runs(tmp_path: Path) -> None:
    # 24 tables of runs: batches of 8 tables (64 Ki entries) until check has judged one by its runs,
    # then as large as L2_BATCH_BYTES allows; a walk without check keeps to 8.
    from qinspect.analysis.check import check_consumer
    from qinspect.analysis.refwalk import BatchConsumer, RefWalk
    from qinspect.qcow2.image import open_image

    path = _create(tmp_path / "b.qcow2", "12G")

    def sizes(out: list[int]) -> BatchConsumer:
        while (batch := (yield)) is not None:
            out.append(len(batch.ids))
        return None

    with open_image(str(path)) as img:
        alone: list[int] = []
        RefWalk(img).run([sizes(alone)])
        with_check: list[int] = []
        walk = RefWalk(img)
        res = walk.run([check_consumer(img, walk), sizes(with_check)])[0]
    assert alone == [8, 8, 8]
    assert with_check == [8, 16]
    assert res.exit_code == 0 and res.allocated_clusters == 24 * 8192  # type: ignore[attr-defined]


@needs_qemu
def test_sixteen_bit_refcount_maximum(tmp_path: Path) -> None:
    # 16-bit refcounts, counted in uint16: a count reaching 65535 must not wrap on the next
    # reference. Nine tables (two batches); the first one named by 65535 L1 entries, so its data
    # cluster reaches the maximum in the first batch, and the ninth table (second batch) names that
    # cluster once more: one overflow, at its place in QEMU's walk.
    path = _create(tmp_path / "m.qcow2", "33T", "cluster_size=65536")
    script = "".join(f"write -P {k + 1} {k * 512}M 64k\n" for k in range(9))
    subprocess.run(["qemu-io", str(path)], input=script, text=True, check=True, capture_output=True)
    with open(path, "r+b") as f:
        h = f.read(104)
        l1 = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1)
        e0 = f.read(8)
        f.seek(l1 + 8 * 9)
        f.write(e0 * 65534)
    t0 = _l2_offsets(path)[0]
    with open(path, "rb") as f:
        f.seek(t0)
        d = struct.unpack(">Q", f.read(8))[0]
    _edit(path, 8, 0, lambda e: d)
    _, i = _same_as_qemu(path)
    assert i.stderr.count("ERROR: overflow cluster") == 1
    assert "refcount=1 reference=65535" in i.stderr
