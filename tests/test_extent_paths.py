"""The extent walk's fast paths give exactly the answers of the plain batch path and of qemu-img:
the sparse path (L2 tables out of host order, read in one sweep, only their non-zero entries
decoded) and the collapsed runs (entries that continue each other classified as one item).

Three ways: every sample image with each fast path forced (its thresholds lowered to nothing)
against the goldens and against the plain batch path (whole disk and random sub-ranges); scattered
4 KiB-cluster images made by qemu-io (plain, zero and compressed writes, discards, compat=0.10)
where the sparse path is taken on its own, against a live `qemu-img map` and `qemu-img convert`;
and the memory bound (too many non-zero entries: the batch path instead).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu, qemu_img_json

from qinspect.analysis.map import iter_map_runs, map_json
from qinspect.qcow2 import extents as qext
from qinspect.qcow2.constants import L1E_OFFSET_MASK
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, open_image


def _plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qext, "SPARSE_MIN_TABLES", 1 << 62)
    monkeypatch.setattr(qext, "COLLAPSE", False)


def _force(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "sparse":
        monkeypatch.setattr(qext, "SPARSE_MIN_TABLES", 0)
        monkeypatch.setattr(qext, "SPARSE_MIN_DESCENTS", 0)
        monkeypatch.setattr(qext, "SPARSE_CHUNK", 3)  # batch boundaries between any entries
    else:
        monkeypatch.setattr(qext, "SPARSE_MIN_TABLES", 1 << 62)
        monkeypatch.setattr(qext, "COLLAPSE", True)
        monkeypatch.setattr(qext, "COLLAPSE_MIN_ENTRIES", 0)
        monkeypatch.setattr(qext, "COLLAPSE_MAX_RUNS", 1.0)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count read_l2_nonzero calls that returned entries (the sparse path taken)."""
    calls: list[int] = []
    real = Image.read_l2_nonzero

    def spy(self: Image, l1_indices: Any, max_entries: int) -> Any:
        got = real(self, l1_indices, max_entries)
        if got is not None:
            calls.append(len(got[0]))
        return got

    monkeypatch.setattr(Image, "read_l2_nonzero", spy)
    return calls


def _runs(img: Image, start: int = 0, length: int | None = None) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for b in iter_map_runs(img, start=start, length=length):
        out.extend(zip(b.start.tolist(), b.length.tolist(), b.flags.tolist(), b.offset.tolist(),
                       b.depth.tolist(), strict=True))
    return out


def _extents(img: Image, start: int, end: int) -> list[tuple[int, ...]]:
    """Extents merged where the batch cuts fall (each path cuts at its own batch boundaries)."""
    out: list[list[int]] = []
    for ex in img.extents(start, end):
        for g, n, t, h, e in zip(ex.guest.tolist(), ex.length.tolist(), ex.sctype.tolist(), ex.host.tolist(),
                                 ex.error.tolist(), strict=True):
            if n == 0:
                continue
            if out and out[-1][2] == t and out[-1][0] + out[-1][1] == g and e == 0 and out[-1][4] == 0 and (
                    t not in qext.OFFSET_TYPES or out[-1][3] + out[-1][1] == h):
                out[-1][1] += n
            else:
                out.append([g, n, t, h, e])
    return [tuple(x) for x in out]


@pytest.fixture
def in_samples(samples: Samples, monkeypatch: pytest.MonkeyPatch) -> Samples:
    monkeypatch.chdir(samples.dir)
    return samples


