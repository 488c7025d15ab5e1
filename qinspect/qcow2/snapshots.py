"""The internal snapshot table: entries with their extra data, read like QEMU reads them.

The entries are held compactly (`SnapshotList`: one array of integers and one of name bytes, about
100 bytes an entry) and a `Snapshot` is made when one is looked at: a hostile table of 65,536
entries costs a few MiB, not the 25 MiB of 65,536 objects with their own ints and strings.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCOW_SNAPSHOT_EXTRA_DATA as EXTRA
from qinspect.qcow2.fields import QCOW_SNAPSHOT_HEADER as SN
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.value import Value

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    from typing import overload

_SN = SN.struct()  # 40 bytes
_EXTRA_DATA_SIZE_AT = SN.offset("extra_data_size")


class Snapshot(Value):
    """One internal snapshot: its own L1 table and metadata.

    `entry_offset`/`entry_size` locate the table entry in the file (size without padding).
    `icount` is None when QEMU would treat it as -1 (absent or disabled).

    An immutable value, compared and hashed by its fields (`qinspect.qcow2.value.Value`).
    """

    __slots__ = ("date_nsec", "date_sec", "disk_size", "entry_offset", "entry_size", "extra_data_size", "icount",
                 "id_str", "index", "l1_size", "l1_table_offset", "name", "unknown_extra_data", "vm_clock_nsec",
                 "vm_state_size")
    FIELDS = ("index", "entry_offset", "entry_size", "l1_table_offset", "l1_size", "id_str", "name", "date_sec",
              "date_nsec", "vm_clock_nsec", "vm_state_size", "extra_data_size", "disk_size", "icount",
              "unknown_extra_data")

    index: int
    entry_offset: int
    entry_size: int
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int
    disk_size: int | None
    icount: int | None
    unknown_extra_data: bytes

    def __init__(self, index: int, entry_offset: int, entry_size: int, l1_table_offset: int, l1_size: int,
                 id_str: str, name: str, date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size: int,
                 extra_data_size: int, disk_size: int | None, icount: int | None, unknown_extra_data: bytes) -> None:
        self._assign(index, entry_offset, entry_size, l1_table_offset, l1_size, id_str, name, date_sec, date_nsec,
                     vm_clock_nsec, vm_state_size, extra_data_size, disk_size, icount, unknown_extra_data)


_NO_ICOUNT = (1 << 64) - 1  # QEMU's -1: no icount (what an absent field means too)
_ROW = 14  # integers per entry in SnapshotList._ints


class SnapshotList(Sequence[Snapshot]):
    """The snapshot table's entries, stored compactly; indexing makes the `Snapshot`."""

    def __init__(self) -> None:
        # per entry: entry_offset, entry_size, l1_table_offset, l1_size, date_sec, date_nsec,
        # vm_clock_nsec, vm_state_size, extra_data_size, disk_size, icount, and where its id, name
        # and unknown extra data are in _text (start, id and name lengths; the extra data follows)
        self._ints = array("Q")
        self._text = bytearray()

    def append(self, entry_offset: int, entry_size: int, l1_table_offset: int, l1_size: int, date_sec: int,
               date_nsec: int, vm_clock_nsec: int, vm_state_size: int, extra_data_size: int, disk_size: int,
               icount: int | None, id_bytes: bytes, name_bytes: bytes, unknown_extra_data: bytes) -> None:
        start = len(self._text)
        self._text += id_bytes
        self._text += name_bytes
        self._text += unknown_extra_data
        self._ints.extend((entry_offset, entry_size, l1_table_offset, l1_size, date_sec, date_nsec, vm_clock_nsec,
                           vm_state_size, extra_data_size, disk_size, _NO_ICOUNT if icount is None else icount,
                           start, len(id_bytes), len(name_bytes)))

    def _make(self, i: int) -> Snapshot:
        r = self._ints[i * _ROW : (i + 1) * _ROW]
        start, id_len, name_len = r[11], r[12], r[13]
        a, b = start + id_len, start + id_len + name_len
        end = self._ints[(i + 1) * _ROW + 11] if (i + 1) * _ROW < len(self._ints) else len(self._text)
        text = self._text
        return Snapshot(i, r[0], r[1], r[2], r[3], text[start:a].decode("utf-8", "replace"),
                        text[a:b].decode("utf-8", "replace"), r[4], r[5], r[6], r[7], r[8], r[9],
                        None if r[10] == _NO_ICOUNT else r[10], bytes(text[b:end]))

    def __len__(self) -> int:
        return len(self._ints) // _ROW

    if TYPE_CHECKING:
        @overload
        def __getitem__(self, index: int) -> Snapshot: ...
        @overload
        def __getitem__(self, index: slice) -> list[Snapshot]: ...

    def __getitem__(self, index: int | slice) -> Snapshot | list[Snapshot]:
        n = len(self)
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(n))]
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("snapshot index out of range")
        return self._make(index)

    def __iter__(self) -> Iterator[Snapshot]:
        for i in range(len(self)):
            yield self._make(i)

    def __repr__(self) -> str:
        return f"<SnapshotList of {len(self)} snapshots>"


