"""`qinspect guest` on images built with the real tools: free space agrees with each filesystem's own
tool (dumpe2fs, fsck.fat, ntfsinfo, xfs_db freesp -d), and the reclaimable bytes agree with a discard
of the free ranges done by qemu-io on a copy (the disk usage drops by exactly that much)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qinspect.guest import Filesystem, PartitionTable, VolumeKind, inspect_guest
from qinspect.guest.model import GuestView
from qinspect.guest.ranges import Ranges
from qinspect.qcow2.image import open_image
from tests.guest.conftest import GuestSamples


def view_of(path: Path) -> GuestView:
    with open_image(path) as img:
        return inspect_guest(img)


def tool(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          env=dict(os.environ, LC_ALL="C")).stdout


def dumpe2fs_free(part: Path) -> Ranges:
    """Free blocks of every group as dumpe2fs lists them (block numbers, inclusive ranges; with
    bigalloc a range's last number is the first block of its last free cluster)."""
    head = tool("dumpe2fs", "-h", part)
    m = re.search(r"Cluster size:\s+(\d+)", head)
    ratio = int(m.group(1)) // block_size(part) if m else 1
    s, e = [], []
    for line in tool("dumpe2fs", part).splitlines():
        m = re.match(r"\s+Free blocks: (.*)$", line)
        if not m or not m.group(1).strip():
            continue
        for item in m.group(1).split(","):
            a, _, b = item.strip().partition("-")
            s.append(int(a))
            e.append(int(b or a) + ratio)
    return Ranges.of(s, e)


def block_size(part: Path) -> int:
    return int(re.search(r"Block size:\s+(\d+)", tool("dumpe2fs", "-h", part)).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "index"), [("cloud", 2), ("mbr", 5), ("chain", 2), ("variants", 1),
                                             ("variants", 2), ("variants", 4)])
def test_ext_free_blocks_match_dumpe2fs(guest_samples: GuestSamples, name: str, index: int) -> None:
    view = view_of(guest_samples.image(name))
    vol = next(v for v in view.volumes if v.index == index)
    part = guest_samples.part_file(name, index)
    bs = block_size(part)
    assert vol.fs is not None and vol.fs.free is not None
    assert vol.fs.block_size == bs
    assert vol.problems == []
    expected = dumpe2fs_free(part)
    ours = vol.fs.free
    assert ours.start.tolist() == (expected.start * bs).tolist()
    assert ours.end.tolist() == (expected.end * bs).tolist()
    sb_free = int(re.search(r"Free blocks:\s+(\d+)", tool("dumpe2fs", "-h", part)).group(1))  # type: ignore[union-attr]
    assert vol.free_bytes == sb_free * bs


def test_variants_exercise_their_features(guest_samples: GuestSamples) -> None:
    view = view_of(guest_samples.image("variants"))
    by = {v.index: v for v in view.volumes}
    assert [by[i].filesystem for i in range(1, 6)] == [Filesystem.EXT3, Filesystem.EXT4, Filesystem.VFAT,
                                                     Filesystem.EXT4, Filesystem.XFS]
    assert by[2].fs is not None and by[2].fs.detail["bigalloc-ratio"] == 16
    assert by[3].fs is not None and by[3].fs.detail["fat-type"] == "FAT12"
    assert all(v.problems == [] for v in view.volumes)
    assert all(by[i].reclaimable_bytes > 0 for i in range(1, 6))


def test_cloud_image_uses_uninit_groups_and_flex_bg(guest_samples: GuestSamples) -> None:
    vol = next(v for v in view_of(guest_samples.image("cloud")).volumes if v.index == 2)
    assert vol.fs is not None and vol.fs.detail["flex-bg"] is True
    assert int(vol.fs.detail["uninit-groups"]) > 0  # type: ignore[call-overload]


@pytest.mark.parametrize(("name", "index"), [("mbr", 1), ("cloud", 1), ("variants", 3)])
def test_fat_free_clusters_match_fsck_fat(guest_samples: GuestSamples, name: str, index: int) -> None:
    vol = next(v for v in view_of(guest_samples.image(name)).volumes if v.index == index)
    out = tool("fsck.fat", "-n", "-v", guest_samples.part_file(name, index))
    used, total = map(int, re.search(r"(\d+)/(\d+) clusters", out).groups())  # type: ignore[union-attr]
    assert vol.filesystem == Filesystem.VFAT and vol.fs is not None and vol.fs.block_size
    assert vol.fs.detail["clusters"] == total
    assert vol.free_bytes == (total - used) * vol.fs.block_size
    m = re.search(r"Cluster size:\s*(\d+)|(\d+) bytes per cluster", out)
    if m:
        assert int(m.group(1) or m.group(2)) == vol.fs.block_size


