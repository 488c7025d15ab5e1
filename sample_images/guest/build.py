#!/usr/bin/env python3
"""Build the guest sample images (issue 13) with the real tools, in OUTDIR (sparse, ~10 s).

    python3 sample_images/guest/build.py OUTDIR

Each image is a raw disk assembled from partitions made by sgdisk/sfdisk and mkfs.* (populated
with mkfs.ext4 -d, mtools, ntfscp, an XFS protofile), converted to qcow2 with qemu-img. Then files
are deleted the way a guest would — debugfs -w rm, mdel/mdeltree, ntfstruncate, and for XFS a
re-mkfs without discard — on the raw partition file, and only the bytes that changed are written
into the qcow2 with `qemu-io -c 'write -s FILE OFF LEN'`, so the deleted data stays allocated in
the image. OUTDIR/manifest.json lists every image, its partitions (offset, size, the partition file
kept for the filesystem tools) and what was deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
CHUNK = 64 * 1024


def run(*cmd: str | os.PathLike[str], **kw: object) -> str:
    env = dict(os.environ, LC_ALL="C", MTOOLS_SKIP_CHECK="1")
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise SystemExit(f"build.py: {' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return str(r.stdout)


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def place(disk: Path, part: Path, offset: int) -> None:
    """Copy a partition file into the disk at `offset`, skipping zero chunks (stays sparse)."""
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while chunk := src.read(MiB):
            if chunk.count(0) != len(chunk):
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def to_qcow2(raw: Path, out: Path, *opts: str) -> None:
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, raw, out)


def changed_ranges(before: Path, after: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with open(before, "rb") as a, open(after, "rb") as b:
        pos = 0
        while True:
            x, y = a.read(CHUNK), b.read(CHUNK)
            if not x and not y:
                break
            if x != y:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + len(y))
                else:
                    out.append((pos, len(y)))
            pos += max(len(x), len(y))
    return out


def guest_writes(image: Path, part: Path, before: Path, offset: int, work: Path) -> int:
    """Write the chunks of `part` that differ from `before` into `image` at `offset` (qemu-io write -s)."""
    cmds: list[str] = []
    n = 0
    with open(part, "rb") as f:
        for k, (off, ln) in enumerate(changed_ranges(before, part)):
            f.seek(off)
            chunk = work / f"chunk{k}"
            chunk.write_bytes(f.read(ln))
            cmds += ["-c", f"write -s {chunk} {offset + off} {ln}"]
            n += ln
    for i in range(0, len(cmds), 200):
        run("qemu-io", "-f", "qcow2", *cmds[i : i + 200], image)
    for c in work.glob("chunk*"):
        c.unlink()
    return n


def tree(dst: Path, sources: dict[str, str]) -> None:
    for rel, src in sources.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target, symlinks=True, ignore_dangling_symlinks=True)
        else:
            shutil.copy(src, target)


def debugfs_rm_tree(part: Path, root: Path, rel: str) -> list[str]:
    """debugfs -w commands removing the directory `rel` of the tree at `root` (files, then dirs bottom-up)."""
    cmds: list[str] = []
    base = root / rel
    for dirpath, _dirnames, filenames in os.walk(base, topdown=False):
        d = "/" + str(Path(dirpath).relative_to(root))
        for fn in filenames:
            cmds.append(f'rm "{d}/{fn}"')
        cmds.append(f'rmdir "{d}"')
    script = part.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    run("debugfs", "-w", "-f", script, part)
    script.unlink()
    return cmds


def free_block_ranges(part: Path) -> set[int]:
    """Every free block of an ext filesystem, from dumpe2fs's per-group lists."""
    out: set[int] = set()
    for line in run("dumpe2fs", part).splitlines():
        line = line.strip()
        if line.startswith("Free blocks: ") and line[13:].strip():
            for item in line[13:].split(","):
                a, _, b = item.strip().partition("-")
                out.update(range(int(a), int(b or a) + 1))
    return out