class SnapshotTable(Value):
    """All snapshots and the table's byte length (QEMU's `snapshots_size`); an immutable value."""

    __slots__ = ("qemu_error", "size", "snapshots")
    FIELDS = ("snapshots", "size", "qemu_error")

    snapshots: Sequence[Snapshot]
    size: int
    qemu_error: tuple[str, str] | None

    def __init__(self, snapshots: Sequence[Snapshot], size: int, qemu_error: tuple[str, str] | None = None) -> None:
        self._assign(snapshots, size, qemu_error)


def read_snapshot_table(
    f: HostFile, offset: int, count: int, version: int, virtual_size: int, problems: list[Problem]
) -> SnapshotTable:
    """Read `count` entries from `offset`, stopping (with a problem) where QEMU would fail."""
    snaps = SnapshotList()
    pos = offset
    table_length = 0
    count = min(count, C.QCOW_MAX_SNAPSHOTS)
    entry_end = offset
    # Entries parsed from memory, read in chunks of at least 40 bytes per entry still to come
    # (no entry is shorter: never past the table's end): 65,536 entries are 262,144 small reads
    # otherwise.
    buf = b""
    bstart = 0
    left = count

    def pread(at: int, n: int) -> bytes:
        nonlocal buf, bstart
        k = at - bstart
        if k >= 0 and k + n <= len(buf):
            return buf[k : k + n]
        want = max(n, min(40 * left, 16 << 20, max(0, f.size - at)))
        buf, bstart = f.pread(at, want), at
        return buf[:n]

    for i in range(count):
        left = count - i
        table_length = (table_length + 7) & ~7
        pos = (pos + 7) & ~7
        if pos >= f.size and (i == 0 or entry_end < f.size):
            # block/io.c: reads past the end of the file return zeros, so the entries there are
            # empty snapshots (QEMU lists them; check calls each one incomplete in v3)
            problems.append(Problem(Severity.ERROR, "snapshot table",
                                    f"snapshot table entries {i}..{count - 1} lie past the end of the file and "
                                    "read as zeros", pos))
            # From here on every entry is 40 zero bytes: an empty snapshot (made without 65,536 reads).
            n = count - i
            for k in range(i, count):
                snaps.append(pos + (k - i) * _SN.size, _SN.size, 0, 0, 0, 0, 0, 0, 0, virtual_size, None, b"", b"", b"")
            table_length += n * _SN.size
            if version >= 3:
                problems.append(Problem(Severity.ERROR, "snapshot table", f"snapshot table entries {i}..{count - 1} "
                                        "are incomplete (0 bytes of extra data)", pos + _EXTRA_DATA_SIZE_AT))
            break
        entry_start = pos
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = _SN.unpack(pread(pos, _SN.size))
        pos += _SN.size
        if extra_size > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            problems.append(Problem(Severity.ERROR, "snapshot table",
                                    f"too much extra metadata in snapshot table entry {i} ({extra_size} bytes)",
                                    entry_start + _EXTRA_DATA_SIZE_AT, qemu_refuses_open=True, check_opens=True))
            return SnapshotTable(snaps, table_length, (
                f"Too much extra metadata in snapshot table entry {i}",
                "You can force-remove this extra metadata with qemu-img check -r all"))
        extra = pread(pos, extra_size)
        pos += extra_size
        vm_state_size = vm_state
        disk_size: int | None = None
        icount: int | None = None
        if extra_size >= EXTRA["vm_state_size_large"].end:
            vm_state_size = EXTRA["vm_state_size_large"].get(extra)
        if extra_size >= EXTRA["disk_size"].end:
            disk_size = EXTRA["disk_size"].get(extra)
        if extra_size >= EXTRA["icount"].end:
            ic = EXTRA["icount"].get(extra)
            icount = None if ic == 0xFFFFFFFFFFFFFFFF else ic
        id_bytes = pread(pos, id_size)
        id_str = id_bytes.decode("utf-8", "replace")
        pos += id_size
        name_bytes = pread(pos, name_size)
        name = name_bytes.decode("utf-8", "replace")
        pos += name_size
        entry_end = pos
        size = _SN.size + extra_size + id_size + name_size
        table_length += size
        if version >= 3 and extra_size < EXTRA["disk_size"].end:
            problems.append(Problem(Severity.ERROR, "snapshot table",
                                    f"snapshot table entry {i} is incomplete ({extra_size} bytes of extra data)",
                                    entry_start + _EXTRA_DATA_SIZE_AT))
        if l1_off % (1 << 9) or l1_size * C.L1E_SIZE > C.QCOW_MAX_L1_SIZE:
            problems.append(Problem(Severity.ERROR, "snapshot table",
                                    f"snapshot {id_str} ({name}): invalid L1 table "
                                    f"(offset {l1_off}, {l1_size} entries)",
                                    entry_start))
        snaps.append(entry_start, size, l1_off, l1_size, date_sec, date_nsec, vm_clock, vm_state_size, extra_size,
                     disk_size if disk_size is not None else virtual_size, icount, id_bytes, name_bytes,
                     extra[EXTRA.size:])
        if table_length > C.QCOW_MAX_SNAPSHOTS_SIZE:
            problems.append(Problem(Severity.ERROR, "snapshot table", "snapshot table is too big",
                                    offset, qemu_refuses_open=True, check_opens=True))
            return SnapshotTable(snaps, table_length, (
                "Snapshot table is too big",
                f"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all"))
    return SnapshotTable(snaps, table_length)
