"""The L2/refcount cache model follows QEMU's read_cache_sizes and docs/qcow2-cache.txt."""

from __future__ import annotations

import json

import pytest
from conftest import Samples

from qinspect.analysis.cache import cache_model, cache_table, cow_amplification
from qinspect.cli import main

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("cluster, ext, covered", [
    (4 * KiB, False, 16 * GiB), (16 * KiB, False, 64 * GiB), (64 * KiB, False, 256 * GiB),
    (128 * KiB, False, 512 * GiB), (1 * MiB, False, 4 * TiB), (2 * MiB, False, 8 * TiB),
    (16 * KiB, True, 32 * GiB), (64 * KiB, True, 128 * GiB), (128 * KiB, True, 256 * GiB),
    (1 * MiB, True, 2 * TiB), (2 * MiB, True, 4 * TiB),
])
def test_default_coverage_table(cluster: int, ext: bool, covered: int) -> None:
    """The 'default L2 coverage, 32 MiB on Linux' table of the fact sheet (§2.2)."""
    m = cache_model(64 * TiB, cluster, ext)
    assert m.default_l2_cache_size == 32 * MiB
    assert m.default_coverage_bytes == covered
    other = cache_model(64 * TiB, cluster, ext, linux=False)
    assert other.default_l2_cache_size == 8 * MiB
    assert other.default_coverage_bytes == covered // 4


def test_defaults_64k() -> None:
    m = cache_model(1 * TiB, 64 * KiB, False)
    assert m.l2_cache_needed == m.max_l2_cache == 128 * MiB  # 128 KiB per GiB
    assert m.default_l2_cache_size == 32 * MiB
    assert m.default_l2_cache_entry_size == 4096  # cache smaller than the disk needs: 4 KiB slices
    assert m.default_coverage == pytest.approx(0.25)
    assert m.refcount_cache_size == 4 * 64 * KiB  # 4 clusters
    assert m.refcount_cache_coverage_bytes == 8 * GiB  # 256 KiB x 32768
    assert m.cow_bytes_written == 64 * KiB and m.cow_factor == 16


def test_small_disk_whole_cluster_entries_and_minimum() -> None:
    m = cache_model(100 * MiB, 64 * KiB, False)
    # 1600 entries of 8 bytes, rounded up to one cluster: the whole disk fits, entries stay clusters.
    assert m.l2_cache_needed == 1600 * 8
    assert m.max_l2_cache == 64 * KiB
    assert m.default_l2_cache_entry_size == 64 * KiB
    # ...but QEMU always keeps at least two entries.
    assert m.l2_cache_entries == 2 and m.l2_cache_size == 128 * KiB
    assert m.coverage == 1.0 and m.covers_disk


def test_given_sizes() -> None:
    m = cache_model(1 * TiB, 64 * KiB, False, l2_cache_size=64 * MiB)
    assert m.l2_cache_size == 64 * MiB and m.l2_cache_entry_size == 4096
    assert m.coverage == pytest.approx(0.5)
    # More than the disk needs is capped at max_l2_cache; entries are whole clusters again.
    m = cache_model(1 * TiB, 64 * KiB, False, l2_cache_size=1 * GiB)
    assert m.l2_cache_size == 128 * MiB and m.l2_cache_entry_size == 64 * KiB and m.coverage == 1.0
    # An explicit entry size is kept.
    m = cache_model(1 * TiB, 64 * KiB, False, l2_cache_size=16 * MiB, l2_cache_entry_size=16 * KiB)
    assert m.l2_cache_entry_size == 16 * KiB and m.l2_cache_entries == 1024
    # Extended L2 needs twice the cache.
    assert cache_model(1 * TiB, 64 * KiB, True).max_l2_cache == 256 * MiB
    # Refcount cache: whole clusters, at least 4.
    assert cache_model(1 * TiB, 64 * KiB, False, refcount_cache_size=1).refcount_cache_size == 256 * KiB
    assert cache_model(1 * TiB, 64 * KiB, False, refcount_cache_size=1 * MiB).refcount_cache_coverage_bytes == 32 * GiB
    assert cache_model(1 * TiB, 64 * KiB, False, refcount_bits=64).refcount_cache_coverage_bytes == 2 * GiB


def test_combined_cache_size() -> None:
    # Only cache-size: L2 gets everything it can use, the refcount cache the rest.
    m = cache_model(8 * GiB, 64 * KiB, False, cache_size=10 * MiB)
    assert m.l2_cache_size == 1 * MiB and m.refcount_cache_size == 9 * MiB
    # Too small for both: the refcount cache gets its 4 clusters first.
    m = cache_model(1 * TiB, 64 * KiB, False, cache_size=1 * MiB)
    assert m.refcount_cache_size == 256 * KiB and m.l2_cache_size == 768 * KiB
    m = cache_model(1 * TiB, 64 * KiB, False, l2_cache_size=2 * MiB, cache_size=3 * MiB)
    assert m.refcount_cache_size == 1 * MiB


@pytest.mark.parametrize("kwargs, message", [
    ({"cluster_size": 3000}, "power of two"),
    ({"cluster_size": 8192, "extended_l2": True}, "at least 16384"),
    ({"l2_cache_entry_size": 256}, "entry size"),
    ({"l2_cache_entry_size": 128 * KiB}, "entry size"),
    ({"l2_cache_size": MiB, "refcount_cache_size": MiB, "cache_size": 4 * MiB}, "at the same time"),
    ({"l2_cache_size": 8 * MiB, "cache_size": 4 * MiB}, "may not exceed"),
    ({"refcount_bits": 3}, "power of two"),
])
def test_rejected_settings(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"virtual_size": 1 * GiB, "cluster_size": 64 * KiB, "extended_l2": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cache_model(**args)  # type: ignore[arg-type]


def test_table_rows() -> None:
    rows = cache_table(1 * TiB)
    sizes = [(r.cluster_size, r.extended_l2) for r in rows]
    assert (4 * KiB, False) in sizes and (4 * KiB, True) not in sizes  # extended L2 needs >= 16 KiB
    assert (2 * MiB, True) in sizes and len(rows) == 10 + 8
    by = {(r.cluster_size, r.extended_l2): r for r in rows}
    assert by[(2 * MiB, False)].max_l2_cache == 4 * MiB
    # A row whose entry size is impossible is left out instead of raising.
    assert all(r.cluster_size >= 16 * KiB for r in cache_table(1 * TiB, l2_cache_entry_size=16 * KiB))


def test_cow_amplification() -> None:
    assert cow_amplification(1 * MiB, False, 4096).bytes_written == 1 * MiB
    assert cow_amplification(1 * MiB, False, 4096).factor == 256
    assert cow_amplification(1 * MiB, True, 4096).unit == 32 * KiB
    assert cow_amplification(64 * KiB, True, 4096).factor == 1.0  # 2 KiB subclusters
    assert cow_amplification(64 * KiB, False, 100 * KiB).bytes_written == 128 * KiB


def test_cli_cache(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(samples.path("big_empty"))
    assert main(["cache", path]) == 0
    out = capsys.readouterr().out
    assert "l2-cache-size=128M" in out and "25" in out
    assert main(["cache", path, "--l2-cache-size=128M", "--output=json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["coverage"] == 1.0 and data["model"]["max-l2-cache"] == 128 * MiB
    assert len(data["other-cluster-sizes"]) == 18
    assert main(["cache", path, "--l2-cache-entry-size=3k"]) == 1
    assert "entry size" in capsys.readouterr().err
