"""The command line as a drop-in for qemu-img (issue 15) and its small promises (issue 10).

- qemu-img command lines as scripts write them run through both tools: same exit code, same JSON
  (qinspect adds only its `"in-use"` key and QEMU 8.2's `"compressed"` in map); human `map`
  prints qemu-img's layout byte for byte.
- qemu-img's read-only spellings are accepted; what would write or what qinspect cannot read is
  refused with one line (for `check -r`, the qemu-img command to run).
- Typos get a suggestion, every command has `--help` with an example and the exit codes, and the
  README's synopsis is the parser's.
- Human `map` of 2**17 alternating extents runs under a 2 GiB address-space limit (the million-
  extent case is bench/map_human.py's, with its RSS); its table gives exact
  lengths, the file or "zeros" that serves each range, and a summary of the range asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_NAMES, Samples, needs_qemu

from qinspect import cli
from qinspect.cli import COMMANDS, main, size_type, suggest, synopsis
from qinspect.cli.synopsis import readme_block

QINSPECT = [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())"]


def run(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", *args] if tool == "qemu-img" else [*QINSPECT, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def run_here(args: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """qinspect's `main` in this process (the same parser and code as the console script, without
    a start-up per command line), captured like a subprocess."""
    capsys.readouterr()
    code = main(args)
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, cap.out, cap.err)


# -- sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [("0x3000b", 0x3000B), ("0x1e", 30), ("0x1E", 30), ("64k", 65536),
                                             ("1.5G", 3 << 29), ("512", 512), ("0x10000", 65536), ("2M", 2 << 20)])
def test_sizes_are_parsed_like_qemu_img(text: str, value: int) -> None:
    assert size_type(text) == value


def test_cli_has_no_size_parser_of_its_own() -> None:
    assert not hasattr(cli, "_size")


def test_hex_offset_on_the_command_line(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layout", str(samples.path("basic64k")), "--offset", "0x3000b", "--output=json"]) == 0
    assert json.loads(capsys.readouterr().out)["offset"] == 0x3000B


def test_too_large_a_size_is_one_line_with_one_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--size=16E"]) == 1
    err = capsys.readouterr().err
    assert err.count("qinspect:") == 1 and err.count("\n") == 1 and "too large" in err


# -- errors a person understands ---------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "hint"), [(["inf", "img.qcow2"], "info"), (["inf"], "info"),
                                            (["chek", "x"], "check"), (["diag", "x"], "diagnose"),
                                            (["mpa", "x"], "map"), (["mesure", "x"], "measure")])
def test_unknown_command_gets_a_suggestion(argv: list[str], hint: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name
    assert main(argv) == 1
    assert capsys.readouterr().err == f"qinspect: unknown command '{argv[0]}' (did you mean {hint}?)\n"


def test_unknown_word_lists_the_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["frobnicate", "x.qcow2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qinspect: unknown command 'frobnicate' (commands: info, map, check")
    assert suggest("zzzzzz") is None


@pytest.mark.parametrize("word", ["convert", "create", "resize", "commit"])
def test_qemu_img_write_commands_point_to_qemu_img(word: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([word, "-O", "raw", "a.qcow2", "b.raw"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qinspect: unknown command '{word}': qinspect only reads images (info, map, check")
    assert err.endswith(f"run qemu-img {word} for that\n")


def test_options_before_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--output=json", "info", "x.qcow2"]) == 1
    assert capsys.readouterr().err == "qinspect: options go after the command: qinspect info --output=json x.qcow2\n"


def test_check_fix_names_the_file_with_image_opts(in_samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--image-opts", "driver=qcow2,file.filename=leaked.qcow2"]) == 3
    assert "Fix: qemu-img check -r leaks leaked.qcow2\n" in capsys.readouterr().out


def test_usage_errors_are_one_line_and_exit_1(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    # 2 and 3 mean corruptions and leaks to `check`: a usage error must not look like either.
    assert main(["check", str(samples.path("basic64k")), "--bogus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qinspect: check: unrecognized arguments: --bogus") and err.count("\n") == 1


def _all_commands() -> list[str]:
    return list(COMMANDS)


@pytest.mark.parametrize("name", _all_commands())
def test_every_command_has_help_with_an_example_and_exit_codes(name: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"example:\n  qinspect {name}" in out
    assert "exit codes:" in out and "check: corruptions found" in out


def test_top_level_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and all(n in out for n in _all_commands())


def test_readme_synopsis_is_the_parsers() -> None:
    block = readme_block((ROOT / "README.md").read_text())
    assert block == synopsis(), "README synopsis is stale: run python -m qinspect.cli.synopsis --update README.md"


@pytest.mark.parametrize("name", _all_commands())
def test_synopsis_line_is_what_help_prints(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0].removeprefix("usage: ")
    lines = [u.removeprefix(" " * len("usage: ")) for u in usage.split("\n")]
    assert "\n".join(lines) + "\n" in synopsis()


# -- qemu-img's spellings ----------------------------------------------------------------------------
@pytest.fixture
def in_samples(samples: Samples, monkeypatch: pytest.MonkeyPatch) -> Samples:
    monkeypatch.chdir(samples.dir)
    return samples


def _json_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, object]:
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


@pytest.mark.parametrize("extra", [["-f", "qcow2"], ["--format=qcow2"], ["-U"], ["--force-share"],
                                   ["--output", "json"], ["--object", "secret,id=sec0,data=x"]])
def test_qemu_img_spellings_are_accepted(in_samples: Samples, extra: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = _json_of(["info", "--output=json", "chain_top.qcow2"], capsys)
    assert _json_of(["info", "--output=json", *extra, "chain_top.qcow2"], capsys) == base


@pytest.mark.parametrize("opts", ["file.filename=chain_top.qcow2", "driver=qcow2,file.filename=chain_top.qcow2",
                                  "driver=qcow2,file.driver=file,file.filename=chain_top.qcow2"])
def test_image_opts_plain_case(in_samples: Samples, opts: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = _json_of(["map", "--output=json", "chain_top.qcow2"], capsys)
    assert _json_of(["map", "--output=json", "--image-opts", opts], capsys) == base


def test_image_opts_doubled_comma(tmp_path: Path, samples: Samples, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copyfile(samples.path("basic64k"), tmp_path / "a,b.qcow2")
    monkeypatch.chdir(tmp_path)
    code, info = _json_of(["info", "--output=json", "--image-opts", "driver=qcow2,file.filename=a,,b.qcow2"], capsys)
    assert code == 0 and isinstance(info, dict) and info["filename"] == "a,b.qcow2"


@pytest.mark.parametrize(("argv", "says"), [
    (["info", "-f", "raw", "basic64k.qcow2"], "format 'raw' is not supported: qinspect reads qcow2 images only"),
    (["map", "-f", "vmdk", "basic64k.qcow2"], "format 'vmdk' is not supported"),
    (["info", "--image-opts", "driver=raw,file.filename=basic64k.qcow2"], "driver 'raw' is not supported"),
    (["info", "--image-opts", "driver=qcow2,file.driver=nbd,file.filename=x"], "file.driver 'nbd' is not supported"),
    (["info", "--image-opts", "driver=qcow2,file.filename=basic64k.qcow2,cache.direct=on"],
     "option 'cache.direct' is not supported"),
    (["info", "--image-opts", "driver=qcow2"], "file.filename=PATH is required"),
    (["measure", "-O", "raw", "basic64k.qcow2"], "qcow2 targets only (-O qcow2)"),
    (["measure", "-O", "vmdk", "--size", "1G"], "run qemu-img measure -O vmdk"),
])
def test_refusals_are_one_clear_line(in_samples: Samples, argv: list[str], says: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert says in cap.err and cap.err.count("\n") == 1 and cap.err.startswith("qinspect: ") and not cap.out


@pytest.mark.parametrize("name", ["leaked.qcow2", "a b.qcow2", "it's.qcow2", "$(touch pwned).qcow2"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_check_repair_is_refused_with_the_qemu_img_command(tmp_path: Path, samples: Samples, name: str, mode: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copyfile(samples.path("leaked"), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / name).read_bytes()
    assert main(["check", "-r", mode, name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never writes" in err
    cmd = err.split("run: ", 1)[1].rstrip("\n")
    assert shlex.split(cmd) == ["qemu-img", "check", "-r", mode, name]
    assert (tmp_path / name).read_bytes() == before
    # The line runs as it says (here with a harmless stand-in for qemu-img) and nothing else.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "qemu-img").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (stub / "qemu-img").chmod(0o755)
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}).stdout
    assert out.split("\n")[:-1] == ["check", "-r", mode, name]
    assert not (tmp_path / "pwned").exists()


# -- the compatibility test: real qemu-img command lines through both tools ------------------------------
COMPAT_IMAGES = ["chain_top", "leaked", "refcount_corrupt", "basic64k", "extl2_64k", "zlib", "overlay_raw",
                 "prealloc_metadata", "snapshots", "bitmaps", "extdata", "v2_backed", "lazy_dirty"]

# Each line on every image of COMPAT_IMAGES; the spelling variants on the first three.
COMPAT_LINES = [
    "info --output=json {img}",
    "info -U --output=json --backing-chain {img}",
    "map --output=json {img}",
    "map --output=json -s 1M -l 2M {img}",
    "check --output=json {img}",
    "measure --output=json -O qcow2 -o cluster_size=2M,extended_l2=on {img}",
]
COMPAT_SPELLINGS = [
    "info --output json -f qcow2 {img}",
    "info --force-share --output=json --image-opts driver=qcow2,file.filename={img}",
    "map -f qcow2 --output json -U {img}",
    "map --output=json --start-offset=0x100000 --max-length=64k {img}",
    "map --output=json --image-opts file.filename={img}",
    "check -U -f qcow2 --output json {img}",
    "measure --output=json -O qcow2 {img}",
    "measure -f qcow2 -O qcow2 --output json -o cluster_size=512,refcount_bits=1 {img}",
]

COMPAT_FIXED = [
    "measure --output=json -O qcow2 --size 10G",
    "measure --output json --size 1T -O qcow2 -o cluster_size=2M",
    "map --output=json --object secret,id=sec0,data=qinspect "
    "--image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0",
    "check --output=json --object secret,id=sec0,data=qinspect "
    "--image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0",
]


def _comparable(line: str, parsed: object) -> object:
    """qinspect's JSON minus its documented extras: the "in-use" key and map's "compressed"."""
    if isinstance(parsed, dict):
        return {k: _comparable(line, v) for k, v in parsed.items() if k != "in-use"}
    if isinstance(parsed, list):
        return [_comparable(line, v) if not isinstance(v, dict) or not line.startswith("map")
                else {k: x for k, x in v.items() if k != "compressed"} for v in parsed]
    return parsed


def _compat_cases() -> list[str]:
    return ([line.format(img=f"{name}.qcow2") for line in COMPAT_LINES for name in COMPAT_IMAGES]
            + [line.format(img=f"{name}.qcow2") for line in COMPAT_SPELLINGS for name in COMPAT_IMAGES[:3]]
            + COMPAT_FIXED)


@needs_qemu
@pytest.mark.parametrize("line", _compat_cases())
def test_qemu_img_command_lines_give_the_same_json(in_samples: Samples, line: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = shlex.split(line)
    q = run("qemu-img", args, in_samples.dir)
    i = run_here(args, capsys)
    assert "Traceback" not in i.stderr
    if q.returncode != 0 and not q.stdout.strip():
        # qemu-img could not open or run it: qinspect fails too, or (where documented) does more.
        assert i.returncode == q.returncode or "extdata" in line, (q.stderr, i.stderr)
        return
    assert i.returncode == q.returncode, (q.stderr, i.stderr)
    expected = json.loads(q.stdout)
    got = json.loads(i.stdout)
    if args[0] in ("info", "check", "measure") and "--size" not in args:
        objs = got if isinstance(got, list) else [got]
        assert all("in-use" in o for o in objs), "the in-use key is missing"
    assert _comparable(line, got) == expected


@needs_qemu
def test_the_console_script_runs_a_qemu_img_line(in_samples: Samples) -> None:
    args = ["map", "-f", "qcow2", "-U", "--output", "json", "chain_top.qcow2"]
    q = run("qemu-img", args, in_samples.dir)
    i = run("qinspect", args, in_samples.dir)
    assert i.returncode == q.returncode == 0
    assert _comparable("map", json.loads(i.stdout)) == json.loads(q.stdout)
    i = run("qinspect", ["map", "chain_top.qcow2"], in_samples.dir)  # a pipe: qemu-img's layout
    assert i.stdout == run("qemu-img", ["map", "chain_top.qcow2"], in_samples.dir).stdout


def _human_map_cases() -> list[str]:
    return [*SAMPLE_NAMES, "chain_top@-s 64k -l 8M", "chain_top@--start-offset=0x1000 --max-length=0x7f000",
            "basic64k@-l 0x3000b"]


@needs_qemu
@pytest.mark.parametrize("case", _human_map_cases())
def test_human_map_is_qemu_imgs_layout_byte_for_byte(in_samples: Samples, case: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    name, _, extra = case.partition("@")
    file = Path(in_samples.path(name)).name
    for output in (["--output=human"], []):  # explicit, and the default when stdout is not a terminal
        args = ["map", *output, *shlex.split(extra), file]
        q = run("qemu-img", args, in_samples.dir)
        i = run_here(args, capsys)
        if q.returncode != 0 and not q.stdout:
            assert i.returncode != 0 or name == "luks"  # (qinspect needs no key; the row then fails)
            continue
        assert i.stdout == q.stdout
        assert i.returncode == q.returncode, (q.stderr, i.stderr)
        if i.returncode:
            assert i.stderr.count("\n") == 1  # one line, where qemu-img fails too


# -- qinspect's table --------------------------------------------------------------------------------
def test_map_table_exact_lengths_serving_files_and_summary(in_samples: Samples,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["map", "--table", "chain_top.qcow2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # no colour off a terminal
    lines = out.splitlines()
    assert lines[0].split() == ["guest", "offset", "length", "state", "host", "offset", "served", "by"]
    row = next(r for r in lines if r.split()[0] == "0x2000")
    assert "504 KiB (516,096 bytes)" in row and row.split()[-1] == "chain_base.qcow2"
    unalloc = [r for r in lines[1:-1] if " unallocated " in r]
    assert unalloc and all(r.split()[-1] == "zeros" for r in unalloc)
    assert "layer" not in out
    assert lines[-1].startswith("22 ranges over 16 MiB (16,777,216 bytes) of guest space (0x0..0x1000000)")


@pytest.mark.parametrize(("argv", "summary"), [
    (["-s", "0x100000", "-l", "0x200000", "chain_top.qcow2"], "over 2 MiB (2,097,152 bytes) of guest space "
                                                             "(0x100000..0x300000)"),
    (["--max-length=2G", "big_empty.qcow2"], "1 range over 2 GiB (2,147,483,648 bytes) of guest space "
                                             "(0x0..0x80000000): unallocated 2 GiB"),
    (["-s", "15M", "-l", "10G", "chain_top.qcow2"], "over 1 MiB (1,048,576 bytes) of guest space "
                                                    "(0xf00000..0x1000000)"),
])
def test_map_table_summary_covers_the_range_asked_for(in_samples: Samples, argv: list[str], summary: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["map", "--table", *argv]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert summary in last
    # The parts add up to the span.
    span = int(last.split(" bytes) of guest space")[0].rsplit("(", 1)[1].replace(",", ""))
    parts = [int(p.split(" bytes)")[0].rsplit("(", 1)[1].replace(",", "")) for p in last.split(": ", 1)[1].split("; ")]
    assert sum(parts) == span


@pytest.mark.parametrize(("argv", "terminal", "layout"), [
    ([], True, "table"), ([], False, "qemu"), (["--output=human"], True, "qemu"), (["--output=human"], False, "qemu"),
    (["--table"], False, "table"), (["--table", "--output=human"], False, "table"), (["--output=json"], True, "json"),
])
def test_which_map_layout(argv: list[str], terminal: bool, layout: str) -> None:
    from qinspect.cli.core_cmds import map_layout

    args = cli.build_parser().parse_args(["map", *argv, "x.qcow2"])
    assert map_layout(args, terminal) == layout


def test_check_quiet_says_it_by_exit_code(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-q", str(samples.path("leaked"))]) == 3
    assert capsys.readouterr().out == ""
    assert main(["check", "--quiet", str(samples.path("basic64k"))]) == 0


def test_map_table_colours_only_on_request() -> None:
    import io

    from qinspect.analysis.map import DATA, MapRuns
    from qinspect.cli.map_output import write_table

    runs = [MapRuns.one(0, 65536, DATA | 4, 0x50000, 0)]
    plain, coloured = io.StringIO(), io.StringIO()
    write_table(runs, ["a.qcow2"], ["a.qcow2"], plain, 0, 65536)
    write_table(runs, ["a.qcow2"], ["a.qcow2"], coloured, 0, 65536, colour=True)
    assert "\x1b" not in plain.getvalue() and "\x1b[32m" in coloured.getvalue()


# -- in use ------------------------------------------------------------------------------------------
_FLOCK = "hhqqi4x"


def _hold_locks(fd: int, writer: bool) -> None:
    """The byte-range locks a QEMU holds (shared OFD locks on the permission bytes)."""
    for b in ((100, 101, 103) if writer else (100,)) + (201, 203):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, b, 1, 0))


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="no OFD locks on this platform")
@pytest.mark.parametrize("writer", [True, False])
def test_every_command_says_in_use(samples: Samples, tmp_path: Path, writer: bool,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "busy.qcow2"
    shutil.copyfile(samples.path("leaked"), path)
    state = "write" if writer else "read"
    fd = os.open(path, os.O_RDONLY)
    try:
        _hold_locks(fd, writer)
        p = str(path)
        for argv in (["info", p], ["map", p], ["map", "--table", p], ["check", p], ["layout", p], ["measure", p],
                     ["cache", p]):
            main(argv)
            cap = capsys.readouterr()
            assert "in use" in cap.err, argv
            assert ("contents may be changing" in cap.err) == writer, argv
        for argv in (["info", p], ["info", "--backing-chain", p], ["check", p], ["layout", p], ["measure", p],
                     ["cache", p], ["layout", "--offset=0", p]):
            main([*argv, "--output=json"])
            got = json.loads(capsys.readouterr().out)
            assert (got[0] if isinstance(got, list) else got)["in-use"] == state, argv
        # A check of an image being written: what it sees, no verdict, no repair advice, exit 1.
        code = main(["check", p])
        cap = capsys.readouterr()
        if writer:
            assert code == 1
            assert "No verdict" in cap.out and "Fix:" not in cap.out and "qemu-img check -r" not in cap.out
            assert "leaked clusters were found" not in cap.out
            assert main(["check", "--output=json", p]) == 1
            assert json.loads(capsys.readouterr().out)["in-use"] == "write"
        else:
            assert code == 3 and "Fix: qemu-img check -r leaks" in cap.out
    finally:
        os.close(fd)
    assert main(["info", "--output=json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["in-use"] is None


@needs_qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_check_of_an_image_qemu_io_holds_open(samples: Samples, tmp_path: Path) -> None:
    """As qemu-img does on an image in use: no verdict, exit 1 ("check not completed")."""
    import time

    path = tmp_path / "live.qcow2"
    shutil.copyfile(samples.path("basic64k"), path)
    log = tmp_path / "qemu-io.err"
    for _attempt in range(3):  # a qemu-io that exits before taking its locks (seen on a loaded machine) is retried
        with open(log, "w") as err:
            proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 30
            q = run("qemu-img", ["check", str(path)], tmp_path)
            while q.returncode == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                q = run("qemu-img", ["check", str(path)], tmp_path)
            if q.returncode == 0:
                continue
            assert "lock" in q.stderr and q.returncode == 1
            i = run("qinspect", ["check", str(path)], tmp_path)
            assert i.returncode == q.returncode and "in use: contents may be changing" in i.stderr
            assert "No verdict" in i.stdout
            return
        finally:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    pytest.fail(f"qemu-io never held the image's locks: {log.read_text()[-500:]}")


# -- alternating extents ------------------------------------------------------------------
ALTERNATING_CLUSTERS = 1 << 17  # the million-extent image is the benchmark's (bench/map_human.py)


@pytest.fixture(scope="module")
def alternating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """2**17 extents that alternate data / zero: a qemu-img image (4 KiB clusters, preallocated
    with fallocate) whose every other L2 entry gets QCOW_OFLAG_ZERO (a valid v3 image: qemu-img
    check finds nothing). (qemu-img takes minutes to preallocate a million 512-byte clusters, so
    the million-extent image is built once by the benchmark, which measures its time and RSS.)"""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("alternating")
    path = d / "alternating.qcow2"
    cs = 4096
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},preallocation=falloc",
                    str(path), str(ALTERNATING_CLUSTERS * cs)], check=True)
    with open(path, "r+b") as f:
        head = f.read(48)
        l1_size, l1_offset = struct.unpack(">IQ", head[36:48])
        f.seek(l1_offset)
        l1 = np.frombuffer(f.read(l1_size * 8), dtype=">u8")
        for e in l1:
            l2 = int(e) & 0x00FFFFFFFFFFFE00
            if not l2:
                continue
            f.seek(l2)
            table = np.frombuffer(f.read(cs), dtype=">u8").copy()
            table[1::2] |= np.uint64(1)  # QCOW_OFLAG_ZERO on every other (allocated) entry
            f.seek(l2)
            f.write(table.tobytes())
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    yield path


def _limited(cmd: list[str], out: Path, cwd: Path) -> int:
    """Run under a 2 GiB address-space limit (issue 10's bound), stdout to a file; the exit code."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    with open(out, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, cwd=cwd, preexec_fn=limit, timeout=120,
                           check=False)
    assert b"Traceback" not in p.stderr and b"MemoryError" not in p.stderr, p.stderr[-500:]
    return p.returncode


