"""Table and hex models of every on-disk structure, for the Structures view.

A `TableModel` describes one structure: its entries as rows (formatted only when a row is on
screen), the file bytes of each entry (for the hex view's highlight), a colour per byte (by
field), and where `enter` on a row leads. Values come from the core (`Header`, `Snapshot`,
`Bitmap`, `LuksHeader`, L1/L2/refcount arrays); the only layout knowledge here is the byte range
of each documented field, used to colour the hex view.

Rows, details and titles are display text: every string from the image is escaped here, once
(`for_terminal`, at the point it is put into display text), and the widgets show them as they are.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import read_bitmap_table
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.fields import (
    HEADER_V2_SIZE,
    HEADER_V3_MIN_SIZE,
    QCOW2_BITMAP_DIR_ENTRY,
    QCOW2_FEATURE,
    QCOW_EXTENSION,
    QCOW_HEADER,
    QCOW_SNAPSHOT_HEADER,
    QCRYPTO_BLOCK_LUKS_HEADER,
    QCRYPTO_BLOCK_LUKS_KEY_SLOT,
    Record,
    key_slot_offset,
)
from qinspect.qcow2.image import Image
from qinspect.qcow2.l2 import (
    ClusterType,
    classify_cluster,
    classify_clusters,
    classify_subcluster,
    invalid_bitmaps,
    parse_compressed,
    uniform_bitmaps,
)
from qinspect.qcow2.refcount import refcount_entry_location
from qinspect.termtext import for_terminal
from qinspect.tui import fmt
from qinspect.tui.palette import DIM, FIELD_CYCLE, FLAG_BYTE, GUEST_COLOURS, KIND_COLOURS, ColourKind, G

U64 = npt.NDArray[np.uint64]
Cell = tuple[str, str | None]


class StructKind(StrEnum):
    """Which structure a node of the Structures tree shows (`model_for` builds its table)."""

    HEADER = "header"
    EXTENSIONS = "extensions"
    BACKING_NAME = "backing_name"
    L1 = "l1"
    SNAPSHOT_L1 = "snapshot_l1"
    L2 = "l2"
    REFCOUNT_TABLE = "refcount_table"
    REFCOUNT_BLOCK = "refblock"
    SNAPSHOT_TABLE = "snapshot_table"
    BITMAP_DIRECTORY = "bitmap_directory"
    BITMAP_TABLE = "bitmap_table"
    LUKS = "luks"


@dataclass(frozen=True)
class StructRef:
    """A node of the Structures tree: what to show, and which row to select first."""

    kind: StructKind
    index: int = 0
    offset: int = 0
    owner: int = -1  # -1: the active tables; n: snapshot n
    row: int = 0


@dataclass(frozen=True)
class GuestTarget:
    """`enter` on this row goes to the guest map at this offset."""

    offset: int


@dataclass(frozen=True)
class HostTarget:
    """`enter` on this row goes to the host layout at this offset."""

    offset: int


Target = StructRef | GuestTarget | HostTarget | None

# Byte ranges of the fields, from the core's one field table (qcow2/fields.py): (name, offset,
# size, Header attribute); padding has no attribute.
HEADER_FIELDS: tuple[tuple[str, int, int, str], ...] = tuple(
    (f.name, f.offset, f.size, "" if f.text else f.name) for f in QCOW_HEADER)
# The LUKS1 header's fields before the key slots (each slot gets a row of its own).
LUKS_FIELDS: tuple[tuple[str, int, int], ...] = tuple(
    (f.name, f.offset, f.size) for f in QCRYPTO_BLOCK_LUKS_HEADER if f.name != "key_slots")

_ENTRY_STATE_NAMES = {
    G.UNALLOCATED: "unallocated",
    G.ZERO_PLAIN: "zero",
    G.ZERO_ALLOC: "zero alloc",
    G.DATA: "normal",
    G.COMPRESSED: "compressed",
    G.RESERVED: "reserved",
    G.INVALID: "INVALID",
}

_STATE_NAMES = {
    ClusterType.UNALLOCATED: "unallocated",
    ClusterType.ZERO_PLAIN: "zero",
    ClusterType.ZERO_ALLOC: "zero alloc",
    ClusterType.NORMAL: "normal",
    ClusterType.COMPRESSED: "compressed",
}


def quoted(text: str | None) -> str:
    """A string from the image, in quotes and escaped for the terminal (\"none\" when absent)."""
    return "none" if text is None else f"'{for_terminal(text)}'"


def _dim_zero(colour: str | None, byte: int) -> str | None:
    return DIM if byte == 0 else colour


def field_colour(index: int) -> str:
    """The colour of a structure's field number `index` (in its table and its hex bytes)."""
    return FIELD_CYCLE[index % len(FIELD_CYCLE)]


def field_colours(off: int, data: bytes, fields: Sequence[tuple[int, int]], base: int = 0) -> list[str | None]:
    """A colour per byte of `data` (read at file offset `off`) of a structure at `base` whose fields
    are (offset, size) ranges: each field its `field_colour`, bytes outside every field none."""
    out: list[str | None] = []
    for k, b in enumerate(data):
        rel = off + k - base
        colour = None
        for i, (fo, fs) in enumerate(fields):
            if fo <= rel < fo + fs:
                colour = field_colour(i)
                break
        out.append(_dim_zero(colour, b))
    return out


class DirectoryEntry(Protocol):
    """An entry of a snapshot table or bitmap directory: a fixed record, then extra data and names."""

    @property
    def entry_offset(self) -> int: ...

    @property
    def entry_size(self) -> int: ...


def entry_colours(off: int, data: bytes, entries: Sequence[DirectoryEntry], record: Record,
                  colour: str) -> list[str | None]:
    """A colour per byte of `data` (read at file offset `off`) of a table of variable-size entries
    that each start with `record`: the record's fields by `field_colour`, the rest of an entry
    (extra data, id, name) `colour`, bytes between entries none."""
    out: list[str | None] = []
    for k, b in enumerate(data):
        pos = off + k
        c = None
        for e in entries:
            if e.entry_offset <= pos < e.entry_offset + e.entry_size:
                i = record.field_at(pos - e.entry_offset)
                c = colour if i is None else field_colour(i)
                break
        out.append(_dim_zero(c, b))
    return out


class TableModel:
    """One structure as a table of entries plus its bytes in the file."""

    title = ""
    columns: tuple[tuple[str, int], ...] = ()
    kind: ColourKind = ColourKind.UNKNOWN  # the colour of the structure

    def __init__(self, img: Image) -> None:
        self.img = img
        self.start = 0
        self.length = 0
        self.error: str | None = None

    def __len__(self) -> int:
        return 0

    def row(self, i: int) -> list[Cell]:
        return []

    def span(self, i: int) -> tuple[int, int] | None:
        return None

    def detail(self, i: int) -> str:
        return ""

    def target(self, i: int) -> Target:
        return None

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        """A colour per byte of `data` (read at file offset `off`; the hex view draws only the bytes
        of the structure, `start` .. `start + length`): by default the structure's colour."""
        colour = KIND_COLOURS.get(self.kind)
        return [_dim_zero(colour, b) for b in data]

    def find(self, text: str, start: int) -> int | None:
        """The first row after `start` whose text contains `text` (case-insensitive), wrapping."""
        t = text.lower()
        n = len(self)
        for k in range(1, min(n, 200_000) + 1):
            i = (start + k) % n
            if any(t in cell[0].lower() for cell in self.row(i)):
                return i
        return None


# -- header and extensions ----------------------------------------------------------------------------
class HeaderModel(TableModel):
    title = "Header"
    columns = (("field", 24), ("offset", 6), ("size", 4), ("value", 18), ("meaning", 26))
    kind = ColourKind.HEADER

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        h = img.header
        # A v2 header ends after snapshots_offset; a v3 header has compression_type (and padding)
        # only when header_length covers them.
        last = HEADER_V2_SIZE if h.version == 2 else HEADER_V3_MIN_SIZE if h.header_length <= HEADER_V3_MIN_SIZE \
            else QCOW_HEADER.size
        self.fields = [f for f in HEADER_FIELDS if f[1] + f[2] <= last]
        if h.version == 3 and h.header_length > QCOW_HEADER.size:
            self.fields.append(("unknown header fields", QCOW_HEADER.size, h.header_length - QCOW_HEADER.size, ""))
        self.spans = [(fo, fs) for _n, fo, fs, _a in self.fields]
        self.start = 0
        self.length = HEADER_V2_SIZE if h.version == 2 else h.header_length

    def __len__(self) -> int:
        return len(self.fields)

    def _value(self, attr: str) -> int | None:
        """The header's value of a numeric field; None for the text fields (no attribute)."""
        if not attr:
            return None
        v = getattr(self.img.header, attr)
        if not isinstance(v, int):
            raise TypeError(f"header field {attr} is not a number")
        return v

    def _meaning(self, name: str) -> str:
        h = self.img.header
        m: dict[str, str] = {
            "magic": "QFI\\xfb" if h.magic == C.QCOW_MAGIC else "bad magic",
            "version": f"qcow2 v{h.version} (compat {h.compat})",
            "backing_file_offset": f"name: {for_terminal(h.backing_file)}" if h.backing_file else "no backing file",
            "cluster_bits": f"{fmt.size(h.cluster_size)} clusters",
            "size": fmt.size(h.size),
            "crypt_method": {0: "none", 1: "AES (legacy)", 2: "LUKS"}.get(h.crypt_method, "unknown"),
            "l1_size": f"{h.l1_size_needed} needed; {fmt.size(h.l2_size * h.cluster_size)} per entry",
            "refcount_table_clusters": f"{h.refcount_table_entries} entries",
            "incompatible_features": ", ".join(map(for_terminal, h.set_features(0))) or "none",
            "compatible_features": ", ".join(map(for_terminal, h.set_features(1))) or "none",
            "autoclear_features": ", ".join(map(for_terminal, h.set_features(2))) or "none",
            "refcount_order": f"{h.refcount_bits}-bit refcounts",
            "compression_type": h.compression_name,
        }
        return m.get(name, "")

    def row(self, i: int) -> list[Cell]:
        name, off, size, attr = self.fields[i]
        v = self._value(attr)
        if name == "magic":
            val = f"0x{v:08x}"
        elif name.endswith(("offset", "features")) and isinstance(v, int):
            val = fmt.hexoff(v)
        elif v is None:
            val = ""
        else:
            val = str(v)
        return [(name, field_colour(i)), (str(off), None), (str(size), None), (val, None),
                (self._meaning(name), DIM)]

    def span(self, i: int) -> tuple[int, int] | None:
        _, off, size, _ = self.fields[i]
        return off, off + size

    def detail(self, i: int) -> str:
        name, off, size, _ = self.fields[i]
        return f"{name}: bytes {off}..{off + size - 1}  {self._meaning(name)}"

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        return field_colours(off, data, self.spans)

    def target(self, i: int) -> Target:
        name = self.fields[i][0]
        h = self.img.header
        return {
            "l1_table_offset": StructRef(StructKind.L1, offset=h.l1_table_offset),
            "refcount_table_offset": StructRef(StructKind.REFCOUNT_TABLE, offset=h.refcount_table_offset),
            "snapshots_offset": (StructRef(StructKind.SNAPSHOT_TABLE, offset=h.snapshots_offset) if h.nb_snapshots
                                 else None),
            "backing_file_offset": StructRef(StructKind.BACKING_NAME) if h.backing_file_offset else None,
        }.get(name)


class ExtensionsModel(TableModel):
    title = "Header extensions"
    columns = (("#", 3), ("offset", 7), ("magic", 10), ("length", 6), ("extension", 30), ("content", 40))
    kind = ColourKind.EXTENSION

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        h = img.header
        self.exts = h.extensions
        self.start = h.header_length if h.version == 3 else HEADER_V2_SIZE
        self.length = max(0, h.extension_area_end - self.start)
        if self.exts:
            last = self.exts[-1]
            self.length = min(self.length, last.end - self.start) or QCOW_EXTENSION.size

    def __len__(self) -> int:
        return len(self.exts)

    def _content(self, i: int) -> str:
        e = self.exts[i]
        h = self.img.header
        if e.magic == C.QCOW2_EXT_MAGIC_BACKING_FORMAT:
            return quoted(h.backing_format)
        if e.magic == C.QCOW2_EXT_MAGIC_DATA_FILE:
            return quoted(h.data_file)
        if e.magic == C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            return f"{e.length // QCOW2_FEATURE.size} feature names"
        if e.magic == C.QCOW2_EXT_MAGIC_BITMAPS and h.bitmaps_ext is not None:
            b = h.bitmaps_ext
            return f"{b.nb_bitmaps} bitmaps, directory at {fmt.hexoff(b.bitmap_directory_offset)}"
        if e.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER and h.crypto_ext is not None:
            return f"LUKS header at {fmt.hexoff(h.crypto_ext.offset)}, {fmt.size(h.crypto_ext.length)}"
        if e.magic == C.QCOW2_EXT_MAGIC_END:
            return "end of the extension area"
        return f"{e.length} bytes"

    def row(self, i: int) -> list[Cell]:
        e = self.exts[i]
        colour = field_colour(i)
        return [(str(i), None), (str(e.offset), None), (f"{e.magic:08x}", colour), (str(e.length), None),
                (e.name, colour), (self._content(i), DIM)]

    def span(self, i: int) -> tuple[int, int] | None:
        e = self.exts[i]
        return e.offset, e.end

    def detail(self, i: int) -> str:
        e = self.exts[i]
        return f"{e.name}: type 0x{e.magic:08x} at {e.offset}, {e.length} bytes of data — {self._content(i)}"

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        out: list[str | None] = []
        for k, b in enumerate(data):
            pos = off + k
            colour = None
            for i, e in enumerate(self.exts):
                if e.offset <= pos < e.data_offset + e.length:
                    colour = FLAG_BYTE if pos < e.data_offset else field_colour(i)
                    break
            out.append(_dim_zero(colour, b))
        return out

    def target(self, i: int) -> Target:
        h = self.img.header
        e = self.exts[i]
        if e.magic == C.QCOW2_EXT_MAGIC_BITMAPS and h.bitmaps_ext is not None:
            return StructRef(StructKind.BITMAP_DIRECTORY, offset=h.bitmaps_ext.bitmap_directory_offset)
        if e.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER and h.crypto_ext is not None:
            return StructRef(StructKind.LUKS, offset=h.crypto_ext.offset)
        return None


class BackingNameModel(TableModel):
    title = "Backing file name"
    columns = (("field", 18), ("value", 60))
    kind = ColourKind.EXTENSION

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        h = img.header
        self.start = h.backing_file_offset
        self.length = h.backing_file_size
        self.rows = [("name", for_terminal(h.backing_file or "")),
                     ("format", for_terminal(h.backing_format or "(probed)")),
                     ("offset", str(h.backing_file_offset)), ("length", str(h.backing_file_size))]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> list[Cell]:
        return [(self.rows[i][0], None), (self.rows[i][1], None)]

    def span(self, i: int) -> tuple[int, int] | None:
        return self.start, self.start + self.length


# -- the first level of the two-level tables --------------------------------------------------------
class PointerTableModel(TableModel):
    """A table of 8-byte entries that each point at one cluster or at nothing: the L1 table (at L2
    tables) and the refcount table (at refcount blocks). A row is the entry's index, where what it
    covers starts, the raw entry, the cluster it points at and its flags."""

    points_to = ColourKind.UNKNOWN  # palette kind of the clusters the entries point at
    reserved_mask = 0

    def __init__(self, img: Image, start: int, entries: U64, offset_mask: int, per: int) -> None:
        super().__init__(img)
        self.start = start
        self.entries = entries
        self.length = len(entries) * 8
        self.per = per  # bytes (of the guest or of the file) that one entry covers
        self.offsets = (entries & np.uint64(offset_mask)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def flags(self, e: int, off: int) -> list[str]:
        """The flags column of an entry `e` pointing at `off`."""
        flags = []
        if e & self.reserved_mask:
            flags.append("RESERVED!")
        if off % self.img.cluster_size:
            flags.append("UNALIGNED!")
        return flags

    def row(self, i: int) -> list[Cell]:
        e = int(self.entries[i])
        off = int(self.offsets[i])
        colour = KIND_COLOURS[self.points_to] if off else DIM
        return [(str(i), None), (fmt.hexoff(i * self.per), None), (f"{e:016x}", colour),
                (fmt.hexoff(off) if off else "-", colour), (" ".join(self.flags(e, off)), None)]

    def span(self, i: int) -> tuple[int, int] | None:
        return self.start + 8 * i, self.start + 8 * i + 8


# -- L1 and L2 tables -------------------------------------------------------------------------------
class L1Model(PointerTableModel):
    columns = (("#", 7), ("guest from", 14), ("raw entry", 17), ("L2 table", 12), ("flags", 16))
    kind = ColourKind.L1
    points_to = ColourKind.L2
    reserved_mask = C.L1E_RESERVED_MASK

    def __init__(self, img: Image, owner: int = -1) -> None:
        h = img.header
        if owner < 0:
            super().__init__(img, h.l1_table_offset, img.l1_table, C.L1E_OFFSET_MASK, h.l2_size * h.cluster_size)
            self.title = f"Active L1 table ({h.l1_size} entries)"
        else:
            sn = img.snapshots[owner]
            super().__init__(img, sn.l1_table_offset, img.snapshot_l1_table(owner, pad=True), C.L1E_OFFSET_MASK,
                             h.l2_size * h.cluster_size)
            self.title = f"L1 table of snapshot {for_terminal(sn.id_str)} {quoted(sn.name)} ({sn.l1_size} entries)"
            self.kind = ColourKind.SNAPSHOT_L1
        self.owner = owner

    def flags(self, e: int, off: int) -> list[str]:
        return (["COPIED"] if e & C.QCOW_OFLAG_COPIED else []) + super().flags(e, off)

    def detail(self, i: int) -> str:
        e = int(self.entries[i])
        off = int(self.offsets[i])
        guest = i * self.per
        where = f"L2 table at {fmt.hexoff(off)}" if off else "no L2 table (all unallocated)"
        return (f"L1[{i}] at {fmt.hexoff(self.start + 8 * i)} = {e:016x}: guest {fmt.hexoff(guest)}.."
                f"{fmt.hexoff(guest + self.per - 1)} → {where}"
                f"{', COPIED' if e & C.QCOW_OFLAG_COPIED else ''}")

    def target(self, i: int) -> Target:
        off = int(self.offsets[i])
        if not off:
            return None
        return StructRef(StructKind.L2, index=i, offset=off, owner=self.owner)

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        out: list[str | None] = []
        for k, b in enumerate(data):
            i = (off + k - self.start) // 8
            within = (off + k - self.start) % 8
            if not 0 <= i < len(self.entries):
                out.append(None)
                continue
            colour = FLAG_BYTE if within == 0 else KIND_COLOURS[ColourKind.L2] if self.offsets[i] else DIM
            out.append(_dim_zero(colour, b))
        return out


def l2_states(img: Image, entries: U64, bitmaps: U64 | None) -> npt.NDArray[np.uint8]:
    """The guest-map state of each L2 entry of one table (this layer only)."""
    fmt_ = img.l2_format
    ctypes = classify_clusters(entries, fmt_)
    lut = np.array([G.UNALLOCATED, G.ZERO_PLAIN, G.ZERO_ALLOC, G.DATA, G.COMPRESSED], dtype=np.uint8)
    out = lut[ctypes]
    if bitmaps is not None:
        normal = ctypes == ClusterType.NORMAL
        unalloc = ctypes == ClusterType.UNALLOCATED
        alloc = bitmaps & np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
        zero = bitmaps >> np.uint64(32)
        full = np.uint64(C.QCOW_L2_BITMAP_ALL_ALLOC)
        uni = uniform_bitmaps(bitmaps)
        out = np.where(normal & uni & (zero == full), np.uint8(G.ZERO_ALLOC), out)
        out = np.where(normal & uni & (alloc == 0) & (zero == 0), np.uint8(G.RESERVED), out)
        out = np.where(unalloc & uni & (zero == full), np.uint8(G.ZERO_PLAIN), out)
        out = np.where(~uni & (normal | unalloc), np.uint8(G.PARTIAL), out)
        out = np.where(invalid_bitmaps(ctypes, bitmaps), np.uint8(G.INVALID), out).astype(np.uint8)
    return out


class L2Model(TableModel):
    kind = ColourKind.L2

    def __init__(self, img: Image, l1_index: int, offset: int, owner: int = -1) -> None:
        super().__init__(img)
        h = img.header
        self.l1_index = l1_index
        self.owner = owner
        self.start = offset
        self.length = h.cluster_size
        self.esize = h.l2_entry_size
        self.ext = h.extended_l2
        self.fmt = img.l2_format
        whose = "active" if owner < 0 else f"snapshot {for_terminal(img.snapshots[owner].id_str)}"
        self.title = f"L2 table {l1_index} ({whose}, {h.l2_size} entries)"
        if offset % h.cluster_size:
            self.error = f"L2 table offset {fmt.hexoff(offset)} is not cluster aligned: QEMU refuses to read it"
            self.entries: U64 = np.zeros(0, dtype=np.uint64)
            self.bitmaps: U64 | None = None
        else:
            self.entries, self.bitmaps = img.read_l2_table(offset)
        self.states = l2_states(img, self.entries, self.bitmaps)
        self.guest0 = l1_index * h.l2_size * h.cluster_size
        if self.ext:
            self.columns = (("#", 6), ("guest", 14), ("raw entry", 17), ("subcluster bitmap", 17), ("type", 11),
                            ("host", 10), ("flags", 8))
        else:
            self.columns = (("#", 6), ("guest", 14), ("raw entry", 17), ("type", 11), ("host", 12), ("flags", 14))

    def __len__(self) -> int:
        return len(self.entries)

    def guest(self, i: int) -> int:
        return self.guest0 + i * self.img.cluster_size

    def _type(self, i: int) -> str:
        st = int(self.states[i])
        if st == G.PARTIAL:
            bm = int(self.bitmaps[i]) if self.bitmaps is not None else 0
            a = bin(bm & 0xFFFFFFFF).count("1")
            z = bin(bm >> 32).count("1")
            return f"{a}A {z}Z /32"
        return _ENTRY_STATE_NAMES.get(G(st), "?")

    def _host(self, i: int) -> str:
        e = int(self.entries[i])
        ct = classify_cluster(e, self.fmt)
        if ct == ClusterType.COMPRESSED:
            return fmt.hexoff(parse_compressed(e, self.fmt).coffset)
        off = e & C.L2E_OFFSET_MASK
        return fmt.hexoff(off) if off or ct == ClusterType.NORMAL else "-"

    def _flags(self, i: int) -> str:
        e = int(self.entries[i])
        f = []
        if e & C.QCOW_OFLAG_COPIED:
            f.append("C")
        if e & C.QCOW_OFLAG_COMPRESSED:
            f.append("comp")  # "Z" means reads-as-zero everywhere else
        elif e & C.QCOW_OFLAG_ZERO:
            f.append("zero" if not self.ext else "bit0!")
        if not e & C.QCOW_OFLAG_COMPRESSED and e & C.L2E_STD_RESERVED_MASK:
            f.append("RSV!")
        return " ".join(f)

    def row(self, i: int) -> list[Cell]:
        e = int(self.entries[i])
        colour = GUEST_COLOURS[int(self.states[i])]
        cells: list[Cell] = [(str(i), None), (fmt.hexoff(self.guest(i)), None), (f"{e:016x}", colour)]
        if self.ext:
            bm = int(self.bitmaps[i]) if self.bitmaps is not None else 0
            cells.append((f"{bm:016x}", colour if bm else DIM))
        cells += [(self._type(i), colour), (self._host(i), None), (self._flags(i), None)]
        return cells

    def span(self, i: int) -> tuple[int, int] | None:
        return self.start + i * self.esize, self.start + (i + 1) * self.esize

    def detail(self, i: int) -> str:
        e = int(self.entries[i])
        g = self.guest(i)
        ct = classify_cluster(e, self.fmt)
        s = f"L2[{i}] at {fmt.hexoff(self.start + i * self.esize)} = {e:016x}"
        if self.bitmaps is not None:
            s += f" bitmap {int(self.bitmaps[i]):016x}"
        s += f": guest {fmt.hexoff(g)} ({fmt.size(g)}) is {_STATE_NAMES[ct]}"
        if ct == ClusterType.COMPRESSED:
            d = parse_compressed(e, self.fmt)
            s += f", {d.csize} bytes at host {fmt.hexoff(d.coffset)} ({d.nb_csectors} sectors)"
        elif e & C.L2E_OFFSET_MASK:
            s += f", host {fmt.hexoff(e & C.L2E_OFFSET_MASK)}"
        if e & C.QCOW_OFLAG_COPIED:
            s += ", COPIED (refcount 1)"
        return s

    def subclusters(self, i: int) -> list[int]:
        """Subcluster types of entry i (QEMU's enum values)."""
        e = int(self.entries[i])
        bm = int(self.bitmaps[i]) if self.bitmaps is not None else 0
        n = self.img.header.subclusters_per_cluster
        return [int(classify_subcluster(e, bm, k, self.fmt)) for k in range(n)]

    def target(self, i: int) -> Target:
        if self.owner >= 0:
            e = int(self.entries[i])
            off = e & C.L2E_OFFSET_MASK
            return HostTarget(off) if off else None
        return GuestTarget(self.guest(i))

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        out: list[str | None] = []
        for k, b in enumerate(data):
            rel = off + k - self.start
            i, within = divmod(rel, self.esize)
            if not 0 <= i < len(self.entries):
                out.append(None)
                continue
            st = int(self.states[i])
            if within == 0:
                colour = FLAG_BYTE
            elif within < 8:
                colour = GUEST_COLOURS[st]
            elif within < 12:
                colour = GUEST_COLOURS[G.ZERO_PLAIN]  # bits 32..63: reads-as-zero
            else:
                colour = GUEST_COLOURS[G.DATA]  # bits 0..31: allocated
            out.append(_dim_zero(colour, b))
        return out


# -- refcounts ---------------------------------------------------------------------------------------
class RefcountTableModel(PointerTableModel):
    columns = (("#", 7), ("covers host from", 16), ("raw entry", 17), ("block", 12), ("flags", 12))
    kind = ColourKind.REFCOUNT_TABLE
    points_to = ColourKind.REFCOUNT_BLOCK
    reserved_mask = C.REFT_RESERVED_MASK

    def __init__(self, img: Image) -> None:
        h = img.header
        super().__init__(img, h.refcount_table_offset, img.refcount_table, C.REFT_OFFSET_MASK,
                         h.refcount_block_entries * h.cluster_size)
        self.used = int(np.count_nonzero(self.offsets))
        self.title = f"Refcount table ({len(self.entries)} entries, {self.used} blocks)"

    def detail(self, i: int) -> str:
        off = int(self.offsets[i])
        lo = i * self.per
        blk = f"refcount block at {fmt.hexoff(off)}" if off else "no block: every cluster it covers has refcount 0"
        return f"reftable[{i}]: host {fmt.hexoff(lo)}..{fmt.hexoff(lo + self.per - 1)} → {blk}"

    def target(self, i: int) -> Target:
        off = int(self.offsets[i])
        return StructRef(StructKind.REFCOUNT_BLOCK, index=i, offset=off) if off else None


class RefblockModel(TableModel):
    columns = (("#", 7), ("host cluster", 14), ("refcount", 10), ("", 30))
    kind = ColourKind.REFCOUNT_BLOCK

    def __init__(self, img: Image, index: int, offset: int) -> None:
        super().__init__(img)
        h = img.header
        self.index = index
        self.start = offset
        self.length = h.cluster_size
        self.order = h.refcount_order
        self.title = f"Refcount block {index} at {fmt.hexoff(offset)} ({h.refcount_bits}-bit refcounts)"
        self.base = index * h.refcount_block_entries
        self.counts: U64
        try:
            block = img.refcount_block(index)
            self.counts = block if block is not None else np.zeros(0, dtype=np.uint64)
        except Qcow2Error as e:
            self.error = str(e)
            self.counts = np.zeros(0, dtype=np.uint64)
        nb_file = -(-img.file.size // h.cluster_size)
        self.in_file = max(0, min(len(self.counts), nb_file - self.base))

    def __len__(self) -> int:
        return len(self.counts)

    def row(self, i: int) -> list[Cell]:
        rc = int(self.counts[i])
        host = (self.base + i) * self.img.cluster_size
        note = "" if i < self.in_file else "past the end of the file"
        if rc > 1:
            note = note or "shared (copy on write)"
        colour = (DIM if rc == 0 else KIND_COLOURS[ColourKind.REFCOUNT_BLOCK] if rc == 1
                  else KIND_COLOURS[ColourKind.SNAPSHOT_TABLE])
        return [(str(i), None), (fmt.hexoff(host), None), (str(rc), colour), (note, DIM)]

    def span(self, i: int) -> tuple[int, int] | None:
        byte, _shift, bits = refcount_entry_location(i, self.order)
        return self.start + byte, self.start + byte + max(1, bits // 8)

    def detail(self, i: int) -> str:
        byte, shift, bits = refcount_entry_location(i, self.order)
        host = (self.base + i) * self.img.cluster_size
        where = f"byte {byte}" + (f" bits {shift}..{shift + bits - 1}" if bits < 8 else "")
        return f"refcount of host cluster {self.base + i} ({fmt.hexoff(host)}) = {int(self.counts[i])} ({where})"

    def target(self, i: int) -> Target:
        return HostTarget((self.base + i) * self.img.cluster_size)


# -- snapshots, bitmaps, LUKS -------------------------------------------------------------------------
def utc(sec: int) -> str:
    try:
        return dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(sec)


def vm_clock(nsec: int) -> str:
    s = nsec // 1_000_000_000
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{nsec // 1_000_000 % 1000:03d}"


class SnapshotTableModel(TableModel):
    columns = (("id", 4), ("name", 14), ("L1 table", 10), ("L1 size", 7), ("date (UTC)", 19), ("vm clock", 12),
               ("vm state", 9))
    kind = ColourKind.SNAPSHOT_TABLE

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        self.snaps = img.snapshots
        self.start = img.header.snapshots_offset
        self.length = img.snapshot_table.size
        self.title = f"Snapshot table ({len(self.snaps)} snapshots, {self.length} bytes)"

    def __len__(self) -> int:
        return len(self.snaps)

    def row(self, i: int) -> list[Cell]:
        s = self.snaps[i]
        return [(for_terminal(s.id_str), None), (for_terminal(s.name), KIND_COLOURS[ColourKind.SNAPSHOT_TABLE]),
                (fmt.hexoff(s.l1_table_offset), None),
                (str(s.l1_size), None), (utc(s.date_sec), None), (vm_clock(s.vm_clock_nsec), None),
                (fmt.size(s.vm_state_size), None)]

    def span(self, i: int) -> tuple[int, int] | None:
        s = self.snaps[i]
        return s.entry_offset, s.entry_offset + s.entry_size

    def detail(self, i: int) -> str:
        s = self.snaps[i]
        return (f"snapshot {for_terminal(s.id_str)} {quoted(s.name)}: "
                f"entry at {fmt.hexoff(s.entry_offset)} ({s.entry_size} bytes), "
                f"disk size {fmt.size(s.disk_size or 0)}, extra data {s.extra_data_size} bytes"
                + (f", icount {s.icount}" if s.icount is not None else ""))

    def target(self, i: int) -> Target:
        return StructRef(StructKind.SNAPSHOT_L1, owner=i, offset=self.snaps[i].l1_table_offset)

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        return entry_colours(off, data, self.snaps, QCOW_SNAPSHOT_HEADER, KIND_COLOURS[ColourKind.SNAPSHOT_TABLE])


class BitmapDirectoryModel(TableModel):
    columns = (("name", 16), ("granularity", 11), ("flags", 12), ("table", 10), ("entries", 8), ("entry at", 10))
    kind = ColourKind.BITMAP_DIRECTORY

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        ext = img.header.bitmaps_ext
        self.bitmaps = img.bitmaps
        self.start = ext.bitmap_directory_offset if ext else 0
        self.length = ext.bitmap_directory_size if ext else 0
        state = "" if img.header.bitmaps_consistent else ", INCONSISTENT (autoclear bit clear)"
        self.title = f"Bitmap directory ({len(self.bitmaps)} bitmaps{state})"

    def __len__(self) -> int:
        return len(self.bitmaps)

    def row(self, i: int) -> list[Cell]:
        b = self.bitmaps[i]
        flags = ",".join(b.flag_names) or "-"
        return [(for_terminal(b.name), KIND_COLOURS[ColourKind.BITMAP_DIRECTORY]), (fmt.size(b.granularity), None),
                (flags, KIND_COLOURS[ColourKind.LEAKED] if b.in_use else None),
                (fmt.hexoff(b.bitmap_table_offset), None), (str(b.bitmap_table_size), None),
                (fmt.hexoff(b.entry_offset), None)]

    def span(self, i: int) -> tuple[int, int] | None:
        b = self.bitmaps[i]
        return b.entry_offset, b.entry_offset + b.entry_size

    def detail(self, i: int) -> str:
        b = self.bitmaps[i]
        s = f"bitmap {quoted(b.name)}: granularity {fmt.size(b.granularity)}, flags 0x{b.flags:x}"
        if b.in_use:
            s += " (in use: not saved cleanly, contents may be stale)"
        return s

    def target(self, i: int) -> Target:
        return StructRef(StructKind.BITMAP_TABLE, index=i, offset=self.bitmaps[i].bitmap_table_offset)

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        return entry_colours(off, data, self.bitmaps, QCOW2_BITMAP_DIR_ENTRY, KIND_COLOURS[ColourKind.BITMAP_DIRECTORY])


class BitmapTableModel(TableModel):
    columns = (("#", 6), ("guest from", 14), ("raw entry", 17), ("data cluster", 12), ("content", 16))
    kind = ColourKind.BITMAP_TABLE

    def __init__(self, img: Image, index: int) -> None:
        super().__init__(img)
        b = img.bitmaps[index]
        self.bitmap = b
        self.entries = read_bitmap_table(img.file, b)
        self.start = b.bitmap_table_offset
        self.length = len(self.entries) * 8
        self.per = img.cluster_size * 8 * b.granularity  # guest bytes per bitmap data cluster
        self.title = f"Bitmap table of {quoted(b.name)} ({len(self.entries)} entries)"

    def __len__(self) -> int:
        return len(self.entries)

    def row(self, i: int) -> list[Cell]:
        e = int(self.entries[i])
        off = e & C.BME_TABLE_ENTRY_OFFSET_MASK
        if off:
            content, colour = "stored", KIND_COLOURS[ColourKind.BITMAP_DATA]
        elif e & C.BME_TABLE_ENTRY_FLAG_ALL_ONES:
            content, colour = "all ones", KIND_COLOURS[ColourKind.BITMAP_TABLE]
        else:
            content, colour = "all zeros", DIM
        return [(str(i), None), (fmt.hexoff(i * self.per), None), (f"{e:016x}", colour),
                (fmt.hexoff(off) if off else "-", colour), (content, colour)]

    def span(self, i: int) -> tuple[int, int] | None:
        return self.start + 8 * i, self.start + 8 * i + 8

    def detail(self, i: int) -> str:
        return f"bitmap {quoted(self.bitmap.name)} entry {i}: guest {fmt.hexoff(i * self.per)}.. " \
               f"({fmt.size(self.per)} of guest per data cluster)"

    def target(self, i: int) -> Target:
        off = int(self.entries[i]) & C.BME_TABLE_ENTRY_OFFSET_MASK
        return HostTarget(off) if off else None


class LuksModel(TableModel):
    columns = (("field", 16), ("offset", 7), ("value", 60))
    kind = ColourKind.LUKS

    def __init__(self, img: Image) -> None:
        super().__init__(img)
        ch = img.header.crypto_ext
        self.start = ch.offset if ch else 0
        self.length = QCRYPTO_BLOCK_LUKS_HEADER.size
        self.luks = img.luks
        self.title = f"LUKS header at {fmt.hexoff(self.start)}" + (f" ({fmt.size(ch.length)} region)" if ch else "")
        self.rows: list[tuple[str, int, int, str]] = []
        lk = self.luks
        if lk is None:
            self.error = "no LUKS header could be read in the encryption region"
            return
        vals = {"magic": "LUKS\\xba\\xbe", "version": str(lk.version), "cipher_name": for_terminal(lk.cipher_name),
                "cipher_mode": for_terminal(lk.cipher_mode_spec), "hash_spec": for_terminal(lk.hash_spec),
                "payload_offset_sector": f"{lk.payload_offset // 512} ({lk.payload_offset} bytes)",
                "master_key_len": f"{lk.key_bytes} ({for_terminal(lk.cipher_alg)})",
                "master_key_digest": "…", "master_key_salt": "…", "master_key_iterations": str(lk.master_key_iters),
                "uuid": for_terminal(lk.uuid)}
        for name, off, size in LUKS_FIELDS:
            self.rows.append((name, off, size, vals.get(name, "")))
        for k, slot in enumerate(lk.slots):
            state = f"active, {slot.iterations} iterations, {slot.stripes} stripes" if slot.active else "inactive"
            self.rows.append((f"key slot {k}", key_slot_offset(k), QCRYPTO_BLOCK_LUKS_KEY_SLOT.size,
                              f"{state}, key material at +{slot.key_offset}"))
        self.spans = [(fo, fs) for _n, fo, fs, _v in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> list[Cell]:
        name, off, _size, val = self.rows[i]
        return [(name, field_colour(i)), (str(off), None), (val, None)]

    def span(self, i: int) -> tuple[int, int] | None:
        _n, off, size, _v = self.rows[i]
        return self.start + off, self.start + off + size

    def byte_colours(self, off: int, data: bytes) -> list[str | None]:
        return field_colours(off, data, self.spans, self.start)


def model_for(img: Image, ref: StructRef) -> TableModel:
    """The table model of a tree node."""
    k = ref.kind
    if k is StructKind.HEADER:
        return HeaderModel(img)
    if k is StructKind.EXTENSIONS:
        return ExtensionsModel(img)
    if k is StructKind.BACKING_NAME:
        return BackingNameModel(img)
    if k is StructKind.L1:
        return L1Model(img)
    if k is StructKind.SNAPSHOT_L1:
        return L1Model(img, owner=ref.owner)
    if k is StructKind.L2:
        return L2Model(img, ref.index, ref.offset, ref.owner)
    if k is StructKind.REFCOUNT_TABLE:
        return RefcountTableModel(img)
    if k is StructKind.REFCOUNT_BLOCK:
        return RefblockModel(img, ref.index, ref.offset)
    if k is StructKind.SNAPSHOT_TABLE:
        return SnapshotTableModel(img)
    if k is StructKind.BITMAP_DIRECTORY:
        return BitmapDirectoryModel(img)
    if k is StructKind.BITMAP_TABLE:
        return BitmapTableModel(img, ref.index)
    if k is StructKind.LUKS:
        return LuksModel(img)
    raise KeyError(k)


def tree_colour_kind(ref: StructRef) -> ColourKind:
    """The colour a tree node is drawn in (a snapshot's L2 tables in the snapshot colour)."""
    if ref.kind is StructKind.L2 and ref.owner >= 0:
        return ColourKind.SNAPSHOT_L2
    return _TREE_COLOUR_KINDS[ref.kind]


_TREE_COLOUR_KINDS = {
    StructKind.HEADER: ColourKind.HEADER, StructKind.EXTENSIONS: ColourKind.EXTENSION,
    StructKind.BACKING_NAME: ColourKind.EXTENSION, StructKind.L1: ColourKind.L1,
    StructKind.SNAPSHOT_L1: ColourKind.SNAPSHOT_L1, StructKind.L2: ColourKind.L2,
    StructKind.REFCOUNT_TABLE: ColourKind.REFCOUNT_TABLE, StructKind.REFCOUNT_BLOCK: ColourKind.REFCOUNT_BLOCK,
    StructKind.SNAPSHOT_TABLE: ColourKind.SNAPSHOT_TABLE, StructKind.BITMAP_DIRECTORY: ColourKind.BITMAP_DIRECTORY,
    StructKind.BITMAP_TABLE: ColourKind.BITMAP_TABLE, StructKind.LUKS: ColourKind.LUKS,
}
