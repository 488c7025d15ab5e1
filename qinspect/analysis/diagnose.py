"""Findings: what makes this image big or slow, with the evidence, the cost and the fix.

`diagnose` runs the layout walk once (plus, with `deep=True`, a read of every data cluster), then
applies a fixed set of rules. Each rule that fires yields a `Finding` with a stable id (the sample
corpus is labelled with them), a severity, the numbers it is based on (all taken from the image),
what it costs, and an exact command that fixes it. Findings are sorted worst first.

Rule ids: leaked-clusters, free-space, zero-clusters (deep), backing-duplicates (deep),
preallocated-unused, snapshot-space, bitmap-in-use, dirty, corrupt-bit, corruption,
l2-cache-coverage, small-clusters, cow-amplification, fragmentation, scattered-metadata,
compressed, long-chain, v2-no-zero, narrow-refcount.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

import numpy as np

from qinspect.analysis.cache import CacheModel, cache_model, cow_amplification
from qinspect.analysis.deep import DeepScan, deep_scan
from qinspect.analysis.layout import Layout, Owner, compute_layout
from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.space import Space, compute_space
from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, Layer

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# Every rule, in the order used to break ties; deep-only rules need `deep=True`.
RULES = (
    "corrupt-bit", "corruption", "dirty", "leaked-clusters", "bitmap-in-use", "l2-cache-coverage",
    "cow-amplification", "free-space", "guest-freed", "zero-clusters", "backing-duplicates", "preallocated-unused",
    "snapshot-space", "small-clusters", "fragmentation", "scattered-metadata", "compressed", "long-chain",
    "v2-no-zero", "narrow-refcount",
)
DEEP_RULES = ("zero-clusters", "backing-duplicates")

# Thresholds.
LONG_CHAIN_LAYERS = 4  # this image and 3 backing files
FRAGMENTATION_MIN_CLUSTERS = 16
FRAGMENTATION_INFO = 0.25
FRAGMENTATION_WARNING = 0.5
SCATTERED_MIN_TABLES = 4
SCATTERED_BACKWARD_SHARE = 0.25
COW_INFO_UNIT = 128 << 10
COW_WARNING_UNIT = 1 << 20
SMALL_CLUSTER = 64 << 10
NARROW_REFCOUNT_BITS = 4


@dataclass
class Finding:
    """One diagnosis: `evidence` holds the numbers (bytes, counts, ratios) the rule used."""

    id: str
    severity: str
    title: str
    evidence: dict[str, int | float | str]
    impact: str
    fix: str
    fixes: list[dict[str, object]] = field(default_factory=list)  # commands with `predicts` (guest-freed)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "severity": self.severity, "title": self.title,
                                  "evidence": dict(self.evidence), "impact": self.impact, "fix": self.fix}
        if self.fixes:
            out["fixes"] = list(self.fixes)
        return out


@dataclass
class Diagnosis:
    """All findings (worst first), the space breakdown and the cache model of one image."""

    path: str
    findings: list[Finding]
    space: Space
    cache: CacheModel
    layout: Layout
    deep: DeepScan | None = None
    rules_run: list[str] = field(default_factory=list)
    """The rule ids that were evaluated (deep-only rules are missing without `deep`)."""

    def worst(self) -> str | None:
        """The most severe severity among the findings, or None."""
        return self.findings[0].severity if self.findings else None

    def fails(self, threshold: str) -> list[Finding]:
        """Findings at `threshold` severity ("warning" or "error") or worse."""
        limit = SEVERITY_RANK[threshold]
        return [f for f in self.findings if SEVERITY_RANK[f.severity] <= limit]

    def to_json(self) -> dict[str, object]:
        """`{"findings": [...], "space": {"file-size": N, "parts": {...}}, "cache": {...}}`."""
        out: dict[str, object] = {
            "findings": [f.to_json() for f in self.findings],
            "space": self.space.to_json(),
            "cache": self.cache.to_json(),
        }
        if self.deep is not None:
            d = self.deep
            out["deep"] = {"data-clusters": d.data_clusters, "data-bytes": d.data_bytes,
                           "zero-clusters": d.zero_clusters, "zero-bytes": d.zero_bytes,
                           "duplicate-clusters": d.duplicate_clusters, "duplicate-bytes": d.duplicate_bytes,
                           "compressed-clusters": d.compressed_clusters, "convert-size": d.convert_size,
                           "convert-reclaim": d.convert_reclaim, "skipped": d.skipped}
        return out


# -- helpers ------------------------------------------------------------------------------------------
def size_text(n: int) -> str:
    """1.5 GiB, 64 KiB, 512 B (for titles and impact lines)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"


