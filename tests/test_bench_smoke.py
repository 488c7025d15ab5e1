"""bench/run.py runs end to end on tiny images and prints its tables (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, needs_qemu


@needs_qemu
def test_bench_small_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--small", "--runs", "1",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| image | command | qemu-img s | qinspect s | ratio |" in r.stdout
    assert "| prealloc-small | check |" in r.stdout
    assert "| prealloc-small | map |" in r.stdout
    assert "MISMATCH" not in r.stdout
