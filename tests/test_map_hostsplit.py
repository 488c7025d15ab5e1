"""The vectorised host-file split of data runs (metadata-preallocated images) cuts exactly where
the piece-by-piece SEEK_DATA/SEEK_HOLE loop does, on random sparse files and random runs."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest

from qinspect.analysis import map as qmap
from qinspect.qcow2.hostfile import HostFile

BLOCK = 4096


def _sparse_file(path: Path, rng: random.Random) -> None:
    size = rng.randrange(1, 400) * BLOCK + rng.choice([0, 0, 512, 1])
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(rng.randrange(0, 40)):
            off = rng.randrange(0, max(1, size // BLOCK)) * BLOCK
            f.seek(off)
            f.write(b"\x01" * rng.choice([BLOCK, 2 * BLOCK, 5 * BLOCK]))
        f.truncate(size)


def _runs(size: int, rng: random.Random) -> qmap.MapRuns:
    n = rng.randrange(1, 30)
    guest = 0
    starts, lens, offs = [], [], []
    for _ in range(n):
        length = rng.choice([512, BLOCK, 3 * BLOCK, 16 * BLOCK, 64 * BLOCK])
        host = rng.choice([rng.randrange(0, size + 8 * BLOCK), size - length // 2, size, 0])
        starts.append(guest)
        lens.append(length)
        offs.append(max(0, host) // 512 * 512)
        guest += length + rng.choice([0, BLOCK])
    k = len(starts)
    return qmap.MapRuns(np.array(starts, np.int64), np.array(lens, np.int64),
                        np.full(k, qmap.DATA | qmap.OFFSET_VALID, np.uint8), np.array(offs, np.int64),
                        np.zeros(k, np.int64))


def _same(a: tuple[qmap.MapRuns, np.ndarray], b: tuple[qmap.MapRuns, np.ndarray]) -> None:
    for key in ("start", "length", "flags", "offset", "depth"):
        assert getattr(a[0], key).tolist() == getattr(b[0], key).tolist(), key
    assert a[1].tolist() == b[1].tolist()


@pytest.mark.parametrize("seed", range(40))
def test_split_matches_loop(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "host.img"
    _sparse_file(path, rng)
    with HostFile(str(path)) as host:
        for _ in range(5):
            runs = _runs(host.size, rng)
            got = qmap._host_zero_split(qmap._HostProbe(host), runs)
            want = qmap._host_zero_split_loop(qmap._HostProbe(host), runs)
            _same(got, want)
            # and the loop agrees with HostFile.data_extent, query by query
            for r in range(len(runs)):
                pieces = want[0]
                lo = int(np.cumsum(want[1])[r] - want[1][r])
                for p in range(lo, lo + int(want[1][r])):
                    off = int(pieces.offset[p])
                    if off < host.size:
                        assert host.data_extent(off)[0] == (not pieces.flags[p] & qmap.ZERO)


def test_split_without_seek_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without SEEK_DATA: everything is data up to EOF, like HostFile.data_extent."""
    path = tmp_path / "host.img"
    _sparse_file(path, random.Random(7))
    real = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "not supported")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    with HostFile(str(path)) as host:
        runs = _runs(host.size, random.Random(8))
        _same(qmap._host_zero_split(qmap._HostProbe(host), runs),
              qmap._host_zero_split_loop(qmap._HostProbe(host), runs))
