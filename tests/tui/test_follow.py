"""Following a live image: only what changed is re-read, new allocations are found, a replaced
file is reported instead of mixed in (tui/follow.py, no Textual)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qinspect.tui.follow import refresh_changed
from qinspect.tui.palette import G
from qinspect.tui.session import Session

from .conftest import make_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


def write(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def test_new_writes_are_found_and_nothing_is_read_when_nothing_changed(tmp_path: Path) -> None:
    img = make_image(tmp_path / "live.qcow2", "64M", "", ("write -P 1 0 64k",))
    s = Session(str(img))
    try:
        s.scan_guest(lambda d, t: None, lambda: False)
        assert int(s.guest.totals()[G.DATA]) == 1
        assert refresh_changed(s) is None  # same size and mtime: nothing read
        write(img, "write -P 2 1M 128k", "write -P 3 40M 64k")
        changes = refresh_changed(s)
        assert changes is not None and not changes.replaced
        assert changes.new_clusters == 3
        assert int(s.guest.totals()[G.DATA]) == 4
        assert s.layout is None and s.pending_steps()  # whole-file analyses are recomputed
        assert (1 << 20) // 65536 in s.fresh_clusters
        assert refresh_changed(s) is None
    finally:
        s.close()


def test_a_new_l2_table_past_the_old_ones_grows_the_map(tmp_path: Path) -> None:
    img = make_image(tmp_path / "grow.qcow2", "8G", "", ("write -P 1 0 64k",))
    s = Session(str(img))
    try:
        s.scan_guest(lambda d, t: None, lambda: False)
        write(img, "write -P 2 6G 64k")
        changes = refresh_changed(s)
        assert changes is not None and changes.new_clusters >= 1
        assert s.guest.state_of((6 << 30) // 65536) == G.DATA
    finally:
        s.close()


def test_a_replaced_file_is_reported(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "64M", "", ("write -P 1 0 64k",))
    other = make_image(tmp_path / "b.qcow2", "64M", "", ("write -P 1 0 1M",))
    s = Session(str(img))
    try:
        os.replace(other, img)
        changes = refresh_changed(s)
        assert changes is not None and changes.replaced
        assert "replaced" in (s.changed() or "")
    finally:
        s.close()