def test_ntfs_free_clusters_match_ntfsinfo(guest_samples: GuestSamples) -> None:
    view = view_of(guest_samples.image("ntfs"))
    assert view.partition_table is None
    (vol,) = view.volumes
    assert vol.index == 0 and vol.kind == VolumeKind.WHOLE_DISK and vol.filesystem == Filesystem.NTFS
    out = tool("ntfsinfo", "-m", "-f", guest_samples.part_file("ntfs", 0))
    free = int(re.search(r"Free Clusters:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    csize = int(re.search(r"Cluster Size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert vol.fs is not None and vol.fs.block_size == csize
    assert vol.free_bytes == free * csize


@pytest.mark.parametrize(("name", "index"), [("xfs", 1), ("variants", 5)])
def test_xfs_free_extents_match_xfs_db(guest_samples: GuestSamples, name: str, index: int) -> None:
    view = view_of(guest_samples.image(name))
    vol = next(v for v in view.volumes if v.index == index)
    part = guest_samples.part_file(name, index)
    sb = tool("xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize agblocks", part)
    bs = int(re.search(r"blocksize = (\d+)", sb).group(1))  # type: ignore[union-attr]
    agblocks = int(re.search(r"agblocks = (\d+)", sb).group(1))  # type: ignore[union-attr]
    s, e = [], []
    for line in tool("xfs_db", "-r", "-c", "freesp -d", part).splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s*$", line)
        if m:
            ag, bno, ln = map(int, m.groups())
            s.append((ag * agblocks + bno) * bs)
            e.append((ag * agblocks + bno + ln) * bs)
    expected = Ranges.of(s, e)
    assert vol.filesystem == Filesystem.XFS and vol.fs is not None and vol.fs.free is not None
    assert vol.problems == []
    assert vol.fs.free.pairs() == expected.pairs()
    total = int(re.search(r"total free blocks (\d+)", tool("xfs_db", "-r", "-c", "freesp -s", part)).group(1))  # type: ignore[union-attr]
    assert vol.free_bytes == total * bs


def test_mbr_extended_logical_swap_luks(guest_samples: GuestSamples) -> None:
    view = view_of(guest_samples.image("mbr"))
    assert view.partition_table == PartitionTable.MBR
    kinds = {v.index: (v.kind, v.filesystem) for v in view.volumes}
    assert kinds == {1: (VolumeKind.PARTITION, Filesystem.VFAT), 2: (VolumeKind.EXTENDED, None),
                     5: (VolumeKind.LOGICAL, Filesystem.EXT2), 6: (VolumeKind.LOGICAL, Filesystem.SWAP),
                     7: (VolumeKind.LOGICAL, Filesystem.LUKS)}
    sfdisk = json.loads(tool("sfdisk", "--json", guest_samples.root / "mbr.qcow2.raw")) if False else None
    del sfdisk
    for v in view.volumes:
        p = next((p for p in guest_samples.entry("mbr")["partitions"] if p["index"] == v.index), None)
        if p is not None:
            assert (v.start, v.length) == (p["offset"], p["length"])
    swap = next(v for v in view.volumes if v.index == 6)
    assert swap.fs is not None and swap.fs.label == "swap0" and swap.free_bytes is None
    luks = next(v for v in view.volumes if v.index == 7)
    assert luks.fs is not None and "opaque" in (luks.fs.note or "")


def disk_usage(path: Path) -> int:
    """Bytes of file data the host holds (SEEK_DATA/SEEK_HOLE): `du` without the host filesystem's
    own extent-tree blocks, which grow by a block now and then as holes are punched."""
    total = 0
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            total += end - pos
            pos = end
    return total


def discard_free_ranges(image: Path, view: GuestView) -> None:
    """What fstrim does through discard=unmap: one discard request per free range of every volume."""
    cmds: list[str] = []
    for v in view.volumes:
        if v.free_disk is None:
            continue
        for s, e in v.free_disk.pairs():
            cmds += ["-c", f"discard {s} {e - s}"]
    for i in range(0, len(cmds), 400):
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds[i : i + 400], str(image)], check=True, capture_output=True)


