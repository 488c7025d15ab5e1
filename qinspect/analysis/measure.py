"""`qemu-img measure -O qcow2`: the file size a conversion of this image (or a new image) needs.

A port of QEMU's `qcow2_measure`, `qcow2_calc_prealloc_size`, `qcow2_refcount_metadata_size` and
`qcow2_get_persistent_dirty_bitmap_size` (block/qcow2.c, block/qcow2-bitmap.c):

* `fully-allocated` = header cluster + every L2 table + the L1 table + the refcount table and
  blocks (a fixed point, since refcount structures count themselves) + the virtual size rounded
  up to the *target* cluster size.
* `required` = `fully-allocated` - virtual size + the source's data: QEMU walks the block status of
  the whole source chain; zero ranges are skipped and every allocated data range is rounded out to
  whole target clusters (a cluster touched twice is counted once). With `backing_file` or
  `preallocation=full|falloc` the whole virtual size counts.
* `bitmaps` (v3 targets with a v3 qcow2 source): every persistent bitmap as if fully allocated,
  its bitmap table, and the bitmap directory, in target clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

from qinspect.analysis.map import iter_map
from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image
from qinspect.units import SizeError, parse_size

DEFAULT_CLUSTER_SIZE = 65536
BME_TABLE_ENTRY_SIZE = 8
BITMAP_DIR_ENTRY_SIZE = 24  # Qcow2BitmapDirEntry without name and extra data
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _div_round_up(a, b) * b


@dataclass(frozen=True)
class MeasureOptions:
    """The target's creation options that matter for its size (`-o` of qemu-img measure)."""

    cluster_size: int = DEFAULT_CLUSTER_SIZE
    extended_l2: bool = False
    refcount_bits: int = 16
    version: int = 3
    preallocation: str = "off"
    backing_file: str | None = None


@dataclass(frozen=True)
class MeasureResult:
    """BlockMeasureInfo: `bitmaps` is None when qemu-img would not print the key."""

    required: int
    fully_allocated: int
    bitmaps: int | None

    def to_json(self) -> dict[str, int]:
        """Keys and order exactly as `qemu-img measure --output=json` prints them."""
        d: dict[str, int] = {}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        d["required"] = self.required
        d["fully-allocated"] = self.fully_allocated
        return d


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true"):
        return True
    if v in ("off", "no", "false"):
        return False
    raise Qcow2Error(f"Parameter '{key}' expects 'on' or 'off'")


def _parse_size(key: str, value: str) -> int:
    """A size option (`cluster_size=64k`) as qemu-img accepts it (qinspect.units.parse_size)."""
    try:
        return parse_size(value, maximum=(1 << 64) - 1)
    except SizeError:
        raise Qcow2Error(f"Parameter '{key}' expects a non-negative number below 2^64") from None


