"""L1 and L2 entries: decoding and QEMU's cluster/subcluster classification.

Bulk functions take numpy arrays of raw entries (one L2 table or many) and classify them with
masks, never a Python loop per entry; the scalar `classify_*` functions are the same rules for a
single entry (the UI's inspector), and tests/test_l2_classifier.py holds the two to agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C

U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]


class ClusterType(IntEnum):
    """QEMU's QCow2ClusterType."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


class SubclusterType(IntEnum):
    """QEMU's QCow2SubclusterType (for images without extended L2, one subcluster per cluster)."""

    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


@dataclass(frozen=True)
class L2Format:
    """What it takes to interpret L2 entries: cluster bits, extended L2 and the data-file rule."""

    cluster_bits: int
    extended_l2: bool
    has_data_file: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1


@dataclass(frozen=True)
class CompressedDescriptor:
    """A compressed cluster: host byte offset and the number of bytes to read (an upper bound)."""

    coffset: int
    nb_csectors: int
    csize: int


def parse_compressed(entry: int, fmt: L2Format) -> CompressedDescriptor:
    """qcow2_parse_compressed_l2_entry."""
    coffset = entry & fmt.cluster_offset_mask
    nb = ((entry >> fmt.csize_shift) & fmt.csize_mask) + 1
    return CompressedDescriptor(coffset, nb, nb * C.QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511))


def classify_cluster(entry: int, fmt: L2Format) -> ClusterType:
    """qcow2_get_cluster_type for one L2 entry."""
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & C.QCOW_OFLAG_ZERO and not fmt.extended_l2:
        return ClusterType.ZERO_ALLOC if entry & C.L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if not entry & C.L2E_OFFSET_MASK:
        if fmt.has_data_file and entry & C.QCOW_OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def classify_subcluster(entry: int, bitmap: int, sc_index: int, fmt: L2Format) -> SubclusterType:
    """qcow2_get_subcluster_type for subcluster `sc_index` of one entry."""
    ctype = classify_cluster(entry, fmt)
    if ctype == ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    if not fmt.extended_l2:
        return {
            ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
            ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
            ClusterType.NORMAL: SubclusterType.NORMAL,
            ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
        }[ctype]
    if ctype == ClusterType.NORMAL:
        if (bitmap >> 32) & bitmap & 0xFFFFFFFF:
            return SubclusterType.INVALID
        if bitmap >> (32 + sc_index) & 1:
            return SubclusterType.ZERO_ALLOC
        if bitmap >> sc_index & 1:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    if bitmap & C.QCOW_L2_BITMAP_ALL_ALLOC:
        return SubclusterType.INVALID
    if bitmap >> (32 + sc_index) & 1:
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


