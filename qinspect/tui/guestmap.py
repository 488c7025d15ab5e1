"""The guest map's data: one state per guest cluster, held per L2 table, aggregated per zoom level.

Nothing here is per-cluster Python objects. A cluster's state is one byte in a numpy array; the
arrays are computed one L2-table span at a time from the core's vectorised extents (this layer,
then the backing layers where this one is unallocated), kept in a bounded LRU, and summarised per
L2 table as state counts. A map cell covering many clusters is aggregated from those counts (whole
tables) or from the per-cluster chunk (less than a table), so a 1 TiB image costs a few thousand
table summaries, and only the tables on screen are read before the full scan gets to them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.image import Image, Layer, RawLayer
from qinspect.qcow2.l2 import SubclusterType
from qinspect.tui.palette import GUEST_COLOURS, GUEST_LETTERS, NSTATES, G, backing_state

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# Glyphs: how full a cell is (share of its clusters that are not unallocated).
GLYPHS = (" ", "·", "░", "▒", "▓", "█")
GL_UNKNOWN, GL_EMPTY, GL_LIGHT, GL_MEDIUM, GL_DARK, GL_FULL = range(6)

# Per-cluster states kept in memory at most (bytes); older table chunks are dropped (their
# per-table counts stay).
CHUNK_BUDGET = 8 << 20
# Tables aggregated at a time for coarse cells (bounds the int64 temporaries to ~7 MiB).
COARSE_BLOCK = 1 << 16  # a screenful at one cluster per cell is ~6,000 clusters; the rest is counts

_SC_TO_G = np.zeros(8, dtype=np.uint8)
_SC_TO_G[SubclusterType.UNALLOCATED_PLAIN] = G.UNALLOCATED
_SC_TO_G[SubclusterType.UNALLOCATED_ALLOC] = G.RESERVED
_SC_TO_G[SubclusterType.ZERO_PLAIN] = G.ZERO_PLAIN
_SC_TO_G[SubclusterType.ZERO_ALLOC] = G.ZERO_ALLOC
_SC_TO_G[SubclusterType.NORMAL] = G.DATA
_SC_TO_G[SubclusterType.COMPRESSED] = G.COMPRESSED
_SC_TO_G[SubclusterType.INVALID] = G.INVALID

_ALLOC_COLS = np.array([s for s in range(NSTATES) if s not in (G.UNKNOWN, G.UNALLOCATED)], dtype=np.int64)


def majority(counts: npt.NDArray[np.int64]) -> U8:
    """The state with the most clusters in each row of state counts (not-scanned aside); ties go
    to the allocated state, so a half-full cell shows what is there."""
    c = counts.astype(np.int64).copy()
    c[:, G.UNKNOWN] = -1
    c[:, G.UNALLOCATED] = c[:, G.UNALLOCATED] * 2 - 1  # compare 2u-1 with 2a: a tie goes to a
    c[:, _ALLOC_COLS] *= 2
    out: U8 = np.argmax(c, axis=1).astype(np.uint8)
    return out


def extents_to_clusters(guest: I64, length: I64, codes: U8, g0: int, n: int, cs: int, g_end: int) -> U8:
    """Per-cluster states of `n` clusters from `g0`, from sorted extents covering the range.

    A cluster covered by one extent (or by several of one state) takes that state; by extents of
    different states it is PARTIAL; touched by an INVALID extent it is INVALID.
    """
    keep = length > 0
    starts = guest[keep]
    codes = codes[keep]
    if n <= 0:
        return np.zeros(0, dtype=np.uint8)
    if len(starts) == 0:
        return np.full(n, G.UNALLOCATED, dtype=np.uint8)
    cl_start = g0 + np.arange(n, dtype=np.int64) * cs
    cl_last = np.minimum(cl_start + cs, g_end) - 1
    first = np.clip(np.searchsorted(starts, cl_start, "right") - 1, 0, len(starts) - 1)
    last = np.clip(np.searchsorted(starts, cl_last, "right") - 1, 0, len(starts) - 1)
    out = codes[first].copy()
    changes = np.zeros(len(codes), dtype=np.int64)
    if len(codes) > 1:
        changes[1:] = np.cumsum(codes[1:] != codes[:-1])
    out[changes[last] != changes[first]] = G.PARTIAL
    inv = np.zeros(len(codes) + 1, dtype=np.int64)
    inv[1:] = np.cumsum(codes == G.INVALID)
    out[(inv[last + 1] - inv[first]) > 0] = G.INVALID
    return out


def layer_states(layer: Layer, g0: int, g1: int, cs: int) -> U8:
    """States of the clusters (size `cs`) of guest [g0, g1) in this layer alone."""
    n = -(-(g1 - g0) // cs)
    out = np.full(n, G.UNALLOCATED, dtype=np.uint8)
    end = min(g1, layer.virtual_size)
    if end <= g0:
        return out
    m = -(-(end - g0) // cs)
    if isinstance(layer, RawLayer):
        out[:m] = G.DATA
        return out
    assert isinstance(layer, Image)
    gs: list[I64] = []
    ls: list[I64] = []
    cs_: list[U8] = []
    for ex in layer.extents(g0, end):
        gs.append(ex.guest)
        ls.append(ex.length)
        cs_.append(_SC_TO_G[ex.sctype])
    if gs:
        out[:m] = extents_to_clusters(np.concatenate(gs), np.concatenate(ls), np.concatenate(cs_), g0, m, cs, end)
    return out


def chain_states(layers: list[Layer], g0: int, g1: int, cs: int) -> U8:
    """States of the top layer's clusters over [g0, g1), resolving unallocated ones downwards."""
    out = layer_states(layers[0], g0, g1, cs)
    for depth in range(1, len(layers)):
        todo = out == G.UNALLOCATED
        if not todo.any():
            break
        below = layer_states(layers[depth], g0, g1, cs)
        provided = todo & (below != G.UNALLOCATED) & (below != G.RESERVED)
        out[provided] = backing_state(depth)
    return out