def parse_options(text: str | None) -> MeasureOptions:
    """Parse `-o key=value,...` the way qemu-img's qcow2 driver validates its creation options."""
    vals: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise Qcow2Error(f"Invalid parameter '{key}'")
        vals[key] = value
    known = {"cluster_size", "extended_l2", "refcount_bits", "compat", "preallocation", "backing_file",
             "backing_fmt", "lazy_refcounts", "compression_type", "size"}
    for key in vals:
        if key.startswith("encrypt"):
            raise Qcow2Error(f"option '{key}': qinspect does not model the LUKS header size")
        if key not in known:
            raise Qcow2Error(f"Invalid parameter '{key}'")
    extended_l2 = _parse_bool("extended_l2", vals["extended_l2"]) if "extended_l2" in vals else False
    cluster_size = _parse_size("cluster_size", vals["cluster_size"]) if "cluster_size" in vals else DEFAULT_CLUSTER_SIZE
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or bits < C.MIN_CLUSTER_BITS or bits > C.MAX_CLUSTER_BITS or 1 << bits != cluster_size:
        raise Qcow2Error(f"Cluster size must be a power of two between {1 << C.MIN_CLUSTER_BITS} and "
                         f"{1 << (C.MAX_CLUSTER_BITS - 10)}k")
    min_ext = (1 << C.MIN_CLUSTER_BITS) * C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
    if extended_l2 and cluster_size < min_ext:
        raise Qcow2Error(f"Extended L2 entries are only supported with cluster sizes of at least {min_ext} bytes")
    compat = vals.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise Qcow2Error(f"Invalid compatibility level: '{compat}'")
    refcount_bits = 16
    if "refcount_bits" in vals:
        try:
            refcount_bits = int(vals["refcount_bits"], 0)
        except ValueError:
            raise Qcow2Error("Parameter 'refcount_bits' expects a number") from None
    if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise Qcow2Error("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                         "(use compat=1.1 or greater)")
    prealloc = vals.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise Qcow2Error(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    return MeasureOptions(cluster_size, extended_l2, refcount_bits, version, prealloc, vals.get("backing_file"))


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> int:
    """qcow2_refcount_metadata_size: bytes of refcount table + blocks for `clusters` clusters."""
    blocks_per_table_cluster = cluster_size // C.REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += _div_round_up(table, 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size


def calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: file bytes of the fully allocated image, metadata included."""
    aligned_total_size = _round_up(total_size, cluster_size)
    l2e_size = C.L2E_SIZE_EXTENDED if extended_l2 else C.L2E_SIZE_NORMAL
    meta_size = cluster_size  # header
    nl2e = aligned_total_size // cluster_size
    nl2e = _round_up(nl2e, cluster_size // l2e_size)
    meta_size += nl2e * l2e_size
    nl1e = nl2e * l2e_size // cluster_size
    nl1e = _round_up(nl1e, cluster_size // C.L1E_SIZE)
    meta_size += nl1e * C.L1E_SIZE
    meta_size += refcount_metadata_size((meta_size + aligned_total_size) // cluster_size, cluster_size,
                                        refcount_order, False)
    return meta_size + aligned_total_size


def bitmaps_size(img: Image, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size: the bitmaps of `img` copied into `cluster_size`."""
    total = 0
    dir_size = 0
    for bm in img.active_bitmaps:
        nbits = _div_round_up(img.virtual_size, bm.granularity)
        nbytes = _div_round_up(nbits, 8)
        clusters = _div_round_up(nbytes, cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BME_TABLE_ENTRY_SIZE, cluster_size)
        dir_size += _round_up(BITMAP_DIR_ENTRY_SIZE + len(bm.name.encode("utf-8")), 8)
    return total + _round_up(dir_size, cluster_size)


def allocated_data_bytes(img: Image, cluster_size: int, progress: ProgressFn = no_progress,
                         cancelled: CancelledFn = never_cancelled) -> int:
    """The source data qemu-img measure counts: allocated, non-zero ranges of the whole chain,
    each rounded out to whole target clusters, a target cluster counted once."""
    total = 0
    last_counted = -1  # index of the last target cluster already counted
    for e in iter_map(img, progress, cancelled):
        if e.zero or not (e.data and e.present):
            continue
        first = e.start // cluster_size
        last = (e.start + e.length - 1) // cluster_size
        if first <= last_counted:
            first = last_counted + 1
        if last >= first:
            total += (last - first + 1) * cluster_size
            last_counted = last
    return total


def measure(img: Image | None, options: MeasureOptions | None = None, size: int | None = None,
            progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled) -> MeasureResult:
    """What `qemu-img measure -O qcow2 [-o options] (IMAGE | --size SIZE)` prints.

    Raises `Qcow2Error` with qemu-img's message for invalid options, an image too large for the
    target cluster size, or a source whose block status QEMU cannot read.
    """
    o = options or MeasureOptions()
    cs = o.cluster_size
    virtual_size = _round_up(size or 0, cs) if img is None else 0
    l2e_size = C.L2E_SIZE_EXTENDED if o.extended_l2 else C.L2E_SIZE_NORMAL
    l2_tables = _div_round_up(virtual_size // cs, cs // l2e_size)
    if l2_tables * C.L1E_SIZE > C.QCOW_MAX_L1_SIZE:
        raise Qcow2Error("The image size is too large (try using a larger cluster size)")
    required = 0
    if img is not None:
        ssize = img.virtual_size
        virtual_size = _round_up(ssize, cs)
        # A backing file for the target: qemu-img assumes every cluster must be written.
        required = virtual_size if o.backing_file is not None else allocated_data_bytes(img, cs, progress, cancelled)
    if o.preallocation in ("full", "falloc"):
        required = virtual_size
    refcount_order = o.refcount_bits.bit_length() - 1
    fully = calc_prealloc_size(virtual_size, cs, refcount_order, o.extended_l2)
    bitmaps: int | None = None
    if o.version >= 3 and img is not None and img.header.version >= 3:
        bitmaps = bitmaps_size(img, cs)
    return MeasureResult(fully - virtual_size + required, fully, bitmaps)


__all__ = ["MeasureOptions", "MeasureResult", "bitmaps_size", "calc_prealloc_size", "measure", "parse_options",
           "refcount_metadata_size"]
