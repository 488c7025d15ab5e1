"""check's stderr in QEMU's exact order where references overflow the refcount width (issue 9).

qcow2_inc_refcounts_imrt prints "ERROR: overflow cluster offset=0x..." for every reference made
to a cluster whose running count is already refcount_max, in the order check_refcounts_l1/_l2
meet the references (tree by tree, L1 entry by L1 entry, L2 entry by L2 entry). qinspect counts
order-free in one walk and replays the order afterwards; these images, made by qemu-img/qemu-io
and byte patches of their tables, are where a wrong replay shows: a cluster named twice with 1-bit
refcounts, one L2 table behind many L1 entries (in one run and alternating with another table),
snapshots sharing tables at the refcount maximum, 8-bit refcounts with more than 255 references.
stderr is compared UNSORTED with live qemu-img's, in both output modes, with exit codes and the
JSON counts.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_qemu

QINSPECT = shutil.which("qinspect") or str(Path(sys.executable).with_name("qinspect"))


def _qemu(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


def _create(path: Path, size: str, opts: str, *writes: str) -> None:
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), size)
    for w in writes:
        _qemu("qemu-io", "-f", "qcow2", "-c", w, str(path))


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _put_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _l1_offset(path: Path) -> int:
    return _u64(path, 40)


def _snapshot_l1_offsets(path: Path) -> list[int]:
    """Offsets (in the file) of each snapshot table entry's l1_table_offset field."""
    with open(path, "rb") as f:
        h = f.read(72)
        nb, off = struct.unpack(">IQ", h[60:72])
        out = []
        for _ in range(nb):
            f.seek(off)
            e = f.read(40)
            _l1, _size, id_len, name_len, _d, _t, _vm, _vs, extra = struct.unpack(">QIHHIIQII", e)
            out.append(off)
            off += 40 + extra + id_len + name_len
            off = (off + 7) & ~7
        return out


def rc1_named_twice(tmp: Path) -> Path:
    """1-bit refcounts; L2 entries 5, 9 and 12 name the data clusters of entries 1, 2 and 1 (their
    own clusters leak; entry 1's overflows twice), entry 7 has a reserved bit set (its message
    comes between the overflows), and the second table's entry 0 names entry 3's cluster too."""
    p = tmp / "rc1.qcow2"
    _create(p, "2G", "refcount_bits=1", "write -P 1 0 1M", "write -P 2 1G 128k")
    l1 = _l1_offset(p)
    l2a = _u64(p, l1) & ((1 << 56) - 512)
    l2b = _u64(p, l1 + 8 * 2) & ((1 << 56) - 512)
    _put_u64(p, l2a + 5 * 8, _u64(p, l2a + 1 * 8))
    _put_u64(p, l2a + 9 * 8, _u64(p, l2a + 2 * 8))
    _put_u64(p, l2a + 12 * 8, _u64(p, l2a + 1 * 8))
    _put_u64(p, l2a + 7 * 8, _u64(p, l2a + 7 * 8) | 0x100)
    _put_u64(p, l2b, _u64(p, l2a + 3 * 8))
    return p


def _shared(tmp: Path, name: str, opts: str, n: int, pattern: Callable[[int, int, int], int]) -> Path:
    """L1 entries 0..n-1 set to pattern(k, entry 0, entry 1) (entry 1 maps guest 512 MiB: 64 KiB clusters)."""
    p = tmp / f"{name}.qcow2"
    _create(p, f"{n * 512}M", f"cluster_size=65536,{opts}", "write -P 0x5a 0 192k", "write -P 0x5b 512M 64k")
    l1 = _l1_offset(p)
    e0, e1 = _u64(p, l1), _u64(p, l1 + 8)
    with open(p, "r+b") as f:
        f.seek(l1)
        f.write(b"".join(struct.pack(">Q", pattern(k, e0, e1)) for k in range(n)))
    return p


def shared_l2_rc16(tmp: Path) -> Path:
    """One L2 table behind 70,000 L1 entries (16-bit refcounts: past 65,535 every entry overflows)."""
    return _shared(tmp, "shared16", "refcount_bits=16", 70000, lambda k, e0, e1: e0)


def shared_l2_rc8_alternating(tmp: Path) -> Path:
    """8-bit refcounts; 700 L1 entries: runs of one table, then two tables alternating."""
    return _shared(tmp, "alt8", "refcount_bits=8", 700,
                   lambda k, e0, e1: e0 if k < 200 else (e0 if k % 2 else e1))


def snapshots_at_max(tmp: Path) -> Path:
    """2-bit refcounts (max 3): the active tree and two snapshots share every table (refcount 3);
    the active L1 names its first table twice and snapshot 2's entry names snapshot 1's L1 table,
    so that the overflows come in the snapshots' trees, through a shared L1 table."""
    p = tmp / "snap.qcow2"
    _create(p, "2G", "refcount_bits=2", "write -P 3 0 256k", "write -P 4 1G 64k")
    _qemu("qemu-img", "snapshot", "-c", "s1", str(p))
    _qemu("qemu-img", "snapshot", "-c", "s2", str(p))
    l1 = _l1_offset(p)
    _put_u64(p, l1 + 8, _u64(p, l1))
    s1, s2 = _snapshot_l1_offsets(p)
    _put_u64(p, s2, _u64(p, s1))
    return p


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "rc1_named_twice": rc1_named_twice,
    "shared_l2_rc16": shared_l2_rc16,
    "shared_l2_rc8_alternating": shared_l2_rc8_alternating,
    "snapshots_at_max": snapshots_at_max,
}


def _as_qinspect(text: str) -> list[str]:
    return [("qinspect: " + ln[len("qemu-img: "):]) if ln.startswith("qemu-img: ") else ln for ln in text.splitlines()]


@needs_qemu
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_check_stderr_in_qemu_order(tmp_path: Path, name: str) -> None:
    path = BUILDERS[name](tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "QINSPECT_DEBUG"}
    for output in ("human", "json"):
        args = ["check", f"--output={output}", path.name]
        q = subprocess.run(["qemu-img", *args], cwd=tmp_path, capture_output=True, text=True, check=False)
        i = subprocess.run([QINSPECT, *args], cwd=tmp_path, capture_output=True, text=True, check=False, env=env)
        assert i.returncode == q.returncode == 2, (output, i.stderr[-2000:], q.stderr[-2000:])
        want = _as_qinspect(q.stderr)
        got = i.stderr.splitlines()
        assert any(ln.startswith("ERROR: overflow cluster") for ln in want)  # the case is what it claims
        if got != want:
            k = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            pytest.fail(f"{output}: {len(got)} lines, qemu-img {len(want)}; first difference at line {k}: "
                        f"{got[k:k + 3]} != {want[k:k + 3]}")
        if output == "json":
            mine = json.loads(i.stdout)
            assert mine.pop("in-use") is None
            assert mine == json.loads(q.stdout)
        else:  # (qinspect adds a pasteable "Fix:" command after qemu-img's lines)
            assert [ln for ln in i.stdout.splitlines() if not ln.startswith("Fix: ")] == q.stdout.splitlines()
