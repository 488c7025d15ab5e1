"""The read-only `Image`: one qcow2 file, its tables, its data file and its backing chain.

Opening reads what QEMU's open reads — the header and extensions and the snapshot table (through
`ImageMeta`, which also resolves the backing chain), the active L1 table and the refcount table —
and nothing else. L2 tables and refcount blocks are read
on demand and kept in a bounded cache; bulk walks read them in batches without caching.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import numpy as np
import numpy.typing as npt

from qinspect.qcow2 import constants as C
from qinspect.qcow2.compressed import decompress_cluster
from qinspect.qcow2.errors import EncryptedDataError, Problem, Qcow2Error, Severity
from qinspect.qcow2.extents import ERROR_MESSAGES, ExtentError, Extents, iter_extents
from qinspect.qcow2.header import table_fits
from qinspect.qcow2.l2 import (
    ClusterType,
    CompressedDescriptor,
    L2Format,
    SubclusterType,
    classify_cluster,
    classify_subcluster,
    parse_compressed,
)
from qinspect.qcow2.meta import ImageMeta, Layer, MetaLayer, RawLayer, SharedMetadata, resolve_backing_path
from qinspect.qcow2.planner import Order, PieceStream, read_pieces
from qinspect.qcow2.refcount import decode_refcount_block

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
L2Stream = PieceStream
CACHE_BYTES = 32 * 1024 * 1024
TABLES = "l1-and-refcount-tables"
"""The key of the open tables in a `SharedMetadata`."""
NONZERO_TAKE_BYTES = 1024 * 1024
"""Bytes of tables filtered per pass by `read_l2_nonzero` (its temporaries stay this small)."""


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


class Image(ImageMeta):
    """A qcow2 image opened read-only, with its tables. Use `open_image`; close it (or use it as a
    context manager). Its backing layers are `Image`s too."""

    def _open_tables(self) -> None:
        if self.reuses_metadata:  # the same file, unchanged: the same tables (read by the first image)
            self.l1_table, self.refcount_table = super().shared_metadata().once(TABLES, self._read_shared_tables)
        else:
            self.l1_table, self.refcount_table = self._read_open_tables()
        self._l2_cache: OrderedDict[int, tuple[U64, U64 | None]] = OrderedDict()
        self._rb_cache: OrderedDict[int, U64] = OrderedDict()
        self._last_compressed: tuple[int, bytes] | None = None

    def _read_open_tables(self) -> tuple[U64, U64]:
        h = self.header
        l1 = self.read_table(h.l1_table_offset, h.l1_size, C.QCOW_MAX_L1_SIZE // C.L1E_SIZE)
        reftable = self.read_table(h.refcount_table_offset, h.refcount_table_entries,
                                   C.QCOW_MAX_REFTABLE_SIZE // C.REFTABLE_ENTRY_SIZE)
        return l1, reftable

    def _read_shared_tables(self) -> tuple[U64, U64]:
        l1, reftable = self._read_open_tables()
        l1.flags.writeable = reftable.flags.writeable = False
        return l1, reftable

    def shared_metadata(self) -> SharedMetadata:
        """`ImageMeta.shared_metadata`, with this image's L1 and refcount tables: the images opened
        with it use the same arrays (made read-only here; no reader writes to them)."""
        m = super().shared_metadata()
        self.l1_table.flags.writeable = self.refcount_table.flags.writeable = False
        m.once(TABLES, lambda: (self.l1_table, self.refcount_table))
        return m

    # -- the backing chain, as layers whose data can be read --------------------------------------------
    def backing(self) -> Layer | None:
        """The layer below this one (an `Image` or a `RawLayer`), opened on first use."""
        return cast("Layer | None", super().backing())

    def open_chain(self) -> tuple[list[Layer], Qcow2Error | None]:
        layers, error = super().open_chain()
        return cast("list[Layer]", list(layers)), error

    def chain(self) -> list[Layer]:
        return cast("list[Layer]", list(super().chain()))

    # -- tables ---------------------------------------------------------------------------------------
    def read_table(self, offset: int, entries: int, max_entries: int = C.QCOW_MAX_L1_SIZE // C.L1E_SIZE) -> U64:
        """A table of `entries` u64 entries at `offset` (L1, refcount table): empty when it exceeds
        `max_entries` or QEMU's table rule refuses its offset (not cluster aligned, or ending past
        INT64_MAX); bytes past the end of the file read as 0."""
        if entries > max_entries or not table_fits(offset, entries, 8, self.header.cluster_size):
            return np.zeros(0, dtype=np.uint64)
        # As in block/io.c, bytes past the end of the file read as zeros: an entry cut off by the
        # end keeps the bytes that are there (its first 4 bytes, say) with zeros after them.
        in_bytes = max(0, min(entries * 8, self.file.size - offset))
        table = np.zeros(entries, dtype=np.uint64)
        if in_bytes:
            words = -(-in_bytes // 8)
            table[:words] = np.frombuffer(self.file.pread(offset, words * 8), dtype=">u8")  # zero-padded
        return table

    def read_entries(self, offset: int, count: int) -> U64:
        """Up to `count` u64 entries at `offset`, as far as the file reaches: entries past its end
        read as 0 and are left out (no buffer in proportion to a size the file merely claims)."""
        count = max(0, min(count, (self.file.size - offset) // 8))
        return np.frombuffer(self.file.pread(offset, count * 8), dtype=">u8").astype(np.uint64)

    def snapshot_l1_table(self, index: int, *, pad: bool = False) -> U64:
        """The L1 table of snapshot `index`; empty when QEMU would refuse it (unaligned or larger
        than the format allows). Entries past the end of the file are left out, or with `pad` read
        as 0 (`l1_size` entries, as QEMU reads them: for a view of one table, not for walks over
        every snapshot, whose claimed sizes the file need not back)."""
        sn = self.snapshots[index]
        if pad:
            return self.read_table(sn.l1_table_offset, sn.l1_size)
        if sn.l1_table_offset % self.cluster_size or sn.l1_size > C.QCOW_MAX_L1_SIZE // C.L1E_SIZE:
            return np.zeros(0, dtype=np.uint64)
        return self.read_entries(sn.l1_table_offset, sn.l1_size)

    def read_l2_tables(self, offsets: npt.NDArray[np.int64]) -> U64:
        """The clusters at `offsets` (L2 tables, exact offsets, aligned or not) as native u64 words,
        one cluster per offset in the order given. Read through the planner (host order, coalesced,
        several reads in flight). Past the end of the file reads as zeros."""
        got = read_pieces(self.file, np.asarray(offsets, dtype=np.int64), self.cluster_size)  # the planner
        words = (got if got.flags.writeable else got.copy()).view(np.uint64)
        if sys.byteorder == "little":
            words.byteswap(inplace=True)
        return words

    @cached_property
    def l2_format(self) -> L2Format:
        return L2Format(self.header.cluster_bits, self.header.extended_l2, self.header.has_data_file)

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

    def read_l2_batch(self, i0: int, i1: int, stream: L2Stream | None = None
                      ) -> tuple[U64, U64 | None, npt.NDArray[np.bool_]]:
        """Entries of the L2 tables of L1 indices [i0, i1), concatenated; missing tables read as 0.

        Tables are read through the planner (host order, coalesced); with `stream` (from
        `l2_stream` over a range that contains [i0, i1)) they come from its read-ahead. Returns
        (entries, bitmaps, unaligned) where `unaligned[k]` marks an L1 entry whose table offset is
        not cluster aligned (not read).
        """
        cs = self.cluster_size
        n = i1 - i0
        offs, readable, unaligned = self._l2_offsets(i0, i1)
        ks = np.flatnonzero(readable)
        got = read_pieces(self.file, offs[ks], cs) if stream is None else stream.take(len(ks))
        if len(ks) == n:
            buf = got if got.flags.writeable else got.copy()
        else:
            buf = np.zeros(n * cs, dtype=np.uint8)
            buf.reshape(n, cs)[ks] = got.reshape(len(ks), cs)
        words = buf.view(np.uint64)
        if sys.byteorder == "little":
            words.byteswap(inplace=True)  # big-endian on disk: swap in place, no copy
        if self.header.extended_l2:
            return words[0::2], words[1::2], unaligned
        return words, None, unaligned

    def read_l2_nonzero(self, l1_indices: npt.NDArray[np.int64], max_entries: int
                        ) -> tuple[npt.NDArray[np.int64], U64] | None:
        """The non-zero entries of the L2 tables of the given L1 entries (ascending; each with an
        aligned table offset), as (guest cluster index, entry), in guest order.

        The tables are read in host order, one sweep of the file through the planner, whatever
        order the L1 table names them in, and only their non-zero entries are kept: a sparsely
        used image scattered over its file (4 KiB clusters, random writes: thousands of tables of
        a few entries each) is read as fast as the file and decoded in one pass. Standard L2 only.
        None when more than `max_entries` entries are non-zero (memory is bounded; read such
        tables with `read_l2_batch`).
        """
        n = self.header.l2_size
        shift = n.bit_length() - 1  # l2_size is a power of two
        idx1 = np.asarray(l1_indices, dtype=np.int64)
        offs = (self.l1_table[idx1] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        counts = np.zeros(len(idx1), np.int64)  # non-zero entries per table, in L1 order
        parts: list[tuple[I64, npt.NDArray[np.uint16], npt.NDArray[np.uint64]]] = []
        total = 0
        with PieceStream(self.file, offs, self.cluster_size, Order.HOST) as stream:
            for pieces, buf in stream.batches(max(1, NONZERO_TAKE_BYTES // self.cluster_size)):
                words = buf.view(np.uint64)  # still big-endian: zero or not is the same
                nz = np.flatnonzero(words != 0)  # (6x faster than on the words themselves)
                total += len(nz)
                if total > max_entries:
                    return None
                tab = nz >> shift
                counts[pieces] = np.bincount(tab, minlength=len(pieces))
                parts.append((pieces[tab], (nz & (n - 1)).astype(np.uint16), words[nz]))
        # Entries in guest order without a sort: each table's entries are in order already, and
        # each table's first entry goes where the tables before it (in L1 order) end.
        first = np.cumsum(counts) - counts
        cluster = np.empty(total, np.int64)
        entries = np.empty(total, np.uint64)
        for piece, pos, vals in parts:
            k = np.arange(len(piece), dtype=np.int64)
            head = np.flatnonzero(np.concatenate(([True], piece[1:] != piece[:-1]))) if len(piece) else k
            rank = k - np.repeat(head, np.diff(np.append(head, len(piece))))
            dest = first[piece] + rank
            cluster[dest] = (idx1[piece] << shift) + pos
            entries[dest] = vals
        if sys.byteorder == "little":
            entries.byteswap(inplace=True)
        return cluster, entries

    def _l2_offsets(self, i0: int, i1: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_],
                                                      npt.NDArray[np.bool_]]:
        offs = (self.l1_table[i0:i1] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        unaligned = (offs % self.cluster_size) != 0
        return offs, (offs != 0) & ~unaligned, unaligned

    def l2_stream(self, i0: int, i1: int) -> L2Stream:
        """Read-ahead of the L2 tables of L1 indices [i0, i1) in L1 order, for `read_l2_batch`."""
        offs, readable, _ = self._l2_offsets(i0, i1)
        return PieceStream(self.file, offs[readable], self.cluster_size, Order.GIVEN)

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
        rc = StoredRefcounts(self, nb_clusters, np.dtype(np.uint64))
        rc.read_all()
        return cast("U64", rc.values), rc.bad

    def stored_refcounts_compact(self, nb_clusters: int) -> tuple[npt.NDArray[np.unsignedinteger], list[int]]:
        """`stored_refcounts` in the narrowest dtype that holds the image's refcount width
        (uint16 for the default 16-bit refcounts: a quarter of the memory for big files)."""
        rc = self.stored_refcounts_lazy(nb_clusters)
        rc.read_all()
        return rc.values, rc.bad

    def stored_refcounts_lazy(self, nb_clusters: int) -> StoredRefcounts:
        """`stored_refcounts_compact` with nothing read yet: blocks are read as `need` asks for
        them (or all at once by `read_all`)."""
        bits = self.header.refcount_bits
        dt = np.uint8 if bits <= 8 else np.uint16 if bits == 16 else np.uint32 if bits == 32 else np.uint64
        return StoredRefcounts(self, nb_clusters, np.dtype(dt))

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
        size = self.file.size
        if d.coffset >= size:  # (it would read as zeros, which no compressed cluster is)
            raise Qcow2Error(f"compressed cluster at host offset {d.coffset:#x} lies past the end of the file "
                             f"({size} bytes)", d.coffset, path=self.path)
        raw = self.file.pread(d.coffset, d.csize)
        try:
            data = decompress_cluster(raw, self.header.compression_type, self.cluster_size, d.coffset)
        except Qcow2Error as e:
            if d.coffset + d.csize <= size:
                raise
            raise Qcow2Error(f"compressed cluster at host offset {d.coffset:#x} ({d.csize} bytes) runs past the end "
                             f"of the file ({size} bytes): {e.message}", d.coffset, path=self.path) from None
        self._last_compressed = (entry, data)
        return data


class StoredRefcounts:
    """The stored refcounts of host clusters [0, nb), read a refcount block at a time as needed.

    `values` holds them (0 where a block is not read yet, unallocated or unreadable); `bad` lists
    the reftable indices whose block cannot be read (unaligned: qcow2_get_refcount's EIO, or past
    the block layer's limit). `need(lo, hi)` reads the blocks covering clusters [lo, hi) not read
    yet, `read_all()` the rest, each through the planner in host order.

    Why not everything at once: check compares COPIED flags with the refcounts during its L2 sweep.
    Reading every block first leaves them cached as islands ahead of the sweep, and the kernel's
    read-ahead stalls at each island (a cold sequential read of the 330 MB scattered image took
    0.10 s alone, 0.20-0.31 s after 41 of its 4 KiB refcount blocks were read). Asked for as the
    sweep goes, a block usually lies behind it (QEMU allocates a refcount block when it first
    allocates a cluster it covers, so it sits before them), already read through; a consumer can
    ask which blocks still lie ahead (`unread_after`) and judge those entries after the sweep.
    """

    def __init__(self, img: Image, nb_clusters: int, dtype: np.dtype[np.unsignedinteger]) -> None:
        self._img = img
        h = img.header
        self._per = h.refcount_block_entries
        cs = img.cluster_size
        self.values: npt.NDArray[np.unsignedinteger] = np.zeros(nb_clusters, dtype=dtype)
        nblocks = min(-(-nb_clusters // self._per), len(img.refcount_table))
        offs_u = img.refcount_table[:nblocks] & np.uint64(C.REFT_OFFSET_MASK)
        # unaligned (qcow2_get_refcount: EIO) or unreadable (ending past BDRV_MAX_LENGTH: EIO)
        self.bad = [int(i) for i in np.flatnonzero(((offs_u % np.uint64(cs)) != 0)
                                                   | (offs_u > np.uint64(C.BDRV_MAX_LENGTH - cs)))]
        # A block at or past the end of the file reads as zeros: skip it (and its offset may not fit int64).
        self._offs = np.where(offs_u < np.uint64(img.file.size), offs_u, np.uint64(0)).astype(np.int64)
        self._todo = (self._offs != 0) & ((self._offs % cs) == 0)  # blocks still to read

    def need(self, lo: int, hi: int) -> None:
        """Read the blocks covering clusters [lo, hi) that are not read yet."""
        b0, b1 = max(0, lo // self._per), min(len(self._todo), -(-hi // self._per))
        if b0 < b1:
            sel = b0 + np.flatnonzero(self._todo[b0:b1])
            if len(sel):
                self._read(sel)

    def need_clusters(self, clusters: npt.NDArray[np.int64]) -> None:
        """Read the blocks of `clusters` not read yet (only those: not the ones in between)."""
        bi = clusters // self._per
        mark = np.zeros(len(self._todo), dtype=bool)
        mark[bi[bi < len(self._todo)]] = True
        sel = np.flatnonzero(mark & self._todo)
        if len(sel):
            self._read(sel)

    def unread_after(self, clusters: npt.NDArray[np.int64], offset: int) -> npt.NDArray[np.bool_]:
        """Which of `clusters` (< len(values)) have their refcount block not read yet and stored
        after host `offset` (ahead of a sweep that has read the file up to there)."""
        bi = clusters // self._per
        inb = bi < len(self._todo)
        out = np.zeros(len(clusters), dtype=bool)
        b = bi[inb]
        out[inb] = self._todo[b] & (self._offs[b] >= offset)
        return out

    def read_all(self) -> None:
        """Read every block not read yet."""
        sel = np.flatnonzero(self._todo)
        if len(sel):
            self._read(sel)

    def _read(self, blocks: npt.NDArray[np.intp]) -> None:
        img = self._img
        self._todo[blocks] = False
        per, cs = self._per, img.cluster_size
        bits = img.header.refcount_bits
        out = self.values
        nb_clusters = len(out)
        group = max(1, (8 << 20) // cs)
        with PieceStream(img.file, self._offs[blocks], cs, Order.HOST) as stream:
            for which, raw in stream.batches(group):
                idx = blocks[which]
                vals = (raw.view(f">u{bits // 8}") if bits >= 8  # cast on assignment below
                        else decode_refcount_block(raw, img.header.refcount_order))
                for j, bi in enumerate(idx.tolist()):
                    lo = bi * per
                    hi = min(lo + per, nb_clusters)
                    out[lo:hi] = vals[j * per : j * per + (hi - lo)]


def open_image(path: str | os.PathLike[str], *, metadata: SharedMetadata | None = None) -> Image:
    """Open a qcow2 image read-only. Raises `Qcow2Error` when it is not a usable qcow2 file. With
    `metadata` (from `shared_metadata()` of an image of the same file), reuse that parse and those
    tables if `path` is still that file, unchanged (see `SharedMetadata`); else parse it afresh."""
    return Image(os.fspath(path), metadata=metadata)


__all__ = ["Image", "ImageMeta", "L2Lookup", "Layer", "MetaLayer", "Problem", "RawLayer", "Severity",
           "SharedMetadata", "StoredRefcounts", "open_image", "resolve_backing_path"]
