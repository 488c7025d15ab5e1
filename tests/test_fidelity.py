"""QEMU's rules at the edges (issue 9): what qemu-img 7.2 prints and refuses on damaged images.

The `fid_*` samples (sample_images/build.sh, section "issue 9") each show one rule; their
goldens were captured from qemu-img. Here: check's stderr lines, exactly, in both output formats
(qemu-img prints them from inside the check, whatever the format), exit codes, refusals at open
with QEMU's reason, and the rules that need images built at test time (65,536 snapshots past the
end of the file, the metadata-preallocation threshold on a sparse file).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu

from qinspect.analysis.check import check_image
from qinspect.analysis.info import image_info
from qinspect.analysis.map import metadata_preallocated
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, open_image

QINSPECT = shutil.which("qinspect") or str(Path(sys.executable).with_name("qinspect"))
FIDELITY = [n for n in SAMPLE_NAMES if n.startswith("fid_")]
REFUSED = "qemu-img: Could not open '"


@pytest.fixture
def in_samples(samples: Samples, monkeypatch: pytest.MonkeyPatch) -> Samples:
    monkeypatch.chdir(samples.dir)
    return samples


def _golden_lines(samples: Samples, name: str) -> list[str]:
    return samples.golden(name, "check.stderr").read_text().splitlines()


def _openable(img: Image) -> None:
    img.require_openable(check=True)
    img.data_file()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "QINSPECT_DEBUG"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False)


def _as_qinspect(lines: list[str]) -> list[str]:
    return [("qinspect: " + ln[len("qemu-img: "):]) if ln.startswith("qemu-img: ") else ln for ln in lines]


def test_every_rule_has_a_sample() -> None:
    assert len(FIDELITY) >= 13


# -- check's stderr: the library's lines against every sample's golden --------------------------------
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_check_stderr_matches_golden(in_samples: Samples, name: str) -> None:
    lines = _golden_lines(in_samples, name)
    rel = in_samples.path(name).name
    with open_image(rel) as img:
        if img.encrypted:
            pytest.skip("qemu-img needs the key to check this image")
        if lines and lines[0].startswith(REFUSED):
            with pytest.raises(Qcow2Error) as e:
                _openable(img)
            assert lines[0].split("': ", 1)[1] in str(e.value)  # QEMU's reason, in its words
            return
        _openable(img)
        res = check_image(img, filename=rel)
    assert res.stderr_lines("qemu-img") == lines
    assert res.exit_code == int(in_samples.golden(name, "check.exit").read_text())


# -- the CLI, both output formats ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["human", "json"])
@pytest.mark.parametrize("name", FIDELITY)
def test_cli_check_matches_golden(in_samples: Samples, name: str, mode: str) -> None:
    lines = _golden_lines(in_samples, name)
    rel = in_samples.path(name).name
    r = _run([QINSPECT, "check", f"--output={mode}", rel], in_samples.dir)
    assert r.returncode == int(in_samples.golden(name, "check.exit").read_text())
    if lines and lines[0].startswith(REFUSED):
        [line] = r.stderr.splitlines()
        assert line.startswith(f"qinspect: {rel}: ") and lines[0].split("': ", 1)[1] in line
        return
    assert r.stderr.splitlines() == _as_qinspect(lines)
    exp = in_samples.golden(name, "check.json").read_text()
    if mode == "json":
        got = json.loads(r.stdout) if r.stdout else None
        if got is not None:
            assert got.pop("in-use") is None  # qinspect's one extra key (issue 10)
        assert got == (json.loads(exp) if exp.strip() else None)
    elif not exp.strip():
        assert not r.stdout  # the check itself failed: no counts


@needs_qemu
@pytest.mark.parametrize("mode", ["human", "json"])
@pytest.mark.parametrize("name", FIDELITY)
def test_cli_agrees_with_live_qemu_img(in_samples: Samples, name: str, mode: str) -> None:
    rel = in_samples.path(name).name
    q = _run(["qemu-img", "check", f"--output={mode}", rel], in_samples.dir)
    r = _run([QINSPECT, "check", f"--output={mode}", rel], in_samples.dir)
    assert r.returncode == q.returncode
    if q.stderr.startswith(REFUSED):
        assert len(r.stderr.splitlines()) == 1
    else:
        assert r.stderr.splitlines() == _as_qinspect(q.stderr.splitlines())
        if mode == "json" and q.stdout:
            assert {k: v for k, v in json.loads(r.stdout).items() if k != "in-use"} == json.loads(q.stdout)
        if mode == "human":  # the counts' lines (qinspect adds advice lines of its own)
            for want in q.stdout.splitlines():
                if want.startswith(("Image end offset", "No errors")) or "errors were found" in want:
                    assert want in r.stdout.splitlines()
    for cmd in ("info", "map"):
        q = _run(["qemu-img", cmd, "--output=json", rel], in_samples.dir)
        r = _run([QINSPECT, cmd, "--output=json", rel], in_samples.dir)
        assert r.returncode == q.returncode, (cmd, q.stderr, r.stderr)
        if q.returncode:
            assert len(r.stderr.splitlines()) == 1
            assert q.stderr.splitlines()[0].split("': ", 1)[1] in r.stderr


# -- single rules ---------------------------------------------------------------------------------------
def test_no_cap_on_messages(in_samples: Samples) -> None:
    with open_image(in_samples.path("fid_many_messages")) as img:
        res = check_image(img)
    assert len(res.stderr_lines()) == len(_golden_lines(in_samples, "fid_many_messages")) > 2689


def test_overflow_is_not_counted(in_samples: Samples) -> None:
    with open_image(in_samples.path("fid_overflow")) as img:
        res = check_image(img)
        host = img.lookup(0).host_offset
    assert res.stderr_lines()[:2] == [f"ERROR: overflow cluster offset={host:#x}",
                                      "Use qemu-img amend to increase the refcount entry width or qemu-img "
                                      "convert to create a clean copy if the image cannot be opened for writing"]
    assert host is not None and int(res.reference[host // 65536]) == 1  # stopped at refcount_max
    assert (res.corruptions, res.leaks) == (1, 1)


def test_empty_backing_name_is_no_backing(in_samples: Samples) -> None:
    with open_image(in_samples.path("fid_backing_empty")) as img:
        assert img.header.backing_file_offset == 0x800 and img.header.backing_file is None
        assert img.backing() is None and "backing-filename" not in image_info(img)
        assert img.read(1 << 20, 16) == b"\x97" * 16


def test_data_file_required_not_named(in_samples: Samples) -> None:
    rel = in_samples.path("fid_data_file_unnamed").name
    r = _run([QINSPECT, "info", rel], in_samples.dir)
    assert r.returncode == 0 and "'data-file' is required" in r.stderr  # info works, and says what is missing
    for cmd in ("map", "check"):
        r = _run([QINSPECT, cmd, rel], in_samples.dir)
        assert r.returncode == 1 and "'data-file' is required" in r.stderr


def _patched(samples: Samples, tmp_path: Path, name: str, *patches: tuple[int, str, int]) -> Path:
    out = tmp_path / f"{name}.qcow2"
    shutil.copyfile(samples.path(name), out)
    with open(out, "r+b") as f:
        for off, fmt, val in patches:
            f.seek(off)
            f.write(struct.pack(fmt, val))
    return out


def test_65536_snapshots_past_eof(samples: Samples, tmp_path: Path) -> None:
    """Reads past EOF are zeros: 65,536 empty snapshots to info, each incomplete to check."""
    p = _patched(samples, tmp_path, "basic64k", (60, ">I", 65536), (64, ">Q", 1 << 40))
    with open_image(p) as img:
        img.require_openable()
        assert len(img.snapshots) == 65536 and img.snapshot_table.size == 65536 * 40
        info = image_info(img, p.name)
        res = check_image(img, filename=p.name)
    lines = res.stderr_lines("qemu-img")
    assert lines[:2] == ["ERROR snapshot table entry 0 is incomplete", "ERROR snapshot table entry 1 is incomplete"]
    assert len(lines) == 65537 and res.corruptions == 65537 and res.exit_code == 2
    if shutil.which("qemu-img"):
        q = _run(["qemu-img", "info", "--output=json", p.name], tmp_path)
        exp = json.loads(q.stdout)
        assert [s["id"] for s in info["snapshots"]] == [s["id"] for s in exp["snapshots"]]  # type: ignore[index]
        q = _run(["qemu-img", "check", "--output=json", p.name], tmp_path)
        assert q.stderr.splitlines() == lines and json.loads(q.stdout) == res.to_json()


@needs_qemu
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_metadata_preallocation_threshold(tmp_path: Path, delta: int) -> None:
    """qcow2_detect_metadata_preallocation is `cluster_count >= threshold`, threshold =
    max(real * 10 / 9, real + 2) for the clusters the file really holds. A preallocated image is
    written densely, then data clusters are punched out until the threshold is `used + delta`."""
    from qinspect.analysis.map import map_json

    p = tmp_path / "pre.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(p), "3904k"],
                   check=True)
    with open_image(p) as img:
        cs = img.cluster_size
        nclusters = -(-img.file.size // cs)
        used = sum(1 for i in range(nclusters) if img.refcount(i))
        data = sorted({h for e in img.extents() for k in range(len(e)) if int(e.host[k]) >= 0
                       for h in range(int(e.host[k]), int(e.host[k]) + int(e.length[k]), cs)})
    with open(p, "r+b") as f:  # every byte really written
        whole = f.read()
        f.seek(0)
        f.write(whole)
    real = next((r for r in range(nclusters, 0, -1) if max(r * 10 // 9, r + 2) == used + delta), None)
    if real is None:
        pytest.skip(f"no real size gives threshold {used + delta}")
    for host in data[: nclusters - real]:
        if _run(["fallocate", "--punch-hole", "--offset", str(host), "--length", str(cs), p.name], tmp_path).returncode:
            pytest.skip("cannot punch holes in this file system")
    with open_image(p) as img:
        real = img.file.allocated_size // cs
        assert max(real * 10 // 9, real + 2) == used + delta  # the case this parameter is about
        assert metadata_preallocated(img) == (delta <= 0)
        got = map_json(img)
    for g in got:
        g.pop("compressed")
    assert got == json.loads(_run(["qemu-img", "map", "--output=json", p.name], tmp_path).stdout)


# -- issue 10: QEMU's refusals that bound the work ------------------------------------------------------
def _bitmap_directory(samples: Samples, tmp_path: Path, entries: int, first_granularity: int,
                      table_size: int | None = None) -> Path:
    """The bitmaps sample with its directory replaced by `entries` entries, all sharing one bitmap
    table of the largest size check_dir_entry allows (BME_MAX_PHYS_SIZE of bitmap data), past the
    end of the file, and the directory after it."""
    from qinspect.qcow2.bitmaps import BME_MAX_PHYS_SIZE

    p = tmp_path / "bitmapdir.qcow2"
    shutil.copyfile(samples.path("bitmaps"), p)
    with open_image(p) as img:
        ext = img.header.bitmaps_ext
        assert ext is not None
        ext_at = next(e.offset for e in img.header.extensions if e.magic == 0x23852875)
        cs, end = img.cluster_size, -(-img.file.size // img.cluster_size) * img.cluster_size
    table_at = end
    d = bytearray()
    for i in range(entries):
        name = str(i).encode()
        gran = first_granularity if i == 0 else 16
        d += struct.pack(">QIIBBHI", table_at, table_size or BME_MAX_PHYS_SIZE // cs, 0, 1, gran, len(name), 0) + name
        d += bytes(-len(d) % 8)
    dir_at = table_at + cs
    with open(p, "r+b") as f:
        f.seek(dir_at)
        f.write(d)
        f.seek(ext_at + 8)
        f.write(struct.pack(">IIQQ", entries, 0, len(d), dir_at))
    return p


def test_hostile_bitmap_directory_is_refused_at_once(samples: Samples, tmp_path: Path) -> None:
    """65,535 entries sharing one large table, the first breaking check_dir_entry's constraints
    (granularity below 512 bytes): refused at open, as qemu-img does, in well under a second."""
    import time

    p = _bitmap_directory(samples, tmp_path, 65535, 8)
    t0 = time.monotonic()
    r = _run([QINSPECT, "info", p.name], tmp_path)
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1 and "Bitmap '0' doesn't satisfy the constraints" in r.stderr
    if shutil.which("qemu-img"):
        q = _run(["qemu-img", "info", p.name], tmp_path)
        assert q.returncode == 1 and "Bitmap '0' doesn't satisfy the constraints" in q.stderr


def test_shared_bitmap_table_is_read_once(samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid entries sharing one table: bitmap_table_load's checks run once per distinct table."""
    from qinspect.qcow2 import bitmaps

    p = _bitmap_directory(samples, tmp_path, 2000, 16, table_size=1)  # (16 MiB at 64 KiB granules: 1 cluster)
    calls = []
    real = bitmaps.read_bitmap_table
    monkeypatch.setattr(bitmaps, "read_bitmap_table", lambda f, bm: calls.append(bm) or real(f, bm))
    with open_image(p) as img:
        assert len(img.bitmaps) == 2000 and not img.open_refusals
    assert len(calls) == 1
    if shutil.which("qemu-img"):
        assert _run(["qemu-img", "info", p.name], tmp_path).returncode == 0


