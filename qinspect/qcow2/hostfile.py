"""Read-only access to one host file (the image, its data file or a backing file).

Reads go through `pread` on a descriptor opened `O_RDONLY`; nothing here can write. Reads past the
end of the file return zeros, as QEMU's file driver does, and the caller can ask whether a range
was past the end. `bytes_read` counts what was read, for the open-cost benchmarks.
"""

from __future__ import annotations

import errno
import os
import stat
from types import TracebackType

from qinspect.qcow2.errors import Qcow2Error

# A single read larger than this is a bug or a hostile size: every caller reads in bounded pieces.
MAX_SINGLE_READ = 256 * 1024 * 1024


class HostFile:
    """A file opened read-only; `pread` never returns short (zero-fills past EOF)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