def build_cloud(out: Path, work: Path) -> dict[str, object]:
    """GPT: EFI (FAT32) + ext4 root made with mkfs.ext4 -d from a real tree; then /usr/share/perl deleted."""
    disk = work / "cloud.raw"
    size = 320 * MiB
    sparse_file(disk, size)
    run("sgdisk", "-n", "1:2048:+64M", "-t", "1:ef00", "-c", "1:EFI", "-n", "2:0:0", "-t", "2:8300",
        "-c", "2:root", disk)
    p1_off, p1_len = 2048 * 512, 64 * MiB
    p2_off = p1_off + p1_len
    p2_len = (size // 512 - 33 - (p2_off // 512)) * 512  # GPT: last usable LBA = sectors - 34, inclusive
    root = work / "rootfs"
    tree(root, {"etc/zoneinfo": "/usr/share/zoneinfo", "usr/share/perl": "/usr/share/perl",
                "usr/lib/python3.11/email": "/usr/lib/python3.11/email",
                "usr/lib/python3.11/json": "/usr/lib/python3.11/json",
                "usr/lib/python3.11/http": "/usr/lib/python3.11/http",
                "usr/lib/python3.11/logging": "/usr/lib/python3.11/logging"})
    efi = work / "cloud.p1"
    sparse_file(efi, p1_len)
    run("mkfs.vfat", "-F", "32", "-n", "EFI", efi)
    (work / "grubx64.efi").write_bytes(os.urandom(300 * 1024))
    run("mmd", "-i", efi, "::/EFI", "::/EFI/debian")
    run("mcopy", "-i", efi, work / "grubx64.efi", "::/EFI/debian/grubx64.efi")
    rootp = work / "cloud.p2"
    sparse_file(rootp, p2_len)
    run("mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs", "-d", root, rootp)
    place(disk, efi, p1_off)
    place(disk, rootp, p2_off)
    img = out / "cloud.qcow2"
    to_qcow2(disk, img)
    before = work / "cloud.p2.before"
    shutil.copy(rootp, before)
    free_before = free_block_ranges(rootp)
    debugfs_rm_tree(rootp, root, "usr/share/perl")
    freed = sorted(free_block_ranges(rootp) - free_before)
    written = guest_writes(img, rootp, before, p2_off, work)
    before.unlink()
    shutil.move(str(efi), out / "cloud.p1")
    shutil.move(str(rootp), out / "cloud.p2")
    deleted = sum(f.stat().st_size for f in (root / "usr/share/perl").rglob("*") if f.is_file())
    shutil.rmtree(root)
    runs: list[list[int]] = []
    for b in freed:  # the blocks the deletion freed, as runs [first, end)
        if runs and runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, b + 1])
    return {"name": "cloud", "file": "cloud.qcow2", "table": "gpt", "deleted": "/usr/share/perl",
            "deleted-bytes": deleted, "guest-written": written, "freed-block-runs": runs,
            "partitions": [{"index": 1, "offset": p1_off, "length": p1_len, "fs": "vfat", "file": "cloud.p1"},
                           {"index": 2, "offset": p2_off, "length": p2_len, "fs": "ext4", "file": "cloud.p2"}]}


