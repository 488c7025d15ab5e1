"""`qinspect scan`: a generated tree of real images (qemu-img/qemu-io) scanned in one run.

The tree has plain images, an internal snapshot, a leaked cluster, a three-layer chain, an
overlay whose backing file is missing, a fully preallocated image, a dirty lazy-refcounts image,
and decoys: a text file and a truncated image named .qcow2, a raw image and a random file (not
images: skipped), a FIFO named .qcow2, a symlink inside the tree (no duplicate), a symlink out of the tree (not
followed unless asked) and a dangling symlink. Every JSON Lines record must equal what the
per-image commands print; the Prometheus text must parse and hold the expected samples; a real
node_exporter must serve them; images replaced or in use must be reported as such.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES

from qinspect.analysis import scan as scan_mod
from qinspect.analysis.diagnose import diagnose
from qinspect.analysis.scan import InUse, find_images, scan_images
from qinspect.analysis.walks import check_and_layout
from qinspect.cli import main as cli_main
from qinspect.qcow2.image import open_image

QINSPECT = str(Path(sys.executable).parent / "qinspect")
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")


# -- the tree -----------------------------------------------------------------------------------------
def qemu_img(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL, cwd=cwd)


def qemu_io(path: Path, *cmds: str, check: bool = True) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def host_offset(path: Path, guest: int) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    for e in json.loads(out):
        if e["start"] <= guest < e["start"] + e["length"] and e.get("offset") is not None:
            return int(e["offset"]) + guest - int(e["start"])
    raise AssertionError(f"{guest} not allocated")


def make_leaked(path: Path) -> None:
    """Two clusters written, one discarded, its refcount PATCHED back to 1: one leaked cluster."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k")
    leaked = host_offset(path, 1 << 20)
    qemu_io(path, "discard 1M 64k")
    with open(path, "r+b") as f:
        hdr = f.read(104)
        rt = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb + 2 * (leaked >> 16))
        f.write(struct.pack(">H", 1))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("scan")
    root = top / "images"
    (root / "chain").mkdir(parents=True)
    (root / "sub").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(root / "plain.qcow2"), "64M")
    qemu_io(root / "plain.qcow2", "write -P 0x61 0 256k", "write -P 0x62 32M 64k")
    qemu_img("create", "-q", "-f", "qcow2", str(root / "snap.qcow2"), "64M")
    qemu_io(root / "snap.qcow2", "write -P 0x41 0 2M")
    qemu_img("snapshot", "-c", "before", str(root / "snap.qcow2"))
    qemu_io(root / "snap.qcow2", "write -P 0x42 0 2M")
    make_leaked(root / "sub" / "leaked.qcow2")
    c = root / "chain"
    qemu_img("create", "-q", "-f", "qcow2", str(c / "base.qcow2"), "64M")
    qemu_io(c / "base.qcow2", "write -P 0x01 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(c / "mid.qcow2"), cwd=c)
    qemu_io(c / "mid.qcow2", "write -P 0x02 1M 128k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(c / "top.qcow2"), cwd=c)
    qemu_io(c / "top.qcow2", "write -P 0x03 2M 64k")
    qemu_img("create", "-q", "-f", "qcow2", str(c / "gone.qcow2"), "64M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", str(c / "orphan.qcow2"), cwd=c)
    qemu_io(c / "orphan.qcow2", "write -P 0x04 0 64k")
    (c / "gone.qcow2").unlink()  # a broken chain
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(root / "prealloc.qcow2"), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(root / "dirty.qcow2"), "64M")
    qemu_io(root / "dirty.qcow2", "write 0 128k", "abort", check=False)  # crash: dirty bit stays set
    # decoys
    (root / "notes.qcow2").write_text("this is not an image\n")
    data = (root / "plain.qcow2").read_bytes()
    (root / "sub" / "truncated.qcow2").write_bytes(data[:200])
    qemu_img("create", "-q", "-f", "raw", str(root / "disk.img"), "1M")
    (root / "random.bin").write_bytes(os.urandom(4096))
    os.symlink("plain.qcow2", root / "alias.qcow2")
    outside = top / "outside.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(outside), "16M")
    os.symlink(outside, root / "sub" / "external.qcow2")
    os.symlink("nowhere.qcow2", root / "dangling.qcow2")
    os.mkfifo(root / "pipe.qcow2")  # must be reported, and must not hang the scan
    return root


GOOD = ["plain.qcow2", "snap.qcow2", "sub/leaked.qcow2", "chain/base.qcow2", "chain/mid.qcow2", "chain/top.qcow2",
        "prealloc.qcow2", "dirty.qcow2",
        "sub/truncated.qcow2"]  # opens (tables past the end read as zeros), then check finds corruption
ERRORS = ["notes.qcow2", "dangling.qcow2", "pipe.qcow2"]
BROKEN = ["chain/orphan.qcow2"]


def run_scan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # table rows on one line each, whatever the caller's terminal
    return subprocess.run([QINSPECT, "scan", *args], capture_output=True, text=True, check=False, cwd=cwd,
                          timeout=120, env=env)


def per_image(*argv: str) -> tuple[int, Any, str]:
    """One per-image qinspect command, in this process: (exit code, JSON on stdout or None, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    text = out.getvalue()
    return code, json.loads(text) if text.strip() else None, err.getvalue()


def same(scanned: dict[str, Any], command: dict[str, Any]) -> bool:
    """The scan's info/check object equals the command's; the scan always states "in-use" (null
    here), which the command prints too once it reports locks."""
    assert scanned["in-use"] == command.get("in-use")
    return {k: v for k, v in scanned.items() if k != "in-use"} == {k: v for k, v in command.items() if k != "in-use"}


def records(stdout: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    by_path = {r["path"]: r for r in lines}
    assert len(by_path) == len(lines), "an image was reported twice"
    return by_path


@pytest.fixture(scope="module")
def json_lines(tree: Path) -> dict[str, dict[str, Any]]:
    r = run_scan(str(tree), "--output=json", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return records(r.stdout)


# -- JSON Lines ---------------------------------------------------------------------------------------
def test_finds_images_by_magic_and_reports_bad_entries(tree: Path, json_lines: dict[str, dict[str, Any]]) -> None:
    expected = {str(tree / p) for p in GOOD + ERRORS + BROKEN}
    assert set(json_lines) == expected  # no raw/random files, no symlink duplicates, nothing outside
    for p in ERRORS:
        assert set(json_lines[str(tree / p)]) == {"path", "error"}


def test_json_lines_agree_with_per_image_commands(tree: Path, json_lines: dict[str, dict[str, Any]]) -> None:
    for path, rec in json_lines.items():
        if set(rec) == {"path", "error"}:
            code, out, err = per_image("info", "--output=json", path)
            assert code == 1 and out is None
            if path.endswith("dangling.qcow2"):  # the scan says why the file is missing
                assert err.strip() == f"qinspect: {path}: no such file"
                assert rec["error"] == "dangling symlink (its target does not exist)"
            else:
                assert err.strip() == f"qinspect: {path}: {rec['error']}"
            continue
        code, info, _ = per_image("info", "--output=json", path)
        assert code == 0 and same(rec["info"], info), path
        code, check, err = per_image("check", "--output=json", path)
        if rec["check"] is None:  # the broken chain: check needs the backing file, as qemu-img's
            assert code == 1 and err.strip() == f"qinspect: {path}: {rec['error']}"
        else:
            assert same(rec["check"], check), path
            assert "error" not in rec
        code, diag, _ = per_image("diagnose", "--output=json", path)
        assert code == 0
        for key, value in diag.items():
            assert rec[key] == value, (path, key)
        assert rec["in-use"] is None


def test_what_the_records_say(tree: Path, json_lines: dict[str, dict[str, Any]]) -> None:
    leaked = json_lines[str(tree / "sub/leaked.qcow2")]
    assert leaked["check"]["leaks"] == 1
    assert "leaked-clusters" in [f["id"] for f in leaked["findings"]]
    top = json_lines[str(tree / "chain/top.qcow2")]
    assert top["chain"] == [str(tree / "chain" / n) for n in ("top.qcow2", "mid.qcow2", "base.qcow2")]
    orphan = json_lines[str(tree / "chain/orphan.qcow2")]
    assert orphan["chain"] == [str(tree / "chain/orphan.qcow2")]
    assert "gone.qcow2" in orphan["error"] and "no such file" in orphan["error"]
    assert "snapshot-space" in [f["id"] for f in json_lines[str(tree / "snap.qcow2")]["findings"]]
    assert "dirty" in [f["id"] for f in json_lines[str(tree / "dirty.qcow2")]["findings"]]
    assert json_lines[str(tree / "plain.qcow2")]["findings"] == []
    truncated = json_lines[str(tree / "sub/truncated.qcow2")]
    assert truncated["check"]["corruptions"] > 0 and truncated["findings"][0]["severity"] == "error"


def test_follow_symlinks_out_of_the_tree(tree: Path) -> None:
    r = run_scan(str(tree), "--output=json", "--follow-symlinks", "--jobs", "1")
    recs = records(r.stdout)
    assert str(tree / "sub/external.qcow2") in recs
    assert "info" in recs[str(tree / "sub/external.qcow2")]
    assert str(tree / "alias.qcow2") not in recs  # its target is in the tree: scanned once


def test_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """Directories nested past Python's recursion limit are walked (depth first, a stack, no
    recursion), and the one image at the bottom is found."""
    here = tmp_path
    depth = sys.getrecursionlimit() + 100
    old = os.getcwd()
    try:  # relative mkdir: the whole path would pass PATH_MAX long before the depth we want
        os.chdir(here)
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
        shutil.copy(SAMPLES / "basic64k.qcow2", "bottom.qcow2")
    finally:
        os.chdir(old)
    try:
        r = run_scan(".", "--output=json", "--jobs", "1", cwd=tmp_path)
    finally:
        _remove_deep(tmp_path / "d")  # pytest's own clean-up recurses and would fail on it later
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    assert [p.count("/") for p in recs] == [depth + 1]
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr


def _remove_deep(top: Path) -> None:
    """Remove a chain of nested directories without recursion (each holds at most `d` and files)."""
    old = os.getcwd()
    try:
        os.chdir(top.parent)
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for _ in range(depth):
            for name in os.listdir("."):
                os.unlink(name)
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(old)


def test_deep_scan_finds_preallocated_space(tree: Path) -> None:
    r = run_scan(str(tree / "prealloc.qcow2"), str(tree / "plain.qcow2"), "--output=json", "--deep")
    recs = records(r.stdout)
    pre = recs[str(tree / "prealloc.qcow2")]
    _, diag, _ = per_image("diagnose", "--output=json", "--deep", str(tree / "prealloc.qcow2"))
    assert pre["findings"] == diag["findings"] and pre["deep"] == diag["deep"]
    assert pre["space"]["parts"]["zero-data"] > 7 << 20  # 8 MiB written by preallocation, none by a guest


# -- human --------------------------------------------------------------------------------------------
def test_human_table_ranks_by_reclaimable(tree: Path) -> None:
    r = run_scan(str(tree), "--deep", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if ".qcow2" in ln]
    assert "prealloc.qcow2" in rows[0]  # 8 MiB reclaimable: the top of the list
    assert "leaked.qcow2" in rows[1]
    assert any(f"total of {len(GOOD + ERRORS + BROKEN)} images" in ln for ln in lines)
    orphan = next(ln for ln in rows if "orphan.qcow2" in ln)
    assert "broken chain" in orphan
    assert "base of 2" in next(ln for ln in rows if "chain/base.qcow2" in ln)


def test_fail_on(tree: Path) -> None:
    assert run_scan(str(tree / "plain.qcow2"), "--fail-on=warning", "--output=json").returncode == 0
    assert run_scan(str(tree / "sub"), "--fail-on=error", "--output=json").returncode == 1  # truncated: unreadable
    leaked = str(tree / "sub/leaked.qcow2")
    _, diag, _ = per_image("diagnose", "--output=json", leaked)
    worst = diag["findings"][0]["severity"]  # one 64 KiB leak: as bad as diagnose says, no more
    order = ["error", "warning", "info"]
    for threshold in order:
        expected = 1 if order.index(worst) <= order.index(threshold) else 0
        assert run_scan(leaked, f"--fail-on={threshold}", "--output=json").returncode == expected, threshold
    r = run_scan(str(tree / "missing"), "--output=json")
    assert r.returncode == 1 and "no such file or directory" in r.stderr


# -- Prometheus ---------------------------------------------------------------------------------------
def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_output_parses_with_expected_samples(tree: Path, json_lines: dict[str, dict[str, Any]],
                                                        tmp_path: Path) -> None:
    target = tmp_path / "qinspect.prom"
    target.write_text("old\n")
    r = run_scan(str(tree), "--output=prometheus", "--output-file", str(target))
    assert r.returncode == 0 and r.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["qinspect.prom"]  # replaced, no temporary left
    assert oct(target.stat().st_mode & 0o044) == oct(0o044)  # readable by the exporter's user
    s = _samples(target.read_text())
    for path, rec in json_lines.items():
        p = (("path", path),)
        if "info" not in rec:
            assert s[("qinspect_image_error", p)] == 1
            assert ("qinspect_image_file_bytes", p) not in s
            continue
        assert s[("qinspect_image_file_bytes", p)] == os.stat(path).st_size
        assert s[("qinspect_image_disk_bytes", p)] == rec["info"]["actual-size"]
        assert s[("qinspect_image_virtual_bytes", p)] == rec["info"]["virtual-size"]
        parts = rec["space"]["parts"]
        for reason in ("leaked", "free", "tail", "zero-allocated", "preallocated-unused"):
            assert s[("qinspect_image_reclaimable_bytes", (("path", path), ("reason", reason)))] == parts[reason]
        assert s[("qinspect_image_l2_cache_coverage_ratio", p)] == rec["cache"]["default-coverage"]
        for sev in ("error", "warning", "info"):
            n = sum(1 for f in rec["findings"] if f["severity"] == sev)
            assert s[("qinspect_image_findings", (("path", path), ("severity", sev)))] == n
        if rec["check"] is not None:
            assert s[("qinspect_image_leaked_clusters", p)] == rec["check"].get("leaks", 0)
            assert s[("qinspect_image_corruptions", p)] == rec["check"].get("corruptions", 0)
            assert s[("qinspect_image_error", p)] == 0
        else:
            assert ("qinspect_image_leaked_clusters", p) not in s  # no check, no number
            assert s[("qinspect_image_error", p)] == 1
    assert s[("qinspect_image_leaked_clusters", (("path", str(tree / "sub/leaked.qcow2")),))] == 1
    assert s[("qinspect_scan_duration_seconds", ())] > 0
    assert s[("qinspect_scan_images", (("state", "ok"),))] == len(GOOD)
    assert s[("qinspect_scan_images", (("state", "error"),))] == len(ERRORS) + len(BROKEN)


def test_prometheus_label_escaping(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird\\name\n.qcow2'
    qemu_img("create", "-q", "-f", "qcow2", str(odd), "1M")
    r = run_scan(str(tmp_path), "--output=prometheus")
    assert r.returncode == 0, r.stderr
    s = _samples(r.stdout)
    assert s[("qinspect_image_file_bytes", (("path", str(odd)),))] == odd.stat().st_size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.skipif(not os.access(NODE_EXPORTER, os.X_OK), reason="prometheus-node-exporter not installed")
def test_node_exporter_textfile_collector_serves_the_metrics(tree: Path, tmp_path: Path) -> None:
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    r = run_scan(str(tree), "--output=prometheus", "--output-file", str(textdir / "qinspect.prom"))
    assert r.returncode == 0, r.stderr
    port = _free_port()
    proc = subprocess.Popen([NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                             f"--collector.textfile.directory={textdir}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"node_exporter exited: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.1)
        assert body, "node_exporter did not answer"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    s = _samples(body)
    assert s[("node_textfile_scrape_error", ())] == 0
    leaked = str(tree / "sub/leaked.qcow2")
    assert s[("qinspect_image_leaked_clusters", (("path", leaked),))] == 1
    for family in ("qinspect_image_file_bytes", "qinspect_image_disk_bytes", "qinspect_image_virtual_bytes",
                   "qinspect_image_reclaimable_bytes", "qinspect_image_corruptions",
                   "qinspect_image_l2_cache_coverage_ratio", "qinspect_image_findings",
                   "qinspect_scan_duration_seconds"):
        assert any(name == family for name, _ in s), family


# -- images that change or are in use -----------------------------------------------------------------
def _copy_tree(tree: Path, dst: Path) -> Path:
    for name in ("plain.qcow2", "snap.qcow2"):
        shutil.copyfile(tree / name, dst / name)
    shutil.copyfile(tree / "sub/leaked.qcow2", dst / "leaked.qcow2")
    return dst


def test_file_replaced_after_discovery_is_an_error(tree: Path, tmp_path: Path) -> None:
    d = _copy_tree(tree, tmp_path)
    cands = find_images([str(d)])
    assert len(cands) == 3
    os.replace(d / "leaked.qcow2", d / "plain.qcow2")  # a new file under a found name
    reps = {r.summary.path: r for r in scan_images(cands, jobs=2)}
    bad = reps[str(d / "plain.qcow2")]
    assert bad.summary.error is not None and "changed during the scan" in bad.summary.error
    assert bad.line is not None and json.loads(bad.line) == {"path": str(d / "plain.qcow2"),
                                                             "error": bad.summary.error}
    assert reps[str(d / "leaked.qcow2")].summary.error is not None  # gone: one line, not a stop
    assert reps[str(d / "snap.qcow2")].summary.error is None


@pytest.mark.parametrize("how", ["replace", "append"])
def test_file_changed_while_read_is_an_error(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             how: str) -> None:
    d = _copy_tree(tree, tmp_path)
    victim = d / "snap.qcow2"
    real_check = check_and_layout

    def check_and_change(img: Any, *a: Any, **kw: Any) -> Any:
        if img.path == str(victim):
            if how == "replace":
                shutil.copyfile(d / "plain.qcow2", d / "tmp.new")
                os.replace(d / "tmp.new", victim)
            else:
                with open(victim, "ab") as f:
                    f.write(b"\0" * 65536)
        return real_check(img, *a, **kw)

    monkeypatch.setattr(scan_mod, "check_and_layout", check_and_change)
    reps = {r.summary.path: r for r in scan_images(find_images([str(d)]), jobs=1)}
    err = reps[str(victim)].summary.error
    assert err is not None and err.startswith("changed during the scan") and "while it was read" in err
    assert json.loads(reps[str(victim)].line or "") == {"path": str(victim), "error": err}  # no mixed answers
    assert ("replaced" in err) == (how == "replace")
    assert reps[str(d / "plain.qcow2")].summary.error is None


@contextlib.contextmanager
def qemu_io_holding(path: Path, *cmds: str) -> Iterator[None]:
    """A read-write qemu-io process that has run `cmds` and keeps the image open (and locked):
    ready once the write lock is seen and the dirty bit (lazy refcounts) is on the file."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(c + "\n" for c in cmds))
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open_image(path) as img:
                if img.file.lock_state() is InUse.WRITER and img.header.dirty:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("qemu-io did not open and dirty the image")
        yield
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write("quit\n")
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_image_in_use_by_a_writer_is_not_diagnosed(tmp_path: Path) -> None:
    busy = tmp_path / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(busy), "64M")
    with qemu_io_holding(busy, "write -P 0x55 0 256k"):
        # With lazy refcounts a running QEMU leaves the dirty bit set and the refcounts stale:
        # the per-image diagnosis sees exactly that (a dirty image, refcount errors) ...
        _, diag, _ = per_image("diagnose", "--output=json", str(busy))
        assert "dirty" in [f["id"] for f in diag["findings"]]
        r = run_scan(str(tmp_path), "--output=json")
        recs = records(r.stdout)
        r2 = run_scan(str(tmp_path), "--output=prometheus")
        r3 = run_scan(str(tmp_path))
    # ... and the scan says "in use" instead of diagnosing it.
    rec = recs[str(busy)]
    assert rec["in-use"] == "write" and rec["info"]["in-use"] == "write"
    assert rec["check"] is None and rec["findings"] is None and rec["space"] is None
    assert rec["info"]["dirty-flag"] is True
    s = _samples(r2.stdout)
    p = (("path", str(busy)),)
    assert s[("qinspect_image_in_use", (("lock", "write"), ("path", str(busy))))] == 1
    assert ("qinspect_image_leaked_clusters", p) not in s and ("qinspect_image_corruptions", p) not in s
    assert "in use" in r3.stdout and "dirty" not in r3.stdout
    # Closed again: a clean image.
    rec = records(run_scan(str(tmp_path), "--output=json").stdout)[str(busy)]
    assert rec["in-use"] is None and rec["findings"] == []


