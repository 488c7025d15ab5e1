"""The parser's public face: `qinspect.qcow2` exports what other layers use, and nothing reaches
past it into a module's `_private` names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES

import qinspect.qcow2 as q

PKG = Path(q.__file__).resolve().parent.parent


def test_every_export_resolves() -> None:
    for name in q.__all__:
        assert getattr(q, name) is not None, name
    with pytest.raises(AttributeError):
        q.no_such_name  # noqa: B018


def test_metadata_path_imports_no_numpy() -> None:
    code = ("import sys, qinspect.qcow2 as q\n"
            "m = q.open_meta(sys.argv[1]); m.chain(); m.bitmaps; m.luks; m.close()\n"
            "q.fields, q.constants, q.Qcow2Error, q.Header\n"
            "print('numpy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "basic64k.qcow2")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


def test_public_readers() -> None:
    with q.open_image(SAMPLES / "basic64k.qcow2") as img:
        h = img.header
        l1 = img.read_table(h.l1_table_offset, h.l1_size)
        assert np.array_equal(l1, img.l1_table)
        offs = (l1 & np.uint64(q.constants.L1E_OFFSET_MASK)).astype(np.int64)
        offs = offs[offs != 0]
        words = img.read_l2_tables(offs[::-1].copy())  # any order: one table per offset, as given
        first, _ = img.read_l2_table(int(offs[-1]))
        assert np.array_equal(words[: h.l2_size], first)
        batch, bitmaps, unaligned = img.read_l2_batch(0, 1)
        assert bitmaps is None and not unaligned.any()
        assert np.array_equal(batch, img.read_l2_table(int(offs[0]))[0])
        assert len(img.read_entries(img.file.size - 16, 100)) == 2  # cut by the end of the file


def test_snapshot_l1_tables(tmp_path: Path) -> None:
    import shutil

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    path = tmp_path / "s.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", str(path)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "one", str(path)], check=True)
    with q.open_image(path) as img:
        sn = img.snapshots[0]
        l1 = img.snapshot_l1_table(0)
        assert len(l1) == sn.l1_size
        assert np.array_equal(l1, img.read_table(sn.l1_table_offset, sn.l1_size))
        assert np.array_equal(img.snapshot_l1_table(0, pad=True), l1)
        assert int(l1[0]) & q.constants.L1E_OFFSET_MASK == int(img.l1_table[0]) & q.constants.L1E_OFFSET_MASK


class _PrivateUses(ast.NodeVisitor):
    """`x._name` where x is not self/cls/super(), and `from qinspect... import _name`."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str]] = []

    def visit_Attribute(self, node: ast.Attribute) -> None:
        a = node.attr
        if a.startswith("_") and not (a.startswith("__") and a.endswith("__")):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in ("self", "cls")
            sup = isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super"
            if not own and not sup:
                self.found.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").startswith("qinspect"):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name not in ("__version__",):
                    self.found.append((node.lineno, f"from {node.module} import {alias.name}"))
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                self.found.append((node.lineno, f"from {node.module} import ..."))


def test_no_private_names_used_from_outside() -> None:
    bad = []
    for path in sorted((PKG / "qinspect").rglob("*.py")):
        v = _PrivateUses()
        v.visit(ast.parse(path.read_text(), str(path)))
        bad += [f"{path.relative_to(PKG)}:{line}: {text}" for line, text in v.found]
    assert bad == [], "\n".join(bad)
