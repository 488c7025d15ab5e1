"""The planner hands back exactly the pieces asked for, whatever their layout.

Windows read all their requests into one buffer and gather the pieces out of it (one vectorised
copy for pieces of one length, a copy per run otherwise, none for one contiguous run); dense
windows go to the sweep thread, sparse ones to the pool, small ones to the caller. Random piece
sets — overlapping, repeated, zero-length, past the end of the file, one length or many — in both
orders and several window sizes must all come back byte for byte, in the stream's order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.planner import Order, PieceStream

SIZE = 1 << 20


@pytest.fixture()
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    return p, data


def _piece(data: bytes, offset: int, length: int) -> bytes:
    return data[offset : offset + length].ljust(length, b"\0")  # past the end reads as zeros


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", [Order.GIVEN, Order.HOST])
def test_random_pieces_come_back_exactly(data_file: tuple[Path, bytes], seed: int, order: Order) -> None:
    path, data = data_file
    rng = np.random.default_rng(seed)
    with HostFile(str(path)) as f:
        for trial in range(25):
            n = int(rng.integers(1, 400))
            offs = rng.integers(0, SIZE + 8192, n).astype(np.int64)
            if trial % 3 == 0:  # many lengths (zero included)
                lengths: np.ndarray | int = rng.integers(0, 9000, n).astype(np.int64)
            else:  # one length, aligned or not, dense or sparse
                lengths = int(rng.choice([512, 4096, 65536]))
                if trial % 2:
                    offs = offs - offs % lengths
            lens = np.broadcast_to(np.asarray(lengths, dtype=np.int64), offs.shape)
            window = int(rng.choice([4096, 65536, 1 << 20, 16 << 20]))
            with PieceStream(f, offs, lengths, order, window_bytes=window) as s:
                while s.pos < len(s):
                    p0 = s.pos
                    buf = s.take(int(rng.integers(1, 40)))
                    want = b"".join(_piece(data, int(offs[i]), int(lens[i])) for i in s.index[p0 : s.pos].tolist())
                    assert buf.tobytes() == want, (seed, trial, p0)
            if order is Order.HOST:
                assert bool((np.diff(offs[s.index]) >= 0).all())  # one sweep, front to back
