"""bench/map_human.py runs and finds qinspect's human map identical to qemu-img's (small images).

The timings and their targets (ratio <= 2 on 100k ranges, first row < 1 s) are the benchmark's,
run on the full-size images by hand: a timed test on a shared CI machine would measure the load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None
                    or not Path("/usr/bin/time").exists(), reason="needs qemu-img, qemu-io and GNU time")
def test_map_human_benchmark_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "map_human.py"), "--small", "--runs", "1",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ranges-") or ln.startswith("| alternating-")]
    assert len(rows) == 2 and all(ln.rstrip().endswith("| yes |") for ln in rows), r.stdout