def build_mbr(out: Path, work: Path) -> dict[str, object]:
    """MBR: FAT16 primary, extended with ext2 (1 KiB blocks), swap and a LUKS-header logical partitions."""
    disk = work / "mbr.raw"
    size = 128 * MiB
    sparse_file(disk, size)
    layout = ("label: dos\n"
              "start=2048, size=65536, type=6\n"
              "start=67584, type=5\n"
              "start=69632, size=65536, type=83\n"
              "start=137216, size=16384, type=82\n"
              "start=155648, size=8192, type=83\n")
    run("sfdisk", "-q", disk, input=layout)
    parts = [(1, 2048, 65536, "vfat"), (5, 69632, 65536, "ext2"), (6, 137216, 16384, "swap"),
             (7, 155648, 8192, "crypto_LUKS")]
    files = {}
    for idx, _start, n, fs in parts:
        p = work / f"mbr.p{idx}"
        sparse_file(p, n * 512)
        files[idx] = p
        if fs == "vfat":
            run("mkfs.vfat", "-F", "16", "-n", "DATA", p)
        elif fs == "ext2":
            run("mkfs.ext2", "-q", "-F", "-b", "1024", "-L", "boot", p)
        elif fs == "swap":
            run("mkswap", "-L", "swap0", p)
        else:
            # A LUKS1 header's fixed fields (cryptsetup is not installed): magic, version, cipher, uuid.
            hdr = bytearray(4096)
            hdr[0:6] = b"LUKS\xba\xbe"
            hdr[6:8] = (1).to_bytes(2, "big")
            hdr[8:11] = b"aes"
            hdr[40:51] = b"xts-plain64"
            hdr[168:204] = b"6b1a1d6e-4a37-4a9e-9c0b-5d2a9f0e7c11"
            p.write_bytes(bytes(hdr) + os.urandom(256 * 1024) + bytes(n * 512 - 4096 - 256 * 1024))
    blob = work / "blob"
    for k in range(6):
        blob.write_bytes(os.urandom((k + 1) * 200 * 1024))
        run("mcopy", "-i", files[1], blob, f"::/file{k}.bin")
    run("mmd", "-i", files[1], "::/logs")
    for k in range(20):
        blob.write_bytes(os.urandom(40 * 1024))
        run("mcopy", "-i", files[1], blob, f"::/logs/log{k}.txt")
    ext2root = work / "ext2root"
    tree(ext2root, {"grub": "/usr/share/zoneinfo/Europe", "old-kernels": "/usr/share/zoneinfo/America"})
    blob.write_bytes(os.urandom(3 * MiB))
    shutil.copy(blob, ext2root / "old-kernels" / "vmlinuz-old")
    subprocess.run(["mkfs.ext2", "-q", "-F", "-b", "1024", "-L", "boot", "-d", ext2root, files[5]], check=True,
                   capture_output=True)
    for idx, s, _n, _fs in parts:
        place(disk, files[idx], s * 512)
    img = out / "mbr.qcow2"
    to_qcow2(disk, img)
    b1, b5 = work / "p1.before", work / "p5.before"
    shutil.copy(files[1], b1)
    shutil.copy(files[5], b5)
    run("mdel", "-i", files[1], "::/file3.bin", "::/file5.bin")
    run("mdeltree", "-i", files[1], "::/logs")
    debugfs_rm_tree(files[5], ext2root, "old-kernels")
    guest_writes(img, files[1], b1, 2048 * 512, work)
    guest_writes(img, files[5], b5, 69632 * 512, work)
    b1.unlink()
    b5.unlink()
    shutil.rmtree(ext2root)
    for idx in files:
        shutil.move(str(files[idx]), out / f"mbr.p{idx}")
    return {"name": "mbr", "file": "mbr.qcow2", "table": "mbr",
            "partitions": [{"index": i, "offset": s * 512, "length": n * 512, "fs": fs, "file": f"mbr.p{i}"}
                           for i, s, n, fs in parts]}


