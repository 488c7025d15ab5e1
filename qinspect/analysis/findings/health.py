"""Health rules: the image opens, its data is safe, its metadata is consistent, nobody is writing it.

Errors here mean data at risk or an image QEMU will not open: a missing or unreadable backing
file, a truncated file, invalid subcluster bitmaps, inconsistent metadata, the corrupt bit.
"""

from __future__ import annotations

import numpy as np

from qinspect.analysis.findings.common import path_arg, plural, size_text
from qinspect.analysis.findings.model import Category, Context, ConvertWish, Finding, Fix, Severity
from qinspect.analysis.findings.registry import rule
from qinspect.analysis.layout import Owner
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.hostfile import InUse
from qinspect.termtext import for_terminal

INVALID_BITMAPS = "invalid subcluster bitmaps"


def repaired(c: Context) -> dict[str, int | float | str]:
    """`qemu-img check -r all`: with refcount errors QEMU rebuilds the refcount structure at the end
    of the file (new refcount blocks for every cluster, then the table) and discards the old one;
    otherwise nothing moves."""
    lay = c.layout
    if not lay.refcount_errors:
        return c.unchanged()
    cs = c.h.cluster_size
    per_block = cs * 8 // c.h.refcount_bits
    blocks = -(-lay.nb_clusters // per_block)
    table = -(-blocks * 8 // cs)
    return {"file-size": c.file_size + (blocks + table) * cs, "disk-usage": c.disk_usage}


@rule("in-use")
def in_use(c: Context) -> Finding | None:
    if c.lock is InUse.NO:
        return None
    write = c.write_locked
    return Finding(
        "in-use", Severity.WARNING if write else Severity.INFO,
        "In use: a running VM holds the image's " + ("write lock; contents may be changing" if write else
                                                      "read lock (it has the image open read-only)"),
        {"lock": "write" if write else "read"},
        ("Another process (a running QEMU) writes to this image: every number here may already be out of date, "
         "and metadata can look inconsistent in the middle of its updates. No in-place repair is offered while "
         "the lock is held; stop the VM and run diagnose again." if write else
         "A running QEMU reads this image (typically as a backing file); it must not be modified in place."),
        None)


@rule("backing-missing")
def backing_missing(c: Context) -> Finding | None:
    if c.chain_error is None:
        return None
    name = c.h.backing_file or ""
    return Finding(
        "backing-missing", Severity.ERROR, "The backing file cannot be opened: QEMU cannot open this image",
        {"backing-file": name, "error": c.chain_error},
        f"{for_terminal(c.chain_error)}. Every guest read of data this image does not hold needs the backing chain; "
        "qemu-img and QEMU refuse to open the image until the backing file is there. Restore it, or point the "
        "image at the right file with `qemu-img rebase -u -b NEW_BACKING -F FORMAT IMAGE` (unsafe mode: only if "
        "NEW_BACKING has exactly the old backing file's content).",
        Fix(None, True, c.unchanged(), blocked="no command: only you know where the right backing file is"),
        Category.HEALTH)


def _missing_bytes(c: Context) -> int:
    """Bytes the structures need past the end of the file (0 when none).

    Whole clusters referenced past the end always count. Inside the last, partial cluster only
    what its owner needs: the L1 table, refcount table and snapshot table their own length (qemu-img
    leaves a new image ending right after its L1 table); data clusters with extended L2 (the file
    may end at the last written subcluster) and compressed clusters (which end anywhere) nothing.
    """
    lay = c.layout
    cs = c.h.cluster_size
    size = lay.file_size
    if lay.refs_past_eof:
        return max(0, lay.refs_end - size)
    if size % cs == 0 or lay.refs_end <= size:
        return 0
    last = size // cs
    kind = lay.kind[last] if last < len(lay.kind) else Owner.FREE
    h = c.h
    ends = {Owner.L1: h.l1_table_offset + h.l1_size * 8,
            Owner.REFCOUNT_TABLE: h.refcount_table_offset + h.refcount_table_entries * 8}
    if kind in ends:
        need = ends[kind] if kind != Owner.L1 or h.l1_table_offset // cs == last else (last + 1) * cs
    elif (kind in (Owner.DATA, Owner.COMPRESSED) and (h.extended_l2 or kind == Owner.COMPRESSED)) \
            or kind in (Owner.HEADER, Owner.FREE, Owner.LEAKED, Owner.PAST_END, Owner.SNAPSHOT_TABLE):
        need = 0
    else:
        need = (last + 1) * cs
    return max(0, need - size)


@rule("data-file-missing")
def data_file_missing(c: Context) -> Finding | None:
    if not c.h.has_data_file:
        return None
    try:
        c.img.data_file()
    except Qcow2Error as e:
        return Finding(
            "data-file-missing", Severity.ERROR,
            "The external data file cannot be opened: the guest data is unreadable",
            {"data-file": c.h.data_file or "", "error": e.message},
            f"{for_terminal(e.message)}. This image keeps its guest data in a separate file; QEMU cannot open the "
            "image without it. Restore the file, or name it with `qemu-img amend -o data_file=PATH IMAGE`.",
            Fix(None, True, c.unchanged(), blocked="no command: only you know where the data file is"))
    return None


@rule("truncated")
def truncated(c: Context) -> Finding | None:
    lay = c.layout
    missing = _missing_bytes(c)
    if missing <= 0:
        return None
    return Finding(
        "truncated", Severity.ERROR, f"The file is truncated: {missing:,} bytes missing",
        {"missing-bytes": missing, "file-size": lay.file_size, "referenced-end": lay.file_size + missing,
         "references-past-eof": lay.refs_past_eof},
        f"Tables reference data up to offset {lay.file_size + missing:#x} but the file ends at {lay.file_size:#x}: "
        f"{size_text(missing)} are gone (a copy or download cut short, a full disk). QEMU reads them as zeros, "
        "so guest data there is lost; qemu-img check does not notice. Restoring the file from a backup is the only "
        "way to get the data back.",
        Fix(["truncate", "-s", str(lay.file_size + missing), "--", c.path], True,
            {"file-size": lay.file_size + missing, "disk-usage": c.disk_usage},
            note="extends the file to its full length; the missing bytes stay zeros",
            loses=f"nothing more: the {missing:,} missing bytes already read as zeros and stay zeros"),
        Category.HEALTH)


@rule("invalid-subclusters")
def invalid_subclusters(c: Context) -> Finding | None:
    n = c.layout.anomalies.get(INVALID_BITMAPS, 0)
    if not n:
        return None
    cs = c.h.cluster_size
    lost = n * cs
    f = Finding(
        "invalid-subclusters", Severity.ERROR,
        f"{plural(n, 'L2 entry')} with an invalid subcluster bitmap: {size_text(lost)} of guest data unreadable",
        {"invalid-entries": n, "unreadable-bytes": lost},
        f"QEMU returns an I/O error for every read of these {plural(n, 'cluster')} and marks the image corrupt; "
        "qemu-img check reports them but `check -r all` cannot repair them. A conversion with --salvage copies "
        f"everything else and writes zeros where reads fail: the {size_text(lost)} of those clusters are lost "
        "(they are unreadable already).",
        None, Category.HEALTH,
        ConvertWish({}, "salvage the readable data (--salvage)", ("--salvage",)))
    return f


@rule("corrupt-bit")
def corrupt_bit(c: Context) -> Finding | None:
    if not c.h.corrupt:
        return None
    lay = c.layout
    return Finding(
        "corrupt-bit", Severity.ERROR, "The image is marked corrupt: QEMU opens it read-only only",
        {"refcount-errors": lay.refcount_errors, "leaks": lay.leaks, "anomalies": sum(lay.anomalies.values())},
        "QEMU set the corrupt bit after it found inconsistent metadata; the image cannot be opened "
        "read-write (a VM using it fails to start) until it is repaired.",
        Fix(["qemu-img", "check", "-r", "all", path_arg(c.path)], True, c.unchanged(),
            note="back the image up first"))


@rule("corruption")
def corruption(c: Context) -> Finding | None:
    lay = c.layout
    errors = 0 if c.h.dirty else lay.refcount_errors
    anomalies = {k: v for k, v in lay.anomalies.items() if v and k != INVALID_BITMAPS}
    if lay.refs_past_eof and lay.refs_end <= lay.file_size:
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
        what.append(f"{plural(errors, 'cluster')} referenced more often than the refcount says")
    what += [f"{n} {k}" for k, n in anomalies.items()]
    if c.write_locked:
        return Finding(
            "corruption", Severity.INFO, "Metadata looked inconsistent while a VM was writing the image", ev,
            "; ".join(what) + ". The image is in use: a running QEMU updates tables and refcounts in steps, so "
            "this may be a moment in the middle of an update and is no corruption verdict. Stop the VM and run "
            "diagnose again.", None)
    return Finding(
        "corruption", Severity.ERROR, "Metadata is inconsistent (qemu-img check reports corruption)", ev,
        "; ".join(what) + ". Writes may overwrite live data (a cluster with a too low refcount can be "
        "allocated again), and reads of invalid entries fail with I/O errors.",
        Fix(["qemu-img", "check", "-r", "all", path_arg(c.path)], True, repaired(c), note="back the image up first"))


@rule("dirty")
def dirty(c: Context) -> Finding | None:
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
        "dirty", Severity.WARNING, f"Dirty bit set{lazy}: the next read-write open repairs all refcounts first",
        {"l1-bytes": l1_bytes, "l2-tables": lay.l2_reads, "l2-bytes": l2_bytes, "refcount-table-bytes": rt_bytes,
         "refcount-blocks": lay.refcount_blocks, "refcount-block-bytes": rb_bytes, "repair-read-bytes": total,
         "stale-refcounts": lay.refcount_errors + lay.leaks},
        f"The image was not closed cleanly. QEMU will walk every L1 and L2 table (snapshots included) and "
        f"every refcount block before the VM can start: about {size_text(total)} of metadata reads "
        f"({plural(lay.l2_reads, 'L2 table')}, {plural(lay.refcount_blocks, 'refcount block')}), then rewrite "
        "the refcount structures.",
        Fix(["qemu-img", "check", "-r", "all", path_arg(c.path)], True, repaired(c), note="with the VM stopped"))


@rule("leaked-clusters")
def leaked(c: Context) -> Finding | None:
    lay = c.layout
    if c.h.dirty or not lay.leaks:
        return None
    leaked_b = c.space.parts.get("leaked", 0)
    leaked_disk = c.space.allocated_parts.get("leaked", 0)
    n = int(np.count_nonzero(lay.owner == Owner.LEAKED))
    sev = Severity.WARNING if leaked_disk >= 256 << 20 and leaked_disk >= 0.25 * c.disk_usage else Severity.INFO
    return Finding(
        "leaked-clusters", sev,
        f"{lay.leaks} leaked clusters ({size_text(leaked_b)} held by nothing)",
        {"leaks": lay.leaks, "leaked-clusters": n, "leaked-bytes": leaked_b, "leaked-disk-bytes": leaked_disk,
         "file-size": lay.file_size},
        f"{size_text(leaked_b)} of the file have a refcount but nothing uses them; qemu-img check exits with 3. "
        "No data is at risk. The repair frees them (QEMU punches them out of the file: the disk usage drops, the "
        "file size stays) and reuses them for new clusters.",
        Fix(["qemu-img", "check", "-r", "leaks", path_arg(c.path)], True,
            {"file-size": c.file_size, "disk-usage": c.disk_usage - leaked_disk}),
        Category.SPACE)


@rule("bitmap-in-use")
def bitmap_in_use(c: Context) -> Finding | None:
    bad = [b for b in c.img.bitmaps if b.in_use]
    if not bad:
        return None
    b = bad[0]
    x = bad[0]
    p = path_arg(c.path)
    # One bitmap per fix (a shell `&&` chain cannot be one argv); the others are listed.
    argv = ["qemu-img", "bitmap", "--remove", p, x.name]
    # Removing it frees (and QEMU discards) its bitmap table; its data clusters are not counted.
    cs = c.h.cluster_size
    table = -(-x.bitmap_table_size * 8 // cs) * cs if x.bitmap_table_offset else 0
    more = f" ({len(bad) - 1} more: run the same for each)" if len(bad) > 1 else ""
    return Finding(
        "bitmap-in-use", Severity.WARNING,
        f"{len(bad)} dirty bitmap(s) marked in use: '{for_terminal(b.name)}'" + (" and more" if len(bad) > 1 else ""),
        {"bitmaps-in-use": len(bad), "bitmaps": len(c.img.bitmaps), "granularity": b.granularity},
        "The image was not closed cleanly while the bitmap was loaded, so its contents are stale. QEMU treats it "
        "as inconsistent: incremental backups based on it fail until it is removed and a full backup is taken.",
        Fix(argv, True,
            {"file-size": c.file_size, "disk-usage": c.disk_usage - table, "bitmaps": len(c.img.bitmaps) - 1},
            note=f"then `qemu-img bitmap --add -g {x.granularity}` it again and take a full backup{more}"))
