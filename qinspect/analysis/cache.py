"""QEMU's qcow2 L2 and refcount cache model, as pure arithmetic (no I/O).

QEMU sizes its metadata caches in `read_cache_sizes` (block/qcow2.c) when it opens an image: the
L2 cache defaults to `min(max_l2_cache, 32 MiB)` on Linux (8 MiB elsewhere), where `max_l2_cache`
is what it takes to hold every L2 entry of the virtual disk rounded up to whole clusters; when the
cache cannot hold all L2 tables and no entry size was asked for, entries ("slices") shrink to
`min(cluster_size, 4096)`; the cache holds at least 2 entries and the refcount cache at least 4
clusters. Each cached L2 byte maps `cluster_size / l2_entry_size` guest bytes, each refcount-cache
byte `cluster_size * 8 / refcount_bits` host bytes.

`cache_model` reproduces those rules for one geometry and `cache_table` for every cluster size
with and without extended L2, so the TUI's cache lab can recompute them on every keystroke. The
copy-on-write numbers say how many bytes a guest write of `write_size` into a fresh cluster costs
over a backing file: QEMU copies whole clusters (whole subclusters with extended L2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qinspect.qcow2 import constants as C

# Cluster sizes offered in the comparison table (4 KiB .. 2 MiB).
TABLE_CLUSTER_SIZES = tuple(1 << b for b in range(12, C.MAX_CLUSTER_BITS + 1))
MIN_CLUSTER_SIZE = 1 << C.MIN_CLUSTER_BITS
MAX_CLUSTER_SIZE = 1 << C.MAX_CLUSTER_BITS
# Extended L2 needs 32 subclusters of at least 512 bytes.
MIN_EXTL2_CLUSTER_SIZE = MIN_CLUSTER_SIZE * C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _div_round_up(a, b) * b


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class CowAmplification:
    """Bytes QEMU writes for one guest write of `write_size` bytes into a fresh cluster.

    Over a backing file the unwritten part of the allocation unit (cluster, or subcluster with
    extended L2) is copied from the backing file, so the unit is written whole.
    """

    write_size: int
    unit: int
    bytes_written: int

    @property
    def factor(self) -> float:
        """Bytes written per guest byte written (1.0 = no amplification)."""
        return self.bytes_written / self.write_size if self.write_size else 1.0


def cow_amplification(cluster_size: int, extended_l2: bool, write_size: int = 4096) -> CowAmplification:
    """Copy-on-write cost of an aligned guest write of `write_size` bytes into a fresh cluster."""
    unit = cluster_size // C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if extended_l2 else cluster_size
    size = max(1, write_size)
    return CowAmplification(size, unit, _round_up(size, unit))


@dataclass(frozen=True)
class CacheModel:
    """What QEMU's qcow2 driver would allocate for its caches, and what that covers.

    Sizes are bytes. Coverage fractions are in [0, 1]; coverage bytes are guest bytes (L2 cache) or
    host-file bytes (refcount cache).
    """

    virtual_size: int
    cluster_size: int
    extended_l2: bool
    refcount_bits: int
    linux: bool
    l2_entry_size: int
    # The whole disk
    l2_cache_needed: int
    """Bytes of L2 entries mapping the whole virtual disk (8 or 16 bytes per guest cluster)."""
    max_l2_cache: int
    """`l2_cache_needed` rounded up to whole clusters: QEMU never allocates more L2 cache."""
    # QEMU's default
    default_l2_cache_max: int
    """DEFAULT_L2_CACHE_MAX_SIZE: 32 MiB on Linux, 8 MiB elsewhere."""
    default_l2_cache_size: int
    default_l2_cache_entry_size: int
    default_coverage: float
    default_coverage_bytes: int
    # With the given options (equal to the default when none were given)
    l2_cache_size: int
    """The L2 cache QEMU would really use: whole entries, at least 2 of them."""
    l2_cache_entry_size: int
    """The L2 cache entry ("slice") size QEMU picks."""
    l2_cache_entries: int
    coverage: float
    coverage_bytes: int
    refcount_cache_size: int
    refcount_cache_coverage_bytes: int
    """Host-file bytes whose refcounts fit in the refcount cache."""
    # Copy-on-write over a backing file
    cow_write_size: int
    cow_unit: int
    cow_bytes_written: int
    cow_factor: float

    @property
    def covers_disk(self) -> bool:
        """True when the chosen L2 cache holds every L2 entry of the disk."""
        return self.coverage >= 1.0

    def to_json(self) -> dict[str, object]:
        """The model with hyphenated keys, as the CLI prints it."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def l2_coverage_bytes(cache_bytes: int, cluster_size: int, extended_l2: bool) -> int:
    """Guest bytes mapped by `cache_bytes` of L2 cache: cache * cluster_size / l2_entry_size."""
    l2e = C.L2E_SIZE_EXTENDED if extended_l2 else C.L2E_SIZE_NORMAL
    return cache_bytes // l2e * cluster_size