class GuestMap:
    """States of every guest cluster, computed lazily per L2 table span; thread-safe.

    Only the tables that can hold anything are kept as arrays (the *dense* range: up to the last
    L1 entry with an L2 table, or to the end of the backing chain's data); the guest space past it
    is unallocated by construction, so a huge virtual size costs nothing.
    """

    def __init__(self, img: Image, backing_size: int | None = None) -> None:
        h = img.header
        self.virtual_size = h.size
        self.cluster_size = h.cluster_size
        self.l2_size = h.l2_size
        # Guest space past the largest L1 table the format allows is never mapped (QEMU refuses such a
        # virtual size): a hostile size in the header must not size the arrays below.
        max_clusters = (C.QCOW_MAX_L1_SIZE // C.L1E_SIZE) * h.l2_size
        self.n_clusters = max(1, min(-(-h.size // h.cluster_size), max_clusters))
        self.n_tables = -(-self.n_clusters // self.l2_size)
        self.has_backing = h.backing_file is not None
        l1 = img.l1_table
        n_l1 = min(len(l1), self.n_tables)
        has_l2 = (l1[:n_l1] & np.uint64(C.L1E_OFFSET_MASK)) != 0
        with_l2 = np.flatnonzero(has_l2)
        last = int(with_l2[-1]) + 1 if len(with_l2) else 0
        back_tables = 0
        if self.has_backing:
            bsize = self.virtual_size if backing_size is None else min(backing_size, self.virtual_size)
            back_tables = -(-bsize // (self.l2_size * self.cluster_size))
        self.n_dense = max(1, min(self.n_tables, max(last, back_tables)))
        self.dense_end = min(self.n_dense * self.l2_size, self.n_clusters)  # first cluster past it
        dtype = np.uint8 if self.l2_size < 256 else np.uint16 if self.l2_size < 65536 else np.uint32
        self.scanned = np.zeros(self.n_dense, dtype=bool)
        self._chunks: OrderedDict[int, U8] = OrderedDict()
        self._lock = threading.Lock()
        self.version = 0
        self.backing_error: str | None = None
        # L2 tables that several L1 entries point at (hostile images share one table millions of
        # times): in an image without a backing file every full-size table with the same L2 table
        # has the same states, so each distinct table is classified once and its state counts are
        # held once. `counts` has a row per distinct table; `_row_of` maps a table to its row
        # (None: one row per table), `_row_rep` a row to its first table (the one classified),
        # `_mult` a row to how many tables share it, `_shared` a row to its tables (until stored).
        self._shared: dict[int, npt.NDArray[np.int32]] = {}
        self._row_of: npt.NDArray[np.int32] | None = None
        self._row_rep: npt.NDArray[np.int32] | None = None
        self._mult: npt.NDArray[np.int64] | None = None
        n_rows = self.n_dense
        if not self.has_backing:
            k = min(n_l1, self.n_dense, self.n_clusters // self.l2_size)  # full-size tables only
            # Lean on purpose (the L1 table may have millions of entries): int32 table numbers,
            # cluster numbers as uint32 where they fit, each temporary dropped once used.
            offs = l1[:k] & np.uint64(C.L1E_OFFSET_MASK)
            idx = np.flatnonzero(offs).astype(np.int32)
            if len(idx) > 1:
                vals = offs[idx] >> np.uint64(h.cluster_bits)
                del offs
                if int(vals.max()) < 1 << 32:
                    vals = vals.astype(np.uint32)
                order = np.argsort(vals, kind="stable").astype(np.int32)
                sorted_vals = vals[order]
                del vals
                starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
                del sorted_vals
                sizes = np.diff(np.r_[starts, len(order)])
                groups = np.flatnonzero(sizes > 1)
                if len(groups):
                    row_of = np.arange(self.n_dense, dtype=np.int32)  # first the group's first table
                    members_of: dict[int, npt.NDArray[np.int32]] = {}
                    for g in groups.tolist():
                        members = idx[order[starts[g] : starts[g] + sizes[g]]]  # ascending (stable sort)
                        row_of[members[1:]] = members[0]
                        members_of[int(members[0])] = members[1:]
                    del order, idx, starts, sizes
                    is_first = row_of == np.arange(self.n_dense, dtype=np.int32)
                    number = np.cumsum(is_first, dtype=np.int32) - 1  # the row of each group's first table
                    self._row_of = number[row_of]
                    del row_of, number
                    self._row_rep = np.flatnonzero(is_first).astype(np.int32)
                    self._mult = np.bincount(self._row_of, minlength=len(self._row_rep)).astype(np.int64)
                    self._shared = {int(self._row_of[f]): m for f, m in members_of.items()}
                    n_rows = len(self._row_rep)
        self.counts = np.zeros((n_rows, NSTATES), dtype=dtype)
        # Tables with no L2 table in an image without a backing file are known without any read.
        if not self.has_backing:
            dense_l2 = np.zeros(self.n_dense, dtype=bool)
            k = min(n_l1, self.n_dense)
            dense_l2[:k] = has_l2[:k]
            empty = np.flatnonzero(~dense_l2)
            if len(empty):
                self.counts[self._rows(empty), G.UNALLOCATED] = self._table_sizes(empty)
                self.scanned[empty] = True

    # -- tables and their rows of state counts --------------------------------------------------------
    def _rows(self, tables: npt.NDArray[np.integer] | slice) -> npt.NDArray[np.integer] | slice:
        """The rows of `counts` of these tables (the tables themselves when none share a row)."""
        if self._row_of is None:
            return tables
        return self._row_of[tables].astype(np.intp)

    def _row(self, t: int) -> int:
        return t if self._row_of is None else int(self._row_of[t])

    def table_counts(self, t: int) -> npt.NDArray[np.int64]:
        """Clusters per state of dense table `t` (zeros while it is not scanned)."""
        with self._lock:
            out: npt.NDArray[np.int64] = self.counts[self._row(t)].astype(np.int64)
        return out

    def first_tables(self, k: int) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.bool_]]:
        """Copies of the first `k` tables' state counts (one row per table) and scanned flags."""
        with self._lock:
            return self.counts[self._rows(slice(0, k))].copy(), self.scanned[:k].copy()

    def copy_known(self, other: GuestMap, k: int) -> None:
        """Take the first `k` tables' states from `other` (the same image before it grew)."""
        rows, scanned = other.first_tables(k)
        with self._lock:
            self._unshare()
            self.counts[:k] = rows
            self.scanned[:k] = scanned

    def _unshare(self) -> None:
        """One row per table again (a followed table is re-read alone: it may no longer share)."""
        if self._row_of is not None:
            self.counts = self.counts[self._row_of]
            self._row_of = self._row_rep = self._mult = None
            self._shared.clear()

    # -- the grid's view of it (GridSource) ------------------------------------------------------------
    @property
    def unit_bytes(self) -> int:
        return self.cluster_size

    @property
    def n_units(self) -> int:
        return self.n_clusters

    @staticmethod
    def colour(code: int) -> str:
        return GUEST_COLOURS.get(code, GUEST_COLOURS[G.UNKNOWN])

    @staticmethod
    def letter(code: int) -> str:
        return GUEST_LETTERS.get(code, "?")

    # -- geometry -------------------------------------------------------------------------------
    def _table_sizes(self, tables: I64) -> I64:
        lo = tables.astype(np.int64) * self.l2_size
        return np.minimum(lo + self.l2_size, self.n_clusters) - lo

    def table_range(self, t: int) -> tuple[int, int]:
        lo = t * self.l2_size
        return lo, min(lo + self.l2_size, self.n_clusters)

    def n_cells(self, zoom: int) -> int:
        return -(-self.n_clusters // (1 << zoom))

    @property
    def max_zoom(self) -> int:
        return max(0, (self.n_clusters - 1).bit_length())

    @property
    def complete(self) -> bool:
        return bool(self.scanned.all())

    @property
    def scanned_tables(self) -> int:
        """Tables whose states are known (those past the dense range always are)."""
        return int(self.scanned.sum()) + self.n_tables - self.n_dense

    # -- computing ----------------------------------------------------------------------------------
    def compute(self, img: Image, t0: int, t1: int, *, shared: bool = True) -> None:
        """Read and classify tables [t0, t1) with `img` (a worker's own image) and store them; a
        table sharing its L2 table with an earlier one gets that one's states (classified once).
        `shared=False` reads every table of the range (a followed image's L1 may have changed)."""
        t1 = min(t1, self.n_dense)
        if t0 >= t1:
            return
        if self._row_of is None or self._row_rep is None or not shared:
            self._classify(img, t0, t1, shared)
            return
        reps = self._row_rep[self._row_of[t0:t1]]
        mine = reps == np.arange(t0, t1)
        for r in np.unique(reps[~mine]).tolist():
            if not self.scanned[r]:
                self._classify(img, r, r + 1)  # its copies get its states as it is stored
        # runs of tables with an L2 table of their own (or the first of a group), not classified yet
        own = np.flatnonzero(mine & ~self.scanned[t0:t1])
        if len(own):
            cuts = np.flatnonzero(np.diff(own) != 1) + 1
            for run in np.split(own, cuts):
                self._classify(img, t0 + int(run[0]), t0 + int(run[-1]) + 1)

    def _classify(self, img: Image, t0: int, t1: int, shared: bool = True) -> None:
        layers, err = img.open_chain()
        if err is not None:
            self.backing_error = str(err)
        c0 = t0 * self.l2_size
        c1 = min(t1 * self.l2_size, self.n_clusters)
        g0 = c0 * self.cluster_size
        g1 = min(c1 * self.cluster_size, self.virtual_size)
        states = chain_states(layers, g0, g1, self.cluster_size)
        self.store(t0, states, shared)

    def store(self, t0: int, states: U8, shared: bool = True) -> None:
        n_t = min(-(-len(states) // self.l2_size), self.n_dense - t0)
        if n_t <= 0:
            return
        states = states[: n_t * self.l2_size]
        rows = np.repeat(np.arange(n_t, dtype=np.int64), self.l2_size)[: len(states)]
        flat = np.bincount(rows * NSTATES + states, minlength=n_t * NSTATES).reshape(n_t, NSTATES)
        with self._lock:
            if self._row_of is not None and self._mult is not None:
                rows = self._row_of[t0 : t0 + n_t].astype(np.intp)
                if not shared and bool((self._mult[rows] > 1).any()):
                    self._unshare()  # re-read alone: its L2 table may have changed
                    self.counts[t0 : t0 + n_t] = flat
                else:
                    self.counts[rows] = flat
                    for r in rows.tolist():
                        others = self._shared.pop(r, None)
                        if others is not None:  # the same L2 table elsewhere: the same states
                            self.scanned[others] = True
            else:
                self.counts[t0 : t0 + n_t] = flat
            self.scanned[t0 : t0 + n_t] = True
            for k in range(n_t):
                chunk = states[k * self.l2_size : (k + 1) * self.l2_size]
                self._chunks[t0 + k] = chunk
                self._chunks.move_to_end(t0 + k)
            while len(self._chunks) * self.l2_size > CHUNK_BUDGET and len(self._chunks) > 1:
                self._chunks.popitem(last=False)
            self.version += 1

    def chunk(self, t: int) -> U8 | None:
        """Per-cluster states of table `t`: stored, or implied by a uniform table summary."""
        if t >= self.n_dense:
            lo, hi = self.table_range(t)
            return np.full(max(0, hi - lo), G.UNALLOCATED, dtype=np.uint8)
        with self._lock:
            c = self._chunks.get(t)
            if c is not None:
                self._chunks.move_to_end(t)
                return c
            if self.scanned[t]:
                nz = np.flatnonzero(self.counts[self._row(t)])
                if len(nz) == 1:
                    lo, hi = self.table_range(t)
                    return np.full(hi - lo, nz[0], dtype=np.uint8)
        return None

    def table_has(self, t: int, states: list[int]) -> bool:
        """Whether scanned table `t` holds a cluster in one of `states` (False when not scanned)."""
        if t >= self.n_dense:
            return G.UNALLOCATED in states
        with self._lock:
            return bool(self.scanned[t]) and bool(self.counts[self._row(t), states].any())

    def unscanned(self, t0: int, t1: int) -> list[int]:
        t0, t1 = max(0, t0), min(t1, self.n_dense)
        if t0 >= t1:
            return []
        return [int(t) for t in np.flatnonzero(~self.scanned[t0:t1]) + t0]

    # -- aggregation --------------------------------------------------------------------------------
    @staticmethod
    def summarise(counts: npt.NDArray[np.int64]) -> tuple[U8, U8]:
        """Majority state and fill glyph of each row of state counts.

        The colour is the state most of the cell's known clusters are in (15 unallocated and 1 data
        cluster make an unallocated cell); the glyph says how much of it is allocated, so the one
        data cluster still shows (`░`). An invalid cluster anywhere makes the cell invalid.
        """
        known = counts.sum(axis=1) - counts[:, G.UNKNOWN]
        alloc = counts[:, _ALLOC_COLS]
        filled = alloc.sum(axis=1)
        code = majority(counts)
        code = np.where(known > 0, code, np.uint8(G.UNKNOWN))
        code = np.where(counts[:, G.INVALID] > 0, np.uint8(G.INVALID), code).astype(np.uint8)
        frac = filled / np.maximum(known, 1)
        glyph = np.where(
            filled == 0,
            np.where(known > 0, GL_EMPTY, GL_UNKNOWN),
            np.where(filled == known, GL_FULL,
                     np.where(frac >= 0.5, GL_DARK, np.where(frac >= 0.125, GL_MEDIUM, GL_LIGHT))),
        ).astype(np.uint8)
        return code, glyph

    def _coarse_counts(self, zoom: int, c0: int, c1: int) -> tuple[npt.NDArray[np.int64], I64]:
        """State counts of cells [c0, c1) that hold whole tables, and their unscanned tables."""
        cpc = 1 << zoom
        tpc = cpc // self.l2_size
        n = c1 - c0
        agg = np.zeros((n, NSTATES), dtype=np.int64)
        todo = np.zeros(n, dtype=np.int64)
        t0, t1 = c0 * tpc, min(c1 * tpc, self.n_dense)
        # In blocks of tables: the whole map at the coarsest zoom is millions of tables, and their
        # counts as int64 would be 14 x 8 bytes each at once.
        for b0 in range(t0, t1, COARSE_BLOCK):
            b1 = min(t1, b0 + COARSE_BLOCK)
            rel = np.arange(b0, b1, dtype=np.int64) - t0
            starts = np.flatnonzero(rel % tpc == 0)
            if not len(starts) or starts[0] != 0:
                starts = np.r_[0, starts]
            cell = (b0 - t0 + starts) // tpc
            with self._lock:
                part = self.counts[self._rows(slice(b0, b1))].astype(np.int64)
                unscanned = (~self.scanned[b0:b1]).astype(np.int64)
            agg[cell] += np.add.reduceat(part, starts, axis=0)
            todo[cell] += np.add.reduceat(unscanned, starts)
            agg[cell, G.UNKNOWN] += np.add.reduceat(unscanned * self._table_sizes(np.arange(b0, b1)), starts)
        # clusters past the dense range are unallocated
        first = np.arange(c0, c1, dtype=np.int64) * cpc
        last = np.minimum(first + cpc, self.n_clusters)
        agg[:, G.UNALLOCATED] += np.maximum(0, last - np.maximum(first, self.dense_end))
        return agg, todo

    def cells(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8, list[int]]:
        """(state, glyph) of cells [c0, c1) at `zoom` (2**zoom clusters per cell) and the tables
        whose data is needed but not loaded."""
        cpc = 1 << zoom
        c1 = min(c1, self.n_cells(zoom))
        n = max(0, c1 - c0)
        if cpc >= self.l2_size:
            if n == 0:
                return np.zeros(0, np.uint8), np.zeros(0, np.uint8), []
            agg, todo = self._coarse_counts(zoom, c0, c1)
            code, glyph = self.summarise(agg)
            tpc = cpc // self.l2_size
            missing = [t for i in np.flatnonzero(todo) for t in self.unscanned((c0 + int(i)) * tpc,
                                                                                (c0 + int(i) + 1) * tpc)]
            return code, glyph, missing
        codes = np.full(n, G.UNKNOWN, dtype=np.uint8)
        glyphs = np.full(n, GL_UNKNOWN, dtype=np.uint8)
        need: list[int] = []
        cpt = self.l2_size // cpc  # cells per table
        t_first, t_last = c0 // cpt, (c1 - 1) // cpt if n else -1
        for t in range(t_first, t_last + 1):
            chunk = self.chunk(t)
            lo_c, hi_c = max(c0, t * cpt), min(c1, (t + 1) * cpt)
            if chunk is None:
                need.append(t)
                continue
            cell_counts = self._chunk_cell_counts(chunk, cpc, lo_c - t * cpt, hi_c - t * cpt)
            code, glyph = self.summarise(cell_counts)
            codes[lo_c - c0 : hi_c - c0] = code
            glyphs[lo_c - c0 : hi_c - c0] = glyph
        return codes, glyphs, need

    @staticmethod
    def _chunk_cell_counts(chunk: U8, cpc: int, k0: int, k1: int) -> npt.NDArray[np.int64]:
        part = chunk[k0 * cpc : k1 * cpc]
        rows = np.arange(len(part), dtype=np.int64) // cpc
        n_rows = k1 - k0
        return np.bincount(rows * NSTATES + part, minlength=n_rows * NSTATES)[: n_rows * NSTATES].reshape(
            n_rows, NSTATES
        )

    def cell_counts(self, zoom: int, cell: int) -> npt.NDArray[np.int64] | None:
        """State counts (clusters) of one cell, or None when nothing of it is known yet."""
        cpc = 1 << zoom
        if not 0 <= cell < self.n_cells(zoom):
            return None
        if cpc >= self.l2_size:
            agg, _todo = self._coarse_counts(zoom, cell, cell + 1)
            row: npt.NDArray[np.int64] = agg[0]
            if int(row.sum()) == int(row[G.UNKNOWN]):
                return None
            return row
        cpt = self.l2_size // cpc
        t = cell // cpt
        chunk = self.chunk(t)
        if chunk is None:
            return None
        k = cell - t * cpt
        out: npt.NDArray[np.int64] = self._chunk_cell_counts(chunk, cpc, k, k + 1)[0]
        return out

    def totals(self) -> npt.NDArray[np.int64]:
        """Clusters per state over the tables scanned so far (and the space past the dense range)."""
        with self._lock:
            if self._mult is None:
                out: npt.NDArray[np.int64] = self.counts.sum(axis=0, dtype=np.int64)
            else:  # a row shared by several tables counts once per table
                out = (self.counts.astype(np.int64) * self._mult[:, None]).sum(axis=0)
        out[G.UNALLOCATED] += self.n_clusters - self.dense_end
        return out

    def state_of(self, cluster: int) -> int | None:
        t = cluster // self.l2_size
        chunk = self.chunk(t)
        if chunk is None or not 0 <= cluster - t * self.l2_size < len(chunk):
            return None
        return int(chunk[cluster - t * self.l2_size])

    # -- finding ------------------------------------------------------------------------------------
    def find(self, start: int, states: tuple[int, ...], forward: bool,
             load: Callable[[int], None] | None = None) -> int | None:
        """The next cluster after (or before) `start` in one of `states`, among scanned tables."""
        want = np.array(states, dtype=np.int64)
        past = G.UNALLOCATED in states and self.dense_end < self.n_clusters
        if forward and start + 1 >= self.dense_end:
            return start + 1 if past and start + 1 < self.n_clusters else None
        step = 1 if forward else -1
        t = min(start // self.l2_size, self.n_dense - 1)
        if not forward and start > self.dense_end and past:
            return start - 1
        while 0 <= t < self.n_dense:
            with self._lock:
                has = bool(self.scanned[t]) and bool(self.counts[self._row(t), want].any())
            if has:
                chunk = self.chunk(t)
                if chunk is None and load is not None:
                    load(t)
                    chunk = self.chunk(t)
                if chunk is not None:
                    lo = t * self.l2_size
                    hits = np.flatnonzero(np.isin(chunk, want)) + lo
                    hits = hits[hits > start] if forward else hits[hits < start]
                    if len(hits):
                        return int(hits[0] if forward else hits[-1])
            t += step
        if forward and past:
            return max(self.dense_end, start + 1)
        return None
