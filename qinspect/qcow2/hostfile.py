"""Read-only access to one host file (the image, its data file or a backing file).

Reads go through `pread` on a descriptor opened `O_RDONLY`; nothing here can write. Reads past the
end of the file return zeros, as QEMU's file driver does, and the caller can ask whether a range
was past the end. `bytes_read` counts what was read, for the open-cost benchmarks.

This is also the one host-extent prober. `host_extents()` classifies the file's bytes as written
data, unwritten extents (allocated, zeroed, never written: what `fallocate` and QEMU's zeroing of
copy-on-write padding leave) and holes, with FIEMAP (`FS_IOC_FIEMAP`), which reads the file
system's extent tree and so does not change with the page cache (FIEMAP_FLAG_SYNC first writes
back pages still dirty in the cache, as `fsync` would, so that data not yet on disk is not taken for
an unwritten extent; the file's contents are never changed). Where the file system has no
FIEMAP it falls back to SEEK_DATA/SEEK_HOLE and says so (`HostExtents.method`): unwritten extents
then count as data, or as holes, depending on what is cached. `data_extent()` and
`seek_extents()` answer the SEEK_DATA/SEEK_HOLE question exactly as QEMU's file-posix block
status does, for `map`, whose zero flag follows QEMU's semantics.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from enum import Enum, IntEnum
from types import TracebackType

from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.value import Value

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:  # numpy is imported by the prober's functions only: opening a file (`info`) needs none
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]

# QEMU's lock bytes (block/file-posix.c RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE) and struct flock.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_FLOCK = "hhqqi4x"
# Buffers one preadv takes (Linux: 1024).
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
    _IOV_MAX = 16

# FIEMAP (linux/fs.h, linux/fiemap.h): _IOWR('f', 11, struct fiemap); struct fiemap is 32 bytes,
# each struct fiemap_extent 56 bytes.
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = "=QQIIII"
_FIEMAP_EXTENT = "=QQQQQIIII"
FIEMAP_FLAG_SYNC = 0x1  # write dirty pages back first: data still in the page cache is data, not unwritten
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_BATCH = 1024  # extents per ioctl: bounded memory, whatever the file's fragmentation


class ExtentKind(IntEnum):
    """What a byte range of the host file is, for space accounting."""

    HOLE = 0
    """No disk space; reads as zeros."""
    DATA = 1
    """Written data (or data waiting in the page cache to be written: delayed allocation)."""
    UNWRITTEN = 2
    """Disk space reserved and reading as zeros, never written (fallocate, QEMU's write-zeroes)."""


class ExtentMethod(IntEnum):
    """How `host_extents` classified the file."""

    FIEMAP = 0
    """The file system's extent map: exact and independent of the page cache."""
    SEEK = 1
    """SEEK_DATA/SEEK_HOLE (no FIEMAP here): no unwritten extents, may depend on the page cache."""
    NONE = 2
    """Neither works (a block device, an exotic file system): everything counts as data."""

    @property
    def label(self) -> str:
        return ("fiemap", "seek-hole", "none")[self.value]

class InUse(Enum):
    """Whether another process holds QEMU's locks on the image file (`HostFile.lock_state`)."""

    NO = "no"
    READER = "reader"
    WRITER = "writer"

    def to_json(self) -> str | None:
        """`null`, `"read"` or `"write"`: the `"in-use"` value every command prints."""
        return _IN_USE_JSON[self]


_IN_USE_JSON = {InUse.NO: None, InUse.READER: "read", InUse.WRITER: "write"}


class HostExtents(Value):
    """The file `[0, size)` cut into consecutive ranges `[start, end)` of one `ExtentKind` each
    (an immutable `qinspect.qcow2.value.Value`)."""

    __slots__ = ("end", "kind", "method", "size", "start")
    FIELDS = ("start", "end", "kind", "method", "size")

    start: I64
    end: I64
    kind: npt.NDArray[np.uint8]
    method: ExtentMethod
    size: int

    def __init__(self, start: I64, end: I64, kind: npt.NDArray[np.uint8], method: ExtentMethod, size: int) -> None:
        self._assign(start, end, kind, method, size)

    def ranges(self, *kinds: ExtentKind) -> tuple[I64, I64]:
        """(start, end) arrays of the ranges of the given kinds, ascending."""
        import numpy as np

        sel = np.isin(self.kind, np.array([int(k) for k in kinds], dtype=np.uint8))
        return self.start[sel], self.end[sel]

    def bytes_of(self, kind: ExtentKind) -> int:
        sel = self.kind == int(kind)
        return int((self.end[sel] - self.start[sel]).sum())

    def to_json(self) -> dict[str, object]:
        return {"method": self.method.label, "data-bytes": self.bytes_of(ExtentKind.DATA),
                "unwritten-bytes": self.bytes_of(ExtentKind.UNWRITTEN), "hole-bytes": self.bytes_of(ExtentKind.HOLE)}


# A single read larger than this is a bug or a hostile size: every caller reads in bounded pieces.
MAX_SINGLE_READ = 256 * 1024 * 1024


class HostFile:
    """A file opened read-only; `pread` never returns short (zero-fills past EOF)."""

    def __init__(self, path: str) -> None:
        self.path = path
        if "\0" in path:
            raise Qcow2Error("file name contains a NUL byte", path=path.replace("\0", "\\0"))
        try:
            # O_NONBLOCK: opening a FIFO named by a hostile backing file must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise Qcow2Error("no such file", path=path) from None
        except PermissionError:
            raise Qcow2Error("permission denied (cannot open for reading)", path=path) from None
        except IsADirectoryError:
            raise Qcow2Error("is a directory, not an image file", path=path) from None
        except OSError as e:
            raise Qcow2Error(f"cannot open: {e.strerror or e}", path=path) from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise Qcow2Error("is a directory, not an image file", path=path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            # QEMU's file driver refuses these too ("'file' driver requires ... to be a regular file");
            # QEMU blocks opening a named FIFO without a writer, which qinspect never does.
            os.close(fd)
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) \
                else "not a regular file"
            raise Qcow2Error(f"is {kind}, not an image file (only regular files and devices are read)",
                             path=path)
        if not stat.S_ISCHR(st.st_mode):
            # A character device (/dev/zero, /dev/null, a terminal as /dev/stdin) stays non-blocking:
            # QEMU's host_device driver opens it and takes its size from lseek(SEEK_END), 0 for
            # these, so it is read as an empty raw file and never actually read from.
            os.set_blocking(fd, True)
        self._fd: int | None = fd
        self._is_regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else _device_size(fd)
        self.allocated_size = st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else self.size
        self.mtime_ns = st.st_mtime_ns
        self.bytes_read = 0

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise Qcow2Error("file is closed", path=self.path)
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes at `offset`; bytes past the end of the file read as zeros."""
        if offset < 0 or length < 0:
            raise Qcow2Error(f"negative read ({length} bytes)", offset, path=self.path)
        if length > MAX_SINGLE_READ:
            raise Qcow2Error(f"refusing a single read of {length} bytes", offset, path=self.path)
        if length == 0:
            return b""
        avail = max(0, min(length, self.size - offset))
        data = b""
        if avail:
            try:
                data = os.pread(self.fd, avail, offset)
            except OSError as e:
                raise Qcow2Error(f"read error: {e.strerror or e}", offset, path=self.path) from None
            self.bytes_read += len(data)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` from `offset` (zero-fill past EOF); used for big batched table reads."""
        length = len(buf)
        avail = max(0, min(length, self.size - offset))
        done = 0
        while done < avail:
            try:
                n = os.preadv(self.fd, [buf[done:avail]], offset + done)
            except OSError as e:
                raise Qcow2Error(f"read error: {e.strerror or e}", offset + done, path=self.path) from None
            if n <= 0:
                break
            done += n
        self.bytes_read += done
        if done < length:
            buf[done:] = bytes(length - done)

    def readv_into(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill `bufs`, one after the other, from `offset` on (zero-fill past EOF): one `preadv` per
        `IOV_MAX` buffers. The planner reads a request this way, straight into the places of the
        pieces it covers, with the gaps it reads through going to a scratch buffer."""
        pos = offset
        for k in range(0, len(bufs), _IOV_MAX):
            chunk = bufs[k : k + _IOV_MAX]
            want = sum(map(len, chunk))
            got = -1
            if pos + want <= self.size:
                try:
                    got = os.preadv(self.fd, chunk, pos)
                except OSError as e:
                    raise Qcow2Error(f"read error: {e.strerror or e}", pos, path=self.path) from None
            if got == want:
                self.bytes_read += got
            else:  # the end of the file inside, or a short read: buffer by buffer (read again)
                at = pos
                for b in chunk:
                    self.read_into(at, b)
                    at += len(b)
            pos += want

    def lock_state(self) -> InUse:
        """Whether another process holds QEMU's image locks (NO where the query is unsupported).

        QEMU (file-posix) takes open-file-description locks on byte 100+bit for each permission
        it uses and on byte 200+bit for each it refuses to share; bit 1 is WRITE and bit 3 RESIZE.
        This only asks (F_OFD_GETLK); it never takes a lock.
        """
        getlk = getattr(fcntl, "F_OFD_GETLK", None)
        if getlk is None or not sys.platform.startswith("linux"):
            return InUse.NO
        try:
            for byte in (_LOCK_PERM_BASE + 1, _LOCK_PERM_BASE + 3):
                if self._locked(getlk, byte, 1):
                    return InUse.WRITER
            if self._locked(getlk, _LOCK_PERM_BASE, 64) or self._locked(getlk, _LOCK_SHARED_BASE, 64):
                return InUse.READER
        except OSError:
            return InUse.NO
        return InUse.NO

    def _locked(self, cmd: int, start: int, length: int) -> bool:
        # struct flock (Linux): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        l_type = struct.unpack(_FLOCK, fcntl.fcntl(self.fd, cmd, req))[0]
        return bool(l_type != fcntl.F_UNLCK)

    def is_past_end(self, offset: int, length: int) -> bool:
        """True when `[offset, offset+length)` is not entirely inside the file."""
        return offset < 0 or offset + length > self.size

    def host_extents(self) -> HostExtents:
        """Classify the whole file: FIEMAP where supported, else SEEK_DATA/SEEK_HOLE (say which)."""
        import numpy as np

        if not self._is_regular:
            return _one_range(self.size, ExtentKind.DATA, ExtentMethod.NONE)
        try:
            ext = self._fiemap()
            self._restat()
            if ext.bytes_of(ExtentKind.UNWRITTEN):
                # Data written just before may still be converting from unwritten (ext4 converts
                # after the write-back completes): wait for it as fsync does, then ask again.
                try:
                    os.fsync(self.fd)
                except OSError:
                    return ext
                ext = self._fiemap()
                self._restat()
            return ext
        except OSError:
            pass
        try:
            os.lseek(self.fd, 0, os.SEEK_HOLE)
        except OSError:
            return _one_range(self.size, ExtentKind.DATA, ExtentMethod.NONE)
        starts, ends, data = self.seek_extents(0, self.size)
        kind = np.where(np.array(data, dtype=bool), ExtentKind.DATA, ExtentKind.HOLE).astype(np.uint8)
        return HostExtents(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), kind,
                           ExtentMethod.SEEK, self.size)

    def _restat(self) -> None:
        """Disk usage again after FIEMAP's write-back: blocks the file system allocates only at
        write-back (delayed allocation, extent-tree blocks) are counted now, whatever was cached."""
        import contextlib  # (here: opening a file for `info` needs none of it)

        with contextlib.suppress(OSError):
            self.allocated_size = os.fstat(self.fd).st_blocks * 512

    def _fiemap(self) -> HostExtents:
        """FS_IOC_FIEMAP in batches of `_FIEMAP_BATCH` extents (raises OSError where unsupported)."""
        import numpy as np

        size = self.size
        head = struct.calcsize(_FIEMAP_HEAD)
        esz = struct.calcsize(_FIEMAP_EXTENT)
        starts: list[int] = []
        ends: list[int] = []
        kinds: list[int] = []
        pos = 0

        def add(a: int, b: int, k: ExtentKind) -> None:
            if b <= a:
                return
            if kinds and kinds[-1] == k and ends[-1] == a:
                ends[-1] = b
                return
            starts.append(a)
            ends.append(b)
            kinds.append(int(k))

        while pos < size:
            req = bytearray(head + esz * _FIEMAP_BATCH)
            flags = FIEMAP_FLAG_SYNC if pos == 0 else 0
            struct.pack_into(_FIEMAP_HEAD, req, 0, pos, size - pos, flags, 0, _FIEMAP_BATCH, 0)
            fcntl.ioctl(self.fd, FS_IOC_FIEMAP, req, True)
            mapped = struct.unpack_from(_FIEMAP_HEAD, req, 0)[3]
            if not mapped:
                break
            last = False
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags, _a, _b, _c = struct.unpack_from(
                    _FIEMAP_EXTENT, req, head + i * esz)
                a, b = max(logical, pos), min(logical + length, size)
                add(pos, a, ExtentKind.HOLE)
                kind = ExtentKind.UNWRITTEN if flags & FIEMAP_EXTENT_UNWRITTEN else ExtentKind.DATA
                add(a, b, kind)
                pos = max(pos, b)
                last = bool(flags & FIEMAP_EXTENT_LAST) or pos >= size
            if last:
                break
        add(pos, size, ExtentKind.HOLE)
        return HostExtents(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64),
                           np.array(kinds, dtype=np.uint8), ExtentMethod.FIEMAP, size)

    def seek_extents(self, start: int, end: int) -> tuple[list[int], list[int], list[bool]]:
        """SEEK_DATA/SEEK_HOLE extents covering `[start, min(end, size))`: (starts, ends, is_data).

        Exactly the answers `data_extent` gives, in one ascending walk (two lseeks per data extent).
        """
        starts: list[int] = []
        ends: list[int] = []
        data: list[bool] = []
        pos = start
        lim = min(end, self.size)
        while pos < lim:
            is_data, nxt = self.data_extent(pos)
            nxt = min(max(nxt, pos + 1), self.size)
            starts.append(pos)
            ends.append(nxt)
            data.append(is_data)
            pos = nxt
        return starts, ends, data

    def next_data(self, offset: int) -> tuple[int, int] | None:
        """The data extent `[start, end)` at or after `offset` by SEEK_DATA then SEEK_HOLE, as QEMU's
        file-posix block status asks; None when only a hole follows. Without SEEK_DATA support
        everything from `offset` to the end is data; without SEEK_HOLE the extent runs to the end."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            return offset, self.size
        try:
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
        except OSError:
            hole = self.size
        return data, hole

    def data_extent(self, offset: int) -> tuple[bool, int]:
        """(is_data, end) of the data extent or hole containing `offset`, via SEEK_DATA/SEEK_HOLE.

        Mirrors QEMU's file-posix block status, which the metadata-preallocation logic of
        `qemu-img map` consults. Without SEEK_HOLE support everything is data.
        """
        if offset >= self.size:
            return False, offset
        nxt = self.next_data(offset)
        if nxt is None:
            return False, self.size
        data, hole = nxt
        if data > offset:
            return False, data
        return True, hole

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HostFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FileIdentity(Value):
    """What identifies a host file as it was seen (device, inode, size, mtime), to tell later whether
    the path was replaced by another file or the file was changed, before answers from two states of
    it are mixed (the TUI's reopen, the fleet scan). An immutable value, compared and hashed by its
    fields (`qinspect.qcow2.value.Value`)."""

    __slots__ = ("dev", "ino", "mtime_ns", "size")
    FIELDS = ("dev", "ino", "size", "mtime_ns")

    dev: int
    ino: int
    size: int
    mtime_ns: int

    def __init__(self, dev: int, ino: int, size: int, mtime_ns: int) -> None:
        self._assign(dev, ino, size, mtime_ns)

    @classmethod
    def of_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_fd(cls, fd: int) -> FileIdentity:
        return cls.of_stat(os.fstat(fd))

    @classmethod
    def of_path(cls, path: str) -> FileIdentity | None:
        """The identity of what `path` names now, or None if it names nothing."""
        try:
            return cls.of_stat(os.stat(path))
        except OSError:
            return None

    def same_file(self, other: FileIdentity) -> bool:
        return (self.dev, self.ino) == (other.dev, other.ino)

    def change_since(self, earlier: FileIdentity | None) -> str | None:
        """How this file differs from `earlier` (the identity seen first): "replaced by another file",
        "size changed from A to B bytes" or "modified"; None when it is the same, unchanged file."""
        if earlier is None:
            return None
        if not self.same_file(earlier):
            return "replaced by another file"
        if self.size != earlier.size:
            return f"size changed from {earlier.size:,} to {self.size:,} bytes"
        if self.mtime_ns != earlier.mtime_ns:
            return "modified"
        return None


def _one_range(size: int, kind: ExtentKind, method: ExtentMethod) -> HostExtents:
    import numpy as np

    n = 1 if size > 0 else 0
    return HostExtents(np.zeros(n, dtype=np.int64), np.full(n, size, dtype=np.int64),
                       np.full(n, int(kind), dtype=np.uint8), method, size)


def _device_size(fd: int) -> int:
    """A device's size as QEMU's raw_getlength takes it: lseek(SEEK_END); 0 where that fails."""
    try:
        return max(0, os.lseek(fd, 0, os.SEEK_END))
    except OSError:
        return 0
