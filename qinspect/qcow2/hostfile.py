"""Read-only access to one host file (the image, its data file or a backing file).

Reads go through `pread` on a descriptor opened `O_RDONLY`; nothing here can write. Reads past the
end of the file return zeros, as QEMU's file driver does, and the caller can ask whether a range
was past the end. `bytes_read` counts what was read, for the open-cost benchmarks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from types import TracebackType

from qinspect.qcow2.errors import Qcow2Error

# QEMU's lock bytes (block/file-posix.c RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE) and struct flock.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_FLOCK = "hhqqi4x"

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
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode) \
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
            raise Qcow2Error(f"is {kind}, not an image file (only regular files and block devices are read)",
                             path=path)
        os.set_blocking(fd, True)
        self._fd: int | None = fd
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

    def lock_state(self) -> str | None:
        """Whether another process holds QEMU's image locks: None, "reader" or "writer".

        QEMU (file-posix) takes open-file-description locks on byte 100+bit for each permission
        it uses and on byte 200+bit for each it refuses to share; bit 1 is WRITE and bit 3 RESIZE.
        This only asks (F_OFD_GETLK); it never takes a lock. None where the query is unsupported.
        """
        getlk = getattr(fcntl, "F_OFD_GETLK", None)
        if getlk is None or not sys.platform.startswith("linux"):
            return None
        try:
            for byte in (_LOCK_PERM_BASE + 1, _LOCK_PERM_BASE + 3):
                if self._locked(getlk, byte, 1):
                    return "writer"
            if self._locked(getlk, _LOCK_PERM_BASE, 64) or self._locked(getlk, _LOCK_SHARED_BASE, 64):
                return "reader"
        except OSError:
            return None
        return None

    def _locked(self, cmd: int, start: int, length: int) -> bool:
        # struct flock (Linux): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        l_type = struct.unpack(_FLOCK, fcntl.fcntl(self.fd, cmd, req))[0]
        return bool(l_type != fcntl.F_UNLCK)

    def is_past_end(self, offset: int, length: int) -> bool:
        """True when `[offset, offset+length)` is not entirely inside the file."""
        return offset < 0 or offset + length > self.size

    def data_extent(self, offset: int) -> tuple[bool, int]:
        """(is_data, end) of the data extent or hole containing `offset`, via SEEK_DATA/SEEK_HOLE.

        Mirrors QEMU's file-posix block status, which the metadata-preallocation logic of
        `qemu-img map` consults. Without SEEK_HOLE support everything is data.
        """
        if offset >= self.size:
            return False, offset
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False, self.size
            return True, self.size
        if data > offset:
            return False, data
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return True, self.size
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


def _device_size(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0
