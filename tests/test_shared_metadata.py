"""One parse of an image's metadata for several open images of one file (`SharedMetadata`,
`Image.reopen`, `open_image(..., metadata=)`): the parse is reused only while the file is the one
it was parsed from, unchanged; a replaced or modified file (or backing file) is parsed afresh.
Images made by qemu-img / qemu-io."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import needs_qemu

from qinspect.qcow2 import SharedMetadata, open_image

pytestmark = needs_qemu


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _image(path: Path, snapshots: list[str], pattern: int = 0xAB, backing: Path | None = None) -> Path:
    opts = ["-b", str(backing), "-F", "qcow2"] if backing is not None else []
    _run("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "4M")
    _run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 64k 64k", str(path))
    for name in snapshots:
        _run("qemu-img", "snapshot", "-c", name, str(path))
    return path


def _names(img: object) -> list[str]:
    return [s.name for s in img.snapshots]  # type: ignore[attr-defined]


def test_reopen_shares_the_parse_with_a_descriptor_of_its_own(tmp_path: Path) -> None:
    p = _image(tmp_path / "a.qcow2", ["one", "two"])
    with open_image(p) as img, img.reopen() as again:
        assert not img.reuses_metadata and again.reuses_metadata
        assert again.snapshot_table is img.snapshot_table and again.header is img.header
        assert again.l1_table is img.l1_table and again.refcount_table is img.refcount_table
        assert not again.l1_table.flags.writeable  # shared arrays are read-only
        assert again.file.fd != img.file.fd
        assert again.problems == img.problems
        assert _names(again) == ["one", "two"]
        assert again.read(64 * 1024, 4096) == img.read(64 * 1024, 4096) == b"\xab" * 4096
        m = img.shared_metadata()
        assert isinstance(m, SharedMetadata) and m is again.shared_metadata() is img.shared_metadata()
        with open_image(p, metadata=m) as third:
            assert third.reuses_metadata and third.snapshot_table is img.snapshot_table


def test_a_replaced_file_is_parsed_afresh(tmp_path: Path) -> None:
    p = _image(tmp_path / "a.qcow2", ["one"])
    other = _image(tmp_path / "b.qcow2", ["x", "y", "z"], pattern=0xCD)
    with open_image(p) as img:
        m = img.shared_metadata()
        os.replace(other, p)  # the path now names another file
        with open_image(p, metadata=m) as fresh, img.reopen() as again:
            for new in (fresh, again):
                assert not new.reuses_metadata
                assert _names(new) == ["x", "y", "z"]
                assert new.read(64 * 1024, 4096) == b"\xcd" * 4096
            assert _names(img) == ["one"]  # the first image still describes the file it opened


def test_a_file_modified_in_place_is_parsed_afresh(tmp_path: Path) -> None:
    p = _image(tmp_path / "a.qcow2", ["one"])
    with open_image(p) as img:
        m = img.shared_metadata()
        _run("qemu-img", "snapshot", "-c", "two", str(p))  # same inode, new snapshot table
        with open_image(p, metadata=m) as fresh:
            assert not fresh.reuses_metadata
            assert _names(fresh) == ["one", "two"]
            assert fresh.l1_table is not img.l1_table


def test_the_backing_file_is_shared_and_checked_too(tmp_path: Path) -> None:
    base = _image(tmp_path / "base.qcow2", ["b1"])
    top = _image(tmp_path / "top.qcow2", [], pattern=0x11, backing=base)
    with open_image(top) as img:
        below = img.backing()
        assert below is not None
        with img.reopen() as again:
            again_below = again.backing()
            assert isinstance(again_below, type(img)) and again_below.reuses_metadata
            assert again_below.snapshot_table is below.snapshot_table  # type: ignore[attr-defined]
        # the backing file replaced by a copy (another inode, same bytes): parsed afresh
        shutil.copyfile(base, tmp_path / "copy.qcow2")
        _run("qemu-img", "snapshot", "-c", "b2", str(tmp_path / "copy.qcow2"))
        os.replace(tmp_path / "copy.qcow2", base)
        with img.reopen() as third:
            assert third.reuses_metadata  # the top file is unchanged
            third_below = third.backing()
            assert isinstance(third_below, type(img)) and not third_below.reuses_metadata
            assert _names(third_below) == ["b1", "b2"]
