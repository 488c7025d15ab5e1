"""Kinds, states and severities are enums, not strings, and no annotation says `Any` (issue 12).

A source scan holds the code to it: no field or parameter named like a kind, a state or a severity
is annotated `str`, and `typing.Any` appears nowhere in qinspect/. Then the enums themselves, on
real sample images: every reference the layout makes is a `ReferenceKind`, every check message a
`MessageKind`, problems and findings share one `Severity`, and the lock state is an `InUse`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import Samples

from qinspect.analysis.check import CheckMessage, MessageKind, TableBlock, check_image
from qinspect.analysis.diagnose import diagnose
from qinspect.analysis.findings import model as findings_model
from qinspect.analysis.layout import ReferenceKind, compute_layout
from qinspect.qcow2 import errors
from qinspect.qcow2.hostfile import InUse
from qinspect.qcow2.image import open_image
from qinspect.tui.palette import KIND_COLOURS, ColourKind, kind_key
from qinspect.tui.structs import TableModel, model_for

SOURCE = Path(__file__).resolve().parent.parent / "qinspect"
WORDS = ("kind", "state", "severity")


def _named_like_a_word(name: str) -> bool:
    return any(name == w or name.endswith("_" + w) for w in WORDS)


def _says_str(annotation: ast.expr) -> bool:
    """True when an annotation is `str` or a union/optional holding `str` ("str | None", ...)."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a quoted annotation
        return _says_str(ast.parse(annotation.value, mode="eval").body)
    return any(isinstance(n, ast.Name) and n.id == "str" for n in ast.walk(annotation))


def _sources() -> list[Path]:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 50  # (the scan looks at the package, not at nothing)
    return files


def test_no_kind_state_or_severity_is_annotated_str() -> None:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.arg) and node.annotation is not None:
                name, ann = node.arg, node.annotation
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name | ast.Attribute):
                name = node.target.id if isinstance(node.target, ast.Name) else node.target.attr
                ann = node.annotation
            else:
                continue
            if _named_like_a_word(name) and _says_str(ann):
                found.append(f"{path.relative_to(SOURCE.parent)}:{node.lineno}: {name}: {ast.unparse(ann)}")
    assert not found, "\n".join(found)


def test_no_class_names_its_kind_with_a_string() -> None:
    """A class attribute `kind = "l2"` (the structure models' palette kinds were) is a string too."""
    found = []
    for path in _sources():
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in cls.body:
                value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                    node, ast.AnnAssign) else []
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if (any(_named_like_a_word(n) for n in names) and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)):
                    found.append(f"{path.relative_to(SOURCE.parent)}:{node.lineno}: {names[0]} = {value.value!r}")
    assert not found, "\n".join(found)


def test_the_scan_sees_a_str_kind() -> None:
    """The scan above would fail on the strings main had (it is not vacuous)."""
    tree = ast.parse("def f(kind: str, state: str | None = None) -> None: ...\nclass R:\n    severity: 'str'\n")
    args = [a for a in ast.walk(tree) if isinstance(a, ast.arg)]
    assert all(_says_str(a.annotation) for a in args if a.annotation is not None) and len(args) == 2
    fields = [n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)]
    assert _says_str(fields[0].annotation)
    assert not _says_str(ast.parse("ReferenceKind | None", mode="eval").body)


def test_no_any_in_qinspect() -> None:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Name) and node.id == "Any") or (
                    isinstance(node, ast.Attribute) and node.attr == "Any") or (
                    isinstance(node, ast.alias) and node.name == "Any"):
                found.append(f"{path.relative_to(SOURCE.parent)}:{getattr(node, 'lineno', '?')}")
    assert not found, found


def test_every_reference_is_a_reference_kind(samples: Samples) -> None:
    """Snapshots, bitmaps and LUKS between them make every kind of reference; each is a member,
    and `layout --offset --output=json` prints the same words as before (the members' values)."""
    seen: set[ReferenceKind] = set()
    for name in ("snapshots", "bitmaps", "luks"):
        with open_image(samples.path(name)) as img:
            lay = compute_layout(img)
            for cl in range(lay.nb_clusters):
                for r in lay.iter_references(cl * lay.cluster_size):
                    assert type(r.kind) is ReferenceKind, r
                    seen.add(r.kind)
    assert seen == set(ReferenceKind)
    assert json.dumps([ReferenceKind.L1_ENTRY, ReferenceKind.HEADER_FIELD]) == '["l1-entry", "header-field"]'
    assert [k.label for k in (ReferenceKind.L2_ENTRY, ReferenceKind.REFCOUNT_TABLE_ENTRY)] == [
        "L2 entry", "refcount table entry"]


@pytest.mark.parametrize("name", ["leaked", "refcount_corrupt", "fid_snap_past_eof", "fid_many_messages"])
def test_check_messages_are_message_kinds(samples: Samples, name: str) -> None:
    with open_image(samples.path(name)) as img:
        res = check_image(img)
    assert res.messages, name
    for m in res.messages:
        assert isinstance(m, CheckMessage | TableBlock)
        assert type(m.kind) is MessageKind, m
    kinds = {m.kind for m in res.messages}
    if res.leaks:
        assert MessageKind.LEAK in kinds
    if res.corruptions:
        assert MessageKind.ERROR in kinds


def test_report_lines_carry_the_program_name() -> None:
    """The kind decides the prefix, as it did when it was a string."""
    assert list(CheckMessage(MessageKind.REPORT, "ERROR x").lines("qemu-img")) == ["qemu-img: ERROR x"]
    assert list(CheckMessage(MessageKind.ERROR, "ERROR x").lines("qemu-img")) == ["ERROR x"]


def test_one_severity_vocabulary(samples: Samples) -> None:
    assert findings_model.Severity is errors.Severity
    assert [s.value for s in errors.Severity] == ["error", "warning", "info"]
    assert [s.rank for s in errors.Severity] == [0, 1, 2]
    with open_image(samples.path("leaked")) as img:
        d = diagnose(img)
        assert img.file.lock_state() is InUse.NO
    assert d.findings and all(type(f.severity) is errors.Severity for f in d.findings)
    assert d.in_use is InUse.NO and d.to_json()["in-use"] is None
    with open_image(samples.path("corrupt_bit")) as img:  # (the corrupt bit: an image problem)
        assert img.problems and all(type(p.severity) is errors.Severity for p in img.problems)


def test_in_use_json_words() -> None:
    assert [s.to_json() for s in InUse] == [None, "read", "write"]


def test_structure_models_and_palette_kinds_are_colour_kinds(samples: Samples) -> None:
    from qinspect.tui.structs import StructKind, StructRef

    assert set(KIND_COLOURS) == set(ColourKind)
    assert kind_key("L2_TABLE") is ColourKind.L2 and kind_key("refcount block") is ColourKind.REFCOUNT_BLOCK
    assert kind_key("no such thing") is ColourKind.UNKNOWN
    with open_image(samples.path("snapshots")) as img:
        for k in (StructKind.HEADER, StructKind.L1, StructKind.REFCOUNT_TABLE, StructKind.SNAPSHOT_TABLE):
            m = model_for(img, StructRef(k))
            assert isinstance(m, TableModel) and type(m.kind) is ColourKind, (k, m.kind)
        assert model_for(img, StructRef(StructKind.SNAPSHOT_L1, owner=0)).kind is ColourKind.SNAPSHOT_L1
