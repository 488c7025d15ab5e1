"""Byte layouts of the fixed-size on-disk records, declared once with QEMU's names.

Each `Record` lists its fields in order (name, offset, size) exactly as the C struct does
(`QCowHeader`, `QCowSnapshotHeader`, `Qcow2BitmapDirEntry`, ... in block/qcow2.h, block/qcow2-bitmap.c
and crypto/block-luks.c). The parsers unpack records through them, the TUI colours hex dumps by
them and the layout's reverse lookup names the header field that points at a cluster by them: a
field's offset lives here and nowhere else. Integers are big-endian (as qcow2 and LUKS store
them); `Field.text` marks character arrays and byte blobs.

This module imports only the standard library and `qinspect.qcow2.value`, and not `typing`
(`info` and the error paths use it at start-up: see `qinspect.qcow2.value` on why records are not
dataclasses).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from qinspect.qcow2.value import Value

_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Field(Value):
    """One field of a record: its name, byte offset in the record and size in bytes (immutable)."""

    __slots__ = ("name", "offset", "size", "text")
    FIELDS = ("name", "offset", "size", "text")

    name: str
    offset: int
    size: int
    text: bool  # a character array or byte blob, not a big-endian integer

    def __init__(self, name: str, offset: int, size: int, text: bool = False) -> None:
        self._assign(name, offset, size, text)

    @property
    def end(self) -> int:
        """The offset just past the field."""
        return self.offset + self.size

    def get(self, buf: bytes | bytearray | memoryview, base: int = 0) -> int:
        """The field's unsigned big-endian value in the record at `buf[base:]`."""
        if self.text:
            raise TypeError(f"{self.name} is not an integer field")
        return int.from_bytes(buf[base + self.offset : base + self.end], "big")

    def raw(self, buf: bytes | bytearray | memoryview, base: int = 0) -> bytes:
        """The field's bytes in the record at `buf[base:]`."""
        return bytes(buf[base + self.offset : base + self.end])


class Record:
    """A fixed-size on-disk record: fields that tile it from offset 0 without gaps."""

    def __init__(self, name: str, *fields: tuple[str, int] | tuple[str, int, bool]) -> None:
        self.name = name
        out: list[Field] = []
        pos = 0
        for spec in fields:
            fname, size = spec[0], spec[1]
            text = bool(spec[2]) if len(spec) > 2 else False
            if not text and size not in _INT_CODES:
                raise ValueError(f"{name}.{fname}: an integer field of {size} bytes")
            out.append(Field(fname, pos, size, text))
            pos += size
        self.fields: tuple[Field, ...] = tuple(out)
        self.size = pos
        self._by_name = {f.name: f for f in out}

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"<Record {self.name} ({self.size} bytes, {len(self.fields)} fields)>"

    def offset(self, name: str) -> int:
        """The byte offset of field `name` in the record."""
        return self._by_name[name].offset

    def upto(self, last: str) -> tuple[Field, ...]:
        """The fields from the first one to `last` (inclusive)."""
        i = self.fields.index(self._by_name[last])
        return self.fields[: i + 1]

    def struct(self, first: str | None = None, last: str | None = None) -> struct.Struct:
        """A big-endian `struct.Struct` for the fields `first`..`last` (default: the whole record)."""
        return _struct_of(self, first, last)

    def unpack(self, buf: bytes | bytearray | memoryview, base: int = 0) -> tuple[int | bytes, ...]:
        """Every field of the record at `buf[base:]`, in order (bytes for text fields)."""
        return self.struct().unpack_from(buf, base)

    def field_at(self, rel: int) -> int | None:
        """The index of the field holding byte `rel` of the record, or None outside it."""
        for i, f in enumerate(self.fields):
            if f.offset <= rel < f.end:
                return i
        return None


def _build_struct(fields: tuple[Field, ...]) -> struct.Struct:
    return struct.Struct(">" + "".join(f"{f.size}s" if f.text else _INT_CODES[f.size] for f in fields))


_STRUCTS: dict[tuple[int, str | None, str | None], struct.Struct] = {}


def _struct_of(rec: Record, first: str | None, last: str | None) -> struct.Struct:
    key = (id(rec), first, last)
    s = _STRUCTS.get(key)
    if s is None:
        i = 0 if first is None else rec.fields.index(rec[first])
        j = len(rec.fields) if last is None else rec.fields.index(rec[last]) + 1
        s = _STRUCTS[key] = _build_struct(rec.fields[i:j])
    return s


