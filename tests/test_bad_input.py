"""Bad input on the command line (issue #6): one clear line on stderr, exit code 1, no traceback.

Every case runs the real `qinspect` command in a subprocess and expects exactly one line on stderr,
`qinspect: FILE: what is wrong` (with `(offset N)` where a file offset is at fault), naming what is
wrong in words a user understands.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Samples

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


QINSPECT = shutil.which("qinspect") or str(Path(sys.executable).with_name("qinspect"))


def qinspect(*args: str | Path, cwd: Path | None = None,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run the installed `qinspect` command (never with QINSPECT_DEBUG, which shows tracebacks)."""
    env = {k: v for k, v in os.environ.items() if k != "QINSPECT_DEBUG"}
    return subprocess.run([*prefix, QINSPECT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def assert_one_line(r: subprocess.CompletedProcess[str], path: str | Path, *fragments: str) -> str:
    """Exit 1, nothing but one `qinspect: PATH: ...` line on stderr, containing every fragment."""
    lines = r.stderr.splitlines()
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr)
    assert "Traceback" not in r.stderr
    assert "internal error" not in r.stderr
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith(f"qinspect: {path}: "), line
    for frag in fragments:
        assert frag in line, (frag, line)
    return line


def qemu_img(*args: str | Path, cwd: Path) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *map(str, args)], cwd=cwd, check=True, capture_output=True)


# -- not an image at all -----------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    for cmd in ("info", "map", "check"):
        assert_one_line(qinspect(cmd, tmp_path / "nope.qcow2"), tmp_path / "nope.qcow2", "no such file")


def test_missing_file_tui(tmp_path: Path) -> None:
    assert_one_line(qinspect(tmp_path / "nope.qcow2"), tmp_path / "nope.qcow2", "no such file")


def test_directory(tmp_path: Path) -> None:
    assert_one_line(qinspect("info", tmp_path), tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.qcow2"
    f.write_bytes(b"")
    assert_one_line(qinspect("info", f), f, "empty file")


def test_tiny_file(tmp_path: Path) -> None:
    f = tmp_path / "tiny.qcow2"
    f.write_bytes(b"QFI")
    assert_one_line(qinspect("info", f), f, "too small", "(3 bytes)")


def test_truncated_header(tmp_path: Path, samples: Samples) -> None:
    f = tmp_path / "trunc.qcow2"
    f.write_bytes(samples.path("basic64k").read_bytes()[:50])
    assert_one_line(qinspect("check", f), f, "truncated header", "50 bytes")


def test_raw_image(tmp_path: Path) -> None:
    f = tmp_path / "disk.raw"
    f.write_bytes(bytes(1 << 20))
    assert_one_line(qinspect("info", f), f, "not a qcow2 image", "raw", "(offset 0)")


def test_fifo(tmp_path: Path) -> None:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    assert_one_line(qinspect("info", f), f, "is a FIFO")


def test_character_device() -> None:
    # Read as QEMU's host_device driver does: its size is lseek(SEEK_END), 0, so no qcow2 header
    # (qemu-img: "Image is not in qcow2 format"), and nothing is read from the device.
    assert_one_line(qinspect("info", "/dev/null"), "/dev/null", "not a qcow2 image")


def _run_both(cmd: str, image: Path, stdin: int | None) -> tuple[int, int]:
    """(qinspect's exit code, qemu-img's) for `cmd --output=json image`, with the given stdin."""
    assert QEMU_IMG is not None
    theirs = subprocess.run([QEMU_IMG, cmd, "-U", "-f", "qcow2", "--output=json", str(image)], stdin=stdin,
                            capture_output=True, timeout=60, check=False).returncode
    env = {k: v for k, v in os.environ.items() if k != "QINSPECT_DEBUG"}
    ours = subprocess.run([QINSPECT, cmd, "--output=json", str(image)], stdin=stdin, capture_output=True,
                          timeout=60, env=env, check=False).returncode
    return ours, theirs


@needs_qemu
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom", "/dev/stdin"])
def test_character_device_backing_file_is_an_empty_raw_layer(tmp_path: Path, device: str) -> None:
    """QEMU opens a character device named as a backing file with its host_device driver: a raw
    layer of lseek(SEEK_END) bytes (0). Same exit codes as qemu-img (stdin: /dev/null)."""
    img = tmp_path / "over.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", device, "-F", "raw", str(img), "1M"],
                   check=True)
    for cmd in ("info", "map", "check"):
        with open(os.devnull, "rb") as null:
            ours, theirs = _run_both(cmd, img, null.fileno())
        assert ours == theirs == 0, (device, cmd, ours, theirs)


