"""Following a live image (`f`): re-read what changed, never the whole image (no Textual here).

Every second the main screen asks `refresh_changed`. When the file's size and mtime are what they
were, nothing is read. Otherwise a fresh image is opened on the same file (a replaced file is
reported, never mixed in), its L1 table is compared with the one shown, and these L2 tables are
re-read and re-classified: those whose L1 entry changed (new, moved or freed tables) and a bounded
round-robin slice of the others (a running VM writes into existing L2 tables, which the L1 table
does not show). Clusters that became allocated are counted (and kept for highlighting). Host
clusters in use when the first change is seen are remembered, so that once the host layout is
rescanned `fresh_host_clusters` can say which ones were newly allocated (data and metadata). The
analyses that depend on the whole file (layout, space, diagnosis, check) are dropped so that the
scan pipeline recomputes them. Read-only as always.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qinspect.analysis.layout import Layout, Owner
from qinspect.qcow2 import constants as C
from qinspect.qcow2.hostfile import FileIdentity
from qinspect.tui.guestmap import GuestMap
from qinspect.tui.palette import G
from qinspect.tui.session import FileReplaced, Session

# L2 tables re-read per look besides those whose L1 entry changed (bounded work per second).
RECHECK_TABLES = 64


@dataclass
class Changes:
    """What one look at a followed image found."""

    replaced: bool = False
    resized: bool = False
    tables: int = 0  # L2 tables re-read
    new_clusters: int = 0  # clusters that were unallocated and now hold something


def _allocated(states: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = (states != G.UNALLOCATED) & (states != G.UNKNOWN)
    return out


def _host_in_use(layout: Layout) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = (layout.owner != Owner.FREE) & (layout.owner != Owner.PAST_END)
    return out


def fresh_host_clusters(s: Session) -> npt.NDArray[np.int64]:
    """Host clusters in use now (data or metadata) that were not when following saw its first
    change; empty before the first change or while the host layout is not rescanned."""
    base, lay = s.follow_host_base, s.layout
    if base is None or lay is None:
        return np.zeros(0, dtype=np.int64)
    now = _host_in_use(lay)
    was = np.zeros(len(now), dtype=np.bool_)
    k = min(len(now), len(base))
    was[:k] = base[:k]
    out: npt.NDArray[np.int64] = np.flatnonzero(now & ~was).astype(np.int64)
    return out


def refresh_changed(s: Session) -> Changes | None:
    """Look at the file; re-read what changed. None when nothing changed since the last look."""
    now = FileIdentity.of_path(s.path)
    if now is None:
        return Changes(replaced=True)
    seen = s.follow_seen or s.identity
    if (now.dev, now.ino) != (seen.dev, seen.ino):
        return Changes(replaced=True)
    if (now.size, now.mtime_ns) == (seen.size, seen.mtime_ns):
        return None
    try:
        fresh = s.pool.open()
    except FileReplaced:
        return Changes(replaced=True)
    s.follow_seen = now
    if s.follow_host_base is None:
        # what the host held before the first change: the layout if it was scanned, else the file
        # as it was (clusters past its old end are new)
        if s.layout is not None:
            s.follow_host_base = _host_in_use(s.layout)
        else:
            s.follow_host_base = np.ones(-(-seen.size // s.img.cluster_size), dtype=np.bool_)
    old_img, gm = s.img, s.guest
    out = Changes(resized=now.size != seen.size)
    old_l1, new_l1 = old_img.l1_table, fresh.l1_table
    n = max(len(old_l1), len(new_l1))
    a = np.zeros(n, dtype=np.uint64)
    b = np.zeros(n, dtype=np.uint64)
    a[: len(old_l1)] = old_l1
    b[: len(new_l1)] = new_l1
    changed = set(np.flatnonzero(a != b).tolist())
    new_gm = gm
    mask = np.uint64(C.L1E_OFFSET_MASK)
    with_l2 = np.flatnonzero(b[: gm.n_tables] & mask)
    if len(with_l2) and int(with_l2[-1]) >= gm.n_dense:
        new_gm = GuestMap(fresh, max((layer.virtual_size for layer in s.layers[1:]), default=0))
        k = min(gm.n_dense, new_gm.n_dense)
        new_gm.copy_known(gm, k)
        new_gm.backing_error = gm.backing_error
    start = s.follow_cursor % max(1, new_gm.n_dense)
    extra = [(start + i) % new_gm.n_dense for i in range(min(RECHECK_TABLES, new_gm.n_dense))]
    s.follow_cursor = start + len(extra)
    tables = sorted({t for t in changed if t < new_gm.n_dense} | set(extra))
    for t in tables:
        before = gm.chunk(t) if t < gm.n_dense else None
        new_gm.compute(fresh, t, t + 1, shared=False)  # this table as it is now
        after = new_gm.chunk(t)
        if after is None:
            continue
        if before is None:
            became = _allocated(after)
            if t < gm.n_dense and gm.scanned[t]:
                # known only as counts: count the change, not the clusters
                known = gm.table_counts(t)
                delta = int(after.size - np.count_nonzero(~became)) - int(known.sum() - known[G.UNALLOCATED])
                out.new_clusters += max(0, delta)
                continue
        else:
            became = _allocated(after) & ~_allocated(before[: len(after)])
        idx = np.flatnonzero(became) + t * new_gm.l2_size
        out.new_clusters += len(idx)
        s.fresh_clusters.update(idx[: 10_000].tolist())
    out.tables = len(tables)
    s.retire(old_img)
    s.img = fresh
    s.guest = new_gm
    s.pool.reset(fresh.shared_metadata())  # the file as it is now
    s.layout = s.check = s.diagnosis = s.space = None
    return out


__all__ = ["RECHECK_TABLES", "Changes", "fresh_host_clusters", "refresh_changed"]