@pytest.mark.parametrize("sparse", ["never", "always"])
@pytest.mark.parametrize("name", ["cloud", "mbr", "xfs", "ntfs", "chain", "lvm", "variants"])
def test_reclaimable_bytes_match_a_discard_on_a_copy(guest_samples: GuestSamples, name: str, sparse: str,
                                                     tmp_path: Path) -> None:
    """With every host cluster allocated (a non-sparse copy) `du` drops by the reclaimable bytes; with
    holes inside clusters (a sparse copy) by `reclaimable-disk-usage`, which looks at the host file."""
    if name == "lvm" and not guest_samples.has("lvm"):
        pytest.skip("no loop device to build the LVM sample on")
    src = guest_samples.image(name)
    entry = guest_samples.entry(name)
    work = tmp_path / "copy"
    work.mkdir()
    copy = work / src.name
    subprocess.run(["cp", f"--sparse={sparse}", str(src), str(copy)], check=True)
    if "backing" in entry:
        subprocess.run(["cp", "--sparse=always", str(guest_samples.root / entry["backing"]), str(work)], check=True)
    view = view_of(copy)
    assert view.reclaimable_bytes > 0
    base_usage = disk_usage(work / entry["backing"]) if "backing" in entry else None
    before = disk_usage(copy)
    discard_free_ranges(copy, view)
    drop = before - disk_usage(copy)
    if sparse == "never":
        assert view.reclaimable_disk_usage == view.reclaimable_bytes
        assert drop == view.reclaimable_bytes
    else:
        # QEMU rewrites the L2 tables and refcount blocks it changes, filling any holes a sparse copy
        # made in them: the drop is short of the data freed by at most those tables' size.
        with open_image(copy) as img:
            tables = int((img.l1_table != 0).sum() + (img.refcount_table != 0).sum()) * img.cluster_size
        assert 0 <= view.reclaimable_disk_usage - drop <= tables
        assert view.reclaimable_disk_usage <= view.reclaimable_bytes
    after = view_of(copy)
    assert after.reclaimable_bytes == 0
    assert [v.free_bytes for v in after.volumes] == [v.free_bytes for v in view.volumes]
    if base_usage is not None:
        assert disk_usage(work / entry["backing"]) == base_usage
        assert after.layers[1].reclaimable_bytes == view.layers[1].reclaimable_bytes > 0
    subprocess.run(["qemu-img", "check", str(copy)], check=True, capture_output=True)


def test_cloud_deleted_directory_within_one_cluster(guest_samples: GuestSamples) -> None:
    """`guest` names the space the deletion of /usr/share/perl freed (dumpe2fs before/after) to within
    one cluster: the two runs of freed blocks lose at most their partial end clusters."""
    entry = guest_samples.entry("cloud")
    view = view_of(guest_samples.image("cloud"))
    ext4 = next(v for v in view.volumes if v.index == 2)
    assert ext4.fs is not None and ext4.fs.block_size
    runs = entry["freed-block-runs"]
    freed = sum(b - a for a, b in runs) * ext4.fs.block_size
    assert abs(ext4.reclaimable_bytes - freed) < view.cluster_size
    assert view.reclaimable_bytes == ext4.reclaimable_bytes
    # And every reclaimable cluster lies in blocks the deletion freed or that were free already.
    assert ext4.free_disk is not None
    assert view.reclaimable.subtract(ext4.free_disk).total == 0


def test_backing_chain_counts_reclaimable_per_layer(guest_samples: GuestSamples) -> None:
    chain = view_of(guest_samples.image("chain"))
    cloud = view_of(guest_samples.image("cloud"))
    assert len(chain.layers) == 2
    top, base = chain.layers
    assert top.depth == 0 and base.depth == 1
    # The overlay wrote a 6 MiB file and deleted it: the overlay holds it (128 KiB clusters, extended L2).
    assert 6 * 2**20 - top.cluster_size <= top.reclaimable_bytes <= 6 * 2**20 + 2 * top.cluster_size  # type: ignore[operator]
    # The base holds everything the base image had freed, plus what the overlay deleted of the base's files.
    assert base.reclaimable_bytes >= cloud.reclaimable_bytes


