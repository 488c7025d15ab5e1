"""The planner hands back exactly the pieces asked for, whatever their layout.

Windows read pieces that do not overlap straight into their places (one preadv per request, the
gaps into scratch); overlapping ones are read into one buffer and gathered out of it (one vectorised
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


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("order", [Order.GIVEN, Order.HOST])
def test_disjoint_pieces_read_straight_into_place(data_file: tuple[Path, bytes], seed: int, order: Order) -> None:
    # Pieces that do not overlap (every walk's tables) are read by one preadv per request, into their
    # places in the output, the gaps between them into scratch: thousands of pieces (more buffers
    # than one preadv takes), gaps short and long, the last ones past the end of the file.
    path, data = data_file
    rng = np.random.default_rng(100 + seed)
    size = int(rng.choice([512, 4096]))
    slots = np.arange(0, SIZE + 4 * size, size, dtype=np.int64)
    offs = rng.permutation(slots[rng.random(len(slots)) < 0.6])
    with HostFile(str(path)) as f, PieceStream(f, offs, size, order, window_bytes=1 << 62) as s:
        buf = s.take(len(offs))
        want = b"".join(_piece(data, int(o), size) for o in offs[s.index].tolist())
        assert buf.tobytes() == want


def test_readv_into_fills_buffers_in_order_and_zeros_past_the_end(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    lengths = [1, 7, 512, 0, 3] * 500  # 2,500 buffers: more than one preadv takes
    start = SIZE - sum(lengths) + 5000  # the last 5,000 bytes lie past the end of the file
    bufs = [memoryview(bytearray(n)) for n in lengths]
    with HostFile(str(path)) as f:
        f.readv_into(start, bufs)
    got = b"".join(bytes(b) for b in bufs)
    assert got == data[start:] + bytes(5000)
