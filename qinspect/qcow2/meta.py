"""An image opened for its metadata: what `qemu-img info` reads, and the backing chain.

`ImageMeta` parses the header and its extensions, the snapshot table, the bitmap directory and
the LUKS header, and resolves the backing chain (the one place that does: relative names like
QEMU, format probing, loop and depth bounds). It imports no numpy, so `qinspect info` and every
error path start fast. `qinspect.qcow2.image.Image` extends it with the tables and guest reads.
"""

from __future__ import annotations

import os
from _thread import allocate_lock  # (threading's Lock, without importing threading at start-up)
from collections.abc import Callable, Sequence
from functools import cached_property
from types import TracebackType

from qinspect.qcow2 import constants as C
from qinspect.qcow2.bitmaps import Bitmap, check_bitmap_tables, read_bitmap_directory
from qinspect.qcow2.errors import Problem, Qcow2Error, Severity
from qinspect.qcow2.fields import QCOW_HEADER, QCOW_SNAPSHOT_HEADER
from qinspect.qcow2.header import Header, read_header, table_fits
from qinspect.qcow2.hostfile import FileIdentity, HostFile, InUse
from qinspect.qcow2.luks import LuksHeader, read_luks_header
from qinspect.qcow2.snapshots import Snapshot, SnapshotTable, read_snapshot_table

# `info` imports this module at start-up, and `typing` is ~3 ms of that: it is imported for mypy
# only (mypy takes a module's own TYPE_CHECKING as typing's). The protocols below are then plain
# classes at run time: nothing instantiates them or tests isinstance against them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol, Self, TypeVar

    T = TypeVar("T")
else:
    Protocol = object


class MetaLayer(Protocol):
    """A member of a backing chain as metadata: an `ImageMeta` (or `Image`) or a `RawLayer`."""

    path: str
    format: str

    @property
    def virtual_size(self) -> int: ...

    def close(self) -> None: ...


class Layer(MetaLayer, Protocol):  # (at run time: class Layer(MetaLayer, object))
    """A member of a backing chain whose guest data can be read: an `Image` or a `RawLayer`."""

    def read(self, offset: int, length: int) -> bytes: ...


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


