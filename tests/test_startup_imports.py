"""The JSON commands start fast: they import neither Textual nor Rich, nor the analysis commands."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import SAMPLES

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