@needs_qemu
def test_pipe_backing_file_is_refused_like_qemu(tmp_path: Path) -> None:
    """/dev/stdin on a pipe: QEMU's file driver requires a regular file (exit 1; info opens no backing)."""
    img = tmp_path / "over.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "/dev/stdin", "-F", "raw", str(img), "1M"],
                   check=True)
    for cmd, want in (("info", 0), ("map", 1), ("check", 1)):
        r, w = os.pipe()
        try:  # the write end stays open: reading the pipe would block, so nothing may read it
            ours, theirs = _run_both(cmd, img, r)
        finally:
            os.close(r)
            os.close(w)
        assert ours == theirs == want, (cmd, ours, theirs)


def test_permission_denied(tmp_path: Path, samples: Samples) -> None:
    f = tmp_path / "secret.qcow2"
    shutil.copyfile(samples.path("basic64k"), f)
    f.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads anything; drop the capabilities that let it (for this command only)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    r = qinspect("info", f, prefix=prefix)
    assert_one_line(r, f, "permission denied")


@needs_qemu
@pytest.mark.parametrize(("fmt", "opts", "what"), [
    ("qcow", (), "qcow (version 1)"),
    ("vmdk", (), "VMDK"),
    ("vmdk", ("-o", "subformat=monolithicFlat"), "VMDK descriptor"),
    ("vdi", (), "VDI"),
    ("vpc", (), "VHD"),
    ("vpc", ("-o", "subformat=fixed"), "VHD"),
    ("vhdx", (), "VHDX"),
    ("qed", (), "QED"),
])
def test_other_formats(tmp_path: Path, fmt: str, opts: tuple[str, ...], what: str) -> None:
    f = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, f, "1M", cwd=tmp_path)
    for cmd in ("info", "map", "check"):
        assert_one_line(qinspect(cmd, f), f, what)


