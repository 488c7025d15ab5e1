"""The space breakdown adds up exactly, to the file size and to the disk usage, and each part
holds what it says (checked against the guest extents, holes made by qemu-img, a deep scan and
real `qemu-img convert` output)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu

from qinspect.analysis.deep import convert_options, deep_scan
from qinspect.analysis.layout import compute_layout
from qinspect.analysis.measure import MeasureOptions
from qinspect.analysis.progress import Cancelled
from qinspect.analysis.space import compute_space, hole_bytes_per_cluster
from qinspect.qcow2.image import open_image
from qinspect.qcow2.l2 import SubclusterType

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_parts_add_up(samples: Samples, name: str) -> None:
    with open_image(samples.path(name)) as img:
        lay = compute_layout(img)
        for deep in (None, deep_scan(img)):
            sp = compute_space(img, lay, deep)
            assert sum(sp.parts.values()) == sp.file_size == img.file.size
            assert sum(sp.allocated_parts.values()) == sp.allocated_size == img.file.allocated_size
            assert all(v >= 0 for v in sp.parts.values()), sp.parts
            assert all(v >= 0 for k, v in sp.allocated_parts.items() if k != "filesystem")


# The issue-9 images whose check follows rules layout.py's own walk does not yet (refcount overflow
# not counted, a check that stops on a bad snapshot table, an L1 entry cut to offset 0 followed to
# the header): they come back here once check and layout share one refcount walk.
LAYOUT_DIVERGES = {"fid_overflow"}


@pytest.mark.parametrize("name", [n for n in SAMPLE_NAMES if n not in LAYOUT_DIVERGES])
def test_data_parts_match_guest_extents(samples: Samples, name: str) -> None:
    """guest data / zero-allocated / preallocated-unused = NORMAL / ZERO_ALLOC / UNALLOCATED_ALLOC."""
    with open_image(samples.path(name)) as img:
        if img.header.has_data_file or name == "invalid_subcluster":
            pytest.skip("data outside this file, or invalid entries")
        cs = img.cluster_size
        hosts = np.concatenate([ex.host[ex.sctype == SubclusterType.NORMAL].astype(np.int64) // cs
                                for ex in img.extents()] or [np.zeros(0, np.int64)])
        guests = np.concatenate([ex.guest[ex.sctype == SubclusterType.NORMAL].astype(np.int64) // cs
                                 for ex in img.extents()] or [np.zeros(0, np.int64)])
        pairs = np.unique(np.stack((guests, hosts)), axis=1) if len(hosts) else np.zeros((2, 0), np.int64)
        if len(np.unique(pairs[1])) < pairs.shape[1]:
            pytest.skip("two guest clusters share a host cluster (counted once in the file)")
        sp = compute_space(img)
        tot = dict.fromkeys(SubclusterType, 0)
        last_end = 0
        size = img.file.size
        for ex in img.extents():
            for t in SubclusterType:
                tot[t] += int(ex.length[ex.sctype == t].sum())
            # A truncated file (diag_truncated) holds only part of its last data cluster.
            normal = ex.sctype == SubclusterType.NORMAL
            h0 = ex.host[normal].astype(np.int64)
            tot[SubclusterType.NORMAL] -= int(np.clip(h0 + ex.length[normal] - np.maximum(h0, size), 0, None).sum())
            alloc = ex.sctype == SubclusterType.UNALLOCATED_ALLOC
            if alloc.any():
                last_end = max(last_end, int((ex.host[alloc] + ex.length[alloc].astype(np.uint64)).max()))
        # Unallocated subclusters of the file's last, short cluster lie past the end of the file.
        beyond = max(0, last_end - img.file.size)
        assert sp.parts["guest-data"] == tot[SubclusterType.NORMAL]
        assert sp.parts["zero-allocated"] == tot[SubclusterType.ZERO_ALLOC]
        assert sp.parts["preallocated-unused"] == tot[SubclusterType.UNALLOCATED_ALLOC] - beyond


def test_known_parts(samples: Samples) -> None:
    def parts(name: str) -> dict[str, int]:
        with open_image(samples.path(name)) as img:
            return compute_space(img).parts

    p = parts("leaked")
    assert p["leaked"] == 2 * 64 * KiB and p["free"] == 64 * KiB and p["tail"] == 0
    p = parts("holes")
    assert p["free"] == 3 * 64 * KiB and p["tail"] == 192 * KiB
    p = parts("basic64k")
    assert p["zero-allocated"] == 64 * KiB
    p = parts("zlib")
    assert p["compressed"] > 0 and p["guest-data"] == 64 * KiB
    p = parts("bitmaps")
    assert p["bitmaps"] > 0
    p = parts("luks")
    assert p["luks"] > 0


def test_snapshot_space(samples: Samples) -> None:
    with open_image(samples.path("snapshots")) as img:
        sp = compute_space(img)
        assert set(sp.snapshots) == {sn.id_str for sn in img.snapshots}
        assert all(v > 0 for v in sp.snapshots.values())
        held = sp.parts["snapshot-data"] + sp.parts["snapshot-l2-tables"] + sp.parts["snapshot-l1-tables"]
        # Each snapshot's own clusters are held only by it; shared ones count once in the parts.
        assert sum(sp.snapshots.values()) <= held
        assert sp.parts["snapshot-l1-tables"] == 3 * 64 * KiB


@needs_qemu
def test_sparse_image_holes(tmp_path: Path) -> None:
    """Metadata preallocation leaves the data as holes: preallocated, never written, not on disk."""
    path = tmp_path / "sparse.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), "256M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 2M", str(path)], check=True, capture_output=True)
    with open_image(path) as img:
        if img.file.allocated_size >= img.file.size:
            pytest.skip("the file system does not keep holes")
        sp = compute_space(img)
        assert sum(sp.parts.values()) == sp.file_size
        assert sum(sp.allocated_parts.values()) == sp.allocated_size
        assert sp.parts["guest-data"] == 2 * MiB
        assert sp.parts["preallocated-unused"] == 254 * MiB
        assert sp.allocated_parts["preallocated-unused"] == 0
        assert sp.hole_bytes >= 254 * MiB


@needs_qemu
def test_extended_l2_sparse_last_cluster(tmp_path: Path) -> None:
    """Extended L2 with subclusters, holes and a file ending inside its last cluster."""
    path = tmp_path / "ext.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
                    str(path), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "write -z 64k 8k",
                    "-c", "write -P 2 1M 12k", str(path)], check=True, capture_output=True)
    with open_image(path) as img:
        sp = compute_space(img)
        assert sum(sp.parts.values()) == sp.file_size
        assert sum(sp.allocated_parts.values()) == sp.allocated_size
        assert sp.parts["guest-data"] == 4 * KiB + 12 * KiB
        assert sp.parts["zero-allocated"] == 8 * KiB


def test_hole_bytes_per_cluster_brute_force() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        cs = int(rng.choice([512, 4096, 65536]))
        size = int(rng.integers(1, 12 * cs))
        nb = -(-size // cs)
        pts = np.sort(rng.choice(size + 1, size=min(size + 1, 2 * int(rng.integers(0, 4))), replace=False))
        hs, he = pts[0::2].astype(np.int64), pts[1::2].astype(np.int64)
        got = hole_bytes_per_cluster((hs, he), nb, cs, size)
        exp = np.zeros(nb, np.int64)
        for a, b in zip(hs.tolist(), he.tolist(), strict=True):
            for c in range(nb):
                exp[c] += max(0, min(b, (c + 1) * cs, size) - max(a, c * cs))
        assert np.array_equal(got, exp)


def test_deep_scan_finds_zeros_and_duplicates(samples: Samples) -> None:
    with open_image(samples.path("dup_top")) as img:
        d = deep_scan(img)
        sp = compute_space(img, deep=d)
    # dup_top: 0 (64k) and 128k (128k) and 2M (64k) repeat the base; 256k (64k) and 4M (128k) are zeros.
    assert (d.duplicate_clusters, d.zero_clusters) == (4, 3)
    assert sp.parts["backing-duplicates"] == 4 * 64 * KiB and sp.parts["zero-data"] == 3 * 64 * KiB
    with open_image(samples.path("prealloc_metadata")) as img:
        d = deep_scan(img)
    assert d.zero_clusters == d.data_clusters - 3  # 64k at 0 and 128k at 10M were written


def test_deep_scan_progress_and_cancel(samples: Samples) -> None:
    calls: list[tuple[int, int]] = []
    with open_image(samples.path("prealloc_metadata")) as img:
        deep_scan(img, lambda d, t: calls.append((d, t)), batch_bytes=1 * MiB)
        assert len(calls) > 10 and calls[-1][0] == calls[-1][1] == 64 * MiB
        with pytest.raises(Cancelled):
            deep_scan(img, cancelled=lambda: True)


def test_deep_scan_skips_encrypted(samples: Samples) -> None:
    with open_image(samples.path("luks")) as img:
        d = deep_scan(img)
    assert d.skipped and d.zero_clusters == 0


@needs_qemu
@pytest.mark.parametrize("name", ["basic64k", "dup_top", "v2_backed", "prealloc_falloc", "zlib", "c4k", "chain_top",
                                  "holes", "snapshots", "extl2_64k", "bigclusters_backing", "big_empty"])
@pytest.mark.parametrize("target", ["same", "default", "4k", "128k-ext"])
def test_convert_estimate_vs_qemu_img(samples: Samples, tmp_path: Path, name: str, target: str) -> None:
    """The estimated size of `qemu-img convert` is within one target cluster of the real one."""
    with open_image(samples.path(name)) as img:
        o = {"same": convert_options(img), "default": MeasureOptions(), "4k": MeasureOptions(cluster_size=4096),
             "128k-ext": MeasureOptions(cluster_size=128 * KiB, extended_l2=True)}[target]
        d = deep_scan(img, convert_to=o)
        back, fmt = img.header.backing_file, img.header.backing_format or "qcow2"
    out = tmp_path / "out.qcow2"
    args = ["qemu-img", "convert", "-O", "qcow2", "-o",
            f"cluster_size={o.cluster_size},extended_l2={'on' if o.extended_l2 else 'off'},"
            f"refcount_bits={o.refcount_bits}"]
    if back:
        args += ["-B", str(samples.dir / back), "-F", fmt]  # -B is relative to the output's directory
    subprocess.run([*args, samples.path(name).name, str(out)], check=True, cwd=samples.dir)
    real = os.path.getsize(out)
    assert abs(d.convert_size - real) <= o.cluster_size, (d.convert_size, real)