def _two_bitmaps_one_name(tmp_path: Path, in_use: tuple[bool, bool]) -> Path:
    """qemu-img's image with bitmaps 'a' and 'b', the second renamed 'a' (a byte patch) and the
    in-use flags set as asked (what QEMU leaves when it stops while the bitmap is in use)."""
    p = tmp_path / f"dup-{int(in_use[0])}{int(in_use[1])}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"], check=True)
    for name in ("a", "b"):
        subprocess.run(["qemu-img", "bitmap", "--add", str(p), name], check=True)
    with open_image(p) as img:
        entries = [(bm.entry_offset, bm.flags) for bm in img.bitmaps]
    assert len(entries) == 2
    with open(p, "r+b") as f:
        f.seek(entries[1][0] + 24)
        f.write(b"a")
        for (at, flags), used in zip(entries, in_use, strict=True):
            f.seek(at + 12)
            f.write(struct.pack(">I", flags | (1 if used else 0)))
    return p


@needs_qemu
@pytest.mark.parametrize("in_use", [(False, False), (True, False), (False, True), (True, True)])
def test_two_bitmaps_of_one_name(tmp_path: Path, in_use: tuple[bool, bool]) -> None:
    """bdrv_create_dirty_bitmap refuses a name it has ("Bitmap already exists"), unless the second
    one is in use (qcow2_load_dirty_bitmaps passes over it): info and check, as qemu-img."""
    p = _two_bitmaps_one_name(tmp_path, in_use)
    for cmd in (["info"], ["check"], ["check", "--output=json"]):
        q = _run(["qemu-img", *cmd, p.name], tmp_path)
        r = _run([QINSPECT, *cmd, p.name], tmp_path)
        assert r.returncode == q.returncode, (cmd, q.stderr, r.stderr)
        refused = "Bitmap already exists: a" in q.stderr
        assert refused == (not in_use[1])
        assert ("Bitmap already exists: a" in r.stderr) == refused
        assert "Traceback" not in r.stderr


