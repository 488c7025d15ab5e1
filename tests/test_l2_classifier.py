"""The scalar and the vectorised L2 classifiers agree (the promise in qcow2/l2.py).

`classify_cluster` / `classify_subcluster` (one entry, the inspector's), `classify_clusters` /
`classify_subclusters_at` (arrays, the walks') and `classify_standard_subclusters` (the extent
walk's lookup table) are spellings of QEMU's qcow2_get_cluster_type
and qcow2_get_subcluster_type. They are compared on every L2 entry (and every subcluster) of every
sample image, and on random entries built to hit every flag combination, for standard and
extended L2, with and without an external data file.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_NAMES, Samples

from qinspect.qcow2 import constants as C
from qinspect.qcow2.image import Image, open_image
from qinspect.qcow2.l2 import (
    ClusterType,
    L2Format,
    SubclusterType,
    classify_cluster,
    classify_clusters,
    classify_standard_subclusters,
    classify_subcluster,
    classify_subclusters_at,
)

U64 = np.uint64


def _agree(entries: np.ndarray, bitmaps: np.ndarray | None, fmt: L2Format) -> int:
    """Compare both classifiers on every entry (and subcluster); the number of comparisons made."""
    vec = classify_clusters(entries, fmt)
    n_sc = C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if fmt.extended_l2 else 1
    bms = bitmaps if bitmaps is not None else np.zeros(len(entries), dtype=np.uint64)
    done = 0
    for i in range(len(entries)):
        e, bm = int(entries[i]), int(bms[i])
        assert ClusterType(int(vec[i])) == classify_cluster(e, fmt), (hex(e), fmt)
        done += 1
    if not fmt.extended_l2:  # the extent walk's lookup-table classifier
        lut = classify_standard_subclusters(entries, fmt)
        for i in range(len(entries)):
            assert SubclusterType(int(lut[i])) == classify_subcluster(int(entries[i]), 0, 0, fmt), hex(int(entries[i]))
            done += 1
    for sc in range(n_sc):
        vsub = classify_subclusters_at(vec, bitmaps, np.full(len(entries), sc, dtype=np.int64), fmt)
        for i in range(len(entries)):
            e, bm = int(entries[i]), int(bms[i])
            assert SubclusterType(int(vsub[i])) == classify_subcluster(e, bm, sc, fmt), (hex(e), hex(bm), sc, fmt)
            done += 1
    return done


def _tables(img: Image) -> list[int]:
    offs = (img.l1_table & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    return [int(o) for o in offs if o and o % img.cluster_size == 0 and o < img.file.size]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_real_images(samples: Samples, name: str) -> None:
    path = samples.path(name)
    try:
        img = open_image(path)
    except Exception:
        pytest.skip("not an image qinspect opens")
    with img:
        fmt = img.l2_format
        tables = _tables(img)[:64]  # bounded: big samples have thousands of identical tables
        for sn in range(len(img.snapshots)):
            l1 = img.snapshot_l1_table(sn)
            offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
            tables += [int(o) for o in offs[:16] if o and o % img.cluster_size == 0 and o < img.file.size]
        if not tables:
            pytest.skip("no L2 tables")
        words = img.read_l2_tables(np.array(tables, dtype=np.int64))
        if img.header.extended_l2:
            entries, bitmaps = words[0::2], words[1::2]
        else:
            entries, bitmaps = words, None
        # Entries of one table are mostly alike: keep the distinct (entry, bitmap) pairs.
        key = np.stack([entries, bitmaps if bitmaps is not None else np.zeros_like(entries)], axis=1)
        uniq = np.unique(key, axis=0)
        assert _agree(uniq[:, 0].copy(), uniq[:, 1].copy() if bitmaps is not None else None, fmt) >= len(uniq)


def _random_entries(rng: np.random.Generator, n: int, fmt: L2Format) -> np.ndarray:
    """Entries from the interesting bits: the three flags, offset zero or not, reserved bits."""
    cs = fmt.cluster_size
    offset = rng.integers(0, 1 << 20, n, dtype=np.uint64) * np.uint64(cs)
    offset[rng.random(n) < 0.3] = 0
    offset[rng.random(n) < 0.05] |= np.uint64(512)  # unaligned (still has an offset)
    e = offset & np.uint64(C.L2E_OFFSET_MASK)
    e[rng.random(n) < 0.5] |= U64(C.QCOW_OFLAG_COPIED)
    e[rng.random(n) < 0.3] |= U64(C.QCOW_OFLAG_ZERO)
    comp = rng.random(n) < 0.15
    e[comp] = (rng.integers(0, 1 << 62, int(comp.sum()), dtype=np.uint64) | U64(C.QCOW_OFLAG_COMPRESSED))
    rsv = rng.random(n) < 0.05
    e[rsv] |= U64(0x3F00000000000000)
    return e


def _random_bitmaps(rng: np.random.Generator, n: int) -> np.ndarray:
    full = np.uint64(0xFFFFFFFF)
    pick = rng.integers(0, 6, n)
    lo = rng.integers(0, 1 << 32, n, dtype=np.uint64)
    hi = rng.integers(0, 1 << 32, n, dtype=np.uint64)
    b = np.zeros(n, dtype=np.uint64)  # pick 0: nothing allocated
    b = np.where(pick == 1, full, b)  # all allocated
    b = np.where(pick == 2, full << np.uint64(32), b)  # all zero
    b = np.where(pick == 3, lo & ~hi & full | ((hi & ~lo & full) << np.uint64(32)), b)  # mixed, valid
    b = np.where(pick == 4, lo | (hi << np.uint64(32)), b)  # anything (often invalid)
    b = np.where(pick == 5, lo & full, b)  # allocation bits only
    return b.astype(np.uint64)


@pytest.mark.parametrize("cluster_bits", [9, 12, 14, 16, 21])
@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("has_data_file", [False, True])
def test_random_entries(cluster_bits: int, extended: bool, has_data_file: bool) -> None:
    if extended and cluster_bits < 14:
        pytest.skip("extended L2 needs clusters of at least 16 KiB")
    fmt = L2Format(cluster_bits, extended, has_data_file)
    rng = np.random.default_rng(cluster_bits * 4 + extended * 2 + has_data_file)
    n = 400 if extended else 3000
    entries = _random_entries(rng, n, fmt)
    bitmaps = _random_bitmaps(rng, n) if extended else None
    _agree(entries, bitmaps, fmt)
    # The random entries reach every type the format can produce.
    seen = {ClusterType(int(t)) for t in classify_clusters(entries, fmt)}
    want = {ClusterType.UNALLOCATED, ClusterType.NORMAL, ClusterType.COMPRESSED}
    if not extended:
        want |= {ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC}
    assert want <= seen
    if extended:
        assert bitmaps is not None
        ct = classify_clusters(entries, fmt)
        subs = {SubclusterType(int(s)) for sc in (0, 7, 31)
                for s in classify_subclusters_at(ct, bitmaps, np.full(n, sc, dtype=np.int64), fmt)}
        assert SubclusterType.INVALID in subs and SubclusterType.ZERO_ALLOC in subs
        assert SubclusterType.UNALLOCATED_ALLOC in subs and SubclusterType.ZERO_PLAIN in subs


def test_a_disagreement_would_be_caught() -> None:
    """The comparison is not vacuous: a classifier off by one flag fails it."""
    fmt = L2Format(16, False, False)
    entries = np.array([C.QCOW_OFLAG_ZERO, 0x10000, 0], dtype=np.uint64)
    wrong = classify_clusters(entries, L2Format(16, True, False))  # ignores the zero flag
    assert any(ClusterType(int(w)) != classify_cluster(int(e), fmt) for w, e in zip(wrong, entries, strict=True))
