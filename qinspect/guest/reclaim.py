"""Which clusters of each layer hold data the guest has freed: what `fstrim` with discard=unmap returns.

QEMU discards whole clusters only (`qcow2_co_pdiscard` ignores partial ones), and a guest discard
request covers one free extent, so a cluster is reclaimable when it lies entirely inside one free
range of one volume and this layer maps it to data (depth 0 of that layer: a standard or
partially-allocated cluster, not a zero, compressed or unallocated one). A cluster that a snapshot
shares (refcount > 1) stays allocated after the discard and is not counted.
"""

from __future__ import annotations

import numpy as np

from qinspect.guest.ranges import Ranges
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import SubclusterType

CLUSTER_BATCH = 1 << 16


def data_clusters(img: Image) -> tuple[Ranges, Ranges, np.ndarray]:
    """The guest clusters this layer maps to data (merged, bytes), and its NORMAL extents (ranges, host)."""
    gs, ge, hs = [], [], []
    for ex in img.extents():
        m = ex.sctype == np.uint8(SubclusterType.NORMAL)
        if m.any():
            gs.append(ex.guest[m])
            ge.append(ex.guest[m] + ex.length[m])
            hs.append(ex.host[m].astype(np.int64))
    if not gs:
        return Ranges.empty(), Ranges.empty(), np.zeros(0, np.int64)
    s, e, h = np.concatenate(gs), np.concatenate(ge), np.concatenate(hs)
    extents = Ranges(s, e)  # already ordered and disjoint
    return extents.outer_units(img.cluster_size), extents, h


def reclaimable_in(img: Image, clusters: Ranges, extents: Ranges, hosts: np.ndarray, free: Ranges) -> Ranges:
    """The clusters of `clusters` lying wholly inside one range of `free`, not shared with a snapshot."""
    cs = img.cluster_size
    hit = clusters.intersect(free.inner_units(cs))
    if not len(hit) or not img.snapshots:
        return hit
    # Shared clusters (snapshots) keep their host cluster after a discard: drop them, one cluster at a time.
    keep_s, keep_e = [], []
    for s, e in hit.pairs():
        for g in range(s, e, cs):
            k = int(np.searchsorted(extents.start, g, side="right")) - 1
            if k < 0 or g >= int(extents.end[k]):
                k = int(np.searchsorted(extents.start, g + cs, side="left"))  # data later in the cluster
                if k >= len(extents) or int(extents.start[k]) >= g + cs:
                    continue
                host = int(hosts[k]) + 0
                host -= (int(extents.start[k]) - g)
            else:
                host = int(hosts[k]) + (g - int(extents.start[k]))
            if img.refcount(host // cs) == 1:
                keep_s.append(g)
                keep_e.append(g + cs)
    return Ranges.of(keep_s, keep_e)


def host_clusters(img: Image, reclaimable: Ranges, extents: Ranges, hosts: np.ndarray) -> Ranges:
    """The host byte ranges (whole clusters) behind the guest clusters `reclaimable`."""
    cs = img.cluster_size
    hit = extents.intersect(reclaimable)
    if not len(hit):
        return Ranges.empty()
    k = np.searchsorted(extents.start, hit.start, side="right") - 1
    h0 = hosts[k] + (hit.start - extents.start[k])
    h1 = h0 + (hit.end - hit.start)
    return Ranges.of(h0, h1).outer_units(cs)


def allocated_bytes(img: Image, host: Ranges) -> int:
    """How many bytes of `host` the host file really has allocated (SEEK_DATA/SEEK_HOLE)."""
    f = img.data_file()
    total = 0
    for s, e in host.pairs():
        pos = s
        while pos < e:
            is_data, end = f.data_extent(pos)
            end = min(max(end, pos + 1), e)
            if is_data:
                total += end - pos
            pos = end
    return total
