"""The guest sample images (sample_images/guest/build.py), built once per session in a temp dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "sample_images" / "guest" / "build.py"


class GuestSamples:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: list[dict[str, Any]] = json.loads((root / "manifest.json").read_text())

    def entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.manifest if e["name"] == name)

    def has(self, name: str) -> bool:
        return any(e["name"] == name for e in self.manifest)

    def image(self, name: str) -> Path:
        return self.root / self.entry(name)["file"]

    def part_file(self, name: str, index: int) -> Path:
        p = next(p for p in self.entry(name)["partitions"] if p["index"] == index)
        return self.root / p["file"]


@pytest.fixture(scope="session")
def guest_samples(tmp_path_factory: pytest.TempPathFactory) -> GuestSamples:
    root = tmp_path_factory.mktemp("guest-samples")
    subprocess.run([sys.executable, str(BUILD), str(root)], check=True, capture_output=True)
    return GuestSamples(root)
