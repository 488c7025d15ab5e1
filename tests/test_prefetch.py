"""Read-ahead of metadata-heavy files before numpy is imported (`HostFile.prefetch`,
`cli.core_cmds.prefetch_metadata`): advice only, on the right files, never leaking a descriptor.

The page cache itself cannot be observed portably from Python (no mincore), so these tests check
what the advice is given for and that it is harmless; the benefit is measured in bench/run.py.
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
    with open_meta(str(sparse)) as meta:
        assert core_cmds.prefetch_metadata(meta)
    with open_meta(str(full)) as meta:
        assert not core_cmds.prefetch_metadata(meta)
    _wait_for_prefetch()


def test_prefetch_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_cmds, "PREFETCH", False)
    with open_meta(str(SAMPLES / "basic64k.qcow2")) as meta:
        assert not core_cmds.prefetch_metadata(meta)
