"""The one host-extent prober: FIEMAP classes (data, unwritten, hole), SEEK_DATA/SEEK_HOLE
fallback (said so), and SEEK answers identical to lseek for map."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import needs_qemu

from qinspect.analysis.space import compute_space
from qinspect.cli import main
from qinspect.qcow2.hostfile import ExtentKind, ExtentMethod, HostFile
from qinspect.qcow2.image import open_image


def _falloc_file(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
        f.seek(1 << 20)
        f.write(b"y" * 4096)
        os.posix_fallocate(f.fileno(), 2 << 20, 1 << 20)
        f.truncate(4 << 20)
        os.fsync(f.fileno())


def test_fiemap_classes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    _falloc_file(p)
    with HostFile(str(p)) as h:
        ext = h.host_extents()
    if ext.method != ExtentMethod.FIEMAP:
        pytest.skip("no FIEMAP on this file system")
    assert int(ext.start[0]) == 0 and int(ext.end[-1]) == 4 << 20
    assert (ext.start[1:] == ext.end[:-1]).all()
    assert ext.bytes_of(ExtentKind.DATA) == 8192 + 4096
    assert ext.bytes_of(ExtentKind.UNWRITTEN) == 1 << 20
    assert ext.bytes_of(ExtentKind.HOLE) == (4 << 20) - (1 << 20) - 8192 - 4096


def test_seek_fallback_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "f"
    _falloc_file(p)

    def no_fiemap(self: HostFile) -> None:
        raise OSError(errno.EOPNOTSUPP, "no FIEMAP")

    monkeypatch.setattr(HostFile, "_fiemap", no_fiemap)
    with HostFile(str(p)) as h:
        ext = h.host_extents()
        assert ext.method == ExtentMethod.SEEK
        assert ext.bytes_of(ExtentKind.UNWRITTEN) == 0
        # The fallback walk answers exactly what lseek answers, extent by extent.
        for a, b, k in zip(ext.start.tolist(), ext.end.tolist(), ext.kind.tolist(), strict=True):
            assert h.data_extent(a) == (k == ExtentKind.DATA, b)


@needs_qemu
def test_seek_fallback_in_space_and_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    p = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", str(p), "8M"], check=True)

    def no_fiemap(self: HostFile) -> None:
        raise OSError(errno.EOPNOTSUPP, "no FIEMAP")

    with open_image(p) as img:
        assert compute_space(img).extents["method"] == "fiemap"
    monkeypatch.setattr(HostFile, "_fiemap", no_fiemap)
    with open_image(p) as img:
        sp = compute_space(img)
        assert sp.extents["method"] == "seek-hole"
        assert sum(sp.allocated_parts.values()) == sp.allocated_size
    assert main(["diagnose", str(p)]) == 0
    assert "this file system has no FIEMAP" in capsys.readouterr().out
