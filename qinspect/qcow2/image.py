"""The read-only `Image`: one qcow2 file, its tables, its data file and its backing chain.

Opening reads what `qemu-img info` reads — the header and extensions, the active L1 table, the
refcount table and the snapshot table — and nothing else. L2 tables and refcount blocks are read
on demand and kept in a bounded cache; bulk walks read them in batches without caching.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import Bitmap, read_bitmap_directory
from qinspect.qcow2.compressed import decompress_cluster
from qinspect.qcow2.errors import EncryptedDataError, Problem, Qcow2Error, Severity
from qinspect.qcow2.extents import ERROR_MESSAGES, ExtentError, Extents, iter_extents
from qinspect.qcow2.header import Header, read_header, table_fits
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.l2 import (
    ClusterType,
    CompressedDescriptor,
    L2Format,
    SubclusterType,
    classify_cluster,
    classify_subcluster,
    parse_compressed,
)
from qinspect.qcow2.luks import LuksHeader, read_luks_header
from qinspect.qcow2.refcount import decode_refcount_block
from qinspect.qcow2.snapshots import Snapshot, SnapshotTable, read_snapshot_table

U64 = npt.NDArray[np.uint64]
CACHE_BYTES = 32 * 1024 * 1024


class Layer(Protocol):
    """A member of a backing chain: a qcow2 `Image` or a `RawLayer`."""

    path: str
    format: str

    @property
    def virtual_size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawLayer:
    """A raw backing file: guest offset = file offset; past the end reads as zeros."""

    format = "raw"

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = HostFile(path)

    @property
    def virtual_size(self) -> int:
        return self.file.size

    def read(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class L2Lookup:
    """Everything about the L1 and L2 entry that maps one guest offset (for inspectors)."""

    guest_offset: int
    l1_index: int
    l1_entry: int
    l1_entry_offset: int
    l2_offset: int
    l2_index: int
    l2_entry_offset: int | None
    l2_entry: int
    l2_bitmap: int | None
    cluster_type: ClusterType
    subcluster_types: list[SubclusterType]
    subcluster_index: int
    host_offset: int | None
    compressed: CompressedDescriptor | None


def resolve_backing_path(image_path: str, name: str) -> str:
    """The backing file's path as QEMU resolves it: relative names are relative to the image's dir."""
    if os.path.isabs(name) or (":" in name.split("/", 1)[0] and not os.path.exists(name)):
        return name
    return os.path.join(os.path.dirname(image_path), name)


class Image:
    """A qcow2 image opened read-only. Use `open_image`; close it (or use it as a context manager)."""

    format = "qcow2"

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.file = HostFile(path)
        try:
            self.header: Header = read_header(self.file, self.problems)
            self.l1_table = self._read_table(self.header.l1_table_offset, self.header.l1_size,
                                             C.QCOW_MAX_L1_SIZE // 8, "L1 table")
            rt_entries = self.header.refcount_table_entries
            self.refcount_table = self._read_table(self.header.refcount_table_offset, rt_entries,
                                                   C.QCOW_MAX_REFTABLE_SIZE // 8, "refcount table")
            self.snapshot_table = self._read_snapshots()
        except Qcow2Error as e:
            self.file.close()
            if e.path is None:
                e.path = path
            raise
        self._l2_cache: OrderedDict[int, tuple[U64, U64 | None]] = OrderedDict()
        self._rb_cache: OrderedDict[int, U64] = OrderedDict()
        self._backing: Layer | None = None
        self._backing_opened = False
        self._data_file: HostFile | None = None
        self._last_compressed: tuple[int, bytes] | None = None
        self._check_host_files()

    # -- opening helpers ----------------------------------------------------------------------------
    def _check_host_files(self) -> None:
        """Problems around the image file: a running QEMU's locks, a missing data or backing file."""
        lock = self.file.lock_state()
        if lock == "writer":
            self.problems.append(Problem(Severity.WARNING, "image file",
                                         "in use: another process (a running QEMU) holds the image's write lock; "
                                         "contents may be changing"))
        elif lock == "reader":
            self.problems.append(Problem(Severity.WARNING, "image file",
                                         "in use: another process (a running QEMU) has the image open read-only"))
        if self.header.has_data_file and self.data_file_path is not None:
            try:
                self.data_file()
            except Qcow2Error as e:  # qemu-img info still works; map, check and reads do not
                self.problems.append(Problem(Severity.ERROR, "data file", e.message))
        bp = self.backing_path
        if bp is not None and "\0" not in bp and not os.path.lexists(bp):
            self.problems.append(Problem(Severity.WARNING, "backing file",
                                         f"backing file {bp} does not exist: guest data that is not in this "
                                         "image cannot be read", self.header.backing_file_offset))

    def _read_table(self, offset: int, entries: int, max_entries: int, name: str) -> U64:
        """Read a u64 table, bounded by the format limit and by the file. As in block/io.c, bytes
        past the end of the file read as zeros: an entry cut off by the end keeps the bytes that
        are there (its first 4 bytes, say) with zeros after them."""
        if entries > max_entries or not table_fits(offset, entries, 8, self.header.cluster_size):
            return np.zeros(0, dtype=np.uint64)
        in_bytes = max(0, min(entries * 8, self.file.size - offset))
        table = np.zeros(entries, dtype=np.uint64)
        if in_bytes:
            words = -(-in_bytes // 8)
            table[:words] = np.frombuffer(self.file.pread(offset, words * 8), dtype=">u8")  # zero-padded
        return table

    def _read_snapshots(self) -> SnapshotTable:
        h = self.header
        if not h.nb_snapshots or h.nb_snapshots > C.QCOW_MAX_SNAPSHOTS or not table_fits(
                h.snapshots_offset, h.nb_snapshots, C.SNAPSHOT_HEADER_SIZE, h.cluster_size):
            return SnapshotTable([], 0)
        return read_snapshot_table(self.file, h.snapshots_offset, h.nb_snapshots, h.version, h.size, self.problems)

    # -- simple properties ---------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.snapshot_table.snapshots

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != C.QCOW_CRYPT_NONE

    @cached_property
    def l2_format(self) -> L2Format:
        return L2Format(self.header.cluster_bits, self.header.extended_l2, self.header.has_data_file)

    @property
    def open_refusals(self) -> list[Problem]:
        """Problems for which QEMU refuses to open the image at all."""
        return [p for p in self.problems if p.qemu_refuses_open]

    def require_openable(self, check: bool = False) -> None:
        """Raise the first problem QEMU would refuse the open for (what qemu-img commands do).

        With `check`, open as `qemu-img check` does (BDRV_O_CHECK): an image without a refcount
        table, or with a bad snapshot table pointer, is accepted (the check reports them).
        """
        refusals = [p for p in self.open_refusals if not (check and p.check_opens)]
        if refusals:
            p = refusals[0]
            raise Qcow2Error(f"{p.structure}: {p.message}", p.offset, path=self.path)

    @cached_property
    def bitmaps(self) -> list[Bitmap]:
        """Bitmap directory entries (empty when the autoclear bit says they are inconsistent)."""
        ext = self.header.bitmaps_ext
        if ext is None:
            return []
        return read_bitmap_directory(self.file, ext.bitmap_directory_offset, ext.bitmap_directory_size,
                                     ext.nb_bitmaps, self.cluster_size, self.problems)

    @property
    def active_bitmaps(self) -> list[Bitmap]:
        """The bitmaps QEMU loads: none when autoclear bit 0 is clear."""
        return self.bitmaps if self.header.bitmaps_consistent else []

    @cached_property
    def luks(self) -> LuksHeader | None:
        ch = self.header.crypto_ext
        if ch is None:
            return None
        return read_luks_header(self.file, ch.offset, ch.length, self.problems)

    # -- data file and backing chain -----------------------------------------------------------------
    @property
    def data_file_path(self) -> str | None:
        name = self.header.data_file
        if not self.header.has_data_file or not name:
            return None
        # Relative to the image's directory, like backing files; QEMU 7.2 takes it relative to the
        # current directory instead, so fall back to that when only it exists.
        path = resolve_backing_path(self.path, name)
        if not os.path.exists(path) and os.path.exists(name):
            return name
        return path

    def data_file(self) -> HostFile:
        """The file guest data lives in: the external data file, or the image itself."""
        if not self.header.has_data_file:
            return self.file
        if self._data_file is None:
            path = self.data_file_path
            if path is None:
                raise Qcow2Error("'data-file' is required for this image (no data file name stored)",
                                 72, path=self.path)
            try:
                self._data_file = HostFile(path)
            except Qcow2Error as e:
                raise Qcow2Error(f"cannot open external data file {path}: {e.message}", path=self.path) from None
        return self._data_file

    @property
    def backing_path(self) -> str | None:
        if self.header.backing_file is None:
            return None
        return resolve_backing_path(self.path, self.header.backing_file)

    def backing(self) -> Layer | None:
        """The layer below this one, opened on first use; raises `Qcow2Error` when it cannot be."""
        if not self._backing_opened:
            self._backing = self._open_backing()
            self._backing_opened = True
        return self._backing

    def _open_backing(self) -> Layer | None:
        path = self.backing_path
        if path is None:
            return None
        if "\0" in path:
            raise Qcow2Error("backing file name contains a NUL byte", self.header.backing_file_offset,
                             path=self.path)
        chain = self._chain_paths()
        fmt = self.header.backing_format
        if fmt is None:
            fmt = _probe_format(path, self.path)
        if os.path.realpath(path) in chain:
            raise Qcow2Error(f"backing chain loops: {path} is already in the chain", self.header.backing_file_offset,
                             path=self.path)
        if len(chain) >= C.BACKING_CHAIN_MAX_DEPTH:
            raise Qcow2Error(f"backing chain deeper than {C.BACKING_CHAIN_MAX_DEPTH} images", path=self.path)
        try:
            if fmt == "raw":
                return RawLayer(path)
            if fmt == "qcow2":
                child = Image(path)
                child._parent_chain = tuple(chain)
                return child
        except Qcow2Error as e:
            raise Qcow2Error(f"cannot open backing file {path}: {e.message}", e.offset,
                             path=self.path) from None
        raise Qcow2Error(f"backing file {path} has format '{fmt}', which qinspect cannot read", path=self.path)

    _parent_chain: tuple[str, ...] = ()

    def _chain_paths(self) -> list[str]:
        return [*self._parent_chain, os.path.realpath(self.path)]

    def open_chain(self) -> tuple[list[Layer], Qcow2Error | None]:
        """The layers that can be opened, top first, and why the chain stops early (None if it does not).

        For viewers that show what they can of a broken chain; `chain()` raises instead.
        """
        layers: list[Layer] = [self]
        cur: Layer = self
        while isinstance(cur, Image):
            try:
                nxt = cur.backing()
            except Qcow2Error as e:
                if cur is self:
                    return layers, e
                # Report it against the image the user named, saying which layer failed.
                return layers, Qcow2Error(f"in backing file {cur.path}: {e.message}", e.offset, path=self.path)
            if nxt is None:
                break
            layers.append(nxt)
            cur = nxt
        return layers, None

    def chain(self) -> list[Layer]:
        """This image and every layer below it, top first (opening them as needed)."""
        layers, error = self.open_chain()
        if error is not None:
            raise error
        return layers

    # -- tables ---------------------------------------------------------------------------------------
    def read_l2_table(self, l2_offset: int) -> tuple[U64, U64 | None]:
        """One L2 table as (entries, bitmaps) arrays, through a bounded LRU cache."""
        hit = self._l2_cache.get(l2_offset)
        if hit is not None:
            self._l2_cache.move_to_end(l2_offset)
            return hit
        raw = self.file.pread(l2_offset, self.cluster_size)
        words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        val: tuple[U64, U64 | None] = (words[0::2], words[1::2]) if self.header.extended_l2 else (words, None)
        self._l2_cache[l2_offset] = val
        while len(self._l2_cache) * self.cluster_size > CACHE_BYTES and len(self._l2_cache) > 2:
            self._l2_cache.popitem(last=False)
        return val

    def read_l2_batch(self, i0: int, i1: int) -> tuple[U64, U64 | None, npt.NDArray[np.bool_]]:
        """Entries of the L2 tables of L1 indices [i0, i1), concatenated; missing tables read as 0.

        Host-adjacent tables are read with one read. Returns (entries, bitmaps, unaligned) where
        `unaligned[k]` marks an L1 entry whose table offset is not cluster aligned (not read).
        """
        cs = self.cluster_size
        n = i1 - i0
        offs = (self.l1_table[i0:i1] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        unaligned = (offs % cs) != 0
        readable = (offs != 0) & ~unaligned
        buf = np.empty(n * cs, dtype=np.uint8)
        if not readable.all():
            buf.reshape(n, cs)[~readable] = 0
        mv = memoryview(buf.data)
        # Read in host order; tables adjacent both in the file and in the batch take one read.
        ks = np.flatnonzero(readable)
        ks = ks[np.argsort(offs[ks], kind="stable")]
        if len(ks):
            hk = offs[ks]
            split = np.flatnonzero((np.diff(hk) != cs) | (np.diff(ks) != 1)) + 1
            for g0, g1 in zip([0, *split.tolist()], [*split.tolist(), len(ks)], strict=True):
                k = int(ks[g0])
                self.file.read_into(int(hk[g0]), mv[k * cs : (k + g1 - g0) * cs])
        words = buf.view(np.uint64)
        if sys.byteorder == "little":
            words.byteswap(inplace=True)  # big-endian on disk: swap in place, no copy
        if self.header.extended_l2:
            return words[0::2], words[1::2], unaligned
        return words, None, unaligned

    def refcount_block(self, reftable_index: int) -> U64 | None:
        """Decoded refcount block `reftable_index` (None when not allocated); raises if unaligned."""
        if reftable_index >= len(self.refcount_table):
            return None
        off = int(self.refcount_table[reftable_index]) & C.REFT_OFFSET_MASK
        if off == 0:
            return None
        if off % self.cluster_size:
            raise Qcow2Error(f"refcount table entry {reftable_index}: refcount block offset {off:#x} is not "
                             "cluster aligned", self.header.refcount_table_offset + 8 * reftable_index,
                             path=self.path)
        hit = self._rb_cache.get(off)
        if hit is not None:
            self._rb_cache.move_to_end(off)
            return hit
        block = decode_refcount_block(self.file.pread(off, self.cluster_size), self.header.refcount_order)
        self._rb_cache[off] = block
        while len(self._rb_cache) * self.cluster_size > CACHE_BYTES and len(self._rb_cache) > 2:
            self._rb_cache.popitem(last=False)
        return block

    def refcount(self, cluster_index: int) -> int:
        """The stored refcount of host cluster `cluster_index` (qcow2_get_refcount)."""
        per = self.header.refcount_block_entries
        block = self.refcount_block(cluster_index // per)
        return 0 if block is None else int(block[cluster_index % per])

    def stored_refcounts(self, nb_clusters: int) -> tuple[U64, list[int]]:
        """Stored refcounts of host clusters [0, nb_clusters) and the reftable indices that failed.

        Refcount blocks are read in host order with adjacent blocks merged into one read; blocks
        whose offset is unaligned are reported (their clusters read as 0).
        """
        out = np.zeros(nb_clusters, dtype=np.uint64)
        return out, self._fill_refcounts(out)

    def stored_refcounts_compact(self, nb_clusters: int) -> tuple[npt.NDArray[np.unsignedinteger[Any]], list[int]]:
        """`stored_refcounts` in the narrowest dtype that holds the image's refcount width
        (uint16 for the default 16-bit refcounts: a quarter of the memory for big files)."""
        bits = self.header.refcount_bits
        dt = np.uint8 if bits <= 8 else np.uint16 if bits == 16 else np.uint32 if bits == 32 else np.uint64
        out: npt.NDArray[np.unsignedinteger[Any]] = np.zeros(nb_clusters, dtype=dt)
        return out, self._fill_refcounts(out)

    def _fill_refcounts(self, out: npt.NDArray[np.unsignedinteger[Any]]) -> list[int]:
        nb_clusters = len(out)
        per = self.header.refcount_block_entries
        cs = self.cluster_size
        bits = self.header.refcount_bits
        nblocks = min(-(-nb_clusters // per), len(self.refcount_table))
        offs_u = self.refcount_table[:nblocks] & np.uint64(C.REFT_OFFSET_MASK)
        bad = [int(i) for i in np.flatnonzero((offs_u % np.uint64(cs)) != 0)]
        # A block at or past the end of the file reads as zeros: skip it (and its offset may not fit int64).
        offs = np.where(offs_u < np.uint64(self.file.size), offs_u, np.uint64(0)).astype(np.int64)
        good = np.flatnonzero((offs != 0) & ((offs % cs) == 0))
        order = good[np.argsort(offs[good], kind="stable")]
        k = 0
        group = max(1, (8 << 20) // cs)
        while k < len(order):
            m = k + 1
            base = int(offs[order[k]])
            while m < len(order) and m - k < group and int(offs[order[m]]) == base + (m - k) * cs:
                m += 1
            raw = self.file.pread(base, (m - k) * cs)
            vals = (np.frombuffer(raw, dtype=f">u{bits // 8}") if bits >= 8  # cast on assignment below
                    else decode_refcount_block(raw, self.header.refcount_order))
            for j in range(k, m):
                idx = int(order[j])
                lo = idx * per
                hi = min(lo + per, nb_clusters)
                out[lo:hi] = vals[(j - k) * per : (j - k) * per + (hi - lo)]
            k = m
        return bad

    # -- guest view -----------------------------------------------------------------------------------
    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extents]:
        """Typed guest extents of this layer alone (see `qinspect.qcow2.extents`)."""
        return iter_extents(self, start, self.virtual_size if end is None else end)

    def lookup(self, guest_offset: int) -> L2Lookup:
        """Decode the L1 and L2 entries that map `guest_offset` (reads one L2 table)."""
        h = self.header
        if not 0 <= guest_offset < h.size:
            raise Qcow2Error(f"guest offset {guest_offset} is outside the virtual disk ({h.size} bytes)",
                             path=self.path)
        cs = h.cluster_size
        l1_index = guest_offset >> (h.cluster_bits + h.l2_bits)
        l2_index = (guest_offset >> h.cluster_bits) & (h.l2_size - 1)
        sc_index = (guest_offset & (cs - 1)) // h.subcluster_size
        l1_entry = int(self.l1_table[l1_index]) if l1_index < len(self.l1_table) else 0
        l2_offset = l1_entry & C.L1E_OFFSET_MASK
        entry, bitmap, entry_off = 0, (0 if h.extended_l2 else None), None
        if l2_offset and not l2_offset % cs:
            entries, bitmaps = self.read_l2_table(l2_offset)
            entry = int(entries[l2_index])
            bitmap = int(bitmaps[l2_index]) if bitmaps is not None else None
            entry_off = l2_offset + l2_index * h.l2_entry_size
        fmt = self.l2_format
        ctype = classify_cluster(entry, fmt)
        subs = [classify_subcluster(entry, bitmap or 0, i, fmt) for i in range(h.subclusters_per_cluster)]
        host = None
        comp = None
        if ctype == ClusterType.COMPRESSED:
            comp = parse_compressed(entry, fmt)
        elif subs[sc_index] in (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC):
            host = (entry & C.L2E_OFFSET_MASK) + (guest_offset & (cs - 1))
        return L2Lookup(guest_offset, l1_index, l1_entry, h.l1_table_offset + 8 * l1_index, l2_offset, l2_index,
                        entry_off, entry, bitmap, ctype, subs, sc_index, host, comp)

    def read(self, offset: int, length: int) -> bytes:
        """The guest's bytes at `offset`, exactly as QEMU returns them (backing chain included)."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise Qcow2Error(f"read of {length} bytes at {offset} is outside the virtual disk "
                             f"({self.virtual_size} bytes)", path=self.path)
        if self.header.has_data_file:
            self.data_file()  # QEMU cannot open the image at all without its data file
        out = bytearray(length)
        for ex in self.extents(offset, offset + length):
            for k in range(len(ex)):
                g, n, t = int(ex.guest[k]), int(ex.length[k]), SubclusterType(int(ex.sctype[k]))
                pos = g - offset
                if t == SubclusterType.NORMAL:
                    if self.encrypted:
                        raise EncryptedDataError("guest data is encrypted (LUKS/AES); qinspect reads no keys",
                                                 int(ex.host[k]), path=self.path)
                    out[pos : pos + n] = self.data_file().pread(int(ex.host[k]), n)
                elif t in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
                    back = self.backing()
                    if back is not None and g < back.virtual_size:
                        m = min(n, back.virtual_size - g)
                        out[pos : pos + m] = back.read(g, m)
                elif t == SubclusterType.COMPRESSED:
                    if self.encrypted:
                        raise EncryptedDataError("guest data is encrypted", path=self.path)
                    try:
                        data = self._decompress(int(ex.host[k]))
                    except Qcow2Error as e:  # say which guest offset, keep the host offset at fault
                        raise Qcow2Error(f"cannot read guest offset {g}: {e.message}", e.offset,
                                         path=self.path) from None
                    within = g & (self.cluster_size - 1)
                    out[pos : pos + n] = data[within : within + n]
                elif t == SubclusterType.INVALID:
                    err = ExtentError(int(ex.error[k]))
                    raise Qcow2Error(f"cannot read guest offset {g}: {ERROR_MESSAGES[err]}",
                                     int(ex.where[k]), path=self.path)
                # ZERO_PLAIN / ZERO_ALLOC: already zeros
        return bytes(out)

    def _decompress(self, entry: int) -> bytes:
        if self._last_compressed is not None and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        d = parse_compressed(entry, self.l2_format)
        raw = self.file.pread(d.coffset, d.csize)
        data = decompress_cluster(raw, self.header.compression_type, self.cluster_size, d.coffset)
        self._last_compressed = (entry, data)
        return data

    # -- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close this image, its data file and its backing chain."""
        self.file.close()
        if self._data_file is not None:
            self._data_file.close()
        if self._backing is not None:
            self._backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Image {self.path!r} v{self.header.version} {self.virtual_size} bytes>"


def _probe_format(path: str, parent: str) -> str:
    """QEMU's format probe for a backing file without a stored format: qcow2 magic, else raw."""
    try:
        with HostFile(path) as f:  # O_RDONLY|O_NONBLOCK, regular files and block devices only
            magic = f.pread(0, 4)
    except Qcow2Error as e:
        raise Qcow2Error(f"cannot open backing file {path}: {e.message}", path=parent) from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def open_image(path: str | os.PathLike[str]) -> Image:
    """Open a qcow2 image read-only. Raises `Qcow2Error` when it is not a usable qcow2 file."""
    return Image(os.fspath(path))


__all__ = ["Image", "L2Lookup", "Layer", "Problem", "RawLayer", "Severity", "open_image"]
