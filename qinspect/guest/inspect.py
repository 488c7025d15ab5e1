"""`inspect_guest(image)`: the guest's volumes, their filesystems' free space, and what the chain holds of it.

The partition table and filesystems are read through the top image's `read()`, so they are the
whole chain's view. Reclaimable space is counted per layer: the clusters each qcow2 layer maps to
data that lie wholly in free blocks (see `qinspect.guest.reclaim`). Every volume is read on its
own: a filesystem that lies gets a problem on that volume and the others are still reported.
"""

from __future__ import annotations

import struct

from qinspect.guest import ext, fat, lvm, ntfs, xfs
from qinspect.guest.disk import DiskReader, VolumeReader
from qinspect.guest.model import (
    CancelledFn,
    Filesystem,
    FsInfo,
    GuestError,
    GuestView,
    LayerReclaim,
    PartitionTable,
    ProgressFn,
    Segment,
    Volume,
    VolumeKind,
    never_cancelled,
    no_progress,
)
from qinspect.guest.partitions import check_extents, read_partitions
from qinspect.guest.ranges import Ranges
from qinspect.guest.reclaim import allocated_bytes, data_clusters, host_clusters, reclaimable_in
from qinspect.guest.signatures import describe_luks, describe_swap, head_of, identify
from qinspect.qcow2.image import Image, Layer

READERS = {Filesystem.EXT4: ext.read_ext, Filesystem.VFAT: fat.read_fat, Filesystem.NTFS: ntfs.read_ntfs,
           Filesystem.XFS: xfs.read_xfs}


def read_volume_fs(disk: DiskReader, v: Volume) -> None:
    """Identify and read the filesystem of `v` (problems are recorded on `v`)."""
    if not v.segments or v.kind == VolumeKind.EXTENDED:
        return
    vol = VolumeReader(disk, v.segments)
    try:
        head = head_of(vol)
        kind = identify(head)
        if kind is None:
            return
        if kind == Filesystem.SWAP:
            v.fs = describe_swap(vol, head)
        elif kind == Filesystem.LUKS:
            v.fs = describe_luks(vol, head)
        elif kind == Filesystem.LVM2:
            v.fs = FsInfo(Filesystem.LVM2, size_bytes=vol.size)
        else:
            v.fs = FsInfo(kind)  # what it is, even if reading it fails below
            v.fs = READERS[kind](vol)
    except GuestError as e:
        v.problems.append(str(e))
        return
    except (struct.error, ValueError, IndexError, OverflowError) as e:
        # A structure whose fields contradict each other in a way no check above caught: the
        # volume is reported as unreadable, the rest of the disk still is.
        v.problems.append(f"{v.filesystem.value if v.filesystem else 'filesystem'} metadata is inconsistent "
                          f"({type(e).__name__}: {e})")
        if v.fs is not None:
            v.fs.free = None
        return
    v.problems += v.fs.problems
    if v.fs.free is not None:
        v.free_disk = vol.to_disk(v.fs.free.clip(0, vol.size))
        v.trim_disk = v.free_disk if v.fs.untrimmed is None else v.free_disk.subtract(vol.to_disk(v.fs.untrimmed))


