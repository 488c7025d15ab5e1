"""Space rules: why the file is bigger than the guest data it holds, and what gives space back.

Thresholds: a space finding is shown when what it is about is at least `SPACE_MIN_BYTES` and
`SPACE_MIN_SHARE` of the file (or, for on-disk costs, of the disk usage); it is a warning from
`SPACE_WARNING_BYTES` and `SPACE_WARNING_SHARE`. Fixes that are conversions are planned together
(`fixes.plan_converts`), which drops them for a finding they would not help.
"""

from __future__ import annotations

from qinspect.analysis.findings.common import path_arg, pct, plural, size_text
from qinspect.analysis.findings.model import Category, Context, ConvertWish, Finding, Fix, Severity
from qinspect.analysis.findings.registry import rule
from qinspect.termtext import LIST_LIMIT, bounded, for_terminal

SPACE_MIN_BYTES = 1 << 20
SPACE_MIN_SHARE = 0.10
SPACE_WARNING_BYTES = 256 << 20
SPACE_WARNING_SHARE = 0.25


def worth(n: int, total: int) -> bool:
    """At or above the threshold for showing a space finding."""
    return n >= SPACE_MIN_BYTES and n >= SPACE_MIN_SHARE * max(1, total)


def severity(n: int, total: int) -> Severity:
    return Severity.WARNING if n >= SPACE_WARNING_BYTES and n >= SPACE_WARNING_SHARE * max(1, total) \
        else Severity.INFO


@rule("free-space")
def free_space(c: Context) -> Finding | None:
    parts, disk = c.space.parts, c.space.allocated_parts
    free, tail = parts.get("free", 0), parts.get("tail", 0)
    total = free + tail
    on_disk = disk.get("free", 0) + disk.get("tail", 0)
    if not worth(total, c.file_size):
        return None
    share = total / max(1, c.file_size)
    return Finding(
        "free-space", severity(on_disk, c.disk_usage), f"{size_text(total)} of the file is unused ({pct(share)})",
        {"free-bytes": free, "free-clusters": free // c.h.cluster_size, "tail-bytes": tail, "on-disk-bytes": on_disk,
         "image-end-offset": c.layout.image_end_offset, "file-size": c.file_size},
        f"{size_text(free)} are free clusters inside the image (refcount 0, reused by later writes) and "
        f"{size_text(tail)} lie past the last cluster in use; {size_text(on_disk)} of it occupies the disk. "
        "A conversion writes none of it.",
        None, Category.SPACE, ConvertWish({}, "drop unused clusters"))


@rule("zero-clusters", deep=True)
def zero_clusters(c: Context) -> Finding | None:
    d = c.deep
    if d is None or not d.zero_clusters or c.fully_allocated() or not worth(d.zero_bytes, c.disk_usage):
        return None
    over = " (they hide the backing file's data, so they become zero clusters)" if c.has_backing else ""
    return Finding(
        "zero-clusters", severity(d.zero_bytes, c.disk_usage),
        f"{d.zero_clusters} data clusters hold only zeros ({size_text(d.zero_bytes)})",
        {"zero-clusters": d.zero_clusters, "zero-bytes": d.zero_bytes, "data-clusters": d.data_clusters,
         "convert-size": d.convert_size, "convert-reclaim": d.convert_reclaim},
        f"The guest wrote zeros as data; they take {size_text(d.zero_bytes)} of the file. A conversion stores "
        f"them as zero clusters, taking no space{over}.",
        None, Category.SPACE, ConvertWish({}, "store all-zero clusters as zero clusters"))


@rule("backing-duplicates", deep=True)
def backing_duplicates(c: Context) -> Finding | None:
    d = c.deep
    if d is None or not d.duplicate_clusters or not c.has_backing or not worth(d.duplicate_bytes, c.disk_usage):
        return None
    bname = c.h.backing_file or ""
    data_disk = c.space.allocated_parts.get("guest-data", 0) + c.space.allocated_parts.get("zero-allocated", 0) \
        + c.space.allocated_parts.get("preallocated-unused", 0)
    return Finding(
        "backing-duplicates", severity(d.duplicate_bytes, c.disk_usage),
        f"{d.duplicate_clusters} clusters repeat what the backing file holds ({size_text(d.duplicate_bytes)})",
        {"duplicate-clusters": d.duplicate_clusters, "duplicate-bytes": d.duplicate_bytes,
         "data-clusters": d.data_clusters},
        f"{size_text(d.duplicate_bytes)} of this overlay are byte-for-byte copies of the backing chain's data "
        "(copy-on-write of whole clusters, or data rewritten unchanged). qemu-img has no command that drops "
        "them from the overlay alone; committing the overlay into its backing file removes them (and empties "
        f"the overlay), but only do that if no other image uses '{for_terminal(bname)}'.",
        Fix(["qemu-img", "commit", "-f", "qcow2", path_arg(c.path)], True, _emptied(c, data_disk),
            note="only if nothing else uses the backing file; it grows by this overlay's data"),
        Category.SPACE)