def test_image_open_read_only_elsewhere_is_inspected(tree: Path, tmp_path: Path) -> None:
    img = tmp_path / "shared.qcow2"
    shutil.copyfile(tree / "sub/leaked.qcow2", img)
    proc = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            [rep] = list(scan_images(find_images([str(img)])))
            if rep.summary.in_use is InUse.READER:
                break
            time.sleep(0.05)
        assert rep.summary.in_use is InUse.READER
        assert rep.summary.checked and rep.summary.leaks == 1
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
        proc.wait(10)


def test_a_worker_that_dies_costs_only_its_image(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy_tree(tree, tmp_path)
    for i in range(6):
        shutil.copyfile(tree / "plain.qcow2", d / f"more-{i}.qcow2")
    victim = str(d / "snap.qcow2")
    real_check = check_and_layout

    def check_or_die(img: Any, *a: Any, **kw: Any) -> Any:
        if img.path == victim:
            os._exit(9)  # what the OOM killer leaves behind: no exception, no report
        return real_check(img, *a, **kw)

    monkeypatch.setattr(scan_mod, "check_and_layout", check_or_die)  # the forked workers inherit it
    reps = {r.summary.path: r.summary for r in scan_images(find_images([str(d)]), jobs=2)}
    assert len(reps) == 9
    assert reps[victim].error == scan_mod.WORKER_DIED
    assert all(s.error is None for p, s in reps.items() if p != victim)


def test_guest_freed_space_counts_as_reclaimable(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest analysis (issue 13) moves what the guest freed out of "guest-data" into a
    "guest-freed" space part; the scan counts that part, under its own reason, whenever it is there."""
    real = diagnose

    def with_guest_part(img: Any, *a: Any, **kw: Any) -> Any:
        d = real(img, *a, **kw)
        moved = d.space.parts["guest-data"] // 2  # what split_space does with the guest's numbers
        d.space.parts["guest-data"] -= moved
        d.space.parts["guest-freed"] = moved
        d.space.allocated_parts["guest-freed"] = moved
        return d

    monkeypatch.setattr(scan_mod, "diagnose", with_guest_part)
    [rep] = list(scan_images(find_images([str(tree / "plain.qcow2")]), jobs=1))
    s = rep.summary
    assert s.reclaimable["guest-freed"] > 0 and s.reclaimable_disk["guest-freed"] == s.reclaimable["guest-freed"]
    assert s.reclaimable_bytes == sum(s.reclaimable.values())
    from qinspect.cli.scan_cmd import prometheus_text

    samples = _samples(prometheus_text([s], 1.0))
    key = ("qinspect_image_reclaimable_bytes", (("path", str(tree / "plain.qcow2")), ("reason", "guest-freed")))
    assert samples[key] == s.reclaimable["guest-freed"]
