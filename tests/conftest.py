"""Shared fixtures: the sample images (decompressed into a session temp dir) and qemu-img access.

Sample images live in `sample_images/` (plain, or gzip'd when large); `catalog.json` there lists
them. The `samples` fixture materialises every image (non-sparse, exactly as committed) in one
temp directory so relative backing and data-file names resolve, and hands out paths by name.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"
GOLDEN = SAMPLES / "golden"


def load_catalog() -> list[dict[str, Any]]:
    """`catalog.json` plus `catalog.d/*.json` (one file per topic), in that order."""
    paths = [SAMPLES / "catalog.json", *sorted((SAMPLES / "catalog.d").glob("*.json"))]
    out: list[dict[str, Any]] = []
    for path in paths:
        if path.exists():
            out.extend(json.loads(path.read_text()))
    return out


CATALOG = load_catalog()
SAMPLE_NAMES = [e["name"] for e in CATALOG]


@dataclass
class Samples:
    """The materialised sample images: `path(name)` gives an image file's path."""

    dir: Path
    catalog: list[dict[str, Any]]

    def entry(self, name: str) -> dict[str, Any]:
        for e in self.catalog:
            if e["name"] == name:
                return e
        raise KeyError(name)

    def path(self, name: str) -> Path:
        file = self.entry(name)["file"]
        return self.dir / (file[:-3] if file.endswith(".gz") else file)

    def golden(self, name: str, kind: str) -> Path:
        return GOLDEN / f"{name}.{kind}"


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    out = tmp_path_factory.mktemp("samples")
    for f in SAMPLES.iterdir():
        if f.is_dir() or f.suffix in (".sh", ".md", ".json", ".py"):
            continue
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as src, open(out / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(f, out / f.name)
    return Samples(out, CATALOG)


def qemu_img_available() -> bool:
    return shutil.which("qemu-img") is not None


needs_qemu = pytest.mark.skipif(not qemu_img_available(), reason="qemu-img not installed")


def qemu_img_json(*args: str, cwd: Path) -> Any:
    r = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return json.loads(r.stdout) if r.stdout.strip() else None