@needs_qemu
def test_human_map_of_alternating_extents_in_bounded_memory(alternating: Path) -> None:
    d = alternating.parent
    q = subprocess.run(["qemu-img", "map", alternating.name], cwd=d, capture_output=True, text=True, check=True)
    assert _limited([*QINSPECT, "map", "--output=human", alternating.name], d / "qemu.txt", d) == 0
    got = (d / "qemu.txt").read_text()
    assert got.count("\n") == ALTERNATING_CLUSTERS // 2 + 1 and got == q.stdout
    assert _limited([*QINSPECT, "map", "--table", alternating.name], d / "table.txt", d) == 0
    with open(d / "table.txt") as f:
        rows = sum(1 for _ in f)
    assert rows == ALTERNATING_CLUSTERS + 2  # heading, every extent, summary


@needs_qemu
@pytest.mark.parametrize("layout", [["--output=human"], ["--table"], ["--output=json"]])
def test_map_piped_into_head_ends_quietly(alternating: Path, layout: list[str]) -> None:
    """`qinspect map IMG | head -3` on many extents: the reader closing the pipe ends the run
    without a traceback or a "Broken pipe" message (how soon the first rows come is the benchmark's)."""
    p = subprocess.Popen([*QINSPECT, "map", *layout, alternating.name], cwd=alternating.parent,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    lines = [p.stdout.readline() for _ in range(3)]
    assert all(lines)
    p.stdout.close()
    p.wait(timeout=60)
    err = p.stderr.read()
    p.stderr.close()
    assert b"Traceback" not in err and b"Broken pipe" not in err, err
