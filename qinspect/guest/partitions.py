"""Partition tables: GPT (with header and entry-array CRCs) and MBR with extended/logical partitions.

`read_partitions` says which table the disk has and lists its partitions as `Volume`s with disk
byte extents. A table that lies — entries past the end of the disk, overlapping partitions, an
EBR chain that loops — is reported as problems on the volumes concerned, never followed blindly.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from qinspect.guest.disk import DiskReader
from qinspect.guest.model import GuestError, PartitionTable, Segment, Volume, VolumeKind

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
MAX_GPT_ENTRIES_BYTES = 1 << 20  # 1 MiB of entries (QEMU/parted use 16 KiB; 8192 entries of 128 bytes)
MAX_LOGICAL = 256  # Linux handles far fewer; a longer EBR chain is a loop or a lie
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE

GPT_TYPES = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
}
MBR_TYPES = {0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
             0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)",
             0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM", 0xEF: "EFI (FAT-12/16/32)",
             0xFD: "Linux raid autodetect", 0xEE: "GPT protective"}


@dataclass
class PartitionScan:
    table: PartitionTable | None
    volumes: list[Volume]
    problems: list[str]


def _volume(index: int, kind: VolumeKind, start: int, length: int, type_name: str | None,
            name: str | None = None) -> Volume:
    return Volume(index=index, kind=kind, start=start, length=length, segments=[Segment(0, start, length)],
                  type_name=type_name, name=name)


def read_partitions(disk: DiskReader) -> PartitionScan:
    """The disk's partition table, if it has one (a whole-disk filesystem is the caller's business)."""
    if disk.size < 2 * SECTOR:
        return PartitionScan(None, [], [])
    mbr = disk.read(0, SECTOR)
    for sector in (SECTOR, 4096):
        if disk.size >= 2 * sector and disk.read(sector, 8) == GPT_SIGNATURE:
            scan = _read_gpt(disk, sector)
            if scan is not None:
                return scan
    if mbr[510:512] != b"\x55\xaa":
        return PartitionScan(None, [], [])
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == MBR_PROTECTIVE for e in entries):
        # A protective MBR without a readable GPT: report it, list nothing.
        return PartitionScan(PartitionTable.GPT, [], ["protective MBR but no valid GPT header"])
    if any(e[0] not in (0, 0x80) for e in entries if e[2]) or not any(e[2] and e[5] for e in entries):
        return PartitionScan(None, [], [])  # a boot sector or garbage, not a partition table
    return _read_mbr(disk, entries)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def _read_gpt(disk: DiskReader, sector: int) -> PartitionScan | None:
    problems: list[str] = []
    hdr = disk.read(sector, sector)
    (hsize, hcrc) = struct.unpack_from("<II", hdr, 12)
    if not 92 <= hsize <= sector:
        return PartitionScan(PartitionTable.GPT, [], [f"GPT header size {hsize} is invalid"])
    check = bytearray(hdr[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        problems.append("GPT header CRC mismatch")
    first_usable, last_usable = struct.unpack_from("<QQ", hdr, 40)
    entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", hdr, 72)
    if entry_size < 128 or entry_size % 8 or n_entries * entry_size > MAX_GPT_ENTRIES_BYTES:
        return PartitionScan(PartitionTable.GPT, [], [*problems, f"GPT entry array of {n_entries} x {entry_size} "
                                                       "bytes is invalid or too large"])
    arr_off = entries_lba * sector
    arr_len = n_entries * entry_size
    if arr_off + arr_len > disk.size:
        return PartitionScan(PartitionTable.GPT, [], [*problems, f"GPT entry array at {arr_off} is past the end "
                                                       "of the disk"])
    arr = disk.read(arr_off, arr_len)
    if zlib.crc32(arr) != entries_crc:
        problems.append("GPT partition entry array CRC mismatch")
    volumes = []
    for i in range(n_entries):
        e = arr[i * entry_size : (i + 1) * entry_size]
        type_guid = e[:16]
        if type_guid == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        tg = _guid(type_guid)
        v = _volume(i + 1, VolumeKind.PARTITION, first * sector, max(0, last + 1 - first) * sector,
                    GPT_TYPES.get(tg, tg), name or None)
        if last < first:
            v.problems.append(f"GPT entry {i + 1}: last LBA {last} is before first LBA {first}")
        elif first < first_usable or last > last_usable:
            v.problems.append(f"GPT entry {i + 1}: LBAs {first}-{last} outside the usable area "
                              f"{first_usable}-{last_usable}")
        volumes.append(v)
    return PartitionScan(PartitionTable.GPT, volumes, problems)


def _read_mbr(disk: DiskReader, entries: list[tuple[int, bytes, int, bytes, int, int]]) -> PartitionScan:
    volumes: list[Volume] = []
    problems: list[str] = []
    for i, (_status, _c1, ptype, _c2, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        kind = VolumeKind.EXTENDED if ptype in MBR_EXTENDED else VolumeKind.PARTITION
        v = _volume(i + 1, kind, lba * SECTOR, count * SECTOR, MBR_TYPES.get(ptype, f"0x{ptype:02x}"))
        volumes.append(v)
        if kind == VolumeKind.EXTENDED:
            if any(x.kind == VolumeKind.EXTENDED for x in volumes[:-1]):
                v.problems.append("a second extended partition (ignored)")
                continue
            volumes += _read_ebr_chain(disk, lba, count, v)
    return PartitionScan(PartitionTable.MBR, volumes, problems)


def _read_ebr_chain(disk: DiskReader, ext_lba: int, ext_count: int, ext: Volume) -> list[Volume]:
    """The logical partitions: a linked list of EBRs, each relative to the extended partition."""
    out: list[Volume] = []
    seen: set[int] = set()
    ebr_lba = ext_lba
    index = 5
    while True:
        if ebr_lba in seen:
            ext.problems.append(f"EBR chain loops back to LBA {ebr_lba}")
            break
        if len(seen) >= MAX_LOGICAL:
            ext.problems.append(f"EBR chain longer than {MAX_LOGICAL} (stopped)")
            break
        seen.add(ebr_lba)
        if not ext_lba <= ebr_lba < ext_lba + ext_count or (ebr_lba + 1) * SECTOR > disk.size:
            ext.problems.append(f"EBR at LBA {ebr_lba} is outside the extended partition or the disk")
            break
        try:
            ebr = disk.read(ebr_lba * SECTOR, SECTOR)
        except GuestError as e:
            ext.problems.append(f"EBR at LBA {ebr_lba}: {e.message}")
            break
        if ebr[510:512] != b"\x55\xaa":
            ext.problems.append(f"EBR at LBA {ebr_lba} has no boot signature")
            break
        e1 = struct.unpack_from("<B3sB3sII", ebr, 446)
        e2 = struct.unpack_from("<B3sB3sII", ebr, 462)
        if e1[2] and e1[5]:
            out.append(_volume(index, VolumeKind.LOGICAL, (ebr_lba + e1[4]) * SECTOR, e1[5] * SECTOR,
                               MBR_TYPES.get(e1[2], f"0x{e1[2]:02x}")))
            index += 1
        if not e2[2] or not e2[5]:
            break
        ebr_lba = ext_lba + e2[4]
    return out


def check_extents(volumes: list[Volume], disk_size: int) -> None:
    """Record partitions that leave the disk or overlap another (logical ones live in the extended)."""
    for v in volumes:
        if v.start >= disk_size:
            v.problems.append(f"starts at {v.start}, past the end of the disk ({disk_size} bytes)")
            v.length = 0
            v.segments = []
        elif v.start + v.length > disk_size:
            v.problems.append(f"ends at {v.start + v.length}, past the end of the disk ({disk_size} bytes); "
                              "read up to the end")
            v.length = disk_size - v.start
            v.segments = [Segment(0, v.start, v.length)]
    for log in (v for v in volumes if v.kind == VolumeKind.LOGICAL):
        ext = next((v for v in volumes if v.kind == VolumeKind.EXTENDED), None)
        if ext is not None and not (ext.start <= log.start and log.start + log.length <= ext.start + ext.length):
            log.problems.append(f"logical partition {log.index} is not inside the extended partition")
    # Overlaps, by a sweep in start order (a table may hold thousands of entries).
    plain = sorted((v for v in volumes if v.kind in (VolumeKind.PARTITION, VolumeKind.LOGICAL) and v.length),
                   key=lambda v: v.start)
    reach: Volume | None = None
    for v in plain:
        if reach is not None and v.start < reach.start + reach.length:
            v.problems.append(f"overlaps partition {reach.index}")
            if f"overlaps partition {v.index}" not in reach.problems and len(reach.problems) < 16:
                reach.problems.append(f"overlaps partition {v.index}")
        if reach is None or v.start + v.length > reach.start + reach.length:
            reach = v
