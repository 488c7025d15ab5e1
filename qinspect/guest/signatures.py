"""What a volume holds, from the magic numbers at its start (blkid's order for what we know).

Swap and LUKS are recognised and described, not read: swap has no allocation map a guest trims,
and LUKS content is ciphertext without the key.
"""

from __future__ import annotations

import struct

from qinspect.guest import ext, fat, ntfs, xfs
from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Filesystem, FsInfo

HEAD = 8192
LUKS_MAGIC = b"LUKS\xba\xbe"
LVM_LABEL = b"LABELONE"
LVM_TYPE = b"LVM2 001"


def head_of(vol: VolumeReader) -> bytes:
    return vol.read(0, min(HEAD, vol.size))


def identify(head: bytes) -> Filesystem | None:
    if head[:6] == LUKS_MAGIC:
        return Filesystem.LUKS
    for sector in range(4):
        at = sector * 512
        if head[at : at + 8] == LVM_LABEL and head[at + 24 : at + 32] == LVM_TYPE:
            return Filesystem.LVM2
    if xfs.probe(head):
        return Filesystem.XFS
    if ext.probe(head):
        return Filesystem.EXT4  # refined by the reader
    if ntfs.probe(head):
        return Filesystem.NTFS
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return Filesystem.SWAP
    if fat.probe(head):
        return Filesystem.VFAT
    return None


def describe_swap(vol: VolumeReader, head: bytes) -> FsInfo:
    info = FsInfo(Filesystem.SWAP, block_size=4096,
                  note="swap: no allocation map; its pages are discarded only by `swapon --discard`")
    if head[4086:4096] == b"SWAPSPACE2":
        version, last_page, nr_bad = struct.unpack_from("<III", head, 1024)
        info.size_bytes = min((last_page + 1) * 4096, vol.size)
        u = head[1036:1052].hex()
        info.uuid = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
        info.label = head[1052:1068].split(b"\0", 1)[0].decode("utf-8", "replace") or None
        info.detail.update({"version": version, "bad-pages": nr_bad})
    return info


def describe_luks(vol: VolumeReader, head: bytes) -> FsInfo:
    version = struct.unpack_from(">H", head, 6)[0]
    info = FsInfo(Filesystem.LUKS, size_bytes=vol.size,
                  note="LUKS: encrypted, contents opaque (qinspect reads no keys); free space inside is unknown")
    info.detail["version"] = version
    if version == 1:
        info.uuid = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace") or None
    elif version == 2:
        info.label = head[24:72].split(b"\0", 1)[0].decode("utf-8", "replace") or None
        info.uuid = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace") or None
    return info
