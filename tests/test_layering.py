"""The parser and the analyses are a library: importing them never imports Textual or Rich."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import qinspect.analysis
import qinspect.qcow2


def _modules(pkg: object) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]  # type: ignore[attr-defined]


def test_core_does_not_import_ui_toolkits() -> None:
    mods = _modules(qinspect.qcow2) + _modules(qinspect.analysis)
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"qcow2/analysis pulled in: {out}"


def test_cli_commands_do_not_import_textual() -> None:
    code = (
        "import sys\n"
        "from qinspect.cli import build_parser\n"
        "build_parser()\n"
        "import qinspect.cli.core_cmds\n"
        "print('textual' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
