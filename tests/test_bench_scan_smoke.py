"""bench/scan.py runs end to end on a few images and prints its tables (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, needs_qemu


@needs_qemu
def test_bench_scan_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scan.py"), "--images", "12", "--runs", "1",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| qemu-img check loop |" in r.stdout and "| qinspect scan |" in r.stdout
    assert "| 12 images, --jobs 2 |" in r.stdout
