"""Finding guest clusters by state (`/` in the guest map), with partial states and backing layers.

A cluster matches `zero` when any of it reads as zeros: a zero cluster, but also an extended-L2
cluster whose subclusters are partly zero. It matches `compressed` when it is compressed here or
in the backing layer that serves it. The search runs over the scanned L2 tables (their per-table
state counts skip the tables that cannot match), wraps around the end once (the caller says so),
and checks candidates that the map alone cannot decide (partial clusters: their subclusters;
clusters served by a backing layer: that layer's own state) by reading just those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, Layer
from qinspect.qcow2.l2 import SubclusterType
from qinspect.tui.guestmap import GuestMap, layer_states
from qinspect.tui.palette import MAX_DEPTH_COLOURS, G, backing_state

BACKING = tuple(backing_state(d) for d in range(1, MAX_DEPTH_COLOURS + 1))

_SC_OF = {
    G.DATA: (SubclusterType.NORMAL,),
    G.ZERO_PLAIN: (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC),
    G.ZERO_ALLOC: (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC),
    G.UNALLOCATED: (SubclusterType.UNALLOCATED_PLAIN,),
    G.RESERVED: (SubclusterType.UNALLOCATED_ALLOC,),
    G.INVALID: (SubclusterType.INVALID,),
}


@dataclass(frozen=True)
class Query:
    """What `/word` looks for: states that match outright, and whether partial clusters and the
    backing layers' own states are checked too."""

    name: str
    states: tuple[int, ...]
    partial: bool = True  # PARTIAL clusters match when a subcluster is in one of `states`
    backing: bool = True  # BACKINGn clusters match when layer n has one of `states` there


QUERIES: dict[str, Query] = {
    "data": Query("data", (G.DATA,)),
    "zero": Query("zero", (G.ZERO_PLAIN, G.ZERO_ALLOC)),
    "unallocated": Query("unallocated", (G.UNALLOCATED,), backing=False),
    "free": Query("unallocated", (G.UNALLOCATED,), backing=False),
    "reserved": Query("reserved", (G.RESERVED,)),
    "compressed": Query("compressed", (G.COMPRESSED,), partial=False),
    "partial": Query("partial", (G.PARTIAL,), partial=False, backing=False),
    "invalid": Query("invalid", (G.INVALID,)),
    "backing": Query("backing", BACKING, partial=False, backing=False),
}


def parse_query(text: str) -> Query | None:
    """The query a word names (a prefix is enough: `comp`, `z`), or None."""
    key = text.strip().lower()
    if not key:
        return None
    for name, q in QUERIES.items():
        if name.startswith(key):
            return q
    return None


@dataclass(frozen=True)
class Hit:
    cluster: int
    wrapped: bool


class Searcher:
    """Searches one guest map (of `img` and its backing `layers`)."""

    def __init__(self, gm: GuestMap, img: Image, layers: list[Layer],
                 load: Callable[[int], None] | None = None) -> None:
        self.gm = gm
        self.img = img
        self.layers = layers
        self.load = load

    def _matches(self, t: int, q: Query) -> npt.NDArray[np.bool_] | None:
        """Which clusters of table `t` match (None: the table is not scanned)."""
        gm = self.gm
        if t < gm.n_dense and not gm.scanned[t]:
            return None
        chunk = gm.chunk(t)
        if chunk is None and self.load is not None:
            self.load(t)
            chunk = gm.chunk(t)
        if chunk is None:
            return None
        hit = np.isin(chunk, np.array(q.states, dtype=np.uint8))
        lo = t * gm.l2_size
        cs = gm.cluster_size
        if q.partial:
            want = {sc for s in q.states for sc in _SC_OF.get(G(s), ())}
            for k in np.flatnonzero(chunk == G.PARTIAL):
                try:
                    lk = self.img.lookup((lo + int(k)) * cs)
                except Qcow2Error:
                    continue
                if any(st in want for st in lk.subcluster_types):
                    hit[k] = True
        if q.backing:
            for d in range(1, len(self.layers)):
                mask = chunk == backing_state(d)
                if d >= MAX_DEPTH_COLOURS:  # the last colour stands for this layer and every deeper one
                    mask = chunk == backing_state(MAX_DEPTH_COLOURS)
                if not mask.any():
                    continue
                g0 = lo * cs
                g1 = min((lo + len(chunk)) * cs, gm.virtual_size)
                try:
                    below = layer_states(self.layers[d], g0, g1, cs)[: len(chunk)]
                except Qcow2Error:
                    continue
                hit |= mask & np.isin(below, np.array(q.states, dtype=np.uint8))
        return hit

    def _may_match(self, t: int, q: Query) -> bool:
        gm = self.gm
        cols = list(q.states)
        if q.partial:
            cols.append(G.PARTIAL)
        if q.backing:
            cols += list(BACKING)
        return gm.table_has(t, cols)

    def find(self, start: int, q: Query, forward: bool = True) -> Hit | None:
        """The next matching cluster after (before) `start`, wrapping around once."""
        gm = self.gm
        past = G.UNALLOCATED in q.states and gm.dense_end < gm.n_clusters

        def scan(lo_cluster: int, hi_cluster: int) -> int | None:
            """First (last, backwards) match in [lo_cluster, hi_cluster)."""
            if lo_cluster >= hi_cluster:
                return None
            if forward and past and lo_cluster >= gm.dense_end:
                return lo_cluster
            if not forward and past and hi_cluster > gm.dense_end:
                return hi_cluster - 1
            t_lo, t_hi = lo_cluster // gm.l2_size, min(gm.n_dense, -(-hi_cluster // gm.l2_size))
            order = range(t_lo, t_hi) if forward else range(t_hi - 1, t_lo - 1, -1)
            for t in order:
                if not self._may_match(t, q):
                    continue
                m = self._matches(t, q)
                if m is None:
                    continue
                idx = np.flatnonzero(m) + t * gm.l2_size
                idx = idx[(idx >= lo_cluster) & (idx < hi_cluster)]
                if len(idx):
                    return int(idx[0] if forward else idx[-1])
            if forward and past and hi_cluster > gm.dense_end:
                return max(gm.dense_end, lo_cluster)
            return None

        n = gm.n_clusters
        if forward:
            hit = scan(start + 1, n)
            if hit is not None:
                return Hit(hit, False)
            hit = scan(0, min(start + 1, n))
        else:
            hit = scan(0, start)
            if hit is not None:
                return Hit(hit, False)
            hit = scan(start, n)
        return Hit(hit, True) if hit is not None else None


__all__ = ["QUERIES", "Hit", "Query", "Searcher", "parse_query"]
