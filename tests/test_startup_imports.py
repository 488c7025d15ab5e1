"""The JSON commands start fast: they import neither Textual nor Rich, nor the analysis commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SAMPLES, Samples

IMAGE = SAMPLES / "basic64k.qcow2"


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_json_commands_import_no_ui(command: str) -> None:
    code = (
        "import io, sys, contextlib\n"
        "from qinspect.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main([{command!r}, '--output=json', sys.argv[1]])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'rich'})\n"
        "extra = sorted(m for m in sys.modules if m.startswith('qinspect.cli.analysis_cmds'))\n"
        "print(rc, heavy, extra)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(IMAGE)], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[-2] == "0 [] []", r.stdout + r.stderr


def _modules_after(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    """Run `qinspect ARGS` in a fresh interpreter; its exit code and the top-level packages it loaded
    (beyond what the interpreter's own start-up loaded: a `.pth` file may import typing itself)."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"  # what the interpreter's start-up (site, .pth files) loaded
        "import io, contextlib\n"
        "from qinspect.cli import main\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "    try:\n"
        "        rc = main(sys.argv[1:])\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "print(rc)\n"
        "print(','.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('qinspect'))))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                       env={**clean, **(env or {})})
    rc, tops, ours = r.stdout.strip().split("\n")[-3:]
    return int(rc), set(tops.split(",")), ours


SLOW_TO_IMPORT = {"numpy", "rich", "textual", "inspect", "dataclasses", "typing", "difflib"}
"""Modules the small commands must not import: numpy and the UI toolkits, `dataclasses` (which
imports `inspect`, ~5 ms), `typing` (~3 ms: the metadata records are `__slots__` classes, not
NamedTuples) and `difflib` (only for "did you mean")."""


@pytest.mark.parametrize("args", [
    ["info", "--output=json", str(IMAGE)],
    ["info", "--output=json", "--backing-chain", str(IMAGE)],
    ["info", str(IMAGE)],
    ["info", "--backing-chain", str(IMAGE)],
    ["info", "--output=human", "{snapshots}"],
    ["info", "--output=json", "{snapshots}"],
    ["info", "--backing-chain", "{chain_top}"],
    ["--help"],
    ["info", "--help"],
    ["diagnose", "--help"],
    ["info", "/nonexistent/image.qcow2"],
    ["check", "/nonexistent/image.qcow2"],
    ["map", "--output=json", str(IMAGE) + ".missing"],
    ["check", str(SAMPLES / "README.md")],
    ["/nonexistent/image.qcow2"],
], ids=lambda a: " ".join(a).replace(str(IMAGE), "IMAGE"))
def test_info_help_and_errors_import_no_numpy_nor_rich(args: list[str], samples: Samples) -> None:
    """`info` (JSON and human output off a terminal), `--help` and the error paths: none of the
    slow imports, and only the metadata opened."""
    rc, tops, ours = _modules_after([str(samples.path(a[1:-1])) if a.startswith("{") else a for a in args])
    assert rc in (0, 1), rc
    assert not tops & SLOW_TO_IMPORT, sorted(tops & SLOW_TO_IMPORT)
    assert "qinspect.qcow2.image" not in ours.split(","), ours  # only the metadata was opened


def test_small_map_imports_no_thread_pool_nor_masked_arrays() -> None:
    """A small image's map reads in the calling thread (no concurrent.futures, which brings logging)
    and the walk avoids np.unique (which imports numpy.ma): a few milliseconds of each start."""
    code = (
        "import io, sys, contextlib\n"
        "from qinspect.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['map', '--output=json', sys.argv[1]])\n"
        "print(rc, sorted(m for m in ('concurrent.futures', 'logging', 'numpy.ma') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(IMAGE)], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[-2] == "0 []", r.stdout + r.stderr


def test_human_check_off_a_terminal_imports_no_rich() -> None:
    """Human `check` prints plain lines; off a terminal it writes them without Rich (as Rich would)."""
    rc, tops, _ours = _modules_after(["check", str(IMAGE)])
    assert rc == 0
    assert "rich" not in tops


def test_human_info_on_a_terminal_imports_rich_but_not_numpy() -> None:
    """On a terminal (Rich's TTY_COMPATIBLE=1 rule stands in for one) human `info` draws Rich's
    tables, and still reads no table needing numpy."""
    rc, tops, _ours = _modules_after(["info", str(IMAGE)], env={"TTY_COMPATIBLE": "1"})
    assert rc == 0
    assert "rich" in tops
    assert "numpy" not in tops


def test_human_info_off_a_terminal_is_rich_s_output(samples: Samples) -> None:
    """Off a terminal the tables are written without Rich, byte for byte as Rich writes them
    there: the same command run with the plain writer turned off (so that every table goes to
    Rich, as one the writer declines does) prints the same bytes."""
    code = (
        "import io, sys, contextlib\n"
        "from qinspect.cli import main, render\n"
        "if sys.argv[1] == 'rich':\n"
        "    render.plain_lines = lambda t, width=render.PIPE_WIDTH: None\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    rc = main(sys.argv[2:])\n"
        "sys.stdout.write(out.getvalue())\n"
        "print(rc, 'rich' in sys.modules)\n"
    )
    for image in (IMAGE, samples.path("snapshots"), samples.path("bitmaps"), samples.path("chain_top")):
        outs = []
        for how in ("plain", "rich"):
            r = subprocess.run([sys.executable, "-c", code, how, "info", "--backing-chain", str(image)],
                               capture_output=True, text=True, check=True)
            outs.append(r.stdout)
        assert outs[0].endswith("0 False\n") and outs[1].endswith("0 True\n"), outs
        assert outs[0].removesuffix("0 False\n") == outs[1].removesuffix("0 True\n")
        assert "| value" in outs[0]


def test_startup_bench_runs() -> None:
    """bench/startup.py runs end to end (one round; no timing is asserted)."""
    root = SAMPLES.parent
    r = subprocess.run([sys.executable, str(root / "bench" / "startup.py"), "--rounds", "1"], capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("`python -c pass`", "`info --output=json`", "`--help`", "`check --output=json`"):
        assert f"| {row} |" in r.stdout, r.stdout


@pytest.mark.parametrize("preset", [None, "4"])
def test_console_script_asks_openblas_for_one_thread(preset: str | None) -> None:
    # qinspect does no linear algebra: the console script keeps numpy's OpenBLAS from starting a
    # spinning thread per core, before anything imports numpy; a user's own setting is kept.
    code = (
        "import os, sys\n"
        "from qinspect import cli\n"
        "cli.main = lambda argv: print(os.environ.get('OPENBLAS_NUM_THREADS'), 'numpy' in sys.modules) or 0\n"
        "sys.argv = ['qinspect', 'info', 'x']\n"
        "cli.run()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert r.stdout.split() == [preset or "1", "False"]
