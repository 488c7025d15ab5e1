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


@needs_qemu
def test_bench_engine_table_runs(tmp_path: Path) -> None:
    # The engine table's three states (cold from a settled state, cold after idling, warm), with a
    # floor for each cold state and the targets' verdicts, on tiny images.
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--engine", "--small", "--runs", "1",
                        "--idle-seconds", "0.05", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for cache in ("cold", "idle", "warm"):
        assert f"| scatter-4k-small | check | {cache} |" in r.stdout
        assert f"| prealloc-small | map | {cache} |" in r.stdout
    assert "MISMATCH" not in r.stdout
