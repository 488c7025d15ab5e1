"""bench/amplify.py runs end to end on tiny attack images and prints its table (timing is the
benchmark's business; here the bounds are generous by construction, so the run must pass)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, needs_qemu


@needs_qemu
def test_bench_amplify_small(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "amplify.py"), "--small", "--runs", "1",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| image | command | qemu-img s |" in r.stdout
    for name in ("shared_l2", "shared_snapshots", "snapshot_l1_copies", "alternating_extents", "shared_bitmap_tables"):
        for command in ("info", "map-json", "check-json", "layout", "diagnose", "diagnose-json", "map"):
            assert f"| {name} | {command} |" in r.stdout, (name, command)
    assert "all 35 cells within their bounds" in r.stdout
