"""The one field table (qcow2/fields.py): sizes as QEMU's structs have them, and every user reads it."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass

import pytest
from conftest import SAMPLES

from qinspect.qcow2 import fields as F
from qinspect.qcow2.image import open_image

# sizeof() of QEMU's structs (QEMU_PACKED), from block/qcow2.h, block/qcow2-bitmap.c, crypto/block-luks.c.
QEMU_SIZES = {
    "QCowHeader": 112, "QCowExtension": 8, "Qcow2Feature": 48, "Qcow2BitmapHeaderExt": 24,
    "Qcow2CryptoHeaderExtension": 16, "QCowSnapshotHeader": 40, "QCowSnapshotExtraData": 24,
    "Qcow2BitmapDirEntry": 24, "QCryptoBlockLUKSKeySlot": 48, "QCryptoBlockLUKSHeader": 592,
}


@pytest.mark.parametrize("rec", F.RECORDS, ids=lambda r: r.name)
def test_records_tile_and_match_qemu_sizes(rec: F.Record) -> None:
    assert rec.size == QEMU_SIZES[rec.name]
    pos = 0
    for f in rec:
        assert f.offset == pos
        pos = f.end
    assert pos == rec.size
    assert rec.struct().size == rec.size


def test_known_offsets() -> None:
    h = F.QCOW_HEADER
    assert h.offset("l1_table_offset") == 40
    assert h.offset("refcount_table_offset") == 48
    assert h.offset("snapshots_offset") == 64
    assert (F.HEADER_V2_SIZE, F.HEADER_V3_MIN_SIZE, F.HEADER_QEMU_SIZE) == (72, 104, 112)
    assert h.offset("compression_type") == 104
    assert F.QCRYPTO_BLOCK_LUKS_HEADER.offset("key_slots") == 208
    assert F.key_slot_offset(7) == 208 + 7 * 48
    assert F.QCOW_SNAPSHOT_HEADER.offset("extra_data_size") == 36


def test_header_unpacks_like_the_parser() -> None:
    img = open_image(SAMPLES / "basic64k.qcow2")
    try:
        raw = img.file.pread(0, F.QCOW_HEADER.size)
        values = dict(zip((f.name for f in F.QCOW_HEADER), F.QCOW_HEADER.unpack(raw), strict=True))
        for f in F.QCOW_HEADER:
            if not f.text:
                assert values[f.name] == getattr(img.header, f.name), f.name
                assert f.get(raw) == values[f.name]
        assert struct.unpack_from(">Q", raw, 40)[0] == img.header.l1_table_offset
    finally:
        img.close()


def test_field_lookup_errors() -> None:
    with pytest.raises(KeyError):
        F.QCOW_HEADER["no_such_field"]
    with pytest.raises(TypeError):
        F.QCOW_HEADER["padding"].get(bytes(112))
    assert F.QCOW_HEADER.field_at(41) == 8  # l1_table_offset
    assert F.QCOW_HEADER.field_at(200) is None


@dataclass(frozen=True)
class _Entry:
    entry_offset: int
    entry_size: int


def test_tui_hex_colouring_reads_the_table() -> None:
    from qinspect.tui import structs

    assert [f[:3] for f in structs.HEADER_FIELDS] == [(f.name, f.offset, f.size) for f in F.QCOW_HEADER]
    # A snapshot table entry and a bitmap directory entry are coloured by their record's fields;
    # the bytes after the fixed part (extra data, id, name) by the structure's colour.
    for rec in (F.QCOW_SNAPSHOT_HEADER, F.QCOW2_BITMAP_DIR_ENTRY):
        entry = _Entry(entry_offset=100, entry_size=rec.size + 5)
        colours = structs.entry_colours(96, bytes([1]) * (rec.size + 12), [entry], rec, "rest")
        want = [None] * 4 + [structs.field_colour(i) for i, f in enumerate(rec) for _ in range(f.size)]
        assert colours == want + ["rest"] * 5 + [None] * 3, rec.name


def test_no_other_module_spells_header_structs() -> None:
    """struct formats of qcow2's on-disk records are built from the table, not written out again
    (qinspect/guest/ reads other formats: partition tables and filesystems, with their own layouts)."""
    out = subprocess.run(["grep", "-rnE", "--exclude=fields.py", "--exclude-dir=guest",
                          r'Struct\(">|unpack(_from)?\(">I+Q', "qinspect/"],
                         capture_output=True, text=True, cwd=SAMPLES.parent).stdout
    assert out == "", out
