"""TUI test helpers: images made with qemu-img/qemu-io, app runners, and the snapshot location.

Snapshot SVGs live in tests/__snapshots__/<test module>/ (not next to this directory), so the
single snapshot directory of the repository holds them all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from pytest_textual_snapshot import SVGImageExtension
except ImportError:  # pragma: no cover - the plugin is a test dependency
    SVGImageExtension = None

SNAPSHOT_ROOT = Path(__file__).resolve().parent.parent / "__snapshots__"

if SVGImageExtension is not None:

    def _dirname(cls: type, *, test_location: object) -> str:
        return str(SNAPSHOT_ROOT / test_location.basename)  # type: ignore[attr-defined]

    SVGImageExtension.dirname = classmethod(_dirname)


needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")


def make_image(path: Path, size: str, opts: str = "", writes: tuple[str, ...] = (), backing: str | None = None) -> Path:
    """qemu-img create (+ qemu-io writes), non-sparse enough for the tests."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", opts]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    cmd += [str(path), size]
    subprocess.run(cmd, check=True, cwd=path.parent)
    if writes:
        args = ["qemu-io", "-f", "qcow2"]
        for w in writes:
            args += ["-c", w]
        subprocess.run([*args, str(path)], check=True, capture_output=True, cwd=path.parent)
    return path


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A few images made here (independent of the sample corpus)."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("made")
    out: dict[str, Path] = {}
    out["ext"] = make_image(d / "ext.qcow2", "64M", "extended_l2=on,cluster_size=128k",
                            ("write -P 0xab 0 4k", "write -z 1M 64k", "write -P 0xcd 2M 256k", "write -z 2M 4k"))
    out["many"] = make_image(d / "many.qcow2", "1G", "cluster_size=4k,preallocation=metadata")
    base = make_image(d / "base.qcow2", "8M", "", ("write -P 0x11 0 1M",))
    out["orphan"] = make_image(d / "orphan.qcow2", "8M", "", ("write -P 0x22 4M 64k",), backing=base.name)
    base.unlink()
    notq = d / "raw.img"
    notq.write_bytes(b"\0" * 65536)
    out["raw"] = notq
    yield out
