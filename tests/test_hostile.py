"""Hostile images from issue #6, one by one: each is reported as a problem, never a crash or a hang.

Every case builds a hostile image from a sample, opens it with the library and runs what an
inspector runs (problems, info, map, check, layout, reads). Each step must return or raise a
`Qcow2Error`, the rest of the image must stay inspectable where the damage allows, and no step may
allocate in proportion to a size claimed by the file (`tracemalloc` peak, bounded generously).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Samples

from qinspect.analysis.check import CheckResult, check_image
from qinspect.analysis.info import chain_info, image_info
from qinspect.analysis.map import iter_map
from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Qcow2Error
from qinspect.qcow2.image import Image, open_image

MEMORY_BOUND = 256 << 20


@contextmanager
def bounded_memory(bound: int = MEMORY_BOUND) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, f"peak allocation {peak >> 20} MiB"


def hostile(samples: Samples, tmp_path: Path, name: str, *patches: tuple[int, bytes], size: int | None = None) -> Path:
    out = tmp_path / f"{name}.qcow2"
    src = samples.path(name)
    for f in samples.dir.iterdir():  # backing files resolve next to it
        if f.name != out.name and not (tmp_path / f.name).exists():
            (tmp_path / f.name).symlink_to(f)
    shutil.copyfile(src, out)
    with open(out, "r+b") as f:
        for off, data in patches:
            f.seek(off)
            f.write(data)
        if size is not None:
            f.truncate(size)
    return out


def u32(off: int, v: int) -> tuple[int, bytes]:
    return off, struct.pack(">I", v)


def u64(off: int, v: int) -> tuple[int, bytes]:
    return off, struct.pack(">Q", v)


def attempt(fn: Callable[[], object]) -> object:
    """The result, or the Qcow2Error (never anything else)."""
    try:
        return fn()
    except Qcow2Error as e:
        assert str(e).strip()
        return e


def inspect_all(path: Path) -> tuple[Image, dict[str, object]]:
    """Open and run every analysis; returns the (closed) image and each step's result or error."""
    out: dict[str, object] = {}
    with bounded_memory():
        img = open_image(path)
        with img:
            out["info"] = attempt(lambda: json.dumps(image_info(img)))
            out["chain"] = attempt(lambda: chain_info(img))
            out["map"] = attempt(lambda: [e.to_json() for e in iter_map(img)])
            out["check"] = attempt(lambda: check_image(img))
            try:
                from qinspect.analysis.layout import compute_layout
            except ImportError:
                pass
            else:
                out["layout"] = attempt(lambda: compute_layout(img))
            out["read"] = attempt(lambda: img.read(0, min(img.virtual_size, 1 << 20)))
    return img, out


def problems_about(img: Image, structure: str) -> list[Problem]:
    return [p for p in img.problems if structure in p.structure]


def test_l1_table_of_four_billion_entries(samples: Samples, tmp_path: Path) -> None:
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(36, 0xFFFFFFFF)))
    [p] = [p for p in problems_about(img, "L1 table") if "too large" in p.message]
    assert p.qemu_refuses_open and "4294967295" in p.message and p.offset == 36
    assert len(img.l1_table) == 0  # nothing allocated for the claim
    assert isinstance(out["info"], str) and isinstance(out["check"], CheckResult)


def test_l1_table_past_the_end_of_the_file(samples: Samples, tmp_path: Path) -> None:
    big = C.QCOW_MAX_L1_SIZE // 8  # the largest L1 QEMU accepts, in a 640 KiB file
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(36, big)))
    assert any("past the end" in p.message for p in problems_about(img, "L1 table"))
    assert isinstance(out["map"], list) and isinstance(out["check"], CheckResult)


def test_refcount_table_larger_than_the_file(samples: Samples, tmp_path: Path) -> None:
    # 100 clusters (6.4 MiB) is within QEMU's 8 MiB limit but far past the end of the file
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(56, 100)))
    assert any("past the end" in p.message for p in problems_about(img, "refcount table"))
    assert isinstance(out["check"], CheckResult) and isinstance(out["map"], list)
    # and one beyond QEMU's limit is refused, without reading it
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(56, 0x10000000)))
    [p] = [p for p in problems_about(img, "refcount table") if "too large" in p.message]
    assert p.qemu_refuses_open and p.offset == 56 and len(img.refcount_table) == 0
    assert isinstance(out["check"], CheckResult)


@pytest.mark.parametrize("count", [C.QCOW_MAX_SNAPSHOTS, C.QCOW_MAX_SNAPSHOTS + 1, 0xFFFFFFFF])
def test_65536_snapshots(samples: Samples, tmp_path: Path, count: int) -> None:
    # snapshots_offset at cluster 5 of basic64k: guest data and zeros, parsed as snapshot entries
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(60, count), u64(64, 0x50000)))
    assert len(img.snapshots) <= C.QCOW_MAX_SNAPSHOTS
    if count > C.QCOW_MAX_SNAPSHOTS:
        [p] = [p for p in problems_about(img, "snapshot table") if p.qemu_refuses_open]
        assert "Snapshot table too large" in p.message and p.offset == 60
    else:
        assert problems_about(img, "snapshot table")  # the junk entries are reported
    assert isinstance(out["info"], str) and isinstance(out["check"], CheckResult)