def classify_clusters(entries: U64, fmt: L2Format) -> U8:
    """qcow2_get_cluster_type over an array of L2 entries."""
    out = np.full(entries.shape, ClusterType.NORMAL, dtype=np.uint8)
    offset = entries & np.uint64(C.L2E_OFFSET_MASK)
    no_offset = offset == 0
    # With an external data file, offset 0 plus COPIED is a valid (NORMAL) cluster.
    copied = (entries & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
    unalloc = no_offset & ~copied if fmt.has_data_file else no_offset
    out[unalloc] = ClusterType.UNALLOCATED
    if not fmt.extended_l2:
        zero = (entries & np.uint64(C.QCOW_OFLAG_ZERO)) != 0
        out[zero & no_offset] = ClusterType.ZERO_PLAIN
        out[zero & ~no_offset] = ClusterType.ZERO_ALLOC
    out[(entries & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0] = ClusterType.COMPRESSED
    return out


_CLUSTER_TO_SUB = np.array(
    [SubclusterType.UNALLOCATED_PLAIN, SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC,
     SubclusterType.NORMAL, SubclusterType.COMPRESSED],
    dtype=np.uint8,
)


def _standard_lut(has_data_file: bool) -> U8:
    """Subcluster type of a standard L2 entry by a 4-bit code: has offset (bit 0), QCOW_OFLAG_ZERO
    (bit 1), QCOW_OFLAG_COMPRESSED (bit 2), QCOW_OFLAG_COPIED (bit 3)."""
    lut = np.zeros(16, dtype=np.uint8)
    for code in range(16):
        has_off, zero, comp, copied = code & 1, code & 2, code & 4, code & 8
        if comp:
            t = SubclusterType.COMPRESSED
        elif zero:
            t = SubclusterType.ZERO_ALLOC if has_off else SubclusterType.ZERO_PLAIN
        elif has_off or (has_data_file and copied):
            t = SubclusterType.NORMAL
        else:
            t = SubclusterType.UNALLOCATED_PLAIN
        lut[code] = t
    return lut


_STD_LUT = (_standard_lut(False), _standard_lut(True))


def classify_standard_subclusters(entries: U64, fmt: L2Format, has_offset: npt.NDArray[np.bool_] | None = None) -> U8:
    """qcow2_get_subcluster_type of standard (not extended) L2 entries: one table lookup per entry
    (the fastest classification, for the extent walk). `has_offset` may pass `entries &
    L2E_OFFSET_MASK != 0` when the caller has it already."""
    if has_offset is None:
        has_offset = (entries & np.uint64(C.L2E_OFFSET_MASK)) != 0
    code = has_offset.view(np.uint8) | ((entries & np.uint64(C.QCOW_OFLAG_ZERO)).astype(np.uint8) << np.uint8(1))
    code |= (entries >> np.uint64(62)).astype(np.uint8) << np.uint8(2)  # COMPRESSED (bit 62), COPIED (bit 63)
    types: U8 = _STD_LUT[1 if fmt.has_data_file else 0][code]
    return types


def invalid_bitmaps(ctypes: U8, bitmaps: U64) -> npt.NDArray[np.bool_]:
    """Entries whose subcluster bitmap QEMU rejects as a whole (INVALID for every subcluster)."""
    alloc = bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
    zero = bitmaps >> np.uint64(32)
    normal = ctypes == ClusterType.NORMAL
    unalloc = ctypes == ClusterType.UNALLOCATED
    invalid: npt.NDArray[np.bool_] = (normal & ((alloc & zero) != 0)) | (unalloc & (alloc != 0))
    return invalid


def classify_subclusters_at(
    ctypes: U8, bitmaps: U64 | None, sc_index: npt.NDArray[np.integer], fmt: L2Format
) -> U8:
    """Subcluster type of subcluster `sc_index[i]` of entry i (arrays of equal length)."""
    if not fmt.extended_l2 or bitmaps is None:
        return _CLUSTER_TO_SUB[ctypes]
    sc = sc_index.astype(np.uint64)
    a = ((bitmaps >> sc) & np.uint64(1)).astype(bool)
    z = ((bitmaps >> (sc + np.uint64(32))) & np.uint64(1)).astype(bool)
    out = np.empty(ctypes.shape, dtype=np.uint8)
    normal = ctypes == ClusterType.NORMAL
    out[normal] = np.where(z[normal], SubclusterType.ZERO_ALLOC,
                           np.where(a[normal], SubclusterType.NORMAL, SubclusterType.UNALLOCATED_ALLOC))
    unalloc = ~normal
    out[unalloc] = np.where(z[unalloc], SubclusterType.ZERO_PLAIN, SubclusterType.UNALLOCATED_PLAIN)
    out[ctypes == ClusterType.COMPRESSED] = SubclusterType.COMPRESSED
    out[invalid_bitmaps(ctypes, bitmaps)] = SubclusterType.INVALID
    return out


def uniform_bitmaps(bitmaps: U64) -> npt.NDArray[np.bool_]:
    """True where all 32 subclusters share one state (so the cluster can be treated whole)."""
    alloc = bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
    zero = bitmaps >> np.uint64(32)
    full = np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
    uniform: npt.NDArray[np.bool_] = ((alloc == 0) | (alloc == full)) & ((zero == 0) | (zero == full))
    return uniform