# -- a qcow2 image whose surroundings are broken -----------------------------------------------------
@needs_qemu
def test_missing_backing_file(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M", cwd=tmp_path)
    for cmd in ("map", "check"):  # like qemu-img: map and check need the backing chain
        assert_one_line(qinspect(cmd, top), top, "cannot open backing file", "gone.qcow2", "no such file")
    assert_one_line(qinspect("info", "--backing-chain", top), top, "cannot open backing file")
    # info of the image alone works (as qemu-img info does) and warns on stderr
    r = qinspect("info", top)
    assert r.returncode == 0, r.stderr
    assert "gone.qcow2 does not exist" in r.stderr and "Traceback" not in r.stderr


@needs_qemu
def test_missing_data_file(tmp_path: Path) -> None:
    img = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", img, "1M", cwd=tmp_path)
    (tmp_path / "ext.raw").unlink()
    for cmd in ("map", "check"):
        assert_one_line(qinspect(cmd, img, cwd=tmp_path), img, "cannot open external data file", "ext.raw",
                        "no such file")
    r = qinspect("info", img, cwd=tmp_path)
    assert r.returncode == 0 and "cannot open external data file" in r.stderr


@needs_qemu
def test_data_file_is_a_directory(tmp_path: Path) -> None:
    img = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", img, "1M", cwd=tmp_path)
    (tmp_path / "ext.raw").unlink()
    (tmp_path / "ext.raw").mkdir()
    assert_one_line(qinspect("map", img, cwd=tmp_path), img, "cannot open external data file", "is a directory")


def _set_backing(path: Path, name: bytes) -> None:
    """Point the image's backing file name at `name` (written at byte 1024 of cluster 0)."""
    with open(path, "r+b") as f:
        f.seek(1024)
        f.write(name)
        f.seek(8)
        f.write(struct.pack(">QI", 1024, len(name)))


def test_backing_chain_loop(tmp_path: Path, samples: Samples) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copyfile(samples.path("basic64k"), a)
    shutil.copyfile(samples.path("basic64k"), b)
    _set_backing(a, b"b.qcow2")
    _set_backing(b, b"a.qcow2")
    assert_one_line(qinspect("map", a), a, "backing chain loops")
    _set_backing(a, b"a.qcow2")
    assert_one_line(qinspect("check", a), a, "backing chain loops")


def test_backing_chain_1000_deep(tmp_path: Path, samples: Samples) -> None:
    data = samples.path("basic64k").read_bytes()
    for i in range(1000):
        p = tmp_path / f"l{i:04d}.qcow2"
        p.write_bytes(data)
        if i:
            _set_backing(p, f"l{i - 1:04d}.qcow2".encode())
    top = tmp_path / "l0999.qcow2"
    assert_one_line(qinspect("map", top), top, "backing chain deeper than")


def test_backing_file_is_a_fifo(tmp_path: Path, samples: Samples) -> None:
    a = tmp_path / "a.qcow2"
    shutil.copyfile(samples.path("basic64k"), a)
    os.mkfifo(tmp_path / "pipe")
    _set_backing(a, b"pipe")  # must not block waiting for a writer
    assert_one_line(qinspect("map", a), a, "cannot open backing file", "FIFO")


# -- hostile headers: what QEMU refuses, qinspect's qemu-img commands refuse too -------------------------
def _patched(tmp_path: Path, samples: Samples, offset: int, fmt: str, value: int) -> Path:
    f = tmp_path / "hostile.qcow2"
    shutil.copyfile(samples.path("basic64k"), f)
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))
    return f


@pytest.mark.parametrize(("offset", "fmt", "value", "fragments"), [
    (36, ">I", 0xFFFFFFFF, ("L1 table", "too large", "4294967295 entries", "(offset 36)")),
    (56, ">I", 0x10000000, ("refcount table", "too large", "(offset 56)")),
    (60, ">I", 0x10000, ("snapshot", "(offset")),
    (60, ">I", 0xFFFFFFFF, ("Snapshot table too large", "(offset 60)")),
    (20, ">I", 40, ("cluster size", "(offset 20)")),
    (4, ">I", 7, ("version 7", "(offset 4)")),
    (96, ">I", 0x80000000, ("refcount_order", "(offset 96)")),
    (100, ">I", 0xFFFFFFF0, ("header", "(offset 100)")),
])
def test_hostile_header_fields(tmp_path: Path, samples: Samples, offset: int, fmt: str, value: int,
                               fragments: tuple[str, ...]) -> None:
    f = _patched(tmp_path, samples, offset, fmt, value)
    for cmd in ("info", "map", "check"):
        if cmd == "check" and offset == 60:
            # check opens with BDRV_O_CHECK (no snapshot table at open), then its own snapshot-table
            # check fails: qemu-img's lines, and no counts
            r = qinspect(cmd, f)
            assert r.returncode == 1 and not r.stdout
            assert r.stderr.splitlines()[0].startswith("qinspect: ERROR ")
            assert r.stderr.splitlines()[-1] == "qinspect: Check failed: File too large"
            continue
        assert_one_line(qinspect(cmd, f), f, *fragments)


