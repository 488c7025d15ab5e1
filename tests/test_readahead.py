"""The tables' early read-ahead (`qinspect.qcow2.readahead`): when it starts, what it reads, and
that check and map answer the same with it.

It must start for tables interleaved densely with data (small clusters, scattered writes), and
not for sparse tables (a metadata-preallocated image), a small span, or a file already cached.
Images are made by qemu-img and qemu-io.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from qinspect.qcow2 import readahead
from qinspect.qcow2.meta import open_meta

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-img and qemu-io")


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _start(path: Path) -> threading.Thread | None:
    with open_meta(str(path)) as meta:
        return readahead.start_table_read_ahead(meta.file, meta.header)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 KiB clusters, a write every 2 MiB (each in its own L2 table) in a shuffled order: tables and
    # data interleave over the file, as on a guest's random writes.
    p = tmp_path_factory.mktemp("ra") / "scattered.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "1G"], check=True)
    offsets = [(k * 37 % 512) * (2 << 20) for k in range(512)]
    cmds = [a for off in offsets for a in ("-c", f"write -P {off >> 21 & 255} {off} 4k")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(p)], check=True, capture_output=True)
    return p


def test_starts_for_dense_tables_and_reads_their_span(scattered: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readahead, "MIN_SPAN", 1 << 20)
    _evict(scattered)
    thread = _start(scattered)
    assert thread is not None
    thread.join(30)
    assert _start(scattered) is None  # now cached: nothing to do


def test_not_for_a_small_span_sparse_tables_or_no_tables(scattered: Path, tmp_path: Path) -> None:
    _evict(scattered)
    assert _start(scattered) is None  # 4 MiB of tables and data: below MIN_SPAN
    prealloc = tmp_path / "prealloc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(prealloc), "8G"],
                   check=True)
    _evict(prealloc)
    assert _start(prealloc) is None  # a 64 KiB table per 512 MiB
    empty = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "1G"], check=True)
    assert _start(empty) is None


@pytest.mark.parametrize("command", ["check", "map"])
def test_same_answers_with_it(scattered: Path, command: str, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from qinspect.cli import main

    outs = []
    for min_span in (1 << 62, 1 << 20):  # never, then always
        monkeypatch.setattr(readahead, "MIN_SPAN", min_span)
        _evict(scattered)
        assert main([command, "--output=json", str(scattered)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_hand_over_stops_it(scattered: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The planner's sweep hands over as it starts: the read-ahead stops after the call it is in.
    monkeypatch.setattr(readahead, "MIN_SPAN", 1 << 20)
    monkeypatch.setattr(readahead, "CALL_BYTES", 64 << 10)
    _evict(scattered)
    thread = _start(scattered)
    assert thread is not None
    readahead.hand_over()
    thread.join(30)
    assert not thread.is_alive()
    again = _start(scattered)  # the end of the span was not read: not cached yet
    assert again is not None
    readahead.hand_over()
    again.join(30)
