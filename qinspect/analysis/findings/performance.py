"""Performance rules: why I/O on this image is slower than it needs to be.

Their fixes may cost space or change the format; each says what it costs. Thresholds:
copy-on-write amplification for every overlay whose allocation unit is larger than 4 KiB (info,
warning from `COW_WARNING_UNIT`); scattered L2 tables from `SCATTERED_MIN_BACKWARD` backward
seeks; fragmentation from `FRAGMENTATION_INFO` of the data clusters out of order.
"""

from __future__ import annotations

import os

import numpy as np

from qinspect.analysis.cache import cache_model, cow_amplification
from qinspect.analysis.findings.common import path_arg, pct, plural, size_text
from qinspect.analysis.findings.model import Category, Context, ConvertWish, Finding, Fix, Severity
from qinspect.analysis.findings.registry import rule
from qinspect.analysis.layout import Owner
from qinspect.qcow2 import constants as C
from qinspect.units import size_option

LONG_CHAIN_LAYERS = 4  # this image and 3 backing files
FRAGMENTATION_MIN_CLUSTERS = 16
FRAGMENTATION_INFO = 0.25
FRAGMENTATION_WARNING = 0.5
FRAGMENTATION_SKIP = 1 << 20
SCATTERED_MIN_BACKWARD = 64
SCATTERED_BACKWARD_SHARE = 0.25
COW_SMALL_WRITE = 4096
COW_WARNING_UNIT = 256 << 10
COW_FIX_MAX_CLUSTER = 128 << 10  # extended L2 with 128 KiB clusters: 4 KiB subclusters
SMALL_CLUSTER = 64 << 10
NARROW_REFCOUNT_BITS = 4


@rule("l2-cache-coverage")
def l2_cache(c: Context) -> Finding | None:
    m = c.cache
    if m.default_coverage >= 1.0:
        return None
    drive = f"file={c.path.replace(',', ',,')},format=qcow2,l2-cache-size={size_option(m.max_l2_cache)}"
    return Finding(
        "l2-cache-coverage", Severity.WARNING,
        f"QEMU's default L2 cache covers {pct(m.default_coverage)} of the disk",
        {"virtual-size": m.virtual_size, "l2-cache-needed": m.max_l2_cache,
         "default-l2-cache": m.default_l2_cache_size, "default-coverage-bytes": m.default_coverage_bytes,
         "default-coverage-percent": round(m.default_coverage * 100, 2),
         "cache-entry-size": m.default_l2_cache_entry_size},
        f"With the default {size_text(m.default_l2_cache_max)} L2 cache only {size_text(m.default_coverage_bytes)} "
        f"of the {size_text(m.virtual_size)} disk are mapped from memory; random I/O beyond that reads an L2 slice "
        f"from the file first (often halving IOPS). {size_text(m.max_l2_cache)} of cache covers the whole disk.",
        Fix(["-drive", drive], False, c.unchanged(**{"l2-cache-coverage-percent": 100.0}),
            note="a QEMU option, not a command: the image file does not change",
            cost=f"{size_text(m.max_l2_cache)} of host memory for the L2 cache"),
        Category.PERFORMANCE)


