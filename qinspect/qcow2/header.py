"""The qcow2 header (v2 and v3) and its extensions, parsed and validated like QEMU's open.

`read_header` reads cluster 0's header fields, the extension area and the backing file name; it
raises `Qcow2Error` only when the file cannot be a qcow2 image at all (wrong magic or version,
impossible cluster size or header length) and records everything else QEMU would refuse as a
`Problem`, so that an inspector can still show the rest.
"""

from __future__ import annotations

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Qcow2Error, Severity
from qinspect.qcow2.fields import (
    HEADER_QEMU_SIZE,
    HEADER_V2_LAST,
    HEADER_V2_SIZE,
    HEADER_V3_LAST,
    HEADER_V3_MIN_SIZE,
    QCOW2_BITMAP_HEADER_EXT,
    QCOW2_CRYPTO_HEADER_EXT,
    QCOW2_FEATURE,
    QCOW_EXTENSION,
    QCOW_HEADER,
    QCOW_SNAPSHOT_HEADER,
)
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.luks import luks_open_refusal
from qinspect.qcow2.value import Value

_V2 = QCOW_HEADER.struct(None, HEADER_V2_LAST)
_MAGIC_VERSION = QCOW_HEADER.struct(None, "version")
_V3 = QCOW_HEADER.struct("incompatible_features", HEADER_V3_LAST)
_EXT = QCOW_EXTENSION.struct()


def _at(name: str) -> int:
    """The header offset of field `name` (where a problem with that field points)."""
    return QCOW_HEADER.offset(name)


# The records are immutable values (`qinspect.qcow2.value.Value`: no dataclasses on the info path).
class HeaderExtension(Value):
    """One header extension: its file offset (of the type field), magic and raw data."""

    __slots__ = ("data", "length", "magic", "offset")
    FIELDS = ("offset", "magic", "length", "data")

    offset: int
    magic: int
    length: int
    data: bytes

    def __init__(self, offset: int, magic: int, length: int, data: bytes) -> None:
        self._assign(offset, magic, length, data)

    @property
    def name(self) -> str:
        return C.EXTENSION_NAMES.get(self.magic, f"unknown extension 0x{self.magic:08x}")

    @property
    def data_offset(self) -> int:
        """File offset of the extension's data (after its QCowExtension type and length)."""
        return self.offset + QCOW_EXTENSION.size

    @property
    def end(self) -> int:
        """File offset past the extension, its data padded to a multiple of 8 (the next one's)."""
        return self.data_offset + ((self.length + 7) & ~7)


class FeatureName(Value):
    """An entry of the feature name table: (type 0/1/2, bit) → name."""

    __slots__ = ("bit", "name", "type")
    FIELDS = ("type", "bit", "name")

    type: int
    bit: int
    name: str

    def __init__(self, type: int, bit: int, name: str) -> None:
        self._assign(type, bit, name)


class BitmapsExtension(Value):
    """The bitmaps header extension: where the bitmap directory is."""

    __slots__ = ("bitmap_directory_offset", "bitmap_directory_size", "nb_bitmaps", "reserved")
    FIELDS = ("nb_bitmaps", "reserved", "bitmap_directory_size", "bitmap_directory_offset")

    nb_bitmaps: int
    reserved: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    def __init__(self, nb_bitmaps: int, reserved: int, bitmap_directory_size: int,
                 bitmap_directory_offset: int) -> None:
        self._assign(nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset)


class CryptoHeaderExtension(Value):
    """The full disk encryption header pointer (LUKS region in the image file)."""

    __slots__ = ("length", "offset")
    FIELDS = ("offset", "length")

    offset: int
    length: int

    def __init__(self, offset: int, length: int) -> None:
        self._assign(offset, length)