@needs_qemu
@pytest.mark.parametrize("flags", [0x4, 0x5, 0x6, 0x8])
def test_bitmap_flag_bits_qemu_has_not(samples: Samples, tmp_path: Path, flags: int) -> None:
    """BME_RESERVED_FLAGS is every flag but in-use and auto (bit 2, the specification's
    extra_data_compatible, included): such a bitmap is refused at open, as qemu-img does."""
    p = tmp_path / "flags.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(p), "b0"], check=True)
    with open_image(p) as img:
        at = img.bitmaps[0].entry_offset
    with open(p, "r+b") as f:
        f.seek(at + 12)
        f.write(struct.pack(">I", flags))
    for cmd in ("info", "check"):
        q = _run(["qemu-img", cmd, p.name], tmp_path)
        r = _run([QINSPECT, cmd, p.name], tmp_path)
        assert q.returncode == r.returncode == 1, (cmd, q.stderr, r.stderr)
        assert "Bitmap 'b0' doesn't satisfy the constraints" in q.stderr
        assert "Bitmap 'b0' doesn't satisfy the constraints" in r.stderr


def test_compressed_cluster_past_eof_says_so(samples: Samples, tmp_path: Path) -> None:
    size = samples.path("zlib").stat().st_size
    p = _patched(samples, tmp_path, "zlib", (0x40000, ">Q", (1 << 62) | (3 << 54) | (size + 65536)))
    with open_image(p) as img, pytest.raises(Qcow2Error, match="lies past the end of the file") as e:
        img.read(0, 512)
    assert e.value.offset == size + 65536
    # partly past the end (the data is cut off): the message says that too
    p = _patched(samples, tmp_path, "zlib", (0x40000, ">Q", (1 << 62) | (255 << 54) | (size - 100)))
    with open_image(p) as img, pytest.raises(Qcow2Error, match="runs past the end of the file"):
        img.read(0, 512)