def build_xfs(out: Path, work: Path) -> dict[str, object]:
    """GPT with one XFS partition (protofile-populated), then re-made with fewer files (mkfs.xfs -K)."""
    disk = work / "xfs.raw"
    size = 340 * MiB
    sparse_file(disk, size)
    run("sgdisk", "-n", "1:2048:0", "-t", "1:8300", "-c", "1:data", disk)
    off = 2048 * 512
    length = (size // 512 - 33 - 2048) * 512
    part = work / "xfs.p1"
    sparse_file(part, length)
    blobs = []
    for k in range(8):
        b = work / f"x{k}.bin"
        b.write_bytes(os.urandom((k + 1) * 512 * 1024))
        blobs.append(b)

    def proto(files: list[Path]) -> Path:
        p = work / "proto"
        lines = ["/dev/null", "0 0", "d--755 0 0"]
        lines += [f"{b.name} ---644 0 0 {b}" for b in files]
        p.write_text("\n".join([*lines, "$", ""]))
        return p

    run("mkfs.xfs", "-q", "-f", "-K", "-L", "xdata", "-p", proto(blobs), part)
    place(disk, part, off)
    img = out / "xfs.qcow2"
    to_qcow2(disk, img)
    before = work / "xfs.before"
    shutil.copy(part, before)
    # The guest reformats without discard and keeps only two of the files.
    run("mkfs.xfs", "-q", "-f", "-K", "-L", "xdata", "-p", proto(blobs[:2]), part)
    guest_writes(img, part, before, off, work)
    before.unlink()
    shutil.move(str(part), out / "xfs.p1")
    return {"name": "xfs", "file": "xfs.qcow2", "table": "gpt",
            "partitions": [{"index": 1, "offset": off, "length": length, "fs": "xfs", "file": "xfs.p1"}]}


def build_ntfs(out: Path, work: Path) -> dict[str, object]:
    """NTFS on the whole disk (no partition table), files copied with ntfscp, two truncated to 0."""
    disk = work / "ntfs.raw"
    size = 96 * MiB
    sparse_file(disk, size)
    run("mkntfs", "-q", "-F", "-f", "-L", "win", disk)
    for k in range(5):
        b = work / f"n{k}.bin"
        b.write_bytes(os.urandom((k + 1) * 700 * 1024))
        run("ntfscp", "-f", disk, b, f"file{k}.bin")
    img = out / "ntfs.qcow2"
    to_qcow2(disk, img)
    before = work / "ntfs.before"
    shutil.copy(disk, before)
    inodes = {ln.split()[1]: ln.split()[0] for ln in run("ntfsls", "-f", "-i", disk).splitlines() if ln.strip()}
    for name in ("file2.bin", "file4.bin"):
        run("ntfstruncate", "-f", disk, inodes[name], "0")
    guest_writes(img, disk, before, 0, work)
    before.unlink()
    shutil.move(str(disk), out / "ntfs.p0")
    return {"name": "ntfs", "file": "ntfs.qcow2", "table": None,
            "partitions": [{"index": 0, "offset": 0, "length": size, "fs": "ntfs", "file": "ntfs.p0"}]}


def build_chain(out: Path, work: Path, cloud: dict[str, object]) -> dict[str, object]:
    """An overlay on a copy of cloud.qcow2 where the guest wrote a big file, then deleted it
    and part of the base's data: reclaimable space in both layers."""
    parts = cloud["partitions"]
    assert isinstance(parts, list)
    p2 = parts[1]
    base = out / "chain-base.qcow2"
    shutil.copy(out / "cloud.qcow2", base)
    over = out / "chain.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b",
        "chain-base.qcow2", "-F", "qcow2", over)
    part = work / "chain.p2"
    shutil.copy(out / "cloud.p2", part)
    before = work / "chain.before"
    shutil.copy(part, before)
    blob = work / "big.bin"
    blob.write_bytes(os.urandom(6 * MiB))
    run("debugfs", "-w", "-R", f"write {blob} big.bin", part)
    guest_writes(over, part, before, p2["offset"], work)
    shutil.copy(part, before)
    run("debugfs", "-w", "-f", "-", part, input='rm "/big.bin"\nrm "/etc/zoneinfo/zone.tab"\n'
        'rm "/etc/zoneinfo/iso3166.tab"\nrm "/usr/lib/python3.11/email/_header_value_parser.py"\n')
    guest_writes(over, part, before, p2["offset"], work)
    before.unlink()
    shutil.move(str(part), out / "chain.p2")
    return {"name": "chain", "file": "chain.qcow2", "table": "gpt", "backing": "chain-base.qcow2",
            "partitions": [parts[0], {**p2, "file": "chain.p2"}]}


def lvm_segments(cfg: str, vg: str) -> dict[str, list[tuple[int, int, int]]]:
    """Per LV: (LV byte offset, PV extent, extents) of each segment, from `lvs --reportformat json`."""
    out = run("lvs", "--config", cfg, "--reportformat", "json", "--units", "b", "-o",
              "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges,vg_extent_size", vg)
    segs: dict[str, list[tuple[int, int, int]]] = {}
    for row in json.loads(out)["report"][0]["lv"]:
        ext = int(row["vg_extent_size"].rstrip("B"))
        pe = int(row["seg_pe_ranges"].split(":")[1].split("-")[0])
        segs.setdefault(row["lv_name"], []).append((int(row["seg_start_pe"]) * ext, pe, int(row["seg_size_pe"])))
    return segs