@rule("small-clusters")
def small_clusters(c: Context) -> Finding | None:
    cs = c.h.cluster_size
    if cs >= SMALL_CLUSTER:
        return None
    m = c.cache
    ref = cache_model(c.h.size, SMALL_CLUSTER, c.h.extended_l2, c.h.refcount_bits)
    l2e = c.h.l2_entry_size
    overhead = (l2e + c.h.refcount_bits / 8) / cs
    return Finding(
        "small-clusters", Severity.WARNING if cs <= 4096 else Severity.INFO,
        f"{size_text(cs)} clusters: metadata-heavy and slow to map",
        {"cluster-size": cs, "l2-tables-for-disk": -(-c.h.guest_clusters // c.h.l2_size),
         "metadata-per-guest-byte-percent": round(overhead * 100, 3), "l2-cache-needed": m.max_l2_cache,
         "l2-cache-needed-at-64k": ref.max_l2_cache},
        f"Each {size_text(cs)} of guest data costs {l2e} bytes of L2 entry and {c.h.refcount_bits // 8 or 1} "
        f"byte(s) of refcount ({overhead * 100:.2f}% of the data); covering the disk needs "
        f"{size_text(m.max_l2_cache)} of L2 cache instead of {size_text(ref.max_l2_cache)} with 64 KiB clusters, "
        "and sequential I/O is split into many small allocations.",
        None, Category.PERFORMANCE, ConvertWish({"cluster_size": "64k"}, "64 KiB clusters"))


@rule("cow-amplification")
def cow(c: Context) -> Finding | None:
    if not c.has_backing:
        return None
    cs = c.h.cluster_size
    amp = cow_amplification(cs, c.h.extended_l2, COW_SMALL_WRITE)
    if amp.unit <= COW_SMALL_WRITE:
        return None
    target = max(min(cs, COW_FIX_MAX_CLUSTER), 16 << 10)
    better = cow_amplification(target, True, COW_SMALL_WRITE)
    gc = c.space.guest_clusters
    allocated = gc.get("written", 0) + gc.get("unwritten", 0) + gc.get("hole", 0)
    padding = gc.get("unwritten", 0) + gc.get("hole", 0)
    sev = Severity.WARNING if amp.unit >= COW_WARNING_UNIT else Severity.INFO
    opts = {"extended_l2": "on"}
    if target != cs:
        opts["cluster_size"] = size_option(target)
    return Finding(
        "cow-amplification", sev,
        f"A 4 KiB write into a fresh cluster allocates {size_text(amp.bytes_written)} (x{amp.factor:.0f})"
        + (f"; so far {size_text(padding)} of zero padding" if padding else ""),
        {"cluster-size": cs, "extended-l2": int(c.h.extended_l2), "cow-unit": amp.unit,
         "bytes-per-4k-write": amp.bytes_written, "amplification": amp.factor,
         "allocated-data-bytes": allocated, "written-data-bytes": gc.get("written", 0),
         "padding-bytes": padding, "cow-unit-after-fix": better.unit,
         "bytes-per-4k-write-after-fix": better.bytes_written},
        f"Over a backing file QEMU allocates whole {size_text(amp.unit)} units: the first small write to a unit "
        f"copies the rest of it from the backing file (or zero-fills it) and the overlay grows by "
        f"{size_text(amp.unit)}. Measured so far: {size_text(allocated)} allocated for data, of which at least "
        f"{size_text(padding)} were never written (zero padding; data copied from the backing file counts as "
        f"written). With extended L2 entries the unit is a {size_text(better.unit)} subcluster and a 4 KiB write "
        f"costs {size_text(better.bytes_written)}; create new overlays with -o extended_l2=on,cluster_size="
        f"{size_option(target)}.",
        None, Category.PERFORMANCE,
        ConvertWish(opts, f"extended L2 ({size_text(better.unit)} subclusters)"))


@rule("fragmentation")
def fragmentation(c: Context) -> Finding | None:
    # A jump counts when it goes backwards or skips more than FRAGMENTATION_SKIP forward: the L2
    # tables qemu-img writes between data clusters cost a sequential reader nothing. (Counted per
    # distinct L2 table and at table boundaries: a table named a million times costs it once.)
    clusters, seeks, backward = c.layout.active_seeks(FRAGMENTATION_SKIP)
    if clusters < FRAGMENTATION_MIN_CLUSTERS or c.h.has_data_file:
        return None
    share = seeks / clusters
    if share < FRAGMENTATION_INFO:
        return None
    return Finding(
        "fragmentation", Severity.WARNING if share >= FRAGMENTATION_WARNING else Severity.INFO,
        f"{pct(share)} of the data clusters are not where a sequential read expects them",
        {"data-clusters": clusters, "discontiguous": seeks, "backward-seeks": backward,
         "discontiguous-share": round(share, 4)},
        f"Reading the whole disk in guest order jumps {seeks} times inside the file ({backward} of them "
        "backwards): slow on spinning disks and for read-ahead everywhere.",
        None, Category.PERFORMANCE, ConvertWish({}, "clusters in guest order"))


@rule("scattered-metadata")
def scattered(c: Context) -> Finding | None:
    cs = c.h.cluster_size
    l1 = c.img.l1_table
    offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    offs = offs[offs != 0]
    n = len(offs)
    if n < 2:
        return None
    jumps = int(np.count_nonzero(offs[1:] != offs[:-1] + cs))
    backward = int(np.count_nonzero(offs[1:] < offs[:-1]))
    if backward < SCATTERED_MIN_BACKWARD or backward / n < SCATTERED_BACKWARD_SHARE:
        return None
    span = int(offs.max() - offs.min()) + cs
    return Finding(
        "scattered-metadata", Severity.INFO, f"The {n} L2 tables are scattered over {size_text(span)} of the file",
        {"l2-tables": n, "seeks": jumps, "backward-seeks": backward, "span-bytes": span},
        f"Loading the L2 tables cold (the first I/O after start, or after cache eviction) costs {jumps} seeks, "
        f"{backward} of them backwards. A conversion writes them in guest order.",
        None, Category.PERFORMANCE, ConvertWish({}, "L2 tables in guest order"))


@rule("compressed")
def compressed(c: Context) -> Finding | None:
    n = c.layout.compressed_count()
    if not n:
        return None
    host = c.space.parts.get("compressed", 0)
    guest = n * c.h.cluster_size
    return Finding(
        "compressed", Severity.INFO,
        f"{n} compressed clusters ({c.h.compression_name}): {size_text(guest)} stored in {size_text(host)}",
        {"compressed-clusters": n, "guest-bytes": guest, "host-bytes": host,
         "ratio": round(host / guest, 3) if guest else 0.0, "compression-type": c.h.compression_name},
        f"Every read of a compressed cluster reads and {c.h.compression_name}-inflates the whole cluster, and the "
        "first write to it stores it uncompressed elsewhere (the file grows, the layout fragments).",
        None, Category.PERFORMANCE, ConvertWish({}, "uncompressed clusters"))


def _rebase_growth(c: Context, layers: int) -> int:
    """Bytes `qemu-img rebase -b BOTTOM` adds to this image: every cluster of it whose guest data an
    intermediate layer serves is copied in (a partly served cluster is allocated whole), plus an L2
    table for each L1 entry that gets its first cluster. Data equal to the bottom's is not copied by
    QEMU, so this is exact when the intermediate layers hold data of their own (the usual case)."""
    from qinspect.analysis.map import iter_map

    cs = c.h.cluster_size
    per_l2 = c.h.l2_size
    clusters = 0
    tables: set[int] = set()
    last = -1
    for e in iter_map(c.img):
        if not (e.data and 1 <= e.depth <= layers - 2):
            continue
        c0, c1 = max(e.start // cs, last + 1), -(-(e.start + e.length) // cs)
        if c1 > c0:
            clusters += c1 - c0
            tables.update(range(c0 // per_l2, (c1 - 1) // per_l2 + 1))
            last = c1 - 1
    l1 = c.img.l1_table
    new_tables = sum(1 for t in tables if t >= len(l1) or not int(l1[t]) & C.L1E_OFFSET_MASK)
    return (clusters + new_tables) * cs


@rule("long-chain")
def long_chain(c: Context) -> Finding | None:
    if c.chain is None or len(c.chain) < LONG_CHAIN_LAYERS:
        return None
    bottom = c.chain[-1]
    rel = os.path.relpath(bottom.path, os.path.dirname(os.path.abspath(c.path)) or ".")
    middle = sum(getattr(getattr(layer, "file", None), "size", 0) for layer in c.chain[1:-1])
    grow = _rebase_growth(c, len(c.chain))
    return Finding(
        "long-chain", Severity.WARNING if len(c.chain) >= 8 else Severity.INFO,
        f"Backing chain of {len(c.chain)} images",
        {"layers": len(c.chain), "backing-files": len(c.chain) - 1, "intermediate-bytes": middle},
        f"A read of data this image does not hold is looked up in up to {len(c.chain) - 1} backing files, each "
        "with its own L2 cache and file descriptor; every layer adds latency and memory.",
        Fix(["qemu-img", "rebase", "-f", "qcow2", "-b", path_arg(rel), "-F", bottom.format, path_arg(c.path)], True,
            {"file-size-at-most": c.file_size + middle, "file-size": c.file_size + grow,
             "disk-usage": c.disk_usage + grow, "layers": 2},
            note="pulls the intermediate layers' data into this image",
            cost=f"this image grows by about {size_text(grow)} (the intermediate layers' data it does not hold)"),
        Category.PERFORMANCE)


@rule("v2-no-zero")
def v2(c: Context) -> Finding | None:
    if c.h.version >= 3:
        return None
    return Finding(
        "v2-no-zero", Severity.INFO, "qcow2 version 2 (compat=0.10): no zero clusters, no lazy refcounts",
        {"version": c.h.version},
        "Writing zeros over a backing file, or discarding, must store real zero-filled clusters; v3 stores a "
        "flag instead. v3 also allows extended L2, lazy refcounts, bitmaps and other refcount widths.",
        Fix(["qemu-img", "amend", "-f", "qcow2", "-o", "compat=1.1", path_arg(c.path)], True,
            c.unchanged(version=3), cost="QEMU older than 1.1 cannot open the result"),
        Category.PERFORMANCE)


def _refcount_order_growth(c: Context, new_bits: int) -> int:
    """Bytes the file grows by when `qemu-img amend -o refcount_bits=N` rewrites the refcounts.

    QEMU's qcow2_change_refcount_order allocates a complete new refcount table and new refcount
    blocks for every cluster (counting its own new clusters), taking free clusters inside the file
    first, then frees the old structures (QCOW2_DISCARD_OTHER: not punched, the file keeps them as
    free space). The file grows by the new structures that do not fit in its free clusters.
    """
    cs = c.h.cluster_size
    per_block = cs * 8 // new_bits
    free = c.layout.counts().get(Owner.FREE, 0)
    used = -(-c.file_size // cs)
    blocks = table = 0
    for _ in range(8):  # the new structures need refcounts too: iterate to the fixed point
        total = used + max(0, blocks + table - free)
        blocks = -(-total // per_block)
        table = -(-(blocks * 8) // cs)
    return max(0, blocks + table - free) * cs


@rule("narrow-refcount")
def narrow_refcount(c: Context) -> Finding | None:
    bits = c.h.refcount_bits
    if bits > NARROW_REFCOUNT_BITS:
        return None
    top = (1 << bits) - 1
    if bits == 1:
        sev, what = Severity.WARNING, "internal snapshots are impossible (every shared cluster needs refcount 2)"
    else:
        sev, what = Severity.INFO, (f"a cluster can be shared by at most {top} references, so more than {top - 1} "
                                    "internal snapshots overflow")
    grow = _refcount_order_growth(c, 16)
    return Finding(
        "narrow-refcount", sev, f"{bits}-bit refcounts: at most {top} references per cluster",
        {"refcount-bits": bits, "max-refcount": top, "snapshots": len(c.img.snapshots)},
        f"With {bits}-bit refcounts {what}; QEMU fails such operations with an error.",
        Fix(["qemu-img", "amend", "-f", "qcow2", "-o", "refcount_bits=16", path_arg(c.path)], True,
            {"file-size": c.file_size + grow, "disk-usage": c.disk_usage + grow, "refcount-bits": 16},
            cost=f"refcount structures {16 // bits}x larger (about {size_text(grow)} more)"),
        Category.PERFORMANCE)


__all__ = ["plural"]