@pytest.mark.parametrize("mode", ["sparse", "collapse"])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_forced_path_matches_batches_and_golden(in_samples: Samples, name: str, mode: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rel = in_samples.path(name).name
    _plain(monkeypatch)
    exp_path = in_samples.golden(name, "map.json")
    with open_image(rel) as img:
        try:
            img.require_openable()
            img.data_file()
            batch = _runs(img)
        except Qcow2Error as e:
            batch_err: str | None = str(e)
        else:
            batch_err = None
        rng = random.Random(name)
        size = img.virtual_size
        windows = [(rng.randrange(0, max(1, size)), rng.randrange(1, max(2, size // 3))) for _ in range(4)]
        batch_windows = [] if batch_err else [_runs(img, s, n) for s, n in windows]
        batch_ext = [] if batch_err else [_extents(img, s, min(size, s + n)) for s, n in windows]
    _force(monkeypatch, mode)
    with open_image(rel) as img:
        if batch_err is not None:
            with pytest.raises(Qcow2Error) as info:
                img.require_openable()
                img.data_file()
                _runs(img)
            assert str(info.value) == batch_err
            return
        assert _runs(img) == batch
        assert [_runs(img, s, n) for s, n in windows] == batch_windows
        assert [_extents(img, s, min(size, s + n)) for s, n in windows] == batch_ext
        if exp_path.exists() and exp_path.read_text().strip():
            got = map_json(img)
            for g in got:
                g.pop("compressed")
            assert got == json.loads(exp_path.read_text())


def _scattered(tmp_path: Path, name: str, create_opts: str, size: int, script: list[str]) -> Path:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, str(path), str(size)], check=True)
    # A compressed write over an allocated cluster fails in some QEMU versions: the image is then
    # what the other commands made of it (qemu-io's exit code says only that one failed).
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(path)], input="".join(script), text=True,
                   check=False, stdout=subprocess.DEVNULL)
    assert subprocess.run(["qemu-img", "check", "-q", str(path)], check=False).returncode == 0
    return path


def _script(rng: random.Random, size: int, writes: int, cs: int, compat_v2: bool) -> list[str]:
    out = []
    for i in range(writes):
        off = rng.randrange(0, size // cs) * cs
        kind = rng.random()
        if kind < 0.6:
            out.append(f"write -P {i % 255 + 1} {off} {rng.choice([512, cs, 3 * cs])}\n")
        elif kind < 0.75 and not compat_v2:
            out.append(f"write -z {off} {rng.choice([cs, 2 * cs])}\n")
        elif kind < 0.85:
            out.append(f"write -c -P {i % 255 + 1} {off} {cs}\n")
        elif kind < 0.95:
            out.append(f"discard {off} {rng.choice([cs, 4 * cs])}\n")
        else:
            out.append(f"write -P 0 {off} {cs}\n")
    return out


CASES = [
    ("plain-4k", "cluster_size=4096", 256 << 20, 900, False),
    ("v2-4k", "cluster_size=4096,compat=0.10", 256 << 20, 700, True),
    ("plain-8k", "cluster_size=8192", 1 << 30, 900, False),
    ("odd-size-4k", "cluster_size=4096", (200 << 20) + 12345 // 512 * 512, 700, False),
]


@needs_qemu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scattered_image_matches_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          case: tuple[str, str, int, int, bool]) -> None:
    name, opts, size, writes, v2 = case
    cs = int(opts.split("cluster_size=")[1].split(",")[0])
    path = _scattered(tmp_path, f"{name}.qcow2", opts, size, _script(random.Random(name), size, writes, cs, v2))
    calls = _spy(monkeypatch)
    with open_image(str(path)) as img:
        got = map_json(img)
    assert calls, "the sparse path was not taken"
    monkeypatch.setattr(qext, "SPARSE_CHUNK", 7)
    with open_image(str(path)) as img:
        assert map_json(img) == got  # cut into many batches: the same answer
    for g in got:
        g.pop("compressed")
    assert got == qemu_img_json("map", "--output=json", str(path), cwd=tmp_path)
    # Guest reads go through the same extents: the whole disk as qemu-img convert has it.
    raw = tmp_path / "raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    h = hashlib.sha256()
    with open_image(str(path)) as img:
        for off in range(0, img.virtual_size, 32 << 20):
            h.update(img.read(off, min(32 << 20, img.virtual_size - off)))
    assert h.hexdigest() == hashlib.sha256(raw.read_bytes()).hexdigest()


@needs_qemu
def test_too_many_entries_fall_back_to_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _scattered(tmp_path, "s.qcow2", "cluster_size=4096", 128 << 20,
                      _script(random.Random(7), 128 << 20, 500, 4096, False))
    with open_image(str(path)) as img:
        sparse = _runs(img)
        tables = np.flatnonzero(img.l1_table & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
        assert img.read_l2_nonzero(tables, 0) is None
        assert img.read_l2_nonzero(tables, 1 << 20) is not None
    monkeypatch.setattr(qext, "SPARSE_MAX_ENTRIES", 10)
    calls = _spy(monkeypatch)
    with open_image(str(path)) as img:
        assert _runs(img) == sparse
    assert not calls


@needs_qemu
@pytest.mark.parametrize("opts", ["preallocation=metadata", "preallocation=metadata,cluster_size=4096",
                                  "preallocation=falloc,cluster_size=8192"])
def test_preallocated_image_matches_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opts: str) -> None:
    size = (1 << 30) if "falloc" not in opts else (64 << 20)
    cs = int(opts.split("cluster_size=")[1]) if "cluster_size=" in opts else 65536
    script = _script(random.Random(opts), size, 200, cs, False)
    path = _scattered(tmp_path, "p.qcow2", opts, size, script)
    collapsed: list[int] = []
    real = qext._continued_runs

    def spy(*a: Any) -> Any:
        got = real(*a)
        if got is not None:
            collapsed.append(len(got))
        return got

    monkeypatch.setattr(qext, "_continued_runs", spy)
    with open_image(str(path)) as img:
        got = map_json(img)
    assert collapsed, "no batch was collapsed"
    for g in got:
        g.pop("compressed")
    assert got == qemu_img_json("map", "--output=json", str(path), cwd=tmp_path)
