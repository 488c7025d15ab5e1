"""Bounded readers of the guest disk and of one volume on it, both through `Layer.read()`.

A `VolumeReader` maps volume offsets to disk offsets through the volume's segments (one segment
for a partition, several for an LVM logical volume) and refuses reads outside the volume, so a
filesystem that points past its partition gets a `GuestError` instead of someone else's bytes.
"""

from __future__ import annotations

import numpy as np

from qinspect.guest.model import GuestError, Segment
from qinspect.guest.ranges import Ranges
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Layer

# The most bytes one filesystem reader may ask for in one call (bitmaps are read in chunks).
MAX_READ = 64 << 20


class DiskReader:
    """The guest disk of a layer (a qcow2 image with its chain, or a raw file)."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.size = layer.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        if length < 0 or length > MAX_READ:
            raise GuestError(f"read of {length} bytes refused (more than {MAX_READ})", offset)
        if offset < 0 or offset + length > self.size:
            raise GuestError(f"read of {length} bytes at {offset} is past the end of the disk ({self.size} bytes)",
                             offset)
        try:
            return self.layer.read(offset, length)
        except Qcow2Error as e:
            raise GuestError(f"the image cannot serve guest bytes at {offset}: {e.message}", offset) from None


class VolumeReader:
    """One volume: `read(offset, length)` in volume coordinates, and volume ranges → disk ranges."""

    def __init__(self, disk: DiskReader, segments: list[Segment]) -> None:
        self.disk = disk
        self.segments = sorted(segments, key=lambda s: s.volume_offset)
        self.size = sum(s.length for s in self.segments)
        self._vstart = np.array([s.volume_offset for s in self.segments], np.int64)
        self._dstart = np.array([s.disk_offset for s in self.segments], np.int64)
        self._len = np.array([s.length for s in self.segments], np.int64)

    def read(self, offset: int, length: int) -> bytes:
        if length < 0 or length > MAX_READ:
            raise GuestError(f"read of {length} bytes refused (more than {MAX_READ})")
        if offset < 0 or offset + length > self.size:
            raise GuestError(f"the filesystem points past the end of its volume: {length} bytes at volume offset "
                             f"{offset}, volume is {self.size} bytes", self.to_disk_offset(min(offset, self.size)))
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            k = int(np.searchsorted(self._vstart, pos, side="right")) - 1
            seg = self.segments[k]
            n = min(end, seg.volume_offset + seg.length) - pos
            out += self.disk.read(seg.disk_offset + pos - seg.volume_offset, n)
            pos += n
        return bytes(out)

    def to_disk_offset(self, offset: int) -> int | None:
        if not self.segments:
            return None
        k = max(0, int(np.searchsorted(self._vstart, offset, side="right")) - 1)
        return int(self._dstart[k] + offset - self._vstart[k])

    def to_disk(self, r: Ranges) -> Ranges:
        """Volume byte ranges as disk byte ranges (split where segments are)."""
        pieces_s, pieces_e = [], []
        for vs, ds, ln in zip(self._vstart, self._dstart, self._len, strict=True):
            part = r.clip(int(vs), int(vs + ln))
            if len(part):
                pieces_s.append(part.start - vs + ds)
                pieces_e.append(part.end - vs + ds)
        if not pieces_s:
            return Ranges.empty()
        return Ranges.of(np.concatenate(pieces_s), np.concatenate(pieces_e))
