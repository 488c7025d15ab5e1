"""check's memory follows what is distinct, not the number of messages (issue 10).

L2 tables full of garbage make one message or more per entry, and QEMU prints them again at every
L1 entry naming the table. check keeps them per table as numbers (`_Rows`, 22 bytes a message) and
each L1 entry's share as one object (`TableBlock`); the lines are rebuilt as they are written. The
images are built here with qemu-img / qemu-io and patched (the malformed part is hand-built on
purpose); the lines are compared with qemu-img's own, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qinspect.qcow2.image import open_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io")

MiB = 1 << 20
QCOW_OFLAG_COPIED = 1 << 63
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _check(path: Path, out: Path) -> tuple[int, int]:
    """(exit code, peak RSS in MiB) of `qinspect check path`, its stderr written to `out`."""
    argv = [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())", "check", path.name]
    with open(out, "wb") as err:
        p = subprocess.Popen(argv, cwd=path.parent, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(p.pid, 0)
    p.returncode = 0
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss >> 10


def _digest(path: Path, prog: str) -> tuple[int, str]:
    """(lines, md5) of a stderr file, "<prog>: " at the start of a line made "qemu-img: "."""
    h = hashlib.md5()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(prog.encode() + b": "):
                line = b"qemu-img" + line[len(prog) :]
            h.update(line)
            n += 1
    return n, h.hexdigest()


def _garbage_tables(tmp: Path, tables: int) -> tuple[Path, Path]:
    """1 MiB clusters, `tables` data clusters written with 0xc0 bytes, and L1 entries 1..tables
    naming them as L2 tables (then the last one again, at the next L1 entry): 128 Ki entries each
    that read as compressed clusters with the COPIED flag, far past the end of the file (two
    messages each). Returns (the image, a clean copy)."""
    path = tmp / "garbage_tables.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path),
                    f"{(tables + 2) * 128}G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xc0 0 {tables}M", str(path)], check=True,
                   capture_output=True)
    clean = tmp / "clean.qcow2"
    shutil.copyfile(path, clean)
    with open_image(path) as img:
        l1_off = img.header.l1_table_offset
        l2 = img.read_l2_table(int(img.l1_table[0]) & L1E_OFFSET_MASK)[0]
        data = [int(e) & L1E_OFFSET_MASK for e in l2[:tables]]
    assert all(data)
    entries = [d | QCOW_OFLAG_COPIED for d in [*data, data[-1]]]
    with open(path, "r+b") as f:
        f.seek(l1_off + 8)
        f.write(struct.pack(f">{len(entries)}Q", *entries))
    return path, clean


def test_garbage_l2_tables_cost_numbers_not_texts(tmp_path: Path) -> None:
    """Seed 23 case 38 in small: six garbage L2 tables, 1.8 M lines. check kept a (L2 index, step,
    text) tuple per message and an object per line printed: 331 MiB for an 11 MiB file, and the
    two L1 entries naming one table printed that table's messages kind by kind instead of entry by
    entry. Now the growth stays within the issue's budget and the lines are qemu-img's."""
    path, clean = _garbage_tables(tmp_path, 6)
    _rc, base = _check(clean, tmp_path / "clean.err")
    rc, peak = _check(path, tmp_path / "mine.err")
    budget = (2 * path.stat().st_size) // MiB + 150  # issue 10: 2 x metadata + 150 MiB
    assert peak - base < budget, f"check grew by {peak - base} MiB (budget {budget} MiB)"
    with open(tmp_path / "theirs.err", "wb") as err:
        theirs = subprocess.run(["qemu-img", "check", path.name], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=err, check=False)
    assert rc == theirs.returncode == 2
    lines, mine = _digest(tmp_path / "mine.err", "qinspect")
    assert lines > 1_800_000  # 2 lines per entry of 7 tables of 128 Ki entries
    assert (lines, mine) == _digest(tmp_path / "theirs.err", "qemu-img")


def test_table_messages_in_walk_order_at_consecutive_entries(tmp_path: Path) -> None:
    """Consecutive L1 entries naming one garbage table print its messages entry by entry, as QEMU's
    walk meets them (coffset, then the region past the end, for each entry), the same at each."""
    path, _clean = _garbage_tables(tmp_path, 1)
    rc, _peak = _check(path, tmp_path / "mine.err")
    theirs = subprocess.run(["qemu-img", "check", path.name], cwd=tmp_path, capture_output=True, text=True,
                            check=False)
    mine = (tmp_path / "mine.err").read_text().splitlines()
    assert rc == theirs.returncode
    assert mine[:4] == theirs.stderr.splitlines()[:4]
    assert mine[0].startswith("ERROR: coffset=") and mine[1].startswith("ERROR: counting reference")
    assert mine == theirs.stderr.splitlines()