class Header:
    """Every header field, the parsed extensions and the values QEMU derives from them.

    `read_header` fills it in as it parses (the v3 fields, the extensions, the names), so it is a
    mutable record, a `__slots__` class (see `qinspect.qcow2.value` on why not a
    dataclass). Nothing compares or hashes headers.
    """

    __slots__ = ("autoclear_features", "backing_file", "backing_file_offset", "backing_file_size", "backing_format",
                 "bitmaps_ext", "cluster_bits", "compatible_features", "compression_type", "crypt_method",
                 "crypto_ext", "data_file", "extension_area_end", "extensions", "feature_names", "header_length",
                 "incompatible_features", "l1_size", "l1_table_offset", "magic", "nb_snapshots", "refcount_order",
                 "refcount_table_clusters", "refcount_table_offset", "size", "snapshots_offset",
                 "unknown_header_bytes", "version")

    def __init__(self, magic: int, version: int, backing_file_offset: int, backing_file_size: int,
                 cluster_bits: int, size: int, crypt_method: int, l1_size: int, l1_table_offset: int,
                 refcount_table_offset: int, refcount_table_clusters: int, nb_snapshots: int,
                 snapshots_offset: int) -> None:
        """The v2 fields, in their on-disk order; `read_header` sets the rest."""
        self.magic = magic
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        # version 3 and later (v2 headers: QEMU's implied values)
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.refcount_order = 4
        self.header_length = HEADER_V2_SIZE
        self.compression_type = C.COMPRESSION_TYPE_ZLIB
        # the extension area and what it names
        self.extensions: list[HeaderExtension] = []
        self.extension_area_end = 0
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.feature_names: list[FeatureName] = []
        self.bitmaps_ext: BitmapsExtension | None = None
        self.crypto_ext: CryptoHeaderExtension | None = None
        self.unknown_header_bytes = b""

    def __repr__(self) -> str:
        return (f"<Header v{self.version}, {self.size} bytes, cluster_bits {self.cluster_bits}, "
                f"{len(self.extensions)} extensions>")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return C.L2E_SIZE_EXTENDED if self.extended_l2 else C.L2E_SIZE_NORMAL

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_size(self) -> int:
        """Entries per L2 table (QEMU's `s->l2_size`)."""
        return 1 << self.l2_bits

    @property
    def subclusters_per_cluster(self) -> int:
        return C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def refcount_bits(self) -> int:
        """Refcount width; a refused refcount_order > 6 counts as 64 (the field keeps the stored value)."""
        return 1 << min(self.refcount_order, C.MAX_REFCOUNT_ORDER)

    @property
    def refcount_block_entries(self) -> int:
        """Refcount entries per refcount block: cluster_size * 8 / refcount_bits."""
        return (self.cluster_size * 8) >> min(self.refcount_order, C.MAX_REFCOUNT_ORDER)

    @property
    def refcount_table_entries(self) -> int:
        return (self.refcount_table_clusters << self.cluster_bits) // C.REFTABLE_ENTRY_SIZE

    @property
    def l1_size_needed(self) -> int:
        """L1 entries the virtual size needs (QEMU refuses a smaller l1_size)."""
        per_l1 = 1 << (self.cluster_bits + self.l2_bits)
        return -(-self.size // per_l1)

    @property
    def guest_clusters(self) -> int:
        return -(-self.size // self.cluster_size)

    # -- features ---------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & C.QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS)

    @property
    def bitmaps_consistent(self) -> bool:
        return bool(self.autoclear_features & C.QCOW2_AUTOCLEAR_BITMAPS)

    @property
    def compression_name(self) -> str:
        return C.COMPRESSION_TYPE_NAMES.get(self.compression_type, f"unknown ({self.compression_type})")

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    def feature_name(self, kind: int, bit: int) -> str:
        """The name of feature bit `bit` of kind 0 (incompatible), 1 (compatible), 2 (autoclear)."""
        for f in self.feature_names:
            if f.type == kind and f.bit == bit:
                return f.name
        kind_name = ("incompatible", "compatible", "autoclear")[kind]
        return C.FEATURE_NAMES.get((kind, bit), f"unknown {kind_name} bit {bit}")

    def set_features(self, kind: int) -> list[str]:
        value = (self.incompatible_features, self.compatible_features, self.autoclear_features)[kind]
        return [self.feature_name(kind, b) for b in range(64) if value >> b & 1]


def read_header(f: HostFile, problems: list[Problem]) -> Header:
    """Parse and validate the header, extensions and backing file name of the image in `f`."""
    if f.size == 0:
        raise Qcow2Error("empty file (0 bytes), not a qcow2 image", path=f.path)
    if f.size < 8:
        raise Qcow2Error(f"file too small to be a qcow2 image ({f.size} bytes)", 0, path=f.path)
    start = f.pread(0, HEADER_QEMU_SIZE)
    magic, version = _MAGIC_VERSION.unpack_from(start)
    if magic != C.QCOW_MAGIC:
        raise Qcow2Error(_not_qcow2_message(f, start), 0, path=f.path)
    if version == C.QCOW1_VERSION:
        raise Qcow2Error("qcow (version 1) image, not qcow2; qinspect reads qcow2 v2 and v3 only", _at("version"),
                         path=f.path)
    if version not in (2, 3):
        raise Qcow2Error(f"unsupported qcow2 version {version}", _at("version"), path=f.path)
    if f.size < HEADER_V2_SIZE:
        raise Qcow2Error(f"truncated header: file is {f.size} bytes, a qcow2 header needs {HEADER_V2_SIZE}", 0,
                         path=f.path)
    h = Header(*_V2.unpack_from(start))
    if not C.MIN_CLUSTER_BITS <= h.cluster_bits <= C.MAX_CLUSTER_BITS:
        raise Qcow2Error(
            f"unsupported cluster size 2^{h.cluster_bits} (QEMU accepts 512 B to 2 MiB)", _at("cluster_bits"),
            path=f.path)
    if version == 3:
        if f.size < HEADER_V3_MIN_SIZE:
            raise Qcow2Error(f"truncated v3 header: file is {f.size} bytes, needs {HEADER_V3_MIN_SIZE}", 0, path=f.path)
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _V3.unpack_from(start, HEADER_V2_SIZE)
        if h.header_length < HEADER_V3_MIN_SIZE:
            raise Qcow2Error(f"qcow2 header too short (header_length {h.header_length})", _at("header_length"),
                             path=f.path)
        if h.header_length > h.cluster_size:
            raise Qcow2Error(
                f"qcow2 header exceeds cluster size (header_length {h.header_length})", _at("header_length"),
                path=f.path)
        if h.header_length % 8:
            _warn(problems, "header", f"header_length {h.header_length} is not a multiple of 8", _at("header_length"))
        if h.header_length > HEADER_V3_MIN_SIZE:
            h.compression_type = start[_at("compression_type")]
        if h.header_length > HEADER_QEMU_SIZE:
            h.unknown_header_bytes = f.pread(HEADER_QEMU_SIZE, h.header_length - HEADER_QEMU_SIZE)
    _validate_fields(h, f, problems)
    _read_extensions(h, f, problems)
    _read_backing_name(h, f, problems)
    return h


def _not_qcow2_message(f: HostFile, start: bytes) -> str:
    """What the file is instead, for the formats `qemu-img create` makes and a few more."""
    fmt = None
    if start[:4] == b"KDMV":
        fmt = "a VMDK file"
    elif start[:21] == b"# Disk DescriptorFile":
        fmt = "a VMDK descriptor file"
    elif start[:8] == b"conectix" or (f.size >= 512 and f.pread(f.size - 512, 8) == b"conectix"):
        fmt = "a VHD (vpc) file"
    elif start[:8] == b"vhdxfile":
        fmt = "a VHDX file"
    elif f.size >= 0x44 and f.pread(0x40, 4) == b"\x7f\x10\xda\xbe":
        fmt = "a VDI file"
    elif start[:4] == b"QED\0":
        fmt = "a QED file"
    elif start[:4] == b"LUKS":
        fmt = "a raw LUKS volume"
    if fmt is not None:
        return f"not a qcow2 image: this is {fmt}"
    magic = QCOW_HEADER["magic"].get(start)
    return f"not a qcow2 image: no qcow2 magic (found 0x{magic:08x}, expected 0x514649fb); a raw disk image?"


def _warn(problems: list[Problem], structure: str, msg: str, offset: int | None = None) -> None:
    problems.append(Problem(Severity.WARNING, structure, msg, offset))


def _refuse(problems: list[Problem], structure: str, msg: str, offset: int | None = None,
            check_opens: bool = False) -> None:
    problems.append(Problem(Severity.ERROR, structure, msg, offset, qemu_refuses_open=True,
                            check_opens=check_opens))


def table_fits(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    """The offset rule of qcow2_validate_table: cluster aligned, and the table ends at or below
    INT64_MAX (`INT64_MAX - entries * entry_len < offset` is refused), even when it is empty."""
    return not (C.INT64_MAX - entries * entry_len < offset or offset % cluster_size)


def _validate_table(problems: list[Problem], structure: str, name: str, offset: int, entries: int,
                    entry_len: int, max_bytes: int, cluster_size: int, fields: tuple[int, int],
                    unit: str, check_opens: bool = False) -> bool:
    """qcow2_validate_table: "<name> too large" / "<name> offset invalid" (`fields`: the header
    offsets of the table's size and offset fields)."""
    if entries > max_bytes // entry_len:
        _refuse(problems, structure, f"{name} too large ({entries} {unit}, the maximum is {max_bytes // entry_len})",
                fields[0], check_opens)
        return False
    if not table_fits(offset, entries, entry_len, cluster_size):
        why = ("not cluster aligned" if offset % cluster_size
               else f"{entries} {unit} of {entry_len} bytes from there would end past INT64_MAX")
        _refuse(problems, structure, f"{name} offset invalid ({offset:#x}: {why})", fields[1], check_opens)
        return False
    return True


def _validate_fields(h: Header, f: HostFile, problems: list[Problem]) -> None:
    cs = h.cluster_size
    if h.version == 2:
        h.refcount_order = 4
    # qcow2_do_open's order: backing file offset, unknown incompatible features, refcount order, ...
    if h.backing_file_offset > cs:
        _refuse(problems, "header", f"invalid backing file offset {h.backing_file_offset}",
                _at("backing_file_offset"))
    unknown = h.incompatible_features & ~C.QCOW2_INCOMPAT_MASK
    if unknown:
        _refuse(problems, "header", f"Unsupported qcow2 feature(s): {_unsupported_features(h, f, unknown)}",
                _at("incompatible_features"))
    if h.refcount_order > C.MAX_REFCOUNT_ORDER:
        _refuse(problems, "header", f"refcount_order {h.refcount_order}: refcount width may not exceed 64 bits",
                _at("refcount_order"))
    if h.corrupt:
        problems.append(Problem(Severity.ERROR, "header",
                                "the corrupt bit is set: QEMU opens this image read-only only",
                                _at("incompatible_features")))
    if h.incompatible_features & C.QCOW2_INCOMPAT_COMPRESSION:
        if h.compression_type == C.COMPRESSION_TYPE_ZLIB:
            _refuse(problems, "header", "compression type incompatible feature bit must not be set with zlib",
                _at("compression_type"))
    elif h.compression_type != C.COMPRESSION_TYPE_ZLIB:
        _refuse(problems, "header", "compression type incompatible feature bit must be set for a non-zlib type",
                _at("compression_type"))
    if h.compression_type not in C.COMPRESSION_TYPE_NAMES:
        _refuse(problems, "header", f"unknown compression type: {h.compression_type}", _at("compression_type"))
    if h.extended_l2 and h.cluster_bits < 14:
        _refuse(problems, "header", "extended L2 entries need clusters of at least 16 KiB (subclusters of 512 B)",
                _at("cluster_bits"))
    if h.crypt_method > C.QCOW_CRYPT_LUKS:
        _refuse(problems, "header", f"unsupported encryption method {h.crypt_method}", _at("crypt_method"))
    if h.size % 512:
        _warn(problems, "header", f"virtual size {h.size} is not a multiple of 512", _at("size"))
    # The tables, in qcow2_do_open's order: refcount table, snapshot table, active L1 table.
    # refcount table (check opens with BDRV_O_CHECK, which accepts an image without one)
    rt_bytes = h.refcount_table_clusters * cs
    if h.refcount_table_clusters == 0:
        _refuse(problems, "refcount table", "Image does not contain a reference count table",
                _at("refcount_table_clusters"), check_opens=True)
    if (_validate_table(problems, "refcount table", "Reference count table", h.refcount_table_offset,
                        h.refcount_table_clusters, cs, C.QCOW_MAX_REFTABLE_SIZE, cs,
                        (_at("refcount_table_clusters"), _at("refcount_table_offset")), "clusters")
            and rt_bytes and f.is_past_end(h.refcount_table_offset, rt_bytes)):
        problems.append(Problem(Severity.ERROR, "refcount table",
                                f"refcount table ({h.refcount_table_clusters} clusters, {rt_bytes} bytes) extends "
                                f"past the end of the file ({f.size} bytes); the missing entries read as 0",
                                h.refcount_table_offset))
    # snapshot table: validated even when empty; check skips this at open and validates it itself
    _validate_table(problems, "snapshot table", "Snapshot table", h.snapshots_offset, h.nb_snapshots,
                    QCOW_SNAPSHOT_HEADER.size, QCOW_SNAPSHOT_HEADER.size * C.QCOW_MAX_SNAPSHOTS, cs,
                    (_at("nb_snapshots"), _at("snapshots_offset")),
                    "snapshots", check_opens=True)
    # L1 table
    l1_bytes = h.l1_size * C.L1E_SIZE
    if (_validate_table(problems, "L1 table", "Active L1 table", h.l1_table_offset, h.l1_size, C.L1E_SIZE,
                        C.QCOW_MAX_L1_SIZE, cs, (_at("l1_size"), _at("l1_table_offset")), "entries")
            and h.l1_size and f.is_past_end(h.l1_table_offset, l1_bytes)):
        problems.append(Problem(Severity.ERROR, "L1 table",
                                f"L1 table ({h.l1_size} entries, {l1_bytes} bytes) extends past the end of the "
                                f"file ({f.size} bytes); the missing entries read as 0", h.l1_table_offset))
    if h.l1_size < h.l1_size_needed:
        _refuse(problems, "L1 table",
                f"L1 table is too small ({h.l1_size} entries, the size needs {h.l1_size_needed})", _at("l1_size"))
    # The tables QEMU reads at open: a read ending past BDRV_MAX_LENGTH fails (block layer, EIO).
    if h.l1_size and h.l1_table_offset + l1_bytes > C.BDRV_MAX_LENGTH:
        _refuse(problems, "L1 table", "Could not read L1 table: Input/output error (it ends past "
                                      f"{C.BDRV_MAX_LENGTH:#x}, the block layer's limit)", _at("l1_table_offset"))
    if rt_bytes and h.refcount_table_offset + rt_bytes > C.BDRV_MAX_LENGTH:
        _refuse(problems, "refcount table", "Could not initialize refcount handling: Input/output error (the "
                                            f"table ends past {C.BDRV_MAX_LENGTH:#x}, the block layer's limit)",
                _at("refcount_table_offset"))
    if h.nb_snapshots and h.snapshots_offset + QCOW_SNAPSHOT_HEADER.size > C.BDRV_MAX_LENGTH:
        _refuse(problems, "snapshot table", "Failed to read the snapshot table: Input/output error (it lies past "
                                            f"{C.BDRV_MAX_LENGTH:#x}, the block layer's limit)",
                _at("snapshots_offset"))


def _unsupported_features(h: Header, f: HostFile, mask: int) -> str:
    """report_unsupported_feature: unknown incompatible bits named from the image's feature name
    table (read by a first pass over the extensions, as qcow2_do_open does before refusing), then
    "Unknown incompatible feature: <hex>" for the bits it does not name."""
    names: list[str] = []
    for entry_type, bit, name in _feature_table_entries(h, f):
        if entry_type == 0 and mask & (1 << (bit & 63)):  # (x86 shifts by bit mod 64)
            names.append(name[:46])
            mask &= ~(1 << (bit & 63))
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def _feature_table_entries(h: Header, f: HostFile) -> list[tuple[int, int, str]]:
    """The last feature name table extension before the extension area ends or goes wrong, up to
    its first entry with an empty name (how QEMU walks it)."""
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size)
    off, table = h.header_length, b""
    while off < end:
        magic, length = _EXT.unpack(f.pread(off, _EXT.size))
        if magic == C.QCOW2_EXT_MAGIC_END or off + _EXT.size + length > end:
            break
        if magic == C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            table = f.pread(off + _EXT.size, length)
        off += _EXT.size + ((length + 7) & ~7)
    out: list[tuple[int, int, str]] = []
    fsize = QCOW2_FEATURE.size
    for i in range(0, len(table), fsize):
        kind, bit, raw_name = QCOW2_FEATURE.unpack(table[i : i + fsize].ljust(fsize, b"\0"))
        name = bytes(raw_name).split(b"\0", 1)[0]
        if not name:
            break
        out.append((int(kind), int(bit), name.decode("utf-8", "replace")))
    return out


def _read_extensions(h: Header, f: HostFile, problems: list[Problem]) -> None:
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, h.cluster_size)
    h.extension_area_end = end
    off = h.header_length
    seen: set[int] = set()
    # qcow2_read_extensions reads an extension header whenever offset < end, and refuses one that
    # does not fit (even the end marker) before looking at its type.
    while off < end:
        magic, length = _EXT.unpack(f.pread(off, _EXT.size))
        hdr = _EXT.size
        if off + hdr > end or length > end - off - hdr:
            room = max(0, end - off - hdr)
            what = (f"only {end - off} bytes left for its {hdr}-byte header" if off + hdr > end
                    else f"{length} bytes, {room} left before byte {end}")
            _refuse(problems, "header extensions", f"Header extension too large (0x{magic:08x}: {what})", off)
            return
        if magic == C.QCOW2_EXT_MAGIC_END:
            h.extensions.append(HeaderExtension(off, magic, length, b""))
            return
        data = f.pread(off + hdr, length)
        ext = HeaderExtension(off, magic, length, data)
        h.extensions.append(ext)
        if magic in seen and magic in C.EXTENSION_NAMES:
            _warn(problems, "header extensions", f"{ext.name} extension appears more than once", off)
        seen.add(magic)
        _apply_extension(h, ext, problems, f)
        off = ext.end


def _apply_extension(h: Header, ext: HeaderExtension, problems: list[Problem], f: HostFile) -> None:
    data, off = ext.data, ext.offset
    if ext.magic == C.QCOW2_EXT_MAGIC_BACKING_FORMAT:
        if ext.length > C.BACKING_FORMAT_MAX:
            _refuse(problems, "header extensions", f"backing format name too long ({ext.length} bytes)", off)
        h.backing_format = data[: C.BACKING_FORMAT_MAX].decode("utf-8", "replace")
    elif ext.magic == C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
        fsize = QCOW2_FEATURE.size
        for i in range(ext.length // fsize):
            kind, bit, raw_name = QCOW2_FEATURE.unpack(data, i * fsize)
            name = bytes(raw_name).split(b"\0", 1)[0].decode("utf-8", "replace")
            h.feature_names.append(FeatureName(int(kind), int(bit), name))
    elif ext.magic == C.QCOW2_EXT_MAGIC_BITMAPS:
        bx = QCOW2_BITMAP_HEADER_EXT
        if ext.length != bx.size:
            _refuse(problems, "bitmaps extension", f"bitmaps extension has length {ext.length}, expected {bx.size}",
                    off)
            return
        bm = BitmapsExtension(*bx.struct().unpack(data))
        at = ext.data_offset
        if not h.bitmaps_consistent:
            _warn(problems, "bitmaps extension",
                  "autoclear bit 0 is clear: all bitmaps are inconsistent and QEMU ignores them", off)
        if bm.reserved:
            _refuse(problems, "bitmaps extension", "reserved field is not zero", at + bx.offset("reserved32"))
        if bm.nb_bitmaps == 0 or bm.nb_bitmaps > C.QCOW2_MAX_BITMAPS:
            _refuse(problems, "bitmaps extension", f"invalid number of bitmaps ({bm.nb_bitmaps})",
                    at + bx.offset("nb_bitmaps"))
        if bm.bitmap_directory_size > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            _refuse(problems, "bitmaps extension",
                    f"bitmap directory too large ({bm.bitmap_directory_size} bytes)",
                    at + bx.offset("bitmap_directory_size"))
        if bm.bitmap_directory_offset % h.cluster_size:
            _refuse(problems, "bitmaps extension", "bitmap directory offset is not cluster aligned",
                    at + bx.offset("bitmap_directory_offset"))
        h.bitmaps_ext = bm
    elif ext.magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        refused = h.crypt_method != C.QCOW_CRYPT_LUKS
        if refused:
            _refuse(problems, "encryption header", "crypto header extension only expected with LUKS encryption", off)
        cx = QCOW2_CRYPTO_HEADER_EXT
        if ext.length != cx.size:
            _refuse(problems, "encryption header",
                    f"crypto header extension has length {ext.length}, expected {cx.size}", off)
            return
        ch = CryptoHeaderExtension(*cx.struct().unpack(data))
        if ch.offset % h.cluster_size:
            refused = True
            _refuse(problems, "encryption header", "crypto header offset is not cluster aligned",
                    ext.data_offset + cx.offset("offset"))
        h.crypto_ext = ch
        # qcow2_read_extensions opens the LUKS header right here (qcrypto_block_open), without a
        # key for info: a header QEMU cannot parse refuses the image for every command.
        why = None if refused else luks_open_refusal(f, ch.offset, ch.length)
        if why is not None:
            _refuse(problems, "LUKS header", why, ch.offset)
    elif ext.magic == C.QCOW2_EXT_MAGIC_DATA_FILE:
        h.data_file = data.decode("utf-8", "replace")


def _read_backing_name(h: Header, f: HostFile, problems: list[Problem]) -> None:
    if h.crypt_method == C.QCOW_CRYPT_LUKS and h.crypto_ext is None:
        _refuse(problems, "encryption header", "LUKS encryption without the crypto header extension")
    if h.data_file_raw and not h.has_data_file:  # refused where QEMU opens the data file (not for info)
        problems.append(Problem(Severity.ERROR, "header", "data-file-raw requires a data file",
                                _at("autoclear_features")))
    if h.has_data_file and not h.data_file:
        # qemu-img info opens with BDRV_O_NO_IO and, since the CVE-2024-4467 fix (in Debian's 7.2),
        # does not open the data file at all: info works; map, check and reads need the file.
        problems.append(Problem(Severity.ERROR, "data file",
                                "'data-file' is required for this image, and the image names none: guest data "
                                "cannot be read (pass the data file to QEMU with data-file=...)",
                                _at("incompatible_features")))
    if not h.backing_file_offset:
        return
    n = h.backing_file_size
    if n > C.BACKING_FILE_NAME_MAX or n > h.cluster_size - min(h.backing_file_offset, h.cluster_size):
        _refuse(problems, "backing file name", f"backing file name too long ({n} bytes)", _at("backing_file_size"))
        return
    # QEMU keeps the name as a C string: it ends at the first NUL, and an empty name is no backing
    # file (bs->backing_file[0] == '\0')
    raw = f.pread(h.backing_file_offset, n).split(b"\0", 1)[0]
    if raw:
        h.backing_file = raw.decode("utf-8", "replace")