def build_lvm(out: Path, work: Path) -> dict[str, object] | None:
    """GPT with one LVM partition: VG `guestvg` with LV `root` (ext4, two non-adjacent segments) and
    `data` (vfat), made by pvcreate/vgcreate/lvcreate on a loop device without device-mapper
    (activation=0); the LVs' filesystems are written through their segments as `lvs` reports them.
    None when no loop device can be set up (not root, or no loop driver)."""
    disk = work / "lvm.raw"
    size = 96 * MiB
    sparse_file(disk, size)
    run("sgdisk", "-n", "1:2048:0", "-t", "1:8e00", "-c", "1:lvm", disk)
    p_off = 2048 * 512
    p_len = (size // 512 - 33 - 2048) * 512
    pv = work / "lvm.p1"
    sparse_file(pv, p_len)
    r = subprocess.run(["losetup", "-f", "--show", str(pv)], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    loop = r.stdout.strip()
    cfg = (f'devices {{ filter=["a|^{loop}$|","r|.*|"] }} activation {{ udev_sync=0 udev_rules=0 }} '
           "global { activation=0 }")
    try:
        run("pvcreate", "-q", "--config", cfg, loop)
        run("vgcreate", "-q", "--config", cfg, "-s", "4M", "guestvg", loop)
        run("lvcreate", "-q", "--config", cfg, "-an", "-Zn", "-L", "24M", "-n", "root", "guestvg")
        run("lvcreate", "-q", "--config", cfg, "-an", "-Zn", "-L", "16M", "-n", "data", "guestvg")
        run("lvextend", "-q", "--config", cfg, "-L", "+8M", "guestvg/root")
        segs = lvm_segments(cfg, "guestvg")
        pe_start = int(run("pvs", "--config", cfg, "--noheadings", "--units", "b", "-o", "pe_start",
                           loop).strip().rstrip("B"))
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    ext = 4 * MiB
    lv_files = {}
    for name in ("root", "data"):
        f = work / f"lv-{name}"
        sparse_file(f, sum(n for _o, _pe, n in segs[name]) * ext)
        lv_files[name] = f
    root = work / "lvroot"
    tree(root, {"etc/zoneinfo": "/usr/share/zoneinfo/Europe", "var/cache": "/usr/share/zoneinfo/America"})
    run("mkfs.ext4", "-q", "-F", "-d", root, lv_files["root"])
    run("mkfs.vfat", lv_files["data"])
    blob = work / "blob"
    blob.write_bytes(os.urandom(3 * MiB))
    run("mcopy", "-i", lv_files["data"], blob, "::/backup.tar")

    def to_pv(name: str, off: int, ln: int) -> list[tuple[int, int]]:
        """LV byte range -> PV byte ranges."""
        out_ = []
        for lv_off, pe, n in segs[name]:
            lo, hi = max(off, lv_off), min(off + ln, lv_off + n * ext)
            if lo < hi:
                out_.append((pe_start + pe * ext + lo - lv_off, hi - lo))
        return out_

    with open(pv, "r+b") as dst:
        for name, f in lv_files.items():
            data = f.read_bytes()
            for lv_off, pe, n in segs[name]:
                chunk = data[lv_off : lv_off + n * ext]
                for k in range(0, len(chunk), MiB):
                    piece = chunk[k : k + MiB]
                    if piece.count(0) != len(piece):
                        dst.seek(pe_start + pe * ext + k)
                        dst.write(piece)
    place(disk, pv, p_off)
    img = out / "lvm.qcow2"
    to_qcow2(disk, img)
    # The guest deletes /var/cache in root and the backup in data; the changed LV bytes go to the image.
    for name, f in lv_files.items():
        before = work / f"{name}.before"
        shutil.copy(f, before)
        if name == "root":
            debugfs_rm_tree(f, root, "var/cache")
        else:
            run("mdel", "-i", f, "::/backup.tar")
        cmds: list[str] = []
        with open(f, "rb") as src:
            for k, (off, ln) in enumerate(changed_ranges(before, f)):
                lv_at = off
                for j, (pv_off, n) in enumerate(to_pv(name, off, ln)):
                    src.seek(lv_at)
                    lv_at += n
                    chunk = work / f"chunk{name}{k}_{j}"
                    chunk.write_bytes(src.read(n))
                    cmds += ["-c", f"write -s {chunk} {p_off + pv_off} {n}"]
        for i in range(0, len(cmds), 200):
            run("qemu-io", "-f", "qcow2", *cmds[i : i + 200], img)
        before.unlink()
        shutil.move(str(f), out / f"lvm.lv-{name}")
    shutil.rmtree(root)
    shutil.move(str(pv), out / "lvm.p1")
    return {"name": "lvm", "file": "lvm.qcow2", "table": "gpt", "pe-start": pe_start,
            "segments": {k: [list(x) for x in v] for k, v in segs.items()},
            "partitions": [{"index": 1, "offset": p_off, "length": p_len, "fs": "LVM2_member", "file": "lvm.p1"}],
            "lvs": [{"name": "guestvg/root", "fs": "ext4", "file": "lvm.lv-root"},
                    {"name": "guestvg/data", "fs": "vfat", "file": "lvm.lv-data"}]}


def build_variants(out: Path, work: Path) -> dict[str, object]:
    """GPT with one filesystem of each less common kind, each with files then some deleted:
    ext3 (4 KiB blocks, no extents), ext4 bigalloc (16 KiB clusters), FAT12, ext4 meta_bg, XFS v4."""
    specs = [  # (index, MiB, fs, mkfs argv without the target)
        (1, 32, "ext3", ["mkfs.ext3", "-q", "-F", "-b", "4096"]),
        (2, 48, "ext4", ["mkfs.ext4", "-q", "-F", "-O", "bigalloc", "-C", "16384"]),
        (3, 4, "vfat", ["mkfs.vfat", "-F", "12"]),
        (4, 40, "ext4", ["mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "meta_bg,^resize_inode"]),
        (5, 320, "xfs", ["mkfs.xfs", "-q", "-f", "-K", "-m", "crc=0,finobt=0,rmapbt=0,reflink=0"]),
    ]
    size = (sum(m for _i, m, _f, _c in specs) + 2) * MiB
    disk = work / "variants.raw"
    sparse_file(disk, size)
    args: list[str] = []
    lba = 2048
    parts = []
    for idx, mib, fs, _cmd in specs:
        n = mib * MiB // 512
        args += ["-n", f"{idx}:{lba}:{lba + n - 1}"]
        parts.append({"index": idx, "offset": lba * 512, "length": n * 512, "fs": fs, "file": f"variants.p{idx}"})
        lba += n
    run("sgdisk", *args, disk)
    root = work / "vroot"
    tree(root, {"keep": "/usr/share/zoneinfo/Europe", "gone": "/usr/share/zoneinfo/America"})
    big = root / "gone" / "big.bin"
    big.write_bytes(os.urandom(2 * MiB))
    files: dict[int, Path] = {}
    blob = work / "blob"
    for (idx, _mib, fs, cmd), p in zip(specs, parts, strict=True):
        f = work / f"variants.p{idx}"
        sparse_file(f, int(p["length"]))  # type: ignore[call-overload]
        files[idx] = f
        if fs.startswith("ext"):
            run(*cmd, "-d", root, f)
        elif fs == "vfat":
            run(*cmd, f)
            for k in range(5):
                blob.write_bytes(os.urandom(300 * 1024))
                run("mcopy", "-i", f, blob, f"::/f{k}.bin")
        else:
            bl = [work / f"v{k}.bin" for k in range(4)]
            for k, b in enumerate(bl):
                b.write_bytes(os.urandom((k + 1) * MiB))
            proto = work / "vproto"
            proto.write_text("\n".join(["/dev/null", "0 0", "d--755 0 0",
                                        *[f"{b.name} ---644 0 0 {b}" for b in bl], "$", ""]))
            run(*cmd, "-p", proto, f)
        place(disk, f, int(p["offset"]))  # type: ignore[call-overload]
    img = out / "variants.qcow2"
    to_qcow2(disk, img)
    for (idx, _mib, fs, cmd), p in zip(specs, parts, strict=True):
        f = files[idx]
        before = work / "before"
        shutil.copy(f, before)
        if fs.startswith("ext"):
            debugfs_rm_tree(f, root, "gone")
        elif fs == "vfat":
            run("mdel", "-i", f, "::/f1.bin", "::/f3.bin")
        else:
            proto = work / "vproto"
            proto.write_text("\n".join(["/dev/null", "0 0", "d--755 0 0", f"v0.bin ---644 0 0 {work / 'v0.bin'}",
                                        "$", ""]))
            run(*cmd, "-p", proto, f)
        guest_writes(img, f, before, int(p["offset"]), work)  # type: ignore[call-overload]
        before.unlink()
        shutil.move(str(f), out / f"variants.p{idx}")
    shutil.rmtree(root)
    return {"name": "variants", "file": "variants.qcow2", "table": "gpt", "partitions": parts}


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    images = []
    cloud = build_cloud(out, work)
    images.append(cloud)
    images.append(build_chain(out, work, cloud))
    images.append(build_mbr(out, work))
    images.append(build_xfs(out, work))
    images.append(build_ntfs(out, work))
    images.append(build_variants(out, work))
    lvm = build_lvm(out, work)
    if lvm is not None:
        images.append(lvm)
    shutil.rmtree(work)
    for f in [*out.glob("*.p[0-9]"), *out.glob("*.lv-*")]:
        run("fallocate", "--dig-holes", f)  # keep the partition files sparse
    (out / "manifest.json").write_text(json.dumps(images, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
