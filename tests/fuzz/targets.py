"""Where the structures of a pristine sample image are, field by field.

`find_targets(path)` opens the image with qinspect itself (the samples are well formed) and lists
every metadata field worth mutating: header fields, header extensions, the backing file name, L1
entries, L2 entries (and extended-L2 bitmaps), the refcount table and refcount blocks, snapshot
table entries and snapshot L1 tables, the bitmap directory and bitmap tables, the LUKS header and
compressed cluster data. Tables contribute their non-zero entries plus a few zero ones, capped, so a
large table does not drown the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import read_bitmap_table
from qinspect.qcow2.image import Image, open_image
from qinspect.qcow2.l2 import ClusterType, classify_cluster, parse_compressed

# Per table, at most this many entries become targets (chosen deterministically).
MAX_ENTRIES_PER_TABLE = 24


@dataclass(frozen=True)
class Field:
    """One mutable field: `size` bytes at file `offset`, big-endian; `kind` picks the mutations.

    Kinds: `int` (a count, size or flag word), `small` (a small enumeration: cluster bits, refcount
    order, crypt method, compression type), `features` (a feature bitmap), `extmagic` (a header
    extension type), `ptr` (a cluster-aligned file offset), `l1e`, `l2e`,
    `rte`, `bte` (table entries: offset bits plus flag bits), `l2bm` (extended-L2 subcluster bitmap),
    `cdesc` (a compressed L2 entry), `bytes` (a string or opaque bytes), `cdata` (compressed data).
    """

    region: str
    name: str
    offset: int
    size: int
    kind: str


@dataclass
class Targets:
    """Every field of one image, grouped by region, plus the offsets of its structures."""

    path: str
    file_size: int
    cluster_size: int
    regions: dict[str, list[Field]] = field(default_factory=dict)
    structures: list[int] = field(default_factory=list)
    backing_name_room: tuple[int, int] | None = None  # (offset, max length) usable for a backing name
    has_backing: bool = False

    def add(self, f: Field) -> None:
        self.regions.setdefault(f.region, []).append(f)


_HEADER_V2 = [
    ("magic", 0, 4, "int"), ("version", 4, 4, "int"), ("backing_file_offset", 8, 8, "int"),
    ("backing_file_size", 16, 4, "int"), ("cluster_bits", 20, 4, "small"), ("size", 24, 8, "int"),
    ("crypt_method", 32, 4, "small"), ("l1_size", 36, 4, "int"), ("l1_table_offset", 40, 8, "ptr"),
    ("refcount_table_offset", 48, 8, "ptr"), ("refcount_table_clusters", 56, 4, "int"),
    ("nb_snapshots", 60, 4, "int"), ("snapshots_offset", 64, 8, "ptr"),
]
_HEADER_V3 = [
    ("incompatible_features", 72, 8, "features"), ("compatible_features", 80, 8, "features"),
    ("autoclear_features", 88, 8, "features"), ("refcount_order", 96, 4, "small"), ("header_length", 100, 4, "int"),
    ("compression_type", 104, 1, "small"),
]
_SNAPSHOT_FIELDS = [
    ("l1_table_offset", 0, 8, "ptr"), ("l1_size", 8, 4, "int"), ("id_str_size", 12, 2, "int"),
    ("name_size", 14, 2, "int"), ("date_sec", 16, 4, "int"), ("vm_clock_nsec", 24, 8, "int"),
    ("vm_state_size", 32, 4, "int"), ("extra_data_size", 36, 4, "int"),
]
_BITMAP_DIR_FIELDS = [
    ("bitmap_table_offset", 0, 8, "ptr"), ("bitmap_table_size", 8, 4, "int"), ("flags", 12, 4, "int"),
    ("type", 16, 1, "int"), ("granularity_bits", 17, 1, "int"), ("name_size", 18, 2, "int"),
    ("extra_data_size", 20, 4, "int"),
]


def _pick(indices: np.ndarray, rng: random.Random, extra_zero: list[int]) -> list[int]:
    idx = [int(i) for i in indices]
    if len(idx) > MAX_ENTRIES_PER_TABLE:
        idx = sorted(rng.sample(idx, MAX_ENTRIES_PER_TABLE))
    return idx + extra_zero[:4]


def find_targets(path: str) -> Targets:
    """Open the pristine image at `path` and list its mutable fields."""
    with open_image(path) as img:
        return _find(img)


def _find(img: Image) -> Targets:
    h = img.header
    cs = h.cluster_size
    rng = random.Random(f"targets:{img.path}")
    t = Targets(img.path, img.file.size, cs)
    t.has_backing = h.backing_file is not None
    structs = {0, h.l1_table_offset, h.refcount_table_offset}

    # Header.
    for name, off, size, kind in _HEADER_V2 + (_HEADER_V3 if h.version >= 3 else []):
        t.add(Field("header", name, off, size, kind))

    # Extensions and the backing file name.
    for ext in img.header.extensions:
        t.add(Field("extensions", f"{ext.name} type", ext.offset, 4, "extmagic"))
        t.add(Field("extensions", f"{ext.name} length", ext.offset + 4, 4, "int"))
        d = ext.offset + 8
        if ext.magic == C.QCOW2_EXT_MAGIC_BITMAPS and ext.length == 24:
            for name, off, size, kind in (("nb_bitmaps", 0, 4, "int"), ("reserved", 4, 4, "int"),
                                          ("directory_size", 8, 8, "int"), ("directory_offset", 16, 8, "ptr")):
                t.add(Field("extensions", f"bitmaps {name}", d + off, size, kind))
        elif ext.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER and ext.length == 16:
            t.add(Field("extensions", "crypto offset", d, 8, "ptr"))
            t.add(Field("extensions", "crypto length", d + 8, 8, "int"))
        elif ext.length:
            t.add(Field("extensions", f"{ext.name} data", d, min(ext.length, 64), "bytes"))
    end = max((e.offset + 8 + ((e.length + 7) & ~7) for e in h.extensions), default=h.header_length)
    if h.backing_file_offset and h.backing_file_size:
        t.add(Field("backing file name", "bytes", h.backing_file_offset, h.backing_file_size, "bytes"))
        t.backing_name_room = (h.backing_file_offset, min(cs - h.backing_file_offset, 1023))
    elif end + 64 < cs:
        t.backing_name_room = (end + 8, min(cs - end - 8, 1023))

    # L1 (active) and the L2 tables it points to.
    l1 = img.l1_table
    nz = np.flatnonzero(l1)
    zero = [int(i) for i in np.flatnonzero(l1 == 0)[:4]]
    for i in _pick(nz, rng, zero):
        t.add(Field("L1", f"L1[{i}]", h.l1_table_offset + 8 * i, 8, "l1e"))
    l2_offsets = sorted({int(v) & C.L1E_OFFSET_MASK for v in l1[nz]} - {0})
    structs.update(l2_offsets)
    esize = h.l2_entry_size
    for l2_off in l2_offsets[:8]:
        if l2_off % cs or l2_off + cs > img.file.size:
            continue
        entries, bitmaps = img.read_l2_table(l2_off)
        enz = np.flatnonzero(entries | (bitmaps if bitmaps is not None else 0))
        ezero = [int(i) for i in np.flatnonzero(entries == 0)[:4]]
        for k in _pick(enz, rng, ezero):
            e = int(entries[k])
            kind = "cdesc" if classify_cluster(e, img.l2_format) == ClusterType.COMPRESSED else "l2e"
            t.add(Field("L2", f"L2@{l2_off:#x}[{k}]", l2_off + k * esize, 8, kind))
            if bitmaps is not None:
                t.add(Field("L2 bitmap", f"L2@{l2_off:#x}[{k}].bitmap", l2_off + k * esize + 8, 8, "l2bm"))
            if kind == "cdesc":
                cd = parse_compressed(e, img.l2_format)
                if cd.coffset + 16 <= img.file.size:
                    t.add(Field("compressed data", f"data of L2@{l2_off:#x}[{k}]", cd.coffset,
                                min(cd.csize, img.file.size - cd.coffset), "cdata"))
            elif e & C.L2E_OFFSET_MASK:
                structs.add(e & C.L2E_OFFSET_MASK)

    # Refcount table and blocks.
    rt = img.refcount_table
    rnz = np.flatnonzero(rt)
    for i in _pick(rnz, rng, [int(i) for i in np.flatnonzero(rt == 0)[:4]]):
        t.add(Field("refcount table", f"reftable[{i}]", h.refcount_table_offset + 8 * i, 8, "rte"))
    rb_offsets = sorted({int(v) & C.REFT_OFFSET_MASK for v in rt[rnz]} - {0})
    structs.update(rb_offsets)
    width = max(1, h.refcount_bits // 8)
    per = h.refcount_block_entries
    nb_clusters = -(-img.file.size // cs)
    for rb in rb_offsets[:2]:
        if rb % cs or rb + cs > img.file.size:
            continue
        used = list(range(min(per, nb_clusters)))
        if len(used) > MAX_ENTRIES_PER_TABLE:
            used = sorted(rng.sample(used, MAX_ENTRIES_PER_TABLE))
        for k in used:
            off = rb + (k * h.refcount_bits) // 8
            t.add(Field("refcount block", f"refblock@{rb:#x}[{k}]", off, width, "int"))

    # Snapshot table and the snapshots' L1 tables.
    for sn in img.snapshots[:MAX_ENTRIES_PER_TABLE]:
        for name, off, size, kind in _SNAPSHOT_FIELDS:
            t.add(Field("snapshot table", f"snapshot {sn.index} {name}", sn.entry_offset + off, size, kind))
        for k in range(min(sn.extra_data_size, 24) // 8):
            t.add(Field("snapshot table", f"snapshot {sn.index} extra[{k}]", sn.entry_offset + 40 + 8 * k, 8, "int"))
        structs.add(sn.l1_table_offset)
        for i in range(min(sn.l1_size, 4)):
            t.add(Field("snapshot L1", f"snapshot {sn.index} L1[{i}]", sn.l1_table_offset + 8 * i, 8, "l1e"))
    if img.snapshots:
        structs.add(h.snapshots_offset)

    # Bitmap directory and bitmap tables.
    bext = h.bitmaps_ext
    if bext is not None:
        structs.add(bext.bitmap_directory_offset)
        for bm in img.bitmaps[:MAX_ENTRIES_PER_TABLE]:
            for name, off, size, kind in _BITMAP_DIR_FIELDS:
                t.add(Field("bitmap directory", f"bitmap '{bm.name}' {name}", bm.entry_offset + off, size, kind))
            t.add(Field("bitmap directory", f"bitmap '{bm.name}' name", bm.entry_offset + 24 + bm.extra_data_size,
                        max(1, min(len(bm.name.encode()), 32)), "bytes"))
            structs.add(bm.bitmap_table_offset)
            table = read_bitmap_table(img.file, bm)
            for i in range(min(len(table), 4)):
                t.add(Field("bitmap table", f"bitmap '{bm.name}' table[{i}]", bm.bitmap_table_offset + 8 * i, 8, "bte"))
                if int(table[i]) & C.BME_TABLE_ENTRY_OFFSET_MASK:
                    structs.add(int(table[i]) & C.BME_TABLE_ENTRY_OFFSET_MASK)

    # LUKS header.
    if h.crypto_ext is not None:
        lo = h.crypto_ext.offset
        structs.add(lo)
        # every field QEMU checks at open (qcrypto_block_luks_check_header / _parse_header)
        for name, off, size, kind in (("magic", 0, 6, "bytes"), ("version", 6, 2, "int"),
                                      ("cipher", 8, 32, "bytes"), ("cipher mode", 40, 32, "bytes"),
                                      ("hash spec", 72, 32, "bytes"), ("payload_offset", 104, 4, "int"),
                                      ("key_bytes", 108, 4, "int"), ("master key iterations", 164, 4, "int"),
                                      ("slot0 active", 208, 4, "int"), ("slot0 iterations", 208 + 4, 4, "int"),
                                      ("slot0 key_offset", 208 + 40, 4, "int"), ("slot0 stripes", 208 + 44, 4, "int"),
                                      ("slot1 key_offset", 256 + 40, 4, "int")):
            t.add(Field("LUKS header", name, lo + off, size, kind))

    t.structures = sorted(s for s in structs if 0 <= s < t.file_size)  # (a sample may point past its end)
    return t
