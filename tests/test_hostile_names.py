"""Names from an image are data: no command's output carries an escape from the file (issue 10).

Images are made by qemu-img (backing names, snapshot names, bitmap names, data-file names, file
names) or patched in place where qemu-img refuses the name (a backing format, the feature name
table), with names full of terminal escapes (OSC `ESC ] 2 ; ... ESC \\`, BEL, CSI), Rich markup
(`[/]`, `[link=...]`, `[bold red]`) and shell syntax (`raw;id`, `$(id)`, newlines). Every command,
human and JSON, runs on each; the captured output must carry no ESC or BEL, nothing may crash,
JSON keeps the exact strings, and a file named `[bold red]leaked.qcow2` is named exactly.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import Samples
from pasteable import NASTY_NAME, assert_pasteable

from qinspect.cli import COMMANDS, main

ESC_OSC = "\x1b]2;pwned\x1b\\"
HOSTILE = f"{ESC_OSC}\x07\x1b[31m\x9b2J[/][link=http://evil]x[/link][bold red]raw;id$(id)`id`\nrm -rf ~"
HOSTILE_FILE = HOSTILE.replace("/", "|").replace(":", "=")  # no "/" in a file name; ":" reads as a protocol
FORMATS = ["raw;id", "raw$(id)", "q\nraw", "\x1b]2;x\x07", "[/]"]  # at most 8 bytes: patched in place
FEATURE = "\x1b]2;feature\x07[/]$(id)\n"

BACKING_FORMAT_EXT = 0xE2792ACA
FEATURE_TABLE_EXT = 0x6803F857


def _qemu(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True)


def _extensions(data: bytes) -> list[tuple[int, int, int]]:
    """(type, offset of the data, length) of each header extension of a v3 image."""
    pos = struct.unpack(">I", data[100:104])[0]
    out = []
    while pos + 8 <= len(data):
        kind, length = struct.unpack(">II", data[pos : pos + 8])
        if kind == 0:
            break
        out.append((kind, pos + 8, length))
        pos += 8 + (length + 7) // 8 * 8
    return out


def _patch_backing_format(path: Path, fmt: str) -> None:
    raw = fmt.encode()
    with open(path, "r+b") as f:
        head = f.read(4096)
        [(_, at, length)] = [e for e in _extensions(head) if e[0] == BACKING_FORMAT_EXT]
        room = (length + 7) // 8 * 8
        assert len(raw) <= room
        f.seek(at - 4)
        f.write(struct.pack(">I", len(raw)) + raw + bytes(room - len(raw)))


def _patch_feature_name(path: Path, name: str) -> None:
    raw = name.encode()[:46]
    with open(path, "r+b") as f:
        head = f.read(4096)
        [(_, at, _length)] = [e for e in _extensions(head) if e[0] == FEATURE_TABLE_EXT]
        f.seek(at + 2)  # the first entry: type, bit, then 46 bytes of name
        f.write(raw + bytes(46 - len(raw)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, samples: Samples) -> dict[str, Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("hostile")
    out: dict[str, Path] = {}

    def make(key: str, name: str, *create: str) -> Path:
        _qemu("create", "-q", "-f", "qcow2", *create, name, "4M", cwd=d)
        out[key] = d / name
        return d / name

    # A backing name that does not exist, and one that does (so map and check follow it).
    make("missing-backing", "missing_backing.qcow2", "-u", "-b", HOSTILE + ".qcow2", "-F", "qcow2")
    base = make("base", HOSTILE_FILE + ".qcow2")
    _qemu("snapshot", "-c", HOSTILE, base.name, cwd=d)
    _qemu("bitmap", "--add", base.name, HOSTILE, cwd=d)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", base.name], cwd=d, check=True,
                   capture_output=True)
    make("overlay", "overlay.qcow2", "-b", base.name, "-F", "qcow2")
    for i, fmt in enumerate(FORMATS):
        p = make(f"format-{i}", f"format_{i}.qcow2", "-b", base.name, "-F", "qcow2")
        _patch_backing_format(p, fmt)
    make("data-file", "datafile.qcow2", "-o", f"data_file={HOSTILE_FILE}.data")
    p = make("feature", "feature.qcow2")
    _patch_feature_name(p, FEATURE)
    for name in ("[bold red]leaked.qcow2", HOSTILE_FILE + "leaked.qcow2"):
        shutil.copyfile(samples.path("leaked"), d / name)
        out[name] = d / name
    return out


def _commands() -> list[list[str]]:
    out: list[list[str]] = []
    for name in COMMANDS:
        out += [[name], [name, "--output=json"]]
    out += [["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"], ["map", "--table"],
            ["map", "--output=human"], ["diagnose", "--deep"], ["check", "-r", "leaks"]]
    return out


CONTROL = ("\x1b", "\x07", "\x9b", "\x9d")


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a))
def test_no_command_prints_an_escape_from_the_image(hostile: dict[str, Path], argv: list[str],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QINSPECT_DEBUG", raising=False)
    for key, path in hostile.items():
        monkeypatch.chdir(path.parent)  # relative names, as a user types them
        code = main([argv[0], path.name, *argv[1:]])
        cap = capsys.readouterr()
        where = f"{' '.join(argv)} on {key}"
        assert code in (0, 1, 2, 3), where
        for text in (cap.out, cap.err):
            assert not any(c in text for c in CONTROL), f"{where}: {text[:300]!r}"
        assert "Traceback" not in cap.err and "internal error" not in cap.err, f"{where}: {cap.err}"
        if "--output=json" in argv and cap.out:
            json.loads(cap.out)  # JSON escapes control characters itself


def test_json_keeps_the_exact_strings(hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(hostile["base"].parent)
    assert main(["info", "--output=json", hostile["missing-backing"].name]) == 0
    assert json.loads(capsys.readouterr().out)["backing-filename"] == HOSTILE + ".qcow2"
    assert main(["info", "--output=json", hostile["base"].name]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["filename"] == HOSTILE_FILE + ".qcow2"
    assert [s["name"] for s in info["snapshots"]] == [HOSTILE]
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == [HOSTILE]
    for i, fmt in enumerate(FORMATS):
        assert main(["info", "--output=json", hostile[f"format-{i}"].name]) == 0
        assert json.loads(capsys.readouterr().out)["backing-filename-format"] == fmt
    assert main(["info", "--output=json", hostile["data-file"].name]) == 0
    assert json.loads(capsys.readouterr().out)["format-specific"]["data"]["data-file"] == HOSTILE_FILE + ".data"


def test_human_output_shows_names_escaped(hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(hostile["base"].parent)
    assert main(["map", "--output=human", hostile["overlay"].name]) == 0
    out = capsys.readouterr().out
    shown = HOSTILE_FILE.replace("\\", "\\\\").replace("\x1b", "\\x1b").replace("\x07", "\\x07") \
        .replace("\x9b", "\\x9b").replace("\n", "\\n")
    assert out.splitlines()[1].endswith(shown + ".qcow2")  # qemu-img's File column, escaped
    assert main(["info", hostile["base"].name]) == 0
    out = capsys.readouterr().out
    assert "[link=http=||evil]x[|link][bold red]raw;id$(id)" in out  # markup shown, not applied


@pytest.mark.parametrize("i", range(len(FORMATS)))
def test_a_bad_backing_format_is_one_line(hostile: dict[str, Path], i: int, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(hostile["base"].parent)
    for cmd in ("map", "check"):
        assert main([cmd, hostile[f"format-{i}"].name]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qinspect: format_"), err


def test_a_file_named_like_markup_is_named_exactly(hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name = "[bold red]leaked.qcow2"
    monkeypatch.chdir(hostile[name].parent)
    assert main(["check", name]) == 3
    out = capsys.readouterr().out
    [fix] = [ln for ln in out.splitlines() if ln.startswith("Fix: ")]
    assert shlex.split(fix.removeprefix("Fix: ")) == ["qemu-img", "check", "-r", "leaks", name]
    assert main(["check", "-r", "all", name]) == 1
    err = capsys.readouterr().err
    assert shlex.split(err.split("run: ")[1]) == ["qemu-img", "check", "-r", "all", name]
    assert main(["info", name]) == 0
    assert name in capsys.readouterr().out
    # A name no quoting can carry (control characters): no command is printed, the reason is.
    hostile_name = HOSTILE_FILE + "leaked.qcow2"
    assert main(["check", hostile_name]) == 3
    out = capsys.readouterr().out
    assert "Fix: qemu-img check -r leaks on this file (its name cannot be pasted" in out


# -- every fix command survives the metacharacter test --------------------------------------------
# Every rule that prints a command (guest-freed needs a guest file system: tests/guest/test_guest_diagnose.py).
FIX_RULES = {"backing-duplicates", "bitmap-in-use", "compressed", "corrupt-bit", "corruption", "cow-amplification",
             "dirty", "fragmentation", "free-space", "invalid-subclusters", "l2-cache-coverage", "leaked-clusters",
             "long-chain", "narrow-refcount", "preallocated-unused", "scattered-metadata", "small-clusters",
             "snapshot-space", "truncated", "v2-no-zero", "zero-clusters"}


def test_every_fix_command_is_pasteable(samples: Samples, tmp_path: Path) -> None:
    """Each sample under a file name full of shell syntax (plus an overlay whose backing file has
    such a name), diagnosed with and without --deep: every printed fix (merged conversions
    included) parses under `bash -n`, gives back its argv word for word, and runs nothing."""
    from qinspect.analysis.diagnose import diagnose
    from qinspect.qcow2.errors import Qcow2Error
    from qinspect.qcow2.image import open_image

    work = tmp_path / "w"
    shutil.copytree(samples.dir, work)
    base = work / f"base {NASTY_NAME}"
    _qemu("create", "-q", "-f", "qcow2", str(base), "64M", cwd=work)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(base)], check=True, capture_output=True)
    over = work / "overlay.qcow2"
    _qemu("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(over), "64M", cwd=work)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", str(over)], check=True, capture_output=True)
    paths = [over, *sorted(p for p in work.glob("*.qcow2") if p != over)]
    seen: set[str] = set()
    for src in paths:
        p = src if src == over else work / (src.stem + NASTY_NAME)
        if p != src:
            shutil.copy(src, p)
        for deep in (False, True):
            try:
                with open_image(p) as img:
                    d = diagnose(img, deep=deep)
            except Qcow2Error:
                continue
            for f in d.findings:
                if f.fix is not None and f.fix.command is not None:
                    assert_pasteable(f.fix.command, work)
                    seen.add(f.id)
        if p != src:
            p.unlink()
    assert not (work / "PWNED").exists() and not (work / "PWNED2").exists()
    assert seen >= FIX_RULES, sorted(FIX_RULES - seen)