def test_compressed_cluster_running_past_the_end(samples: Samples, tmp_path: Path) -> None:
    size = samples.path("zlib").stat().st_size
    # L2 entry 0 of zlib (at 0x40000): compressed, 256 sectors starting 100 bytes before the end
    coff = size - 100
    entry = (1 << 62) | (255 << 54) | coff
    _img, out = inspect_all(hostile(samples, tmp_path, "zlib", u64(0x40000, entry)))
    assert isinstance(out["read"], Qcow2Error)
    assert out["read"].offset == coff  # type: ignore[attr-defined]
    chk = out["check"]
    assert isinstance(chk, CheckResult) and chk.corruptions  # clusters past the end have no refcount
    assert isinstance(out["map"], list)


def test_l2_entry_pointing_past_the_end(samples: Samples, tmp_path: Path) -> None:
    _img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u64(0x40000, (1 << 63) | (1 << 40))))
    assert isinstance(out["read"], bytes)  # QEMU reads zeros past the end of the file
    chk = out["check"]
    assert isinstance(chk, CheckResult) and chk.corruptions
    # as qemu-img 7.2: a reference a cluster or more past the end of the file is refused, not counted
    assert any("exceeding the end of the file" in m.text for m in chk.messages)
    assert isinstance(out["map"], list)


def test_l2_entry_unaligned(samples: Samples, tmp_path: Path) -> None:
    _img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u64(0x40000, 0x8000000000050200)))
    for step in ("read", "map"):
        err = out[step]
        assert isinstance(err, Qcow2Error) and "unaligned" in str(err) and err.offset == 0x40000, step
    chk = out["check"]
    assert isinstance(chk, CheckResult)
    assert any("not properly aligned" in m.text for m in chk.messages)
    assert isinstance(out["info"], str)


def test_extended_l2_bitmap_with_both_bits_set(samples: Samples, tmp_path: Path) -> None:
    # extl2_64k: entry 0 at 0x40000 is allocated with bitmap 0x13; set A and Z of subcluster 0
    _img, out = inspect_all(hostile(samples, tmp_path, "extl2_64k", u64(0x40008, 0x13 | (1 << 32))))
    for step in ("read", "map"):
        err = out[step]
        assert isinstance(err, Qcow2Error) and "invalid" in str(err) and err.offset == 0x40000, step
    chk = out["check"]
    assert isinstance(chk, CheckResult)
    assert any("corrupted subcluster allocation bitmap" in m.text for m in chk.messages)


def test_refcount_order_huge(samples: Samples, tmp_path: Path) -> None:
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u32(96, 0x80000000)))
    [p] = [p for p in img.problems if "refcount_order" in p.message]
    assert p.qemu_refuses_open and p.offset == 96
    assert isinstance(out["info"], str) and isinstance(out["check"], CheckResult)


def test_virtual_size_of_16_exabytes(samples: Samples, tmp_path: Path) -> None:
    img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u64(24, 0xFFFFFFFFFFFFFE00)))
    assert any(p.qemu_refuses_open for p in img.problems)
    assert isinstance(out["map"], list) and isinstance(out["check"], CheckResult)


def test_refcount_block_offset_with_the_top_bit(samples: Samples, tmp_path: Path) -> None:
    _img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u64(0x10008, 1 << 63)))
    chk = out["check"]
    assert isinstance(chk, CheckResult) and chk.corruptions


def test_crypto_header_of_huge_length(samples: Samples, tmp_path: Path) -> None:
    img = open_image(samples.path("luks"))
    ext = next(e for e in img.header.extensions if e.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    img.close()
    _img, out = inspect_all(hostile(samples, tmp_path, "luks", u64(ext.offset + 16, 1 << 62)))
    assert isinstance(out["check"], CheckResult) and out["check"].corruptions


def test_truncated_everywhere(samples: Samples, tmp_path: Path) -> None:
    """Cut the file at each of its structures: every step ends in a result or a Qcow2Error."""
    img = open_image(samples.path("snapshots"))
    h = img.header
    cuts = sorted({72, 104, 200, h.refcount_table_offset + 8, h.l1_table_offset + 4, h.snapshots_offset + 20,
                   img.file.size - 1})
    img.close()
    for cut in cuts:
        with contextlib.suppress(Qcow2Error):
            inspect_all(hostile(samples, tmp_path, "snapshots", size=cut))


def test_backing_chain_loop_is_an_error_not_a_hang(samples: Samples, tmp_path: Path) -> None:
    name = b"basic64k.qcow2"
    _img, out = inspect_all(hostile(samples, tmp_path, "basic64k", u64(8, 1024), u32(16, len(name)), (1024, name)))
    assert isinstance(out["info"], str)  # the image itself is fine
    for step in ("chain", "map", "read"):
        err = out[step]
        assert isinstance(err, Qcow2Error) and "loops" in str(err), step