def test_cli_json_keys(guest_samples: GuestSamples) -> None:
    out = subprocess.run(["qinspect", "guest", "--output=json", str(guest_samples.image("mbr"))],
                         check=True, capture_output=True, text=True).stdout
    doc = json.loads(out)
    assert doc["partition-table"] == "mbr"
    for v in doc["volumes"]:
        assert {"index", "start", "length", "filesystem", "block-size", "free-bytes", "reclaimable-bytes"} <= set(v)
    assert doc["reclaimable-bytes"] == sum(v["reclaimable-bytes"] for v in doc["volumes"])
    human = subprocess.run(["qinspect", "guest", str(guest_samples.image("mbr"))], check=True,
                           capture_output=True, text=True).stdout
    assert "vfat" in human and "ext2" in human and "swap" in human and "crypto_LUKS" in human


def test_cli_on_a_non_disk_image(tmp_path: Path) -> None:
    img = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    doc = json.loads(subprocess.run(["qinspect", "guest", "--output=json", str(img)], check=True,
                                    capture_output=True, text=True).stdout)
    assert doc["partition-table"] is None
    assert doc["volumes"][0]["index"] == 0 and doc["volumes"][0]["filesystem"] is None
    assert doc["reclaimable-bytes"] == 0
    shutil.rmtree(tmp_path)


def test_lvm_logical_volumes_through_their_segments(guest_samples: GuestSamples) -> None:
    if not guest_samples.has("lvm"):
        pytest.skip("no loop device to build the LVM sample on")
    entry = guest_samples.entry("lvm")
    view = view_of(guest_samples.image("lvm"))
    pv = view.volumes[0]
    assert pv.filesystem == Filesystem.LVM2 and pv.name == "guestvg" and pv.problems == []
    lvs = {v.name: v for v in view.volumes if v.kind == VolumeKind.LVM_LV}
    assert set(lvs) == {"guestvg/root", "guestvg/data"}
    ext = 4 << 20
    part = entry["partitions"][0]["offset"]
    for name, segs in entry["segments"].items():
        lv = lvs[f"guestvg/{name}"]
        assert [(s.volume_offset, s.disk_offset, s.length) for s in lv.segments] == [
            (off, part + entry["pe-start"] + pe * ext, n * ext) for off, pe, n in segs]
        assert lv.parent == 0
    root, data = lvs["guestvg/root"], lvs["guestvg/data"]
    assert len(root.segments) == 2  # lvextend put the second segment after `data`
    assert root.filesystem == Filesystem.EXT4 and root.fs is not None and root.fs.free is not None
    lv_root = guest_samples.root / "lvm.lv-root"
    bs = block_size(lv_root)
    assert root.fs.free.pairs() == dumpe2fs_free(lv_root).scaled(bs).pairs()
    out = tool("fsck.fat", "-n", "-v", guest_samples.root / "lvm.lv-data")
    used, total = map(int, re.search(r"(\d+)/(\d+) clusters", out).groups())  # type: ignore[union-attr]
    assert data.fs is not None and data.fs.block_size
    assert data.free_bytes == (total - used) * data.fs.block_size
    # Free ranges of the root LV map to the disk through both segments.
    assert root.free_disk is not None
    seg2 = root.segments[1]
    assert any(seg2.disk_offset <= s < seg2.disk_offset + seg2.length for s, _ in root.free_disk.pairs())
    assert data.reclaimable_bytes >= 3 * 2**20 - 2 * view.cluster_size


def test_clusters_shared_with_a_snapshot_are_not_reclaimable(guest_samples: GuestSamples, tmp_path: Path) -> None:
    """After `qemu-img snapshot -c`, every data cluster has refcount 2: a discard frees nothing."""
    copy = tmp_path / "snap.qcow2"
    subprocess.run(["cp", "--sparse=never", str(guest_samples.image("cloud")), str(copy)], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "before-trim", str(copy)], check=True)
    view = view_of(copy)
    ext4 = next(v for v in view.volumes if v.index == 2)
    assert ext4.free_bytes == next(v for v in view_of(guest_samples.image("cloud")).volumes if v.index == 2).free_bytes
    assert view.reclaimable_bytes == 0
    before = disk_usage(copy)
    discard_free_ranges(copy, view_of(guest_samples.image("cloud")))
    # Nothing freed; the discards even copy the L2 tables the snapshot shares (copy-on-write).
    assert disk_usage(copy) >= before
