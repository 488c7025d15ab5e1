"""The guest map's numpy states agree with the core's one-entry lookups, cluster by cluster."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import CATALOG

from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, RawLayer, open_image
from qinspect.qcow2.l2 import SubclusterType
from qinspect.tui import fmt
from qinspect.tui.guestmap import GL_EMPTY, GL_FULL, GuestMap, extents_to_clusters, majority
from qinspect.tui.palette import NSTATES, G, backing_state

SC = {
    SubclusterType.UNALLOCATED_PLAIN: G.UNALLOCATED,
    SubclusterType.UNALLOCATED_ALLOC: G.RESERVED,
    SubclusterType.ZERO_PLAIN: G.ZERO_PLAIN,
    SubclusterType.ZERO_ALLOC: G.ZERO_ALLOC,
    SubclusterType.NORMAL: G.DATA,
    SubclusterType.COMPRESSED: G.COMPRESSED,
    SubclusterType.INVALID: G.INVALID,
}


def layer_state(layer: Any, guest: int, cs: int) -> int:
    """The state of one cluster of one layer from scalar lookups (the inspector's path)."""
    if guest >= layer.virtual_size:
        return G.UNALLOCATED
    if isinstance(layer, RawLayer):
        return G.DATA
    assert isinstance(layer, Image)
    states = set()
    sub = layer.header.subcluster_size
    lcs = layer.cluster_size
    end = min(guest + cs, layer.virtual_size)
    g = guest
    while g < end:
        lk = layer.lookup(g)
        if layer.header.extended_l2:
            first = (g % lcs) // sub
            last = min(lcs, (end - (g - g % lcs)) + sub - 1) // sub
            states |= {SC[t] for t in lk.subcluster_types[first:last]}
        else:
            states.add(SC[lk.subcluster_types[0]])
        g = g - g % lcs + lcs
    if G.INVALID in states:
        return G.INVALID
    return states.pop() if len(states) == 1 else G.PARTIAL


def scalar_state(layers: list[Any], guest: int, cs: int) -> int:
    st = layer_state(layers[0], guest, cs)
    for depth in range(1, len(layers)):
        if st != G.UNALLOCATED:
            break
        below = layer_state(layers[depth], guest, cs)
        if below not in (G.UNALLOCATED, G.RESERVED):
            st = backing_state(depth)
    return st


SMALL = [e["name"] for e in CATALOG if e["name"] not in ("big_empty", "fragmented", "prealloc_metadata")]


@pytest.mark.parametrize("name", SMALL)
def test_vectorised_states_agree_with_lookups(samples: Any, name: str) -> None:
    try:
        img = open_image(samples.path(name))
    except Qcow2Error:
        pytest.skip("not openable")
    with img:
        layers, _err = img.open_chain()
        gm = GuestMap(img, max((la.virtual_size for la in layers[1:]), default=0))
        gm.compute(img, 0, gm.n_tables)
        assert gm.complete
        cs = gm.cluster_size
        for c in range(gm.n_clusters):
            try:
                want = scalar_state(layers, c * cs, cs)
            except Qcow2Error:
                continue
            assert gm.state_of(c) == want, (name, c, gm.state_of(c), want)
        totals = gm.totals()
        assert int(totals.sum()) == gm.n_clusters


def test_extents_to_clusters_mixed_and_invalid() -> None:
    cs = 4
    guest = np.array([0, 4, 6, 8, 12], dtype=np.int64)
    length = np.array([4, 2, 2, 4, 4], dtype=np.int64)
    codes = np.array([G.DATA, G.DATA, G.ZERO_PLAIN, G.INVALID, G.DATA], dtype=np.uint8)
    out = extents_to_clusters(guest, length, codes, 0, 4, cs, 16)
    assert out.tolist() == [G.DATA, G.PARTIAL, G.INVALID, G.DATA]


def test_cells_show_their_majority_state_and_fill(samples: Any) -> None:
    with open_image(samples.path("basic64k")) as img:
        gm = GuestMap(img)
        gm.compute(img, 0, gm.n_tables)
        # 16 clusters per cell: the first cell holds one data cluster among 15 unallocated ones. Its
        # colour is the majority's (unallocated); its glyph says that some of it is allocated.
        codes, glyphs, need = gm.cells(4, 0, 4)
        assert not need
        assert codes[0] == G.UNALLOCATED and glyphs[0] not in (GL_FULL, GL_EMPTY)
        counts = gm.cell_counts(4, 0)
        assert counts is not None and int(counts.sum()) == 16
        assert int(majority(counts.reshape(1, -1))[0]) == codes[0]  # what the side panel says
        # the whole disk in one cell
        z = gm.max_zoom
        codes, glyphs, _ = gm.cells(z, 0, 1)
        assert len(codes) == 1 and glyphs[0] not in (GL_EMPTY,)


def test_huge_virtual_size_costs_only_the_tables_in_use(samples: Any) -> None:
    with open_image(samples.path("big_empty")) as img:  # 1 TiB, no L2 table at all
        gm = GuestMap(img)
        assert gm.n_clusters == (1 << 40) // img.cluster_size
        assert gm.n_dense == 1 and gm.complete
        codes, _glyphs, need = gm.cells(0, gm.n_cells(0) - 64, gm.n_cells(0))
        assert not need and set(codes.tolist()) == {G.UNALLOCATED}
        assert gm.find(0, (G.DATA,), True) is None
        assert int(gm.totals()[G.UNALLOCATED]) == gm.n_clusters


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("0x1000", 4096), ("64k", 65536), ("1.5M", 1572864),
                                             ("2 GiB", 2 << 30), ("1T", 1 << 40)])
def test_parse_size(text: str, value: int) -> None:
    assert fmt.parse_size(text) == value


def test_parse_size_rejects_junk() -> None:
    with pytest.raises(ValueError):
        fmt.parse_size("12q")




def test_majority_ties_go_to_what_is_allocated() -> None:
    c = np.zeros((3, NSTATES), dtype=np.int64)
    c[0, G.UNALLOCATED], c[0, G.DATA] = 15, 1
    c[1, G.UNALLOCATED], c[1, G.DATA] = 8, 8
    c[2, G.ZERO_PLAIN], c[2, G.DATA], c[2, G.UNALLOCATED] = 5, 4, 7
    assert majority(c).tolist() == [G.UNALLOCATED, G.DATA, G.UNALLOCATED]


def test_tables_sharing_one_l2_table_are_classified_once(tmp_path: Any) -> None:
    """A hostile image (one L2 table behind every L1 entry) maps in bounded time, and the counts
    copied from the shared table are the ones classifying every table gives."""
    import shutil
    import time

    from fuzz.amplify import GENERATORS

    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    path = GENERATORS["shared_l2"](tmp_path, 0.02)
    with open_image(str(path)) as img:
        gm = GuestMap(img)
        assert gm._shared, "the generator's L1 entries share an L2 table"
        t0 = time.monotonic()
        gm.compute(img, 0, gm.n_dense)
        took = time.monotonic() - t0
        assert gm.complete
        slow = GuestMap(img)
        some = sorted({0, 1, gm.n_dense // 2, gm.n_dense - 1})
        for t in some:  # each table on its own, without the sharing
            slow.compute(img, t, t + 1, shared=False)
            assert (slow.table_counts(t) == gm.table_counts(t)).all(), t
    assert took < 10, took
