"""The internal snapshot table: entries with their extra data, read like QEMU reads them."""

from __future__ import annotations

from dataclasses import dataclass

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCOW_SNAPSHOT_EXTRA_DATA as EXTRA
from qinspect.qcow2.fields import QCOW_SNAPSHOT_HEADER as SN
from qinspect.qcow2.hostfile import HostFile

_SN = SN.struct()  # 40 bytes
_EXTRA_DATA_SIZE_AT = SN.offset("extra_data_size")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot: its own L1 table and metadata.

    `entry_offset`/`entry_size` locate the table entry in the file (size without padding).
    `icount` is None when QEMU would treat it as -1 (absent or disabled).
    """

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


@dataclass(frozen=True)
class SnapshotTable:
    """All snapshots and the table's byte length (QEMU's `snapshots_size`)."""

    snapshots: list[Snapshot]
    size: int
    # Why qcow2_read_snapshots fails, in QEMU's words: (error, hint); qemu-img check prints them.
    qemu_error: tuple[str, str] | None = None


def read_snapshot_table(
    f: HostFile, offset: int, count: int, version: int, virtual_size: int, problems: list[Problem]
) -> SnapshotTable:
    """Read `count` entries from `offset`, stopping (with a problem) where QEMU would fail."""
    snaps: list[Snapshot] = []
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
            snaps.extend(Snapshot(k, pos + (k - i) * _SN.size, _SN.size, 0, 0, "", "", 0, 0, 0, 0, 0, virtual_size,
                                  None, b"") for k in range(i, count))
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
        id_str = pread(pos, id_size).decode("utf-8", "replace")
        pos += id_size
        name = pread(pos, name_size).decode("utf-8", "replace")
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
        snaps.append(Snapshot(i, entry_start, size, l1_off, l1_size, id_str, name, date_sec, date_nsec,
                              vm_clock, vm_state_size, extra_size, disk_size if disk_size is not None else virtual_size,
                              icount, extra[EXTRA.size:]))
        if table_length > C.QCOW_MAX_SNAPSHOTS_SIZE:
            problems.append(Problem(Severity.ERROR, "snapshot table", "snapshot table is too big",
                                    offset, qemu_refuses_open=True, check_opens=True))
            return SnapshotTable(snaps, table_length, (
                "Snapshot table is too big",
                f"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all"))
    return SnapshotTable(snaps, table_length)
