"""The guest's view of the disk: partition tables, filesystems and their free-space maps.

Read through `Image.read()` (the whole backing chain), never mounted: GPT and MBR (extended and
logical partitions), ext2/3/4, FAT12/16/32, NTFS (via The Sleuth Kit), XFS, LVM2 logical volumes,
with swap and LUKS recognised. `inspect_guest(image)` returns a `GuestView`. Imports only `qcow2`
and the leaf modules (and `analysis.progress` for the callback types); no Textual, no Rich.
"""

from qinspect.guest.inspect import inspect_guest
from qinspect.guest.model import Filesystem, GuestError, GuestView, PartitionTable, Volume, VolumeKind

__all__ = ["Filesystem", "GuestError", "GuestView", "PartitionTable", "Volume", "VolumeKind", "inspect_guest"]