def _l2_cache(size: int, max_l2_cache: int, cluster_size: int, entry_size: int | None) -> tuple[int, int, int]:
    """(bytes, entry size, entries) of the L2 cache QEMU builds from `size` bytes of L2 cache and
    an l2-cache-entry-size of `entry_size` (None: not given). A cache that cannot hold every L2
    table gets entries of `min(cluster_size, 4096)` unless an entry size was given; it holds at
    least `MIN_L2_CACHE_SIZE` entries. Raises `ValueError` with QEMU's message for an entry size
    QEMU rejects."""
    entry = cluster_size if entry_size is None else entry_size
    if size < max_l2_cache and entry_size is None:
        entry = min(cluster_size, 4096)
    if entry < MIN_CLUSTER_SIZE or entry > cluster_size or not _is_pow2(entry):
        raise ValueError(f"L2 cache entry size must be a power of two between {MIN_CLUSTER_SIZE} and the "
                         f"cluster size ({cluster_size})")
    entries = max(C.MIN_L2_CACHE_SIZE, size // entry)
    return entries * entry, entry, entries


def cache_model(
    virtual_size: int,
    cluster_size: int,
    extended_l2: bool,
    refcount_bits: int = 16,
    l2_cache_size: int | None = None,
    l2_cache_entry_size: int | None = None,
    refcount_cache_size: int | None = None,
    linux: bool = True,
    *,
    cache_size: int | None = None,
    write_size: int = 4096,
) -> CacheModel:
    """QEMU's cache sizing (`read_cache_sizes`) for one image geometry and set of -drive options.

    `l2_cache_size`, `l2_cache_entry_size`, `refcount_cache_size` and `cache_size` are the qcow2
    driver options of the same names (None = not given). Raises `ValueError` with QEMU's message
    for settings QEMU rejects.
    """
    if not _is_pow2(cluster_size) or not MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"Cluster size must be a power of two between {MIN_CLUSTER_SIZE} and "
                         f"{MAX_CLUSTER_SIZE >> 10}k")
    if extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise ValueError(f"Extended L2 entries are only supported with cluster sizes of at least "
                         f"{MIN_EXTL2_CLUSTER_SIZE} bytes")
    if not _is_pow2(refcount_bits) or refcount_bits > 64:
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if virtual_size < 0:
        raise ValueError("virtual size must not be negative")
    l2e = C.L2E_SIZE_EXTENDED if extended_l2 else C.L2E_SIZE_NORMAL
    max_l2_entries = _div_round_up(virtual_size, cluster_size)
    needed = max_l2_entries * l2e
    max_l2_cache = _round_up(needed, cluster_size)
    default_max = C.DEFAULT_L2_CACHE_MAX_SIZE_LINUX if linux else C.DEFAULT_L2_CACHE_MAX_SIZE_OTHER
    min_refcount_cache = C.MIN_REFCOUNT_CACHE_SIZE * cluster_size

    # -- the given options, exactly as read_cache_sizes combines them ----------------------------
    l2_set = l2_cache_size is not None
    rc_set = refcount_cache_size is not None
    l2_max_setting = l2_cache_size if l2_cache_size is not None else default_max
    rc = refcount_cache_size or 0
    l2 = min(max_l2_cache, l2_max_setting)
    if cache_size is not None:
        if l2_set and rc_set:
            raise ValueError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2_set and l2_max_setting > cache_size:
            raise ValueError("l2-cache-size may not exceed cache-size")
        if rc > cache_size:
            raise ValueError("refcount-cache-size may not exceed cache-size")
        if l2_set:
            rc = cache_size - l2
        elif rc_set:
            l2 = cache_size - rc
        elif cache_size >= max_l2_cache + min_refcount_cache:
            l2 = max_l2_cache
            rc = cache_size - l2
        else:
            rc = min(cache_size, min_refcount_cache)
            l2 = cache_size - rc
    l2_bytes, entry, entries = _l2_cache(l2, max_l2_cache, cluster_size, l2_cache_entry_size)
    rc_clusters = max(C.MIN_REFCOUNT_CACHE_SIZE, rc // cluster_size)
    rc_bytes = rc_clusters * cluster_size

    # -- QEMU's defaults (no options) ---------------------------------------------------------------
    d_bytes, d_entry, _ = _l2_cache(min(max_l2_cache, default_max), max_l2_cache, cluster_size, None)

    def cover(cache_bytes: int) -> tuple[float, int]:
        covered = min(virtual_size, l2_coverage_bytes(cache_bytes, cluster_size, extended_l2))
        return (covered / virtual_size if virtual_size else 1.0), covered

    d_frac, d_cov = cover(d_bytes)
    frac, cov = cover(l2_bytes)
    refcounts_per_cluster = cluster_size * 8 // refcount_bits
    cow = cow_amplification(cluster_size, extended_l2, write_size)
    return CacheModel(
        virtual_size=virtual_size, cluster_size=cluster_size, extended_l2=extended_l2,
        refcount_bits=refcount_bits, linux=linux, l2_entry_size=l2e,
        l2_cache_needed=needed, max_l2_cache=max_l2_cache,
        default_l2_cache_max=default_max, default_l2_cache_size=d_bytes, default_l2_cache_entry_size=d_entry,
        default_coverage=d_frac, default_coverage_bytes=d_cov,
        l2_cache_size=l2_bytes, l2_cache_entry_size=entry, l2_cache_entries=entries,
        coverage=frac, coverage_bytes=cov,
        refcount_cache_size=rc_bytes, refcount_cache_coverage_bytes=rc_clusters * refcounts_per_cluster * cluster_size,
        cow_write_size=cow.write_size, cow_unit=cow.unit, cow_bytes_written=cow.bytes_written,
        cow_factor=cow.factor,
    )


def cache_table(
    virtual_size: int,
    refcount_bits: int = 16,
    l2_cache_size: int | None = None,
    l2_cache_entry_size: int | None = None,
    refcount_cache_size: int | None = None,
    linux: bool = True,
    *,
    cache_size: int | None = None,
    write_size: int = 4096,
    cluster_sizes: tuple[int, ...] = TABLE_CLUSTER_SIZES,
) -> list[CacheModel]:
    """`cache_model` for every cluster size (4 KiB .. 2 MiB), without and with extended L2.

    Combinations QEMU rejects (extended L2 below 16 KiB clusters, an entry size larger than the
    cluster) are left out rather than raised.
    """
    rows: list[CacheModel] = []
    for cs in cluster_sizes:
        for ext in (False, True):
            try:
                rows.append(cache_model(virtual_size, cs, ext, refcount_bits, l2_cache_size, l2_cache_entry_size,
                                        refcount_cache_size, linux, cache_size=cache_size, write_size=write_size))
            except ValueError:
                continue
    return rows


__all__ = ["CacheModel", "CowAmplification", "cache_model", "cache_table", "cow_amplification", "l2_coverage_bytes"]