@needs_qemu
@pytest.mark.parametrize("in_use", [False, True])
def test_bad_bitmap_table_entry_refused_only_when_not_in_use(tmp_path: Path, in_use: bool) -> None:
    """load_bitmap skips an in-use bitmap's table at open ("Data is unusable"): a bad table entry
    refuses the open only for a bitmap not in use. Same exit codes as qemu-img, both ways."""
    from qinspect.qcow2.meta import open_meta

    img = tmp_path / "bm.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    subprocess.run([QEMU_IMG, "bitmap", "--add", str(img), "b0"], check=True)
    with open_meta(img) as m:
        [bm] = m.bitmaps
        entry, table = bm.entry_offset, bm.bitmap_table_offset
    with open(img, "r+b") as f:
        f.seek(table)
        f.write(struct.pack(">Q", 0x10201))  # offset 0x10200: not cluster-aligned (check_table_entry)
        if in_use:
            f.seek(entry + 12)
            flags = struct.unpack(">I", f.read(4))[0]
            f.seek(entry + 12)
            f.write(struct.pack(">I", flags | 1))  # BME_FLAG_IN_USE
    for cmd in ("info", "map"):
        with open(os.devnull, "rb") as null:
            ours, theirs = _run_both(cmd, img, null.fileno())
        assert ours == theirs == (0 if in_use else 1), (cmd, ours, theirs)


@needs_qemu
@pytest.mark.parametrize("base", ["fid_norefcount_table.qcow2", "fid_snap_misaligned_empty.qcow2"])
def test_check_opens_backing_files_with_check_rules(tmp_path: Path, samples: Samples, base: str) -> None:
    """Backing files inherit BDRV_O_CHECK: qemu-img check opens an overlay whose backing file has
    no refcount table or a bad snapshot table pointer (map refuses it). Same exit codes."""
    shutil.copyfile(samples.dir / base, tmp_path / base)
    img = tmp_path / "top.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2", str(img), "1M"],
                   check=True)
    for cmd, want in (("map", 1), ("check", 0)):
        ours, theirs = _run_both(cmd, img, subprocess.DEVNULL)
        assert ours == theirs == want, (cmd, ours, theirs)


@needs_qemu
def test_backing_format_of_nul_bytes_is_probed_and_raw_self_backing_is_no_loop(tmp_path: Path) -> None:
    """A backing format extension of NUL bytes is an empty C string to QEMU: the format is probed.
    And an image that names itself as a raw backing file is no loop: its bytes are a raw layer."""
    base = tmp_path / "base.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "1M"],
                   check=True)
    data = bytearray(top.read_bytes())
    at = data.index(b"qcow2", 72, 4096)  # the backing format extension's data
    data[at : at + 5] = bytes(5)
    assert b"base.qcow2" in data  # (the backing file name is untouched)
    top.write_bytes(bytes(data))
    raw_self = tmp_path / "self.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "raw", str(raw_self),
                    "1M"], check=True)
    for img in (top, raw_self):
        for cmd in ("info", "map", "check"):
            ours, theirs = _run_both(cmd, img, subprocess.DEVNULL)
            assert ours == theirs == 0, (img.name, cmd, ours, theirs)


@needs_qemu
def test_check_takes_the_file_length_in_whole_sectors(tmp_path: Path) -> None:
    """check's "exceeding the end of the file by one cluster or more" compares with bdrv_getlength,
    the file's size rounded up to 512 bytes: a table starting one cluster minus 8 bytes past the
    end is not counted as a corruption when the sector rounding brings it under one cluster."""
    from qinspect.qcow2.meta import open_meta

    img = tmp_path / "cut.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    with open_meta(img) as m:
        l1, cs = m.header.l1_table_offset, m.cluster_size
    for want_corrupt, size in ((False, l1 - cs + 8), (True, l1 - cs)):
        os.truncate(img, size)
        ours, theirs = _run_both("check", img, subprocess.DEVNULL)
        assert ours == theirs == (2 if want_corrupt else 0), (size, ours, theirs)