def _emptied(c: Context, data_disk: int) -> dict[str, int | float | str]:
    """The overlay after `qemu-img commit` empties it (qcow2_make_empty): a v3 image without
    snapshots, bitmaps, encryption or data file is rebuilt as header, refcount table, refcount
    block and L1 table; otherwise every cluster is discarded (punched) and the size stays."""
    h = c.h
    l1_clusters = -(-h.l1_size * 8 // h.cluster_size)
    if h.version >= 3 and not c.img.snapshots and not c.img.bitmaps and not c.img.encrypted \
            and not h.has_data_file:
        size = (3 + l1_clusters) * h.cluster_size
        return {"file-size": size, "disk-usage": size}
    return {"file-size": c.file_size, "disk-usage": c.disk_usage - data_disk}


@rule("preallocated-unused")
def preallocated_unused(c: Context) -> Finding | None:
    sp = c.space
    zero_alloc = sp.parts.get("zero-allocated", 0)
    unused = sp.parts.get("preallocated-unused", 0)
    prealloc_look = c.fully_allocated()
    deep_zero = c.deep.zero_bytes if c.deep is not None and prealloc_look else 0
    total = zero_alloc + unused + deep_zero
    on_disk = sp.allocated_parts.get("zero-allocated", 0) + sp.allocated_parts.get("preallocated-unused", 0) \
        + deep_zero
    if total and (worth(on_disk, c.disk_usage) or worth(total, c.file_size)):
        gc = sp.guest_clusters
        what = []
        if zero_alloc:
            what.append(f"{size_text(zero_alloc)} in zero-allocated clusters (they read as zeros)")
        if unused:
            what.append(f"{size_text(unused)} allocated but never written ({size_text(gc.get('unwritten', 0))} "
                        f"reserved as zeroed space on disk, {size_text(gc.get('hole', 0))} holes taking no space, "
                        "the rest unallocated subclusters)")
        if deep_zero:
            what.append(f"{size_text(deep_zero)} in preallocated clusters that still hold only zeros")
        return Finding(
            "preallocated-unused", severity(on_disk, c.disk_usage),
            f"{size_text(total)} allocated in the file but never written by the guest",
            {"zero-allocated-bytes": zero_alloc, "unused-bytes": unused, "zero-preallocated-bytes": deep_zero,
             "on-disk-bytes": on_disk, "unwritten-bytes": gc.get("unwritten", 0), "hole-bytes": sp.hole_bytes,
             "fully-allocated": int(prealloc_look)},
            "; ".join(what) + f". Of this, {size_text(on_disk)} occupy the disk.",
            None, Category.SPACE, _wish(c, prealloc_look))
    if prealloc_look and c.deep is None and not c.h.has_data_file and worth(c.disk_usage, c.disk_usage):
        return Finding(
            "preallocated-unused", Severity.INFO,
            "Every guest cluster is allocated (a preallocated image?); --deep tells how much is unused",
            {"fully-allocated": 1, "on-disk-bytes": c.disk_usage},
            "All guest clusters have host clusters holding written data. If the image was preallocated "
            "(preallocation=full), the part the guest never wrote is zeros a conversion would drop; only reading "
            "the data (--deep) can tell how much, and what the conversion would give back.",
            None, Category.SPACE)
    return None


def _wish(c: Context, preallocated: bool) -> ConvertWish:
    """Preallocation goes away with a plain conversion; the zero padding QEMU allocates around small
    writes into fresh clusters stays unless the target has extended L2 (subclusters)."""
    if preallocated or c.h.extended_l2:
        return ConvertWish({}, "drop never-written preallocation (keep it instead if you preallocated to avoid "
                               "allocation cost on first write)")
    return ConvertWish({"extended_l2": "on"}, "extended L2, so that the never-written parts of partly written "
                                              "clusters are not allocated (needs QEMU 5.2 or later)")


@rule("snapshot-space")
def snapshot_space(c: Context) -> Finding | None:
    if not c.img.snapshots:
        return None
    sp = c.space
    held = sp.parts.get("snapshot-data", 0) + sp.parts.get("snapshot-l2-tables", 0) + \
        sp.parts.get("snapshot-l1-tables", 0)
    if not worth(held, c.file_size) or not sp.snapshots:
        return None
    ev: dict[str, int | float | str] = {"snapshots": len(c.img.snapshots), "held-bytes": held}
    for sid, b in sp.snapshots.items():
        ev[f"snapshot {sid} exclusive-bytes"] = b
    sid, _b = max(sp.snapshots.items(), key=lambda kv: kv[1])
    name = sp.snapshot_names.get(sid, sid)
    frees_disk = sp.snapshot_disk.get(sid, 0)
    # Named in table order; past LIST_LIMIT only those freeing the most (the evidence has every one).
    items = list(sp.snapshots.items())
    if len(items) > LIST_LIMIT:
        keep = {s for s, _b in sorted(items, key=lambda kv: -kv[1])[:LIST_LIMIT]}
        items = [kv for kv in items if kv[0] in keep]
    per = bounded([f"'{for_terminal(sp.snapshot_names.get(s, s))}' {size_text(b)}" for s, b in items],
                  total=len(sp.snapshots))
    return Finding(
        "snapshot-space", severity(held, c.file_size),
        f"{plural(len(c.img.snapshots), 'internal snapshot')} hold {size_text(held)} the current disk no longer uses",
        ev,
        f"Deleting a snapshot frees what only it references: {per}. Space shared by several snapshots is freed "
        "only when the last of them goes; QEMU punches the freed clusters out of the file.",
        Fix(["qemu-img", "snapshot", "-d", name, path_arg(c.path)], True,
            {"file-size": c.file_size, "disk-usage": c.disk_usage - frees_disk, "snapshots": len(c.img.snapshots) - 1},
            note="deletes the snapshot freeing the most space"),
        Category.SPACE)