class SharedMetadata:
    """One parse of an image's immutable metadata, for every image opened on one state of one file.

    What QEMU's open parses (the header and its extensions, the snapshot table, the bitmap
    directory, the LUKS header) and the problems found doing so, plus, once an image of this state
    has opened it, its backing layer's own `SharedMetadata` (`backing`), and what a subclass keeps
    with `once` (`Image`: its L1 and refcount tables, as read-only arrays). A hostile image's
    65,536 snapshots or 65,535 bitmaps are then parsed and held once, not once per open image (the
    TUI opens one for the main thread and one per worker thread).

    An image opened with it (`ImageMeta(path, metadata=m)`, `open_image(path, metadata=m)`,
    `reopen()`) has a file descriptor of its own and reuses it only when the file it opened has
    `identity` (device, inode, size, mtime, from fstat of the new descriptor): a file replaced or
    changed since is parsed afresh, so that metadata of one file never describes another.
    """

    def __init__(self, identity: FileIdentity, header: Header, snapshot_table: SnapshotTable,
                 bitmaps: list[Bitmap], luks: LuksHeader | None, problems: tuple[Problem, ...],
                 host_at: int) -> None:
        self.identity = identity
        self.header = header
        self.snapshot_table = snapshot_table
        self.bitmaps = bitmaps
        self.luks = luks
        self.problems = problems
        """The problems of the parse; those about the host files (locks, a missing data or backing
        file) are not among them: each open looks again, and puts its own at `host_at`."""
        self.host_at = host_at
        self.backing: SharedMetadata | None = None
        self._lock = allocate_lock()
        self._memo: dict[str, object] = {}

    def once(self, key: str, make: Callable[[], T]) -> T:
        """The value kept under `key`, made by `make()` the first time it is asked for (thread-safe)."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = make()
            return self._memo[key]  # type: ignore[return-value]

    def matches(self, identity: FileIdentity) -> bool:
        """Whether a file seen as `identity` is the file, in the state, this metadata was parsed from."""
        return identity.change_since(self.identity) is None


def resolve_backing_path(image_path: str, name: str) -> str:
    """The backing file's path as QEMU resolves it: relative names are relative to the image's dir."""
    if os.path.isabs(name) or (":" in name.split("/", 1)[0] and not os.path.exists(name)):
        return name
    return os.path.join(os.path.dirname(image_path), name)


class ImageMeta:
    """A qcow2 image's metadata, opened read-only. Use `open_meta` (or `open_image` for the tables)."""

    format = "qcow2"

    def __init__(self, path: str, *, parents: tuple[str, ...] = (), metadata: SharedMetadata | None = None) -> None:
        """Open `path`; `parents` are the real paths of the layers above it (for the loop check).
        With `metadata` (another image's `shared_metadata()`), reuse its parse when `path` is still
        that file, unchanged; otherwise (replaced, resized, modified) parse the file afresh."""
        self.path = path
        self.parents = parents
        self.problems: list[Problem] = []
        self.file = HostFile(path)
        self._backing: MetaLayer | None = None
        self._backing_opened = False
        self._data_file: HostFile | None = None
        try:
            self.identity = FileIdentity.of_fd(self.file.fd)
            if metadata is not None and not metadata.matches(self.identity):
                metadata = None
            self._metadata = metadata
            self._reused = metadata is not None
            if metadata is not None:
                self.header: Header = metadata.header
                self.snapshot_table = metadata.snapshot_table
                self.__dict__["bitmaps"] = metadata.bitmaps
                self.__dict__["luks"] = metadata.luks
                self.problems = list(metadata.problems[: metadata.host_at])
            else:
                self.header = read_header(self.file, self.problems)
                self.snapshot_table = self._read_snapshots()
            self._open_tables()
        except Qcow2Error as e:
            self.file.close()
            if e.path is None:
                e.path = path
            raise
        except OSError:
            self.file.close()
            raise
        if metadata is None and self.header.bitmaps_ext is not None and self.header.bitmaps_consistent \
                and not self.open_refusals:
            # qcow2_load_dirty_bitmaps reads the directory and every bitmap table at open (and may refuse them)
            check_bitmap_tables(self.file, self.bitmaps, self.cluster_size, self.problems, self.header.size)
        self._host_at = len(self.problems)
        self._check_host_files()
        self._host_count = len(self.problems) - self._host_at
        if metadata is not None:
            self.problems.extend(metadata.problems[metadata.host_at :])

    @property
    def reuses_metadata(self) -> bool:
        """Whether this image reuses another's parse (see `SharedMetadata`) rather than its own."""
        return self._reused

    def shared_metadata(self) -> SharedMetadata:
        """This image's parsed metadata, to open more images of the same file without parsing it
        again (`reopen`, `open_image(path, metadata=...)`). Made on first call (the bitmap
        directory and LUKS header are parsed then if they were not yet); the same object after."""
        if self._metadata is None:
            bitmaps, luks = self.bitmaps, self.luks  # (parsed now if not yet: their problems come first)
            at, n = self._host_at, self._host_count
            problems = tuple(self.problems[:at] + self.problems[at + n :])
            self._metadata = SharedMetadata(self.identity, self.header, self.snapshot_table, bitmaps, luks,
                                            problems, at)
            if isinstance(self._backing, ImageMeta):  # opened already: its images share its parse too
                self._metadata.backing = self._backing.shared_metadata()
        return self._metadata

    def reopen(self) -> Self:
        """Another image of this file, with a file descriptor (and caches) of its own, sharing this
        one's parsed metadata while the file is unchanged (parsed afresh if it was replaced or
        changed since this one was opened). For another thread: images are not thread-safe."""
        return type(self)(self.path, parents=self.parents, metadata=self.shared_metadata())

    def _open_tables(self) -> None:
        """What a subclass reads at open beyond the metadata (nothing here)."""

    # -- opening helpers ----------------------------------------------------------------------------
    def _check_host_files(self) -> None:
        """Problems around the image file: a running QEMU's locks, a missing data or backing file."""
        lock = self.file.lock_state()
        if lock is InUse.WRITER:
            self.problems.append(Problem(Severity.WARNING, "image file",
                                         "in use: another process (a running QEMU) holds the image's write lock; "
                                         "contents may be changing"))
        elif lock is InUse.READER:
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

    def _read_snapshots(self) -> SnapshotTable:
        h = self.header
        if not h.nb_snapshots or h.nb_snapshots > C.QCOW_MAX_SNAPSHOTS or not table_fits(
                h.snapshots_offset, h.nb_snapshots, QCOW_SNAPSHOT_HEADER.size, h.cluster_size):
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
    def snapshots(self) -> Sequence[Snapshot]:
        return self.snapshot_table.snapshots

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != C.QCOW_CRYPT_NONE

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
                                     ext.nb_bitmaps, self.cluster_size, self.problems, self.header.size)

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
            if self.header.data_file_raw:  # QEMU's data-file opening refuses this (info does not open it)
                raise Qcow2Error("data-file-raw requires a data file", QCOW_HEADER.offset("autoclear_features"),
                                 path=self.path)
            return self.file
        if self._data_file is None:
            path = self.data_file_path
            if path is None:
                raise Qcow2Error("'data-file' is required for this image (no data file name stored)",
                                 QCOW_HEADER.offset("incompatible_features"), path=self.path)
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

    def backing(self) -> MetaLayer | None:
        """The layer below this one, opened on first use; raises `Qcow2Error` when it cannot be."""
        if not self._backing_opened:
            self._backing = self._open_backing()
            self._backing_opened = True
        return self._backing

    def _open_backing(self) -> MetaLayer | None:
        path = self.backing_path
        if path is None:
            return None
        if "\0" in path:
            raise Qcow2Error("backing file name contains a NUL byte", self.header.backing_file_offset,
                             path=self.path)
        chain = [*self.parents, os.path.realpath(self.path)]
        # QEMU keeps the extension's bytes as a C string: up to the first NUL.
        fmt = (self.header.backing_format or "").split("\0", 1)[0]
        if not fmt:  # none stored, or an empty backing format extension: QEMU probes
            fmt = probe_format(path, self.path)
        if fmt != "raw" and os.path.realpath(path) in chain:  # (as raw, the file is just bytes: no loop)
            raise Qcow2Error(f"backing chain loops: {path} is already in the chain", self.header.backing_file_offset,
                             path=self.path)
        if len(chain) >= C.BACKING_CHAIN_MAX_DEPTH:
            raise Qcow2Error(f"backing chain deeper than {C.BACKING_CHAIN_MAX_DEPTH} images", path=self.path)
        try:
            if fmt == "raw":
                return RawLayer(path)
            if fmt == "qcow2":
                # A layer of the same class as this one: metadata opens metadata, images images;
                # when this image shares its metadata, the backing layer shares its own too.
                shared = self._metadata
                layer = type(self)(path, parents=tuple(chain), metadata=shared.backing if shared else None)
                if shared is not None and shared.backing is None:
                    shared.backing = layer.shared_metadata()
                return layer
        except Qcow2Error as e:
            raise Qcow2Error(f"cannot open backing file {path}: {e.message}", e.offset,
                             path=self.path) from None
        raise Qcow2Error(f"backing file {path} has format '{fmt}', which qinspect cannot read", path=self.path)

    def open_chain(self) -> tuple[Sequence[MetaLayer], Qcow2Error | None]:
        """The layers that can be opened, top first, and why the chain stops early (None if it does not).

        For viewers that show what they can of a broken chain; `chain()` raises instead.
        """
        layers: list[MetaLayer] = [self]
        cur: MetaLayer = self
        while isinstance(cur, ImageMeta):
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

    def chain(self) -> Sequence[MetaLayer]:
        """This image and every layer below it, top first (opening them as needed)."""
        layers, error = self.open_chain()
        if error is not None:
            raise error
        return layers

    # -- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close this image, its data file and its backing chain."""
        self.file.close()
        if self._data_file is not None:
            self._data_file.close()
        if self._backing is not None:
            self._backing.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} v{self.header.version} {self.virtual_size} bytes>"


def probe_format(path: str, parent: str) -> str:
    """QEMU's format probe for a backing file without a stored format: qcow2 magic, else raw."""
    try:
        with HostFile(path) as f:  # O_RDONLY|O_NONBLOCK, regular files and block devices only
            magic = f.pread(0, 4)
    except Qcow2Error as e:
        raise Qcow2Error(f"cannot open backing file {path}: {e.message}", path=parent) from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"




def open_meta(path: str | os.PathLike[str], *, metadata: SharedMetadata | None = None) -> ImageMeta:
    """Open a qcow2 image's metadata read-only (no tables, no numpy). Raises `Qcow2Error`. With
    `metadata`, reuse that parse if `path` is still the file it was parsed from, unchanged."""
    return ImageMeta(os.fspath(path), metadata=metadata)


__all__ = ["ImageMeta", "Layer", "MetaLayer", "RawLayer", "SharedMetadata", "open_meta", "probe_format",
           "resolve_backing_path"]