def size_option(n: int) -> str:
    """A size as QEMU options accept it, exact: 128M, 64k, or plain bytes."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _q(path: str) -> str:
    return shlex.quote(path)


def _create_options(img: Image, **override: object) -> str:
    """`-o` options that keep this image's chosen geometry (non-default values only)."""
    h = img.header
    opts: dict[str, object] = {}
    if h.cluster_size != 65536:
        opts["cluster_size"] = size_option(h.cluster_size)
    if h.extended_l2:
        opts["extended_l2"] = "on"
    if h.refcount_bits != 16:
        opts["refcount_bits"] = h.refcount_bits
    if h.lazy_refcounts:
        opts["lazy_refcounts"] = "on"
    opts.update(override)
    opts = {k: v for k, v in opts.items() if v is not None}
    return ",".join(f"{k}={v}" for k, v in opts.items())


def convert_command(img: Image, out: str | None = None, keep_backing: bool = True, backing: str | None = None,
                    backing_format: str | None = None, extra: str = "", **override: object) -> str:
    """`qemu-img convert` that rewrites `img` into OUT, keeping its backing file (-B) and geometry."""
    path = img.path
    out = out or f"{path}.new"
    parts = ["qemu-img", "convert"]
    src = _q(path)
    if img.encrypted:
        parts += ["--object", "secret,id=sec0,file=PASSPHRASE_FILE", "--image-opts"]
        src = _q(f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0")
        override.setdefault("encrypt.format", "luks")
        override.setdefault("encrypt.key-secret", "sec0")
    else:
        parts += ["-f", "qcow2"]
    if img.active_bitmaps:
        # Keep the persistent dirty bitmaps (convert drops them otherwise); in-use ones cannot be
        # copied and are skipped.
        parts += ["--bitmaps"] + (["--skip-broken-bitmaps"] if any(b.in_use for b in img.active_bitmaps) else [])
    if extra:
        parts += extra.split()
    parts += ["-O", "qcow2"]
    opts = _create_options(img, **override)
    if opts:
        parts += ["-o", opts]
    bname = backing if backing is not None else img.header.backing_file
    if keep_backing and bname is not None:
        fmt = backing_format or img.header.backing_format or "qcow2"
        parts += ["-B", _q(bname), "-F", fmt]
    parts += [src, _q(out)]
    return " ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%" if x < 0.1 else f"{x * 100:.0f}%"


# -- the rules ----------------------------------------------------------------------------------------
class _Context:
    """Everything the rules look at, computed once."""

    def __init__(self, img: Image, layout: Layout, space: Space, cache: CacheModel, deep: DeepScan | None) -> None:
        self.img = img
        self.h = img.header
        self.layout = layout
        self.space = space
        self.cache = cache
        self.deep = deep
        self.path = img.path
        self.chain: list[Layer] | None
        self.chain_error: str | None = None
        try:
            self.chain = img.chain()
        except Qcow2Error as e:
            self.chain = None
            self.chain_error = e.message

    @property
    def has_backing(self) -> bool:
        return self.h.backing_file is not None

    def fully_allocated(self) -> bool:
        """Every guest cluster of the virtual disk has a host cluster (the mark of preallocation)."""
        _, _, length, _ = self.layout.active_data_runs()
        guest_clusters = self.h.guest_clusters
        return guest_clusters > 0 and int(length.sum()) >= guest_clusters


def _rule_corrupt_bit(c: _Context) -> Finding | None:
    if not c.h.corrupt:
        return None
    lay = c.layout
    return Finding(
        "corrupt-bit", "error", "The image is marked corrupt: QEMU opens it read-only only",
        {"refcount-errors": lay.refcount_errors, "leaks": lay.leaks, "anomalies": sum(lay.anomalies.values())},
        "QEMU set the corrupt bit after it found inconsistent metadata; the image cannot be opened "
        "read-write (a VM using it fails to start) until it is repaired.",
        f"qemu-img check -r all {_q(c.path)}")


def _rule_corruption(c: _Context) -> Finding | None:
    lay = c.layout
    errors = 0 if c.h.dirty else lay.refcount_errors
    anomalies = {k: v for k, v in lay.anomalies.items() if v}
    if lay.refs_past_eof:
        anomalies["references past the end of the file"] = lay.refs_past_eof
    conflicts = int(np.count_nonzero(lay.owner == Owner.CONFLICT))
    if conflicts:
        anomalies["clusters used by two structures"] = conflicts
    if not errors and not anomalies:
        return None
    ev: dict[str, int | float | str] = {"refcount-errors": errors}
    ev.update(anomalies)
    what = []
    if errors:
        what.append(f"{_plural(errors, 'cluster')} referenced more often than the refcount says")
    what += [f"{n} {k}" for k, n in anomalies.items()]
    return Finding(
        "corruption", "error", "Metadata is inconsistent (qemu-img check reports corruption)", ev,
        "; ".join(what) + ". Writes may overwrite live data (a cluster with a too low refcount can be "
        "allocated again), and reads of invalid entries fail with I/O errors.",
        f"qemu-img check -r all {_q(c.path)}   # back the image up first")


def _rule_dirty(c: _Context) -> Finding | None:
    if not c.h.dirty:
        return None
    lay = c.layout
    cs = c.h.cluster_size
    l1_bytes = c.h.l1_size * 8 + sum(sn.l1_size * 8 for sn in c.img.snapshots)
    l2_bytes = lay.l2_reads * cs
    rt_bytes = c.h.refcount_table_entries * 8
    rb_bytes = lay.refcount_blocks * cs
    total = l1_bytes + l2_bytes + rt_bytes + rb_bytes
    lazy = " (lazy refcounts)" if c.h.lazy_refcounts else ""
    return Finding(
        "dirty", "warning", f"Dirty bit set{lazy}: the next read-write open repairs all refcounts first",
        {"l1-bytes": l1_bytes, "l2-tables": lay.l2_reads, "l2-bytes": l2_bytes, "refcount-table-bytes": rt_bytes,
         "refcount-blocks": lay.refcount_blocks, "refcount-block-bytes": rb_bytes, "repair-read-bytes": total,
         "stale-refcounts": lay.refcount_errors + lay.leaks},
        f"The image was not closed cleanly. QEMU will walk every L1 and L2 table (snapshots included) and "
        f"every refcount block before the VM can start: about {size_text(total)} of metadata reads "
        f"({_plural(lay.l2_reads, 'L2 table')}, {_plural(lay.refcount_blocks, 'refcount block')}), then rewrite "
        "the refcount structures.",
        f"qemu-img check -r all {_q(c.path)}   # repair now, with the VM stopped")


def _rule_leaked(c: _Context) -> Finding | None:
    lay = c.layout
    if c.h.dirty or not lay.leaks:
        return None
    leaked = c.space.parts.get("leaked", 0)
    n = int(np.count_nonzero(lay.owner == Owner.LEAKED))
    return Finding(
        "leaked-clusters", "warning",
        f"{lay.leaks} leaked clusters ({size_text(leaked)} held by nothing)",
        {"leaks": lay.leaks, "leaked-clusters": n, "leaked-bytes": leaked, "file-size": lay.file_size},
        f"{size_text(leaked)} of the file have a refcount but nothing uses them; qemu-img check exits with 3. "
        "No data is at risk. After the repair QEMU reuses the space for new clusters (the file does not shrink).",
        f"qemu-img check -r leaks {_q(c.path)}")


def _rule_free_space(c: _Context) -> Finding | None:
    parts = c.space.parts
    free, tail = parts.get("free", 0), parts.get("tail", 0)
    total = free + tail
    if not total:
        return None
    share = total / max(1, c.space.file_size)
    sev = "warning" if share >= 0.25 and total >= 64 << 20 else "info"
    return Finding(
        "free-space", sev, f"{size_text(total)} of the file is unused ({_pct(share)})",
        {"free-bytes": free, "free-clusters": free // c.h.cluster_size, "tail-bytes": tail,
         "image-end-offset": c.layout.image_end_offset, "file-size": c.space.file_size},
        f"{size_text(free)} are holes inside the image (refcount 0, reused by later writes) and "
        f"{size_text(tail)} lie past the last cluster in use. A conversion writes none of it.",
        convert_command(c.img) + "   # then replace the image with the .new file, VM stopped")


def _rule_zero_clusters(c: _Context) -> Finding | None:
    d = c.deep
    if d is None or not d.zero_clusters or c.fully_allocated():
        return None
    over = " (they hide the backing file's data, so they stay as zero clusters)" if c.has_backing else ""
    return Finding(
        "zero-clusters", "info" if d.zero_bytes < 64 << 20 else "warning",
        f"{d.zero_clusters} data clusters hold only zeros ({size_text(d.zero_bytes)})",
        {"zero-clusters": d.zero_clusters, "zero-bytes": d.zero_bytes, "data-clusters": d.data_clusters,
         "convert-size": d.convert_size, "convert-reclaim": d.convert_reclaim},
        f"The guest wrote zeros as data; they take {size_text(d.zero_bytes)} of the file. A conversion stores "
        f"them as zero clusters, taking no space{over}.",
        convert_command(c.img))


def _rule_backing_duplicates(c: _Context) -> Finding | None:
    d = c.deep
    if d is None or not d.duplicate_clusters or not c.has_backing:
        return None
    unit = cow_amplification(c.h.cluster_size, c.h.extended_l2).unit
    return Finding(
        "backing-duplicates", "info" if d.duplicate_bytes < 64 << 20 else "warning",
        f"{d.duplicate_clusters} clusters repeat what the backing file holds ({size_text(d.duplicate_bytes)})",
        {"duplicate-clusters": d.duplicate_clusters, "duplicate-bytes": d.duplicate_bytes,
         "cow-unit": unit, "data-clusters": d.data_clusters},
        f"{size_text(d.duplicate_bytes)} of this overlay are byte-for-byte copies of the backing chain's data "
        f"(copy-on-write of {size_text(unit)} units, or data rewritten unchanged). qemu-img has no command that "
        "drops them from the overlay alone; committing the overlay into its backing file removes them, but only "
        "do that if no other image uses that backing file.",
        f"qemu-img commit -f qcow2 {_q(c.path)}   # only if nothing else uses {c.h.backing_file}")


def _rule_preallocated(c: _Context) -> Finding | None:
    sp = c.space
    zero_alloc = sp.parts.get("zero-allocated", 0)
    unused = sp.parts.get("preallocated-unused", 0)
    prealloc_look = c.fully_allocated()
    deep_zero = c.deep.zero_bytes if c.deep is not None and prealloc_look else 0
    total = zero_alloc + unused + deep_zero
    on_disk = sp.allocated_parts.get("zero-allocated", 0) + sp.allocated_parts.get("preallocated-unused", 0) \
        + deep_zero
    if total:
        title = f"{size_text(total)} allocated in the file but never written by the guest"
        # Holes cost nothing on disk: only what really occupies the disk is worth a warning.
        sev = "warning" if on_disk >= 64 << 20 and on_disk / max(1, sp.allocated_size) >= 0.25 else "info"
        what = []
        if zero_alloc:
            what.append(f"{size_text(zero_alloc)} in zero-allocated clusters (they read as zeros)")
        if unused:
            what.append(f"{size_text(unused)} preallocated but never written (unallocated subclusters, or holes "
                        "in the file)")
        if deep_zero:
            what.append(f"{size_text(deep_zero)} in preallocated clusters that still hold only zeros")
        impact = "; ".join(what) + f". Of this, {size_text(on_disk)} occupy the disk. A conversion keeps none of it."
    elif prealloc_look and c.deep is None and not c.h.has_data_file:
        title = "Every guest cluster is allocated (a preallocated image?); --deep tells how much is unused"
        sev = "info"
        impact = ("All guest clusters have host clusters. If the image was preallocated, the part the guest never "
                  "wrote is file space a conversion would give back; only reading the data can tell how much.")
    else:
        return None
    return Finding(
        "preallocated-unused", sev, title,
        {"zero-allocated-bytes": zero_alloc, "unused-bytes": unused, "zero-preallocated-bytes": deep_zero,
         "on-disk-bytes": on_disk, "hole-bytes": sp.hole_bytes, "fully-allocated": int(prealloc_look)},
        impact,
        convert_command(c.img) + "   # or keep it: preallocation avoids allocation cost on first write")


def _rule_snapshots(c: _Context) -> Finding | None:
    if not c.img.snapshots:
        return None
    sp = c.space
    held = sp.parts.get("snapshot-data", 0) + sp.parts.get("snapshot-l2-tables", 0) + \
        sp.parts.get("snapshot-l1-tables", 0)
    ev: dict[str, int | float | str] = {"snapshots": len(c.img.snapshots), "held-bytes": held}
    for sid, b in sp.snapshots.items():
        ev[f"snapshot {sid} ({sp.snapshot_names.get(sid, '')})"] = b
    biggest = max(sp.snapshots.items(), key=lambda kv: kv[1]) if sp.snapshots else None
    share = held / max(1, sp.file_size)
    sev = "warning" if share >= 0.5 and held >= 1 << 30 else "info"
    per = ", ".join(f"'{sp.snapshot_names.get(s, s)}' {size_text(b)}" for s, b in sp.snapshots.items())
    fix = (f"qemu-img snapshot -d {_q(sp.snapshot_names.get(biggest[0], biggest[0]))} {_q(c.path)}"
           if biggest else "")
    return Finding(
        "snapshot-space", sev,
        f"{len(c.img.snapshots)} internal snapshots hold {size_text(held)} the current disk no longer uses",
        ev,
        f"Deleting a snapshot frees what only it references: {per}. Space shared by several snapshots is freed "
        "only when the last of them goes.",
        fix + "   # the snapshot freeing the most space")


def _rule_bitmap_in_use(c: _Context) -> Finding | None:
    bad = [b for b in c.img.bitmaps if b.in_use]
    if not bad:
        return None
    b = bad[0]
    cmds = " && ".join(f"qemu-img bitmap --remove {_q(c.path)} {_q(x.name)} && "
                       f"qemu-img bitmap --add -g {x.granularity} {_q(c.path)} {_q(x.name)}" for x in bad)
    return Finding(
        "bitmap-in-use", "warning",
        f"{len(bad)} dirty bitmap(s) marked in use: '{b.name}'" + (" and more" if len(bad) > 1 else ""),
        {"bitmaps-in-use": len(bad), "bitmaps": len(c.img.bitmaps), "granularity": b.granularity},
        "The image was not closed cleanly while the bitmap was loaded, so its contents are stale. QEMU treats it "
        "as inconsistent: incremental backups based on it fail until it is removed and a full backup is taken.",
        cmds + "   # then take a full backup")


def _rule_l2_cache(c: _Context) -> Finding | None:
    m = c.cache
    if m.default_coverage >= 1.0:
        return None
    return Finding(
        "l2-cache-coverage", "warning",
        f"QEMU's default L2 cache covers {_pct(m.default_coverage)} of the disk",
        {"virtual-size": m.virtual_size, "l2-cache-needed": m.max_l2_cache,
         "default-l2-cache": m.default_l2_cache_size, "default-coverage-bytes": m.default_coverage_bytes,
         "default-coverage-percent": round(m.default_coverage * 100, 2),
         "cache-entry-size": m.default_l2_cache_entry_size},
        f"With the default {size_text(m.default_l2_cache_max)} L2 cache only {size_text(m.default_coverage_bytes)} "
        f"of the {size_text(m.virtual_size)} disk are mapped from memory; random I/O beyond that reads an L2 slice "
        f"from the file first (often halving IOPS). {size_text(m.max_l2_cache)} of cache covers the whole disk.",
        f"-drive file={c.path},format=qcow2,l2-cache-size={size_option(m.max_l2_cache)}")


def _rule_small_clusters(c: _Context) -> Finding | None:
    cs = c.h.cluster_size
    if cs >= SMALL_CLUSTER:
        return None
    m = c.cache
    ref = cache_model(c.h.size, SMALL_CLUSTER, c.h.extended_l2, c.h.refcount_bits)
    l2e = c.h.l2_entry_size
    overhead = (l2e + c.h.refcount_bits / 8) / cs
    sev = "warning" if cs <= 4096 else "info"
    return Finding(
        "small-clusters", sev, f"{size_text(cs)} clusters: metadata-heavy and slow to map",
        {"cluster-size": cs, "l2-tables-for-disk": -(-c.h.guest_clusters // c.h.l2_size),
         "metadata-per-guest-byte-percent": round(overhead * 100, 3), "l2-cache-needed": m.max_l2_cache,
         "l2-cache-needed-at-64k": ref.max_l2_cache},
        f"Each {size_text(cs)} of guest data costs {l2e} bytes of L2 entry and {c.h.refcount_bits // 8 or 1} "
        f"byte(s) of refcount ({overhead * 100:.2f}% of the data); covering the disk needs "
        f"{size_text(m.max_l2_cache)} of L2 cache instead of {size_text(ref.max_l2_cache)} with 64 KiB clusters, "
        "and sequential I/O is split into many small allocations.",
        convert_command(c.img, cluster_size="64k"))


def _rule_cow(c: _Context) -> Finding | None:
    if not c.has_backing:
        return None
    cow = cow_amplification(c.h.cluster_size, c.h.extended_l2, 4096)
    if cow.unit < COW_INFO_UNIT:
        return None
    sev = "warning" if cow.unit >= COW_WARNING_UNIT else "info"
    target = max(c.h.cluster_size, 16 << 10)
    better = cow_amplification(target, True, 4096)
    return Finding(
        "cow-amplification", sev,
        f"A 4 KiB write into a fresh cluster copies {size_text(cow.bytes_written)} (x{cow.factor:.0f})",
        {"cluster-size": c.h.cluster_size, "extended-l2": int(c.h.extended_l2), "cow-unit": cow.unit,
         "bytes-per-4k-write": cow.bytes_written, "amplification": cow.factor,
         "bytes-with-extended-l2": better.bytes_written},
        f"Over a backing file QEMU allocates whole {size_text(cow.unit)} units and copies the rest of the unit from "
        f"the backing file: every first small write to a region costs x{cow.factor:.0f} the I/O and the overlay "
        f"grows by {size_text(cow.unit)}. With extended L2 entries the unit is a {size_text(better.unit)} "
        "subcluster.",
        convert_command(c.img, cluster_size=size_option(target), extended_l2="on"))


def _rule_fragmentation(c: _Context) -> Finding | None:
    host, _guest, length, zero = c.layout.active_data_runs()
    keep = ~zero
    host, length = host[keep], length[keep]
    clusters = int(length.sum())
    if clusters < FRAGMENTATION_MIN_CLUSTERS or c.h.has_data_file:
        return None
    seeks = int(np.count_nonzero(host[1:] != host[:-1] + length[:-1])) if len(host) > 1 else 0
    backward = int(np.count_nonzero(host[1:] < host[:-1])) if len(host) > 1 else 0
    share = seeks / clusters
    if share < FRAGMENTATION_INFO:
        return None
    sev = "warning" if share >= FRAGMENTATION_WARNING else "info"
    return Finding(
        "fragmentation", sev, f"{_pct(share)} of the data clusters are not where a sequential read expects them",
        {"data-clusters": clusters, "discontiguous": seeks, "backward-seeks": backward,
         "discontiguous-share": round(share, 4)},
        f"Reading the whole disk in guest order jumps {seeks} times inside the file ({backward} of them "
        "backwards): slow on spinning disks and for read-ahead everywhere.",
        convert_command(c.img) + "   # writes the clusters in guest order")


def _rule_scattered(c: _Context) -> Finding | None:
    cs = c.h.cluster_size
    l1 = c.img.l1_table
    offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    offs = offs[offs != 0]
    n = len(offs)
    if n < SCATTERED_MIN_TABLES:
        return None
    jumps = int(np.count_nonzero(offs[1:] != offs[:-1] + cs))
    backward = int(np.count_nonzero(offs[1:] < offs[:-1]))
    if backward / n < SCATTERED_BACKWARD_SHARE:
        return None
    span = int(offs.max() - offs.min()) + cs
    return Finding(
        "scattered-metadata", "info", f"The {n} L2 tables are scattered over {size_text(span)} of the file",
        {"l2-tables": n, "seeks": jumps, "backward-seeks": backward, "span-bytes": span},
        f"Loading the L2 tables cold (the first I/O after start, or after cache eviction) costs {jumps} seeks, "
        f"{backward} of them backwards. Bigger clusters need far fewer L2 tables.",
        convert_command(c.img, cluster_size="2M", extended_l2="on"))


def _rule_compressed(c: _Context) -> Finding | None:
    n = c.layout.compressed_count()
    if not n:
        return None
    host = c.space.parts.get("compressed", 0)
    guest = n * c.h.cluster_size
    zstd = c.h.compression_type == C.COMPRESSION_TYPE_ZSTD
    alt = "" if zstd else (" Keeping it compressed but with zstd decompresses several times faster: "
                           + convert_command(c.img, extra="-c", compression_type="zstd") + ".")
    return Finding(
        "compressed", "info",
        f"{n} compressed clusters ({c.h.compression_name}): {size_text(guest)} stored in {size_text(host)}",
        {"compressed-clusters": n, "guest-bytes": guest, "host-bytes": host,
         "ratio": round(host / guest, 3) if guest else 0.0, "compression-type": c.h.compression_name},
        f"Every read of a compressed cluster reads and {c.h.compression_name}-inflates the whole cluster, and the "
        "first write to it stores it uncompressed elsewhere (the file grows, the layout fragments)." + alt,
        convert_command(c.img) + "   # uncompressed")


def _rule_long_chain(c: _Context) -> Finding | None:
    if c.chain is None or len(c.chain) < LONG_CHAIN_LAYERS:
        return None
    bottom = c.chain[-1]
    rel = os.path.relpath(bottom.path, os.path.dirname(os.path.abspath(c.path)) or ".")
    sev = "warning" if len(c.chain) >= 8 else "info"
    return Finding(
        "long-chain", sev, f"Backing chain of {len(c.chain)} images",
        {"layers": len(c.chain), "backing-files": len(c.chain) - 1},
        f"A read of data this image does not hold is looked up in up to {len(c.chain) - 1} backing files, each "
        "with its own L2 cache and file descriptor; every layer adds latency and memory.",
        f"qemu-img rebase -f qcow2 -b {_q(rel)} -F {bottom.format} {_q(c.path)}   "
        "# pulls the intermediate layers into this image")


def _rule_v2(c: _Context) -> Finding | None:
    if c.h.version >= 3:
        return None
    return Finding(
        "v2-no-zero", "info", "qcow2 version 2 (compat=0.10): no zero clusters, no lazy refcounts",
        {"version": c.h.version},
        "Writing zeros over a backing file, or discarding, must store real zero-filled clusters; v3 stores a "
        "flag instead. v3 also allows extended L2, lazy refcounts, bitmaps and other refcount widths.",
        f"qemu-img amend -f qcow2 -o compat=1.1 {_q(c.path)}")


def _rule_narrow_refcount(c: _Context) -> Finding | None:
    bits = c.h.refcount_bits
    if bits > NARROW_REFCOUNT_BITS:
        return None
    top = (1 << bits) - 1
    if bits == 1:
        sev, what = "warning", "internal snapshots are impossible (every shared cluster needs refcount 2)"
    else:
        sev, what = "info", (f"a cluster can be shared by at most {top} references, so more than {top - 1} "
                             "internal snapshots overflow")
    return Finding(
        "narrow-refcount", sev, f"{bits}-bit refcounts: at most {top} references per cluster",
        {"refcount-bits": bits, "max-refcount": top, "snapshots": len(c.img.snapshots)},
        f"With {bits}-bit refcounts {what}; QEMU fails such operations with an error.",
        f"qemu-img amend -f qcow2 -o refcount_bits=16 {_q(c.path)}")


def _rule_guest_freed(c: _Context) -> Finding | None:
    from qinspect.analysis import guest_freed as g  # its own module; imports qinspect.guest

    found = g.guest_freed(c.img, c.space)
    if found is None:
        return None
    g.split_space(c.space, found)
    return Finding(g.RULE_ID, g.severity(found), g.title(found), g.evidence(found), g.impact(found),
                   g.fix_text(found), fixes=[f.to_json() for f in found.fixes])


_RULES = {
    "guest-freed": _rule_guest_freed,
    "corrupt-bit": _rule_corrupt_bit, "corruption": _rule_corruption, "dirty": _rule_dirty,
    "leaked-clusters": _rule_leaked, "bitmap-in-use": _rule_bitmap_in_use, "l2-cache-coverage": _rule_l2_cache,
    "cow-amplification": _rule_cow, "free-space": _rule_free_space, "zero-clusters": _rule_zero_clusters,
    "backing-duplicates": _rule_backing_duplicates, "preallocated-unused": _rule_preallocated,
    "snapshot-space": _rule_snapshots, "small-clusters": _rule_small_clusters,
    "fragmentation": _rule_fragmentation, "scattered-metadata": _rule_scattered, "compressed": _rule_compressed,
    "long-chain": _rule_long_chain, "v2-no-zero": _rule_v2, "narrow-refcount": _rule_narrow_refcount,
}


def diagnose(img: Image, deep: bool = False, progress: ProgressFn = no_progress,
             cancelled: CancelledFn = never_cancelled, *, layout: Layout | None = None,
             linux: bool = True) -> Diagnosis:
    """Run every rule on `img` (reading each data cluster too when `deep`); findings worst first.

    `progress` reports the layout walk, then (deep) the data read; pass a `layout` already
    computed for this image to skip the walk.
    """
    lay = layout if layout is not None else compute_layout(img, progress, cancelled)
    scan = deep_scan(img, progress, cancelled) if deep else None
    space = compute_space(img, lay, scan)
    h = img.header
    cache = cache_model(h.size, h.cluster_size, h.extended_l2, h.refcount_bits, linux=linux)
    ctx = _Context(img, lay, space, cache, scan)
    findings: list[Finding] = []
    ran: list[str] = []
    for rid in RULES:
        if rid in DEEP_RULES and not deep:
            continue
        ran.append(rid)
        f = _RULES[rid](ctx)
        if f is not None:
            findings.append(f)
    if img.snapshots:
        for f in findings:
            if f.fix.startswith("qemu-img convert"):
                f.impact += (f" Note: a conversion does not copy the {len(img.snapshots)} internal snapshot(s); "
                             "delete or export them first if they matter.")
    order = {rid: i for i, rid in enumerate(RULES)}
    findings.sort(key=lambda f: (SEVERITY_RANK[f.severity], order[f.id]))
    return Diagnosis(img.path, findings, space, cache, lay, scan, ran)


__all__ = ["DEEP_RULES", "RULES", "Diagnosis", "Finding", "convert_command", "diagnose"]
