"""The layering contracts of pyproject.toml ([tool.importlinter]) hold, and they can fail.

`lint-imports` checks the import graph statically (every import, also those inside functions and
under TYPE_CHECKING); tests/test_layering.py checks what importing the modules really loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_contracts_are_kept() -> None:
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("qinspect/qcow2/l2.py", "import textual", "qcow2 imports nothing above it"),
    ("qinspect/qcow2/header.py", "from qinspect.analysis import info", "Layers import downward only"),
    ("qinspect/analysis/info.py", "from qinspect.cli import render", "Layers import downward only"),
    ("qinspect/tui/session.py", "import textual.app", "headless state"),
    ("qinspect/units.py", "from qinspect.qcow2 import constants", "are leaves"),
])
def test_a_violation_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """Each contract catches the import it forbids (run on a copy of the package with one import added)."""
    shutil.copytree(ROOT / "qinspect", tmp_path / "qinspect", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "Broken contracts" in r.stdout, r.stdout + r.stderr
    broken = r.stdout.split("Broken contracts", 1)[1]
    assert contract in broken, r.stdout


def test_no_import_cycles_below_the_tui() -> None:
    """No module of qcow2, guest, analysis or cli imports, even indirectly, a module that imports it
    (deep<->space and extents<->image were such cycles). The TUI's screens are left to the TUI."""
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("qinspect", exclude_type_checking_imports=False)
    cycles = set()
    for m in g.modules:
        if m.startswith("qinspect.tui"):
            continue
        for n in g.find_modules_directly_imported_by(m):
            if n != m and g.chain_exists(importer=n, imported=m, as_packages=False):
                cycles.add(tuple(sorted((m, n))))
    assert not cycles, sorted(cycles)
