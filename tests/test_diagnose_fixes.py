"""Every fix is a prediction: run it on a copy and check what it predicted.

For each kind of finding an image that shows it (made here by qemu-img/qemu-io, sparse, in a tmp
dir, or a committed sample), the finding's fix is run as printed (after `bash -n`), and then:
guest content identical (`qemu-img compare`; salvage: identical outside the lost clusters),
`qemu-img check` clean, file size and disk usage equal to `predicts` (within 5 % or two
clusters), and diagnose on the result does not offer the same fix again. Also: the same JSON with
the file's pages cached and evicted, fixes safe to paste for names full of shell syntax, and an
image write-locked by a running qemu-io.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu

from qinspect.analysis.diagnose import Diagnosis, Finding, diagnose
from qinspect.cli import main
from qinspect.qcow2.hostfile import InUse
from qinspect.qcow2.image import open_image

pytestmark = needs_qemu


def sh(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(list(args), check=True, capture_output=True, cwd=cwd)


def qio(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    sh(*argv, str(path))


def diag(path: Path, deep: bool = False) -> Diagnosis:
    with open_image(path) as img:
        return diagnose(img, deep=deep)


def finding(d: Diagnosis, fid: str) -> Finding:
    for f in d.findings:
        if f.id == fid:
            return f
    raise AssertionError(f"{fid} not in {[f.id for f in d.findings]}")


def within(actual: int, predicted: int, cluster: int) -> bool:
    return abs(actual - predicted) <= max(0.05 * predicted, 2 * cluster)


def run_fix(f: Finding, image: Path, cluster: int, compare: bool = True) -> Path:
    """Run `f`'s fix as printed (cwd = the image's dir), move a new file over the image, check it."""
    assert f.fix is not None and f.fix.command is not None, f
    cmd = f.fix.command
    assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0, cmd
    before = image.with_suffix(".before")
    shutil.copyfile(image, before)
    subprocess.run(["bash", "-c", cmd], cwd=image.parent, check=True, capture_output=True)
    if not f.fix.in_place:
        assert f.fix.output is not None
        os.replace(image.parent / f.fix.output, image)
    st = os.stat(image)
    p = f.fix.predicts
    print(f"FIX {f.id} [{image.name}] {cmd.split(' ')[1]}: predicted file-size {p['file-size']} disk-usage "
          f"{p['disk-usage']}; actual {st.st_size} {st.st_blocks * 512}")
    assert within(st.st_size, int(p["file-size"]), cluster), (f.id, st.st_size, p)
    assert within(st.st_blocks * 512, int(p["disk-usage"]), cluster), (f.id, st.st_blocks * 512, p)
    chk = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    if compare:
        cmp = subprocess.run(["qemu-img", "compare", str(before), str(image)], capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    return image


def no_repeat(image: Path, f: Finding, deep: bool = False) -> None:
    after = diag(image, deep)
    cmds = {g.fix.command for g in after.findings if g.fix is not None}
    assert f.fix is not None and f.fix.command not in cmds, f.fix.command
    assert f.id not in {g.id for g in after.findings}, (f.id, [g.id for g in after.findings])


# -- images made here (sparse) -------------------------------------------------------------------------
def make_falloc(d: Path) -> Path:
    p = d / "falloc.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", str(p), "32M")
    qio(p, "write -P 0x11 0 64k", "write -P 0x12 5M 4k")
    return p


def make_metadata_prealloc(d: Path) -> Path:
    p = d / "meta.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(p), "32M")
    qio(p, "write -P 0x21 1M 64k")
    return p


def make_cow(d: Path, cluster: str) -> Path:
    base = d / f"base{cluster}.qcow2"
    top = d / f"top{cluster}.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M")
    qio(base, "write -P 0x31 0 16M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", base.name, "-F", "qcow2",
       str(top))
    offs = [(k * 7919 * 4096) % (32 << 20) for k in range(60)]
    qio(top, *[f"write -P {0x40 + k % 64} {o} 4k" for k, o in enumerate(offs)])
    return top


def make_free(d: Path) -> Path:
    p = d / "free.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "32M")
    qio(p, "write -P 0x51 0 8M", "write -P 0x52 16M 64k", "discard 0 6M")
    return p


def make_snapshots(d: Path, name: str = "old") -> Path:
    p = d / "snaps.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "32M")
    qio(p, "write -P 0x61 0 4M")
    sh("qemu-img", "snapshot", "-c", name, str(p))
    qio(p, "write -P 0x62 0 4M")
    return p


def make_truncated(d: Path) -> Path:
    p = d / "trunc.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M")
    qio(p, "write -P 1 0 64k", "write -P 2 1M 64k", "write -P 3 2M 64k")
    os.truncate(p, os.path.getsize(p) - 40000)
    return p


def make_scattered(d: Path) -> Path:
    p = d / "scat.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "40G")
    qio(p, *[f"write -P {k % 200 + 1} {k * 512}M 4k" for k in range(70, -1, -1)])
    return p


# -- the fixes, run on copies ------------------------------------------------------------------------
def test_falloc_preallocation(tmp_path: Path) -> None:
    p = make_falloc(tmp_path)
    f = finding(diag(p), "preallocated-unused")
    assert f.evidence["unwritten-bytes"] >= 30 << 20
    run_fix(f, p, 65536)
    no_repeat(p, f)


def test_zero_padding_of_small_writes(tmp_path: Path) -> None:
    """Scattered 4 KiB writes into a 64 KiB-cluster image: QEMU zero-fills the rest of each cluster
    (unwritten extents). A plain conversion would keep it all; the fix offered has extended L2."""
    p = tmp_path / "s4k.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "2G")
    qio(p, *[f"write -P 5 {(k * 7919 * 4096) % (2000 << 20)} 4k" for k in range(300)])
    f = finding(diag(p), "preallocated-unused")
    assert int(f.evidence["unwritten-bytes"]) >= 17 << 20
    assert f.fix is not None and "extended_l2=on" in (f.fix.command or "")
    assert int(f.fix.predicts["disk-usage"]) < os.stat(p).st_blocks * 512 // 4
    run_fix(f, p, 65536)
    no_repeat(p, f)


def test_metadata_preallocation(tmp_path: Path) -> None:
    p = make_metadata_prealloc(tmp_path)
    f = finding(diag(p), "preallocated-unused")
    run_fix(f, p, 65536)
    no_repeat(p, f)


@pytest.mark.parametrize("cluster", ["64k", "1M"])
def test_cow_amplification(tmp_path: Path, cluster: str) -> None:
    p = make_cow(tmp_path, cluster)
    f = finding(diag(p), "cow-amplification")
    assert f.severity.value == ("info" if cluster == "64k" else "warning")
    assert int(f.evidence["padding-bytes"]) > 0 and int(f.evidence["bytes-per-4k-write-after-fix"]) == 4096
    run_fix(f, p, 65536)
    with open_image(p) as img:
        assert img.header.extended_l2 and img.header.backing_file == f"base{cluster}.qcow2"
    no_repeat(p, f)


def test_free_space(tmp_path: Path) -> None:
    p = make_free(tmp_path)
    f = finding(diag(p), "free-space")
    run_fix(f, p, 65536)
    no_repeat(p, f)


@pytest.mark.parametrize("snap", ["old", "[/]$(touch PWNED)[link=x]`id`"])
def test_snapshot_space(tmp_path: Path, snap: str, capsys: pytest.CaptureFixture[str]) -> None:
    p = make_snapshots(tmp_path, snap)
    f = finding(diag(p), "snapshot-space")
    assert main(["diagnose", str(p)]) == 0  # snapshot names with markup do not crash the human output
    assert snap in capsys.readouterr().out
    run_fix(f, p, 65536)
    assert not (tmp_path / "PWNED").exists()
    with open_image(p) as img:
        assert not img.snapshots
    no_repeat(p, f)


def test_truncated(tmp_path: Path) -> None:
    p = make_truncated(tmp_path)
    f = finding(diag(p), "truncated")
    assert f.severity.value == "error" and f.evidence["missing-bytes"] == 40000
    assert "40,000 bytes missing" in f.title
    run_fix(f, p, 65536)
    no_repeat(p, f)


def test_scattered_metadata(tmp_path: Path) -> None:
    p = make_scattered(tmp_path)
    f = finding(diag(p), "scattered-metadata")
    run_fix(f, p, 65536)
    no_repeat(p, f)


def test_in_place_repairs(samples: Samples, tmp_path: Path) -> None:
    for name, fid in (("leaked", "leaked-clusters"), ("lazy_dirty", "dirty"), ("v2", "v2-no-zero"),
                      ("refcount_corrupt", "corruption"), ("corrupt_bit", "corrupt-bit"),
                      ("bitmap_inuse", "bitmap-in-use")):
        src = samples.path(name)
        p = tmp_path / src.name
        shutil.copyfile(src, p)
        f = finding(diag(p), fid)
        run_fix(f, p, 65536, compare=False)
        no_repeat(p, f)


def test_invalid_subclusters_salvage(samples: Samples, tmp_path: Path) -> None:
    src = samples.path("invalid_subcluster")
    p = tmp_path / src.name
    shutil.copyfile(src, p)
    d = diag(p)
    f = finding(d, "invalid-subclusters")
    assert f.severity.value == "error" and f.fix is not None and "--salvage" in (f.fix.command or "")
    assert "become zeros" in f.fix.loses
    with open_image(p) as img:
        keep = img.read(1 << 20, 65536)
    run_fix(f, p, 65536, compare=False)
    with open_image(p) as img:
        assert img.read(1 << 20, 65536) == keep and img.read(0, 65536) == bytes(65536)
    no_repeat(p, f)


def test_backing_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "orphan.qcow2"
    sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", str(p), "16M")
    f = finding(diag(p), "backing-missing")
    assert f.severity.value == "error" and f.fix is not None and f.fix.command is None
    assert finding(diag(p, deep=True), "backing-missing").severity.value == "error"
    assert main(["diagnose", str(p), "--fail-on=error"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL")


def test_data_file_missing(samples: Samples) -> None:
    if "fid_data_file_unnamed" not in SAMPLE_NAMES:
        pytest.skip("sample not present")
    d = diag(samples.path("fid_data_file_unnamed"), deep=True)
    f = finding(d, "data-file-missing")
    assert f.severity.value == "error" and f.fix is not None and f.fix.command is None
    assert d.deep is not None and d.deep.skipped


def test_one_convert_per_image(tmp_path: Path) -> None:
    """An 8 KiB-cluster overlay with scattered writes: small-clusters wants 64 KiB clusters,
    cow-amplification 16 KiB with extended L2: one conversion, the conflict resolved with a reason."""
    p = tmp_path / "c8k.qcow2"
    base = tmp_path / "b.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M")
    qio(base, "write -P 0x33 0 32M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=8k", "-b", base.name, "-F", "qcow2", str(p))
    qio(p, *[f"write -P 7 {k * 131072 + 8192} 4k" for k in range(200, 0, -1)])
    d = diag(p)
    wanting = [f for f in d.findings if f.fix is not None and f.fix.command
               and f.fix.command.startswith("qemu-img convert")]
    assert {f.id for f in wanting} >= {"small-clusters", "cow-amplification"}
    assert len({f.fix.command for f in wanting if f.fix is not None}) == 1
    fix = wanting[0].fix
    assert fix is not None and "cluster_size=64k" in (fix.command or "") and "extended_l2=on" in (fix.command or "")
    assert "Conflicts: cow-amplification wanted cluster_size=16k; cluster_size=64k kept for small-clusters" in fix.note
    run_fix(wanting[0], p, 65536)
    for f in wanting:
        no_repeat(p, f)


def test_zero_clusters_deep(samples: Samples, tmp_path: Path) -> None:
    src = samples.path("diag_zeros")
    p = tmp_path / src.name
    shutil.copyfile(src, p)
    f = finding(diag(p, deep=True), "zero-clusters")
    run_fix(f, p, 65536)
    no_repeat(p, f, deep=True)


def test_backing_duplicates_commit(samples: Samples, tmp_path: Path) -> None:
    for n in ("diag_dup_base", "diag_dup_top"):
        shutil.copyfile(samples.path(n), tmp_path / samples.path(n).name)
    p = tmp_path / "diag_dup_top.qcow2"
    before = tmp_path / "guest.raw"
    sh("qemu-img", "convert", "-O", "raw", str(p), str(before))
    f = finding(diag(p, deep=True), "backing-duplicates")
    run_fix(f, p, 65536, compare=False)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(before), str(p)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout
    no_repeat(p, f, deep=True)


def test_compressed_and_small_clusters(samples: Samples, tmp_path: Path) -> None:
    for name, fid in (("zstd", "compressed"), ("c4k", "small-clusters")):
        src = samples.path(name)
        p = tmp_path / src.name
        shutil.copyfile(src, p)
        f = finding(diag(p), fid)
        assert f.fix is not None and (f.fix.cost or fid != "compressed")
        run_fix(f, p, 65536)
        no_repeat(p, f)


def test_narrow_refcount_amend(samples: Samples, tmp_path: Path) -> None:
    """`qemu-img amend -o refcount_bits=16` grows the file by the new refcount table and blocks
    that do not fit in its free clusters (qcow2_change_refcount_order), as predicted."""
    src = samples.path("refcount1")
    p = tmp_path / src.name
    shutil.copyfile(src, p)
    f = finding(diag(p), "narrow-refcount")
    run_fix(f, p, 65536)
    no_repeat(p, f)


def test_long_chain_rebase(samples: Samples, tmp_path: Path) -> None:
    for k in range(5):
        shutil.copyfile(samples.path(f"longchain_{k}"), tmp_path / f"longchain_{k}.qcow2")
    p = tmp_path / "longchain_4.qcow2"
    before = tmp_path / "guest.raw"
    sh("qemu-img", "convert", "-O", "raw", str(p), str(before))
    f = finding(diag(p), "long-chain")
    assert f.fix is not None and f.fix.cost
    cmd = f.fix.command
    assert cmd is not None
    subprocess.run(["bash", "-c", cmd], cwd=tmp_path, check=True, capture_output=True)
    st = os.stat(p)
    assert st.st_size <= int(f.fix.predicts["file-size-at-most"])
    assert within(st.st_size, int(f.fix.predicts["file-size"]), 65536), (st.st_size, f.fix.predicts)
    assert within(st.st_blocks * 512, int(f.fix.predicts["disk-usage"]), 65536), (st.st_blocks, f.fix.predicts)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(before), str(p)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout
    no_repeat(p, f)


# -- stable numbers: page cache ---------------------------------------------------------------------
def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def _json(path: Path, deep: bool) -> str:
    return json.dumps(diag(path, deep).to_json(), sort_keys=True)


def test_same_json_cached_and_evicted(samples: Samples, tmp_path: Path) -> None:
    paths = [samples.path(n) for n in SAMPLE_NAMES] + [make_falloc(tmp_path), make_cow(tmp_path, "64k")]
    for path in paths:
        try:
            open_image(path).close()
        except Exception:  # samples QEMU refuses to open are covered elsewhere
            continue
        for deep in (False, True):
            _cache(path)
            cached = _json(path, deep)
            _evict(path)
            evicted = _json(path, deep)
            assert cached == evicted, (path.name, deep)


# -- pasteable fixes and live images -----------------------------------------------------------------
NASTY = ["a b$(touch PWNED);c'd\"`x`.qcow2", "-rf *.qcow2", "[bold red]leaked.qcow2"]


@pytest.mark.parametrize("name", NASTY)
def test_fix_commands_with_shell_syntax(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_free(tmp_path)
    p = tmp_path / name
    os.rename(src, p)
    d = diag(p)
    cmds = [f.fix.command for f in d.findings if f.fix is not None and f.fix.command]
    assert cmds
    for cmd in cmds:
        assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0
        # By substitution: echo each word back; the words are exactly the argv.
        words = subprocess.run(["bash", "-c", "printf '%s\\0' " + cmd.split(" ", 1)[1]], cwd=tmp_path,
                               capture_output=True, check=True).stdout.split(b"\0")[:-1]
        assert [w.decode() for w in words] == shlex.split(cmd)[1:]
    f = finding(d, "free-space")
    run_fix(f, p, 65536)
    assert not (tmp_path / "PWNED").exists()
    assert main(["diagnose", str(p)]) == 0  # markup in the name must not crash the human output
    assert name in capsys.readouterr().out


def test_no_escape_from_the_image_reaches_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = make_snapshots(tmp_path, "\x1b]2;pwned\x07[/]")
    assert main(["diagnose", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]2;pwned\\x07[/]" in out
    f = finding(diag(p), "snapshot-space")
    assert f.fix is not None and f.fix.command is None and "cannot be pasted" in f.fix.blocked


def test_unpasteable_name_prints_no_command(tmp_path: Path) -> None:
    src = make_free(tmp_path)
    p = tmp_path / "evil\nrm -rf ~.qcow2"
    os.rename(src, p)
    f = finding(diag(p), "free-space")
    assert f.fix is not None and f.fix.command is None and "cannot be pasted" in f.fix.blocked


def test_in_use_blocks_in_place_fixes(samples: Samples, tmp_path: Path) -> None:
    p = tmp_path / "leaked.qcow2"
    shutil.copyfile(samples.path("leaked"), p)
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(p)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with open_image(p) as img:
                if img.file.lock_state() is InUse.WRITER:
                    break
            time.sleep(0.05)
        d = diag(p)
        assert d.in_use is InUse.WRITER
        assert finding(d, "in-use").severity.value == "warning"
        for f in d.findings:
            if f.fix is not None and f.fix.in_place:
                assert f.fix.command is None and "stop the VM" in f.fix.blocked, f.id
            elif f.fix is not None and f.fix.command:
                assert "stop the VM first" in f.fix.note
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
