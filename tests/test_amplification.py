"""Work bounded by what is distinct: the sharing attacks of tests/fuzz/amplify.py, each command
in a child process, its peak RSS held to the budget (2x the metadata + 150 MiB, whatever the
image claims), no traceback, an answer within the timeout. The times themselves are measured
in the benchmark (bench/run.py); small versions are compared with qemu-img's answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fuzz.amplify import GENERATORS

MiB = 1 << 20
TIMEOUT = 120  # a hang guard on a loaded 2-core machine, not a speed target
GNU_TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io")

# (generator, scale): counts as the attacks have them, except where the answer itself is tens of
# millions of lines (check of a table named by 2 Mi entries prints ~20 M lines; the full scale is
# in the benchmark).
CASES = {
    "shared_l2": 1.0,
    "shared_snapshots": 1.0,
    "snapshot_l1_copies": 1.0,
    "alternating_extents": 1.0,
    "shared_bitmap_tables": 1.0,
}
COMMANDS = [("info", "--output=json"), ("map", "--output=json"), ("check", "--output=json"), ("layout",),
            ("diagnose", "--output=json"), ("diagnose",)]
# Answers that are huge by nature at full scale: run at a scale where they stay seconds.
SMALLER = {("shared_l2", "check"): 0.05}


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, float], Path]:
    tmp = Path(tempfile.mkdtemp(prefix="qinspect-amplify-"))
    out: dict[tuple[str, float], Path] = {}
    scales = {(g, s) for g, s in CASES.items()} | {(g, s) for (g, _c), s in SMALLER.items()}
    for g, s in sorted(scales):
        d = tmp / f"{g}-{s}"
        d.mkdir()
        out[(g, s)] = GENERATORS[g](d, s)
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


def _run(args: list[str]) -> tuple[int, int, str]:
    """(exit code, peak RSS in KiB, stderr's first 4 KiB) of `qinspect args` in its own process."""
    cmd = [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())", *args]
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss, tempfile.TemporaryFile() as err:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        try:
            rc = p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            pytest.fail(f"qinspect {' '.join(args)}: no answer within {TIMEOUT} s")
        text = Path(rss.name).read_text().split() if GNU_TIME else []
        peak = int(text[-1]) if text and text[-1].isdigit() else 0
        err.seek(0)
        return rc, peak, err.read(4096).decode(errors="replace")


PAIRS = [pytest.param(g, c, id=f"{g}-{c[0]}{'-json' if '--output=json' in c else ''}") for g in CASES for c in COMMANDS]


@pytest.mark.parametrize(("gen", "command"), PAIRS)
def test_attack_is_bounded(images: dict[tuple[str, float], Path], gen: str, command: tuple[str, ...]) -> None:
    scale = SMALLER.get((gen, command[0]), CASES[gen])
    path = images[(gen, scale)]
    rc, peak_kb, err = _run([*command, str(path)])
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc in (0, 1, 2, 3), (rc, err)
    # Every byte of these files is metadata or a few data clusters: the file size bounds the metadata.
    budget_kb = (2 * path.stat().st_size + 150 * MiB) // 1024
    if GNU_TIME:
        assert 0 < peak_kb <= budget_kb, f"peak RSS {peak_kb} KiB > budget {budget_kb} KiB"


def _qemu(*args: str) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False, timeout=TIMEOUT)
    return r.returncode, r.stdout


def _qinspect(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())",
                        *args], capture_output=True, text=True, check=False, timeout=TIMEOUT)
    return r.returncode, r.stdout


@pytest.mark.parametrize("gen", ["shared_l2", "snapshot_l1_copies", "alternating_extents"])
def test_shared_counts_are_qemus(tmp_path: Path, gen: str) -> None:
    """Counting each distinct table once, weighted by its references, gives qemu-img's answers."""
    path = GENERATORS[gen](tmp_path, 0.001 if gen == "shared_l2" else 0.05)
    q_rc, q_out = _qemu("check", "--output=json", str(path))
    i_rc, i_out = _qinspect("check", "--output=json", str(path))
    mine = json.loads(i_out)
    mine.pop("in-use", None)  # qinspect's extra key
    assert (i_rc, mine) == (q_rc, json.loads(q_out))
    q_rc, q_map = _qemu("map", "--output=json", str(path))
    i_rc, i_map = _qinspect("map", "--output=json", str(path))
    assert i_rc == q_rc
    assert i_map.replace(', "compressed": false', "") == q_map


@pytest.mark.parametrize("output", [(), ("--output=json",)], ids=["human", "json"])
def test_reverse_lookup_of_a_shared_table_is_bounded(tmp_path: Path, output: tuple[str, ...]) -> None:
    """`layout --offset` on the L2 table that every L1 entry names, and on a data cluster it maps:
    each has one reference per L1 entry (512 Ki at this scale). The JSON lists them all, streamed;
    the human table shows the first rows and counts the rest; memory stays within the budget."""
    from qinspect.qcow2 import constants as C
    from qinspect.qcow2.image import open_image

    path = GENERATORS["shared_l2"](tmp_path, 0.25)
    with open_image(path) as img:
        nz = img.l1_table[img.l1_table != 0]
        table = int(nz[0]) & C.L1E_OFFSET_MASK
        entries = len(nz)
    rc, out = _qinspect("map", "--output=json", str(path))
    data = next(e["offset"] for e in json.loads(out) if e.get("data"))
    budget_kb = (2 * path.stat().st_size + 150 * MiB) // 1024
    for offset in (table, data):
        rc, peak_kb, err = _run(["layout", "--offset", hex(offset), *output, str(path)])
        assert rc == 0 and "Traceback" not in err, err
        if GNU_TIME:
            assert 0 < peak_kb <= budget_kb, f"peak RSS {peak_kb} KiB > budget {budget_kb} KiB"
    rc, out = _qinspect("layout", "--offset", hex(table), *output, str(path))
    if output:
        refs = json.loads(out)["references"]
        assert len(refs) == entries and {r["kind"] for r in refs} == {"l1-entry"}
        assert [r["entry-index"] for r in refs] == sorted(r["entry-index"] for r in refs)
    else:
        assert f"... and {entries - 500} more references (--output=json lists them all)" in out
