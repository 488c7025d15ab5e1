"""The planner's small-read path: windows of a few small reads are read by the caller, same bytes.

A scan inspects hundreds of small images; handing their handful of 64 KiB reads to the thread pool
cost more than the reads. These tests pin that the synchronous path (below `SYNC_BYTES`) and the
pooled path return the same bytes, in the stream's order, and that small streams start no pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qinspect.qcow2 import planner
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.planner import Order, PieceStream


@pytest.fixture()
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 123)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    return p, data


def _expected(data: bytes, offs: list[int], ln: int) -> bytes:
    return b"".join(data[o:o + ln].ljust(ln, b"\0") for o in offs)


OFFSETS = [[4096], [2 * 1024 * 1024, 0, 65536, 3 * 1024 * 1024, 200000, 0], [3 * 1024 * 1024 + 100]]


@pytest.mark.parametrize("offs", OFFSETS)
@pytest.mark.parametrize("order", [Order.GIVEN, Order.HOST])
def test_sync_and_pooled_paths_agree(data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
                                     offs: list[int], order: Order) -> None:
    path, data = data_file
    ln = 65536
    got = {}
    for sync in (planner.SYNC_BYTES, 0):
        monkeypatch.setattr(planner, "SYNC_BYTES", sync)
        with HostFile(str(path)) as f, PieceStream(f, np.array(offs, np.int64), ln, order,
                                                   window_bytes=256 * 1024) as s:
            parts = [(idx.copy(), buf.tobytes()) for idx, buf in s.batches(2)]
        got[sync] = parts
    assert got[planner.SYNC_BYTES] == got[0]
    # and both are the pieces asked for, in the stream's order
    idx = np.concatenate([i for i, _ in got[0]])
    assert b"".join(b for _, b in got[0]) == _expected(data, [offs[i] for i in idx.tolist()], ln)


def test_small_reads_start_no_pool(data_file: tuple[Path, bytes]) -> None:
    # In a fresh interpreter (a scan worker): reading a few small pieces starts no I/O thread.
    path, _ = data_file
    code = (
        "import sys, threading, numpy as np\n"
        "from qinspect.qcow2.hostfile import HostFile\n"
        "from qinspect.qcow2.planner import read_pieces\n"
        "with HostFile(sys.argv[1]) as f:\n"
        "    b = read_pieces(f, np.array([0, 1 << 20, 2 << 20, 65536], np.int64), 4096)\n"
        "assert len(b) == 4 * 4096\n"
        "print(sum(t.name.startswith('qinspect-io') for t in threading.enumerate()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "0"