def inspect_guest(img: Layer, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled
                  ) -> GuestView:
    """Everything `qinspect guest` reports about `img` (a qcow2 `Image` with its chain, or a raw layer)."""
    disk = DiskReader(img)
    problems: list[str] = []
    try:
        scan = read_partitions(disk)
        table, volumes = scan.table, scan.volumes
        problems += scan.problems
        if table == PartitionTable.MBR and _boot_sector_fs(disk) and (
                not volumes or any(v.start == 0 for v in volumes)):
            # A FAT/NTFS boot sector with a fake MBR entry at LBA 0 (mkfs.fat --mbr): a whole-disk filesystem.
            table, volumes, problems = None, [], []
    except GuestError as e:
        # The first sectors cannot be read (encrypted image, an entry QEMU fails): nothing to inspect.
        problems.append(f"partition table: {e}")
        return GuestView(disk.size, img.cluster_size if isinstance(img, Image) else 512, None, [],
                         _reclaim(img, [], cancelled), problems)
    if table is None:
        volumes = [Volume(0, VolumeKind.WHOLE_DISK, 0, disk.size, [Segment(0, 0, disk.size)])]
    check_extents(volumes, disk.size)
    steps = len(volumes) + 1
    for k, v in enumerate(list(volumes)):
        progress(k, steps)
        read_volume_fs(disk, v)
        if v.filesystem == Filesystem.LVM2:
            try:
                lvs = lvm.logical_volumes(VolumeReader(disk, v.segments), v)
            except (GuestError, ValueError, IndexError, struct.error) as e:
                v.problems.append(f"LVM2: {e}")
                continue
            pv_pos = volumes.index(v)
            for lv in lvs:
                lv.parent = pv_pos
                read_volume_fs(disk, lv)
                volumes.append(lv)
    _exclude_overlaps(volumes)
    layers = _reclaim(img, volumes, cancelled)
    progress(steps, steps)
    view = GuestView(disk.size, img.cluster_size if isinstance(img, Image) else 512, table, volumes, layers,
                     problems)
    tops = [v.reclaimable for v in volumes if v.reclaimable is not None]
    for r in tops:
        view.reclaimable = view.reclaimable.union(r)
    return view


def _boot_sector_fs(disk: DiskReader) -> bool:
    head = disk.read(0, 512)
    return fat.probe(head) or ntfs.probe(head)


def _exclude_overlaps(volumes: list[Volume]) -> None:
    """A byte another volume also claims is not free: drop it from free space (partition tables that lie)."""
    plain = [v for v in volumes if v.kind in (VolumeKind.PARTITION, VolumeKind.LOGICAL, VolumeKind.WHOLE_DISK)]
    for v in volumes:
        if v.trim_disk is None or not len(v.trim_disk):
            continue
        others = [o for o in plain if o is not v and o.length and (v.parent is None or volumes[v.parent] is not o)
                  and o.start < v.start + v.length + (1 << 62) and v.kind != VolumeKind.LVM_LV]
        clash = Ranges.empty()
        for o in others:
            if o.start < int(v.trim_disk.end[-1]) and int(v.trim_disk.start[0]) < o.start + o.length:
                clash = clash.union(Ranges.of([o.start], [o.start + o.length]))
        if len(clash):
            v.trim_disk = v.trim_disk.subtract(clash)


def _reclaim(img: Layer, volumes: list[Volume], cancelled: CancelledFn) -> list[LayerReclaim]:
    if isinstance(img, Image):
        chain, _error = img.open_chain()
    else:
        chain = [img]
    out: list[LayerReclaim] = []
    for depth, layer in enumerate(chain):
        if cancelled():
            break
        if not isinstance(layer, Image) or not any(v.trim_disk is not None and len(v.trim_disk) for v in volumes):
            out.append(LayerReclaim(layer.path, depth, 0, None, 0))
            for v in volumes:
                v.reclaimable_by_layer.append(0)
            continue
        clusters, extents, hosts = data_clusters(layer)
        total = 0
        mine = Ranges.empty()
        for v in volumes:
            if v.trim_disk is None:
                v.reclaimable_by_layer.append(0)
                continue
            r = reclaimable_in(layer, clusters, extents, hosts, v.trim_disk.clip(0, layer.virtual_size))
            if depth == 0:
                v.reclaimable = r
            v.reclaimable_by_layer.append(r.total)
            total += r.total
            mine = mine.union(r)
        on_disk = allocated_bytes(layer, host_clusters(layer, mine, extents, hosts))
        out.append(LayerReclaim(layer.path, depth, total, layer.cluster_size, on_disk))
    return out