# -- qcow2 (block/qcow2.h) ---------------------------------------------------------------------------
QCOW_HEADER = Record(
    "QCowHeader",
    ("magic", 4), ("version", 4), ("backing_file_offset", 8), ("backing_file_size", 4), ("cluster_bits", 4),
    ("size", 8), ("crypt_method", 4), ("l1_size", 4), ("l1_table_offset", 8), ("refcount_table_offset", 8),
    ("refcount_table_clusters", 4), ("nb_snapshots", 4), ("snapshots_offset", 8),
    # version 3 and later
    ("incompatible_features", 8), ("compatible_features", 8), ("autoclear_features", 8),
    ("refcount_order", 4), ("header_length", 4),
    # additional fields (present when header_length covers them)
    ("compression_type", 1), ("padding", 7, True),
)
"""The image header (112 bytes as QEMU writes it; v2 headers end after `snapshots_offset`)."""

HEADER_V2_LAST = "snapshots_offset"
HEADER_V3_LAST = "header_length"
HEADER_V2_SIZE = QCOW_HEADER["snapshots_offset"].end  # 72
HEADER_V3_MIN_SIZE = QCOW_HEADER["header_length"].end  # 104
HEADER_QEMU_SIZE = QCOW_HEADER.size  # 112

QCOW_EXTENSION = Record("QCowExtension", ("magic", 4), ("len", 4))
"""The type and length that precede every header extension's data."""

QCOW2_FEATURE = Record("Qcow2Feature", ("type", 1), ("bit", 1), ("name", 46, True))
"""One entry of the feature name table extension."""

QCOW2_BITMAP_HEADER_EXT = Record(
    "Qcow2BitmapHeaderExt",
    ("nb_bitmaps", 4), ("reserved32", 4), ("bitmap_directory_size", 8), ("bitmap_directory_offset", 8),
)
"""The data of the bitmaps header extension."""

QCOW2_CRYPTO_HEADER_EXT = Record("Qcow2CryptoHeaderExtension", ("offset", 8), ("length", 8))
"""The data of the full disk encryption header pointer extension."""

QCOW_SNAPSHOT_HEADER = Record(
    "QCowSnapshotHeader",
    ("l1_table_offset", 8), ("l1_size", 4), ("id_str_size", 2), ("name_size", 2), ("date_sec", 4),
    ("date_nsec", 4), ("vm_clock_nsec", 8), ("vm_state_size", 4), ("extra_data_size", 4),
)
"""A snapshot table entry's fixed part (extra data, id string and name follow)."""

QCOW_SNAPSHOT_EXTRA_DATA = Record(
    "QCowSnapshotExtraData", ("vm_state_size_large", 8), ("disk_size", 8), ("icount", 8),
)
"""The known part of a snapshot's extra data (an entry may store less, or more)."""

QCOW2_BITMAP_DIR_ENTRY = Record(
    "Qcow2BitmapDirEntry",
    ("bitmap_table_offset", 8), ("bitmap_table_size", 4), ("flags", 4), ("type", 1), ("granularity_bits", 1),
    ("name_size", 2), ("extra_data_size", 4),
)
"""A bitmap directory entry's fixed part (extra data and name follow) — block/qcow2-bitmap.c."""

# -- LUKS1 (crypto/block-luks.c) -----------------------------------------------------------------------
QCRYPTO_BLOCK_LUKS_KEY_SLOT = Record(
    "QCryptoBlockLUKSKeySlot",
    ("active", 4), ("iterations", 4), ("salt", 32, True), ("key_offset_sector", 4), ("stripes", 4),
)
"""One of the 8 LUKS1 key slots."""

QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS = 8

QCRYPTO_BLOCK_LUKS_HEADER = Record(
    "QCryptoBlockLUKSHeader",
    ("magic", 6, True), ("version", 2), ("cipher_name", 32, True), ("cipher_mode", 32, True),
    ("hash_spec", 32, True), ("payload_offset_sector", 4), ("master_key_len", 4),
    ("master_key_digest", 20, True), ("master_key_salt", 32, True), ("master_key_iterations", 4),
    ("uuid", 40, True),
    ("key_slots", QCRYPTO_BLOCK_LUKS_KEY_SLOT.size * QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS, True),
)
"""The LUKS1 partition header (592 bytes) at the start of a qcow2 image's encryption region."""


def key_slot_offset(index: int) -> int:
    """The offset of LUKS key slot `index` in the LUKS header."""
    return QCRYPTO_BLOCK_LUKS_HEADER.offset("key_slots") + index * QCRYPTO_BLOCK_LUKS_KEY_SLOT.size


RECORDS: tuple[Record, ...] = (
    QCOW_HEADER, QCOW_EXTENSION, QCOW2_FEATURE, QCOW2_BITMAP_HEADER_EXT, QCOW2_CRYPTO_HEADER_EXT,
    QCOW_SNAPSHOT_HEADER, QCOW_SNAPSHOT_EXTRA_DATA, QCOW2_BITMAP_DIR_ENTRY, QCRYPTO_BLOCK_LUKS_KEY_SLOT,
    QCRYPTO_BLOCK_LUKS_HEADER,
)
