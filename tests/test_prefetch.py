"""Read-ahead of metadata-heavy files before numpy is imported (`HostFile.prefetch`,
`cli.core_cmds.prefetch_metadata`): on the right files only, their data extents and never their
holes, never leaking a descriptor.

The page cache itself cannot be observed portably from Python (no mincore); what the prefetch
thread reads is counted by the kernel (/proc/self/io `rchar`). The benefit is measured in
bench/run.py.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import SAMPLES, needs_qemu

from qinspect.cli import core_cmds
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.meta import open_meta


def _wait_for_prefetch() -> None:
    for t in threading.enumerate():
        if t.name == "qinspect-prefetch":
            t.join(timeout=30)
            assert not t.is_alive()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("layout", ["dense", "sparse", "empty"])
def test_prefetch_closes_its_descriptor(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        if layout == "dense":
            f.write(os.urandom(1 << 20))
        elif layout == "sparse":
            for k in range(200):  # more data extents than PREFETCH_EXTENTS
                f.seek(k * (1 << 20))
                f.write(b"x" * 4096)
    before = _open_fds()
    with HostFile(str(path)) as host:
        started = host.prefetch(host.allocated_size or 1)
    _wait_for_prefetch()
    assert started
    assert _open_fds() == before


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_prefetch_reads_the_data_extents_not_the_holes(tmp_path: Path) -> None:
    # 8 data extents of 256 KiB, 64 MiB apart: 2 MiB of data in a 448 MiB file.
    path = tmp_path / "f"
    with open(path, "wb") as f:
        for k in range(8):
            f.seek(k * (64 << 20))
            f.write(b"d" * (256 << 10))
    with HostFile(str(path)) as host:
        if host.allocated_size > (4 << 20):
            pytest.skip("this file system does not keep holes")
        before = _rchar()
        assert host.prefetch(host.allocated_size)
        _wait_for_prefetch()
        got = _rchar() - before
    assert 8 * (256 << 10) <= got < 8 * (256 << 10) + (1 << 20), got


def test_prefetch_of_a_device_is_refused() -> None:
    with HostFile("/dev/null") as host:
        assert not host.prefetch(1 << 20)


@needs_qemu
def test_prefetch_only_metadata_heavy_files(tmp_path: Path) -> None:
    # Scattered small writes with 4 KiB clusters: the file is mostly L2 tables.
    sparse = tmp_path / "sparse.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(sparse), "1G"],
                   check=True)
    script = "".join(f"write -P 1 {k * 7 * (1 << 21)} 4k\n" for k in range(60))
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(sparse)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    # 64 MiB of data written in order with 64 KiB clusters: a few KiB of metadata, the rest data.
    full = tmp_path / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(full), "1G"], check=True)
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", "-c", "write -P 3 0 64M", str(full)], check=True,
                   stdout=subprocess.DEVNULL)
    # The same 64 MiB of data in a 1 TiB image: its L1 table could name 128 MiB of L2 tables, but
    # one table is in use, so the file is still mostly data.
    wide = tmp_path / "wide.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(wide), "1T"], check=True)
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", "-c", "write -P 3 0 64M", str(wide)], check=True,
                   stdout=subprocess.DEVNULL)
    with open_meta(str(sparse)) as meta:
        assert core_cmds.prefetch_metadata(meta)
    for data_heavy in (full, wide):
        with open_meta(str(data_heavy)) as meta:
            assert not core_cmds.prefetch_metadata(meta), data_heavy.name
    _wait_for_prefetch()


def test_prefetch_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_cmds, "PREFETCH", False)
    with open_meta(str(SAMPLES / "basic64k.qcow2")) as meta:
        assert not core_cmds.prefetch_metadata(meta)
