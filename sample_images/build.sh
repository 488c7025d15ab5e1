#!/usr/bin/env bash
# Rebuild every sample image of the qinspect test corpus, then capture the qemu-img goldens.
#
#   bash sample_images/build.sh          (from any directory; ~30 s)
#
# Everything is made with qemu-img / qemu-io (QEMU 7.2).  Byte patches are used ONLY for the
# deliberately malformed images (and the zero tail of holes.qcow2); each one is commented where
# it happens.  All images are rewritten
# non-sparse before the goldens are captured (git checkouts are not sparse, and `qemu-img map`
# looks at host-file holes), files > 1 MiB are stored as NAME.gz (gzip -9n), and the goldens are
# captured from a fresh directory holding exactly what is committed (decompressed).
#
# catalog.json (hand-maintained, next to this script) lists the images that get goldens.
set -euo pipefail
export LC_ALL=C
ulimit -c 0   # qemu-io `abort` must not leave core files around

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qinspect-samples.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
B=$WORK/build
mkdir -p "$B"
# Every file is committed gzip'd (NAME.gz; the folder stays at a few MB) except the showcase
# images in KEEP_PLAIN, which the README and screenshots open directly. The "file" fields of
# catalog.json are updated to match. GZIP_OVER=N keeps files of at most N bytes plain too.
GZIP_OVER=${GZIP_OVER:-0}
KEEP_PLAIN=" basic64k.qcow2 extl2_128k.qcow2 "
cd "$B"

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
cat >"$WORK/qhelp.py" <<'PY'
"""Tiny qcow2 helper for build.sh: non-sparse copies and the documented malformations."""
import struct
import sys


def header(f):
    f.seek(0)
    h = f.read(104)
    (magic, ver, _bfo, _bfs, cbits, _size, _crypt, l1_size, l1_off, rt_off, rt_clusters,
     _nsn, _sno) = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
    assert magic == 0x514649FB, "not qcow2"
    incompat, refcount_order = 0, 4
    if ver >= 3:
        incompat, _compat, _auto, refcount_order, _hlen = struct.unpack(">QQQII", h[72:104])
    return dict(cs=1 << cbits, l1_size=l1_size, l1_off=l1_off, rt_off=rt_off,
                rt_clusters=rt_clusters, incompat=incompat, rbits=1 << refcount_order,
                ext_l2=bool(incompat & 16))


def u64(f, off):
    f.seek(off)
    return struct.unpack(">Q", f.read(8))[0]


def l2_slot(f, h, guest):
    """Byte offset of the active L2 entry for a guest offset."""
    esize = 16 if h["ext_l2"] else 8
    per = h["cs"] // esize
    ci = guest // h["cs"]
    l1e = u64(f, h["l1_off"] + 8 * (ci // per)) & 0x00FFFFFFFFFFFE00
    assert l1e, "guest offset has no L2 table"
    return l1e + esize * (ci % per)


def host_of(f, h, guest):
    e = u64(f, l2_slot(f, h, guest))
    assert not e & (1 << 62), "compressed"
    off = e & 0x00FFFFFFFFFFFE00
    assert off, "unallocated"
    return off


def set_refcount(f, h, host, value):
    cs, rb = h["cs"], h["rbits"]
    per_block = cs * 8 // rb
    ci = host // cs
    block = u64(f, h["rt_off"] + 8 * (ci // per_block)) & ~0x1FF
    assert block, "no refcount block"
    i = ci % per_block
    if rb >= 8:
        f.seek(block + i * rb // 8)
        f.write(value.to_bytes(rb // 8, "big"))
    else:
        pos = block + i * rb // 8
        f.seek(pos)
        byte = f.read(1)[0]
        shift = (i % (8 // rb)) * rb
        mask = ((1 << rb) - 1) << shift
        byte = (byte & ~mask) | ((value << shift) & mask)
        f.seek(pos)
        f.write(bytes([byte]))


def num(s):
    """Integer with an optional qemu-style k/M/G suffix."""
    mult = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s, 0) * mult


def main():
    cmd, path, *args = sys.argv[1:]
    if cmd == "densify":
        # densify FILE...: rewrite each file so that every byte is really written (no holes):
        # copy it with plain write() calls to a new file, then rename over the original.
        import os
        for p in [path, *args]:
            with open(p, "rb") as src, open(p + ".dense", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(p + ".dense", p)
        return
    with open(path, "r+b") as f:
        h = header(f)
        if cmd == "host-of":
            print(host_of(f, h, num(args[0])))
        elif cmd == "set-refcount":           # set-refcount HOST_OFFSET VALUE
            set_refcount(f, h, num(args[0]), int(args[1], 0))
        elif cmd == "set-incompat-bit":       # set-incompat-bit BIT
            f.seek(72)
            f.write(struct.pack(">Q", h["incompat"] | (1 << int(args[0]))))
        elif cmd == "set-l2-bitmap":          # set-l2-bitmap GUEST_OFFSET BITMAP (extended L2)
            assert h["ext_l2"]
            f.seek(l2_slot(f, h, num(args[0])) + 8)
            f.write(struct.pack(">Q", int(args[1], 0)))
        elif cmd == "get-l2-bitmap":
            assert h["ext_l2"]
            print(hex(u64(f, l2_slot(f, h, num(args[0])) + 8)))
        else:
            raise SystemExit(f"unknown command {cmd}")


main()
PY
qh() { python3 "$WORK/qhelp.py" "$@"; }

# qio FILE CMD...: qemu-io on a qcow2 file, one -c per CMD; any stderr output is fatal.
qio() {
    local file=$1; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if ! qemu-io -f qcow2 "${args[@]}" "$file" >"$WORK/qio.out" 2>"$WORK/qio.err" || [ -s "$WORK/qio.err" ]; then
        echo "qemu-io failed on $file:" >&2; cat "$WORK/qio.out" "$WORK/qio.err" >&2; exit 1
    fi
}
# qio_abort FILE CMD...: same, then `abort` (simulated crash: SIGABRT, so the exit status is ignored).
qio_abort() {
    local file=$1; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    # the subshell swallows bash's "Aborted" job message
    ( qemu-io -f qcow2 "${args[@]}" -c abort "$file" >/dev/null 2>&1 || true ) 2>/dev/null
}
mk() { qemu-img create -q -f qcow2 "$@"; }

# ---------------------------------------------------------------------------------------------
# plain layouts
# ---------------------------------------------------------------------------------------------

# basic64k: default options. NORMAL, ZERO_PLAIN (write -z on unallocated), ZERO_ALLOC (write -z
# over data, no unmap), ZERO_PLAIN from `write -z -u` over data (its host cluster is freed, and
# the next allocation, guest 5M, reuses it).
mk basic64k.qcow2 64M
qio basic64k.qcow2 \
    "write -P 0xab 0 4k" "write -z 1M 64k" "write -P 0xcd 2M 128k" \
    "write -P 0xef 3M 64k" "write -z 3M 64k" \
    "write -P 0x5a 4M 64k" "write -z -u 4M 64k" \
    "write -P 0x77 5M 64k"

# c512: 512-byte clusters (an L2 table maps 32 KiB, a refcount block covers 128 KiB of file,
# so this image has several of both), plus compressed clusters at the smallest cluster size
# (compressed descriptor: 61 offset bits, 1 sector-count bit).  One `write -c` per cluster: a
# multi-cluster `write -c` compresses the clusters in parallel and allocates them in a random order.
mk -o cluster_size=512 c512.qcow2 16M
qio c512.qcow2 \
    "write -P 0x21 0 4k" "write -P 0x22 31k 2k" "write -P 0x23 1M 1k" "write -z 1040k 512" \
    "write -P 0x24 8191k 1k" "write -P 0x25 15M 64k" "write -P 0x26 12M 192k" \
    "write -c -P 0x27 $((14 << 20)) 512" "write -c -P 0x28 $(((14 << 20) + 512)) 512" \
    "write -c -P 0x29 $(((14 << 20) + 1024)) 512" "write -c -P 0x2a $(((14 << 20) + 1536)) 512"

# c4k: 4 KiB clusters (an L2 table maps 2 MiB).
mk -o cluster_size=4k c4k.qcow2 64M
qio c4k.qcow2 \
    "write -P 0x31 0 64k" "write -P 0x32 2044k 8k" "write -z 4M 4k" "write -P 0x33 4100k 4k" \
    "write -P 0x34 40M 1M"

# v2: compat=0.10.  v2 has no zero flag: a whole-cluster `write -z` without a backing file is
# turned into a discard (cluster deallocated), a partial one writes real zeros.
mk -o compat=0.10 v2.qcow2 64M
qio v2.qcow2 \
    "write -P 0x41 0 128k" "write -z 64k 64k" "write -P 0x42 1M 64k" "write -z 1M 4k" \
    "write -z 2M 64k" "write -P 0x43 3M 64k"
# v2_backed: v2 overlay on v2.qcow2; here `write -z` must write real zero clusters because the
# backing data has to be hidden (no zero flag in v2).
mk -o compat=0.10 -b v2.qcow2 -F qcow2 v2_backed.qcow2
qio v2_backed.qcow2 "write -z 0 64k" "write -z 3M 64k" "write -P 0x44 5M 64k"

# extended L2 at three cluster sizes: same guest pattern scaled to the cluster (CL) and
# subcluster (SC) size.
ext_image() {
    local name=$1 cl=$2 size=$3
    local sc=$((cl / 32))
    mk -o extended_l2=on,cluster_size=$cl "$name" "$size"
    qio "$name" \
        "write -P 0x51 0 4k" \
        "write -P 0x52 8k 2k" \
        "write -z $cl $cl" \
        "write -P 0x53 $((2 * cl)) $cl" \
        "write -z $((2 * cl)) $sc" \
        "write -z $((2 * cl + 4 * sc)) $((2 * sc))" \
        "write -z $((3 * cl)) $((2 * sc))" \
        "write -P 0x54 $((4 * cl + 3 * sc)) $((sc / 2))" \
        "write -P 0x55 $((4 * cl + 20 * sc)) $((3 * sc))"
}
ext_image extl2_64k.qcow2 $((64 << 10)) 64M
ext_image extl2_128k.qcow2 $((128 << 10)) 64M
ext_image extl2_2m.qcow2 $((2 << 20)) 64M

# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------
# Half-random 64 KiB buffers (30000 seeded-random bytes + a constant tail) compress to ~30 KiB,
# so the third one cannot fit in the rest of its host cluster and runs into the next one.
python3 - <<'PY'
import random
r = random.Random(1)
for i in range(3):
    d = bytes(r.getrandbits(8) for _ in range(30000)) + bytes([0x40 + i]) * (65536 - 30000)
    open(f"semi{i}.bin", "wb").write(d)
PY
for ct in zlib zstd; do
    mk -o compression_type=$ct $ct.qcow2 16M
    qio $ct.qcow2 \
        "write -P 0x13 128k 64k" \
        "write -c -P 0x11 0 64k" "write -c -P 0x12 64k 64k" \
        "write -c -s semi0.bin 192k 64k" "write -c -s semi1.bin 256k 64k" \
        "write -c -s semi2.bin 320k 64k" \
        "write -c -P 0x14 1M 64k"
done
rm -f semi?.bin

# ---------------------------------------------------------------------------------------------
# backing chains
# ---------------------------------------------------------------------------------------------
mk chain_base.qcow2 8M
qio chain_base.qcow2 "write -P 0xb0 0 1M" "write -P 0xb1 4M 64k" "write -P 0xb2 7M 1M"
mk -b chain_base.qcow2 -F qcow2 chain_mid.qcow2 8M
qio chain_mid.qcow2 "write -P 0x3d 512k 64k" "write -P 0x3e 6M 64k" "write -z 7M 64k"
mk -o extended_l2=on -b chain_mid.qcow2 -F qcow2 chain_top.qcow2 16M
qio chain_top.qcow2 \
    "write -P 0x70 4k 4k" "write -z 600k 64k" "write -P 0x71 6145k 1k" \
    "write -P 0x72 10M 64k" "write -z 12M 64k" "write -P 0x73 8190k 4k"

# raw backing file (1 MiB, committed plain) under a qcow2 overlay that is larger than it.
qemu-img create -q -f raw rawback.raw 1M
qemu-io -f raw -c "write -P 0x99 0 256k" -c "write -P 0x9a 768k 128k" rawback.raw >/dev/null
mk -b rawback.raw -F raw overlay_raw.qcow2 4M
qio overlay_raw.qcow2 "write -P 0x9b 128k 64k" "write -z 800k 64k" "write -P 0x9c 2M 64k"

# longchain_0 <- ... <- longchain_4 (5 layers)
mk longchain_0.qcow2 4M
qio longchain_0.qcow2 "write -P 0x60 0 1M"
for k in 1 2 3 4; do
    mk -b longchain_$((k - 1)).qcow2 -F qcow2 longchain_$k.qcow2 4M
    qio longchain_$k.qcow2 "write -P $((0x60 + k)) $((k * 64))k 64k" "write -P $((0x68 + k)) $((k * 512 + 1024))k 4k"
done

# bigclusters_backing: 1 MiB clusters, no extended L2, over a 64k base: each small write copies
# a whole 1 MiB cluster from the backing file.
mk bigclusters_base.qcow2 16M
qio bigclusters_base.qcow2 "write -P 0xc0 0 4M"
mk -o cluster_size=1M -b bigclusters_base.qcow2 -F qcow2 bigclusters_backing.qcow2 16M
qio bigclusters_backing.qcow2 "write -P 0xc1 4k 4k" "write -P 0xc2 3M 4k" "write -P 0xc3 8M 4k"

# dup_base <- dup_top: top has all-zero data clusters (write -P 0, not -z) and clusters that
# duplicate what the base already holds.
mk dup_base.qcow2 16M
qio dup_base.qcow2 "write -P 0xd0 0 1M" "write -P 0xd2 2M 256k"
mk -b dup_base.qcow2 -F qcow2 dup_top.qcow2 16M
qio dup_top.qcow2 \
    "write -P 0xd0 0 64k" "write -P 0xd0 128k 128k" "write -P 0xd2 2M 64k" \
    "write -P 0 256k 64k" "write -P 0 4M 128k" "write -P 0xd1 1M 64k"

# ---------------------------------------------------------------------------------------------
# snapshots, bitmaps
# ---------------------------------------------------------------------------------------------
mk snapshots.qcow2 16M
qio snapshots.qcow2 "write -P 0xa1 0 256k" "write -P 0xa2 1M 64k"
qemu-img snapshot -c first snapshots.qcow2
qio snapshots.qcow2 "write -P 0xa3 0 64k" "write -P 0xa4 2M 64k"
qemu-img snapshot -c second snapshots.qcow2
qio snapshots.qcow2 "write -P 0xa5 2M 64k" "write -P 0xa6 1M 64k"
qemu-img snapshot -c third snapshots.qcow2
qio snapshots.qcow2 "write -P 0xa7 64k 192k" "write -P 0xa8 2M 64k" "write -P 0xa9 3M 64k"
# -> first alone holds old guest 0, second alone old 2M (0xa4), third alone old 2M (0xa5);
#    the three snapshots share old 64k..256k, which the active layer no longer references.

# bitmaps: both bitmaps are enabled while the first writes happen (qemu-io opens the image
# read/write, loads the persistent bitmaps and records into the enabled ones); then
# 'bitmap-two' is disabled and only 'b0' records the second round.
mk bitmaps.qcow2 16M
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 128k bitmaps.qcow2 bitmap-two
qio bitmaps.qcow2 "write -P 0xe1 0 4k" "write -P 0xe2 1M 64k"
qemu-img bitmap --disable bitmaps.qcow2 bitmap-two
qio bitmaps.qcow2 "write -P 0xe3 8M 128k"

# bitmap_inuse: one clean session (bitmap data stored), then a crashed read/write session:
# the bitmap keeps the in_use flag and its stored table is stale.
mk bitmap_inuse.qcow2 16M
qemu-img bitmap --add bitmap_inuse.qcow2 b0
qio bitmap_inuse.qcow2 "write -P 0xe4 0 64k"
qio_abort bitmap_inuse.qcow2 "write -P 0xe5 4M 64k" "flush"

# ---------------------------------------------------------------------------------------------
# external data files (virtual size 1 MiB, so the data files are 1 MiB and stay uncompressed)
# ---------------------------------------------------------------------------------------------
mk -o data_file=extdata.data extdata.qcow2 1M
qio extdata.qcow2 "write -P 0xf1 0 64k" "write -P 0xf2 512k 4k" "write -z 768k 64k"
mk -o data_file=extdata_raw.data,data_file_raw=on extdata_raw.qcow2 1M
qio extdata_raw.qcow2 "write -P 0xf3 0 64k" "write -P 0xf4 512k 4k" "write -z 768k 64k"

# ---------------------------------------------------------------------------------------------
# encryption (secret: qinspect; iter-time kept low so opening is fast)
# ---------------------------------------------------------------------------------------------
qemu-img create -q -f qcow2 --object secret,id=sec0,data=qinspect \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 luks.qcow2 16M
qemu-io --object secret,id=sec0,data=qinspect \
    --image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0 \
    -c "write -P 0x42 0 64k" -c "write -P 0x43 1M 4k" >/dev/null

# ---------------------------------------------------------------------------------------------
# refcount widths, lazy refcounts
# ---------------------------------------------------------------------------------------------
for rb in 1 8 64; do
    mk -o refcount_bits=$rb refcount$rb.qcow2 16M
    qio refcount$rb.qcow2 "write -P $((0x10 + rb)) 0 128k" "write -P $((0x20 + rb)) 4M 64k" "write -z 5M 64k"
done

# lazy_dirty: lazy refcounts, crash after writing: dirty bit stays set, refcounts stale.
mk -o lazy_refcounts=on lazy_dirty.qcow2 16M
qio_abort lazy_dirty.qcow2 "write -P 0x61 0 64k" "write -P 0x62 1M 128k"

# ---------------------------------------------------------------------------------------------
# damaged images (documented patches)
# ---------------------------------------------------------------------------------------------

# leaked: 6 data clusters, 3 of them discarded (free holes, refcount 0); then PATCH the
# refcounts of two of those freed host clusters back to 1 -> two leaked clusters (check exit 3)
# and one genuinely free hole.
mk leaked.qcow2 16M
qio leaked.qcow2 "write -P 0x71 0 64k" "write -P 0x72 1M 64k" "write -P 0x73 2M 64k" \
    "write -P 0x74 3M 64k" "write -P 0x75 4M 64k" "write -P 0x76 5M 64k"
L1M=$(qh host-of leaked.qcow2 1M); L2M=$(qh host-of leaked.qcow2 2M); L4M=$(qh host-of leaked.qcow2 4M)
qio leaked.qcow2 "discard 1M 64k" "discard 2M 64k" "discard 4M 64k"
qh set-refcount leaked.qcow2 "$L1M" 1     # PATCH: leak (refcount 1, no reference)
qh set-refcount leaked.qcow2 "$L4M" 1     # PATCH: leak (refcount 1, no reference)
: "$L2M"                                  # stays free (refcount 0): a hole inside the file

# refcount_corrupt: PATCH the refcount of the data cluster holding guest 1M to 0 although the
# active L2 table references it -> "ERROR cluster N refcount=0 reference=1" + OFLAG_COPIED (exit 2).
mk refcount_corrupt.qcow2 16M
qio refcount_corrupt.qcow2 "write -P 0x81 0 64k" "write -P 0x82 1M 64k" "write -P 0x83 2M 64k"
qh set-refcount refcount_corrupt.qcow2 "$(qh host-of refcount_corrupt.qcow2 1M)" 0   # PATCH

# corrupt_bit: a healthy image whose header has incompatible feature bit 1 (corrupt) PATCHED on.
mk corrupt_bit.qcow2 16M
qio corrupt_bit.qcow2 "write -P 0x91 0 64k" "write -P 0x92 2M 64k"
qh set-incompat-bit corrupt_bit.qcow2 1   # PATCH: incompatible_features |= 1<<1

# invalid_subcluster: extended L2, 4 KiB written at 0 (bitmap 0x3: subclusters 0,1 allocated).
# PATCH the bitmap to 0x0000000100000003: subcluster 0 has both A and Z set (invalid entry).
mk -o extended_l2=on invalid_subcluster.qcow2 16M
qio invalid_subcluster.qcow2 "write -P 0xa9 0 4k" "write -P 0xaa 1M 64k"
[ "$(qh get-l2-bitmap invalid_subcluster.qcow2 0)" = 0x3 ]
qh set-l2-bitmap invalid_subcluster.qcow2 0 0x0000000100000003   # PATCH

# holes: 8 data clusters, 3 in the middle discarded (refcount-0 holes between used clusters),
# then PATCH: the file is extended by 192 KiB of zeros past the image end (truncate), a tail
# that `check` does not count (image-end-offset < file size).
mk holes.qcow2 16M
qio holes.qcow2 "write -P 0xb5 0 512k" "discard 128k 64k" "discard 256k 128k"
truncate -s +192K holes.qcow2   # PATCH: append a zero-filled tail past the image end

# ---------------------------------------------------------------------------------------------
# preallocation
# ---------------------------------------------------------------------------------------------
mk -o preallocation=metadata prealloc_metadata.qcow2 64M
qio prealloc_metadata.qcow2 "write -P 0xc5 0 64k" "write -P 0xc6 10M 128k"
mk -o preallocation=falloc prealloc_falloc.qcow2 2M
qio prealloc_falloc.qcow2 "write -P 0xc7 0 64k" "write -z 1M 64k"

# ---------------------------------------------------------------------------------------------
# layout: fragmented, big_empty
# ---------------------------------------------------------------------------------------------
# fragmented: 8 GiB, 32 single-cluster writes (two per 512 MiB L2 region) in a fixed shuffled
# order (generated once with random.Random(20240601), frozen here), then 8 consecutive guest
# clusters written backwards.  L2 tables are allocated on first touch, so they end up
# interleaved with data all over the file.
mk fragmented.qcow2 8G
frag_cmds=()
i=0
for c in 127188 42217 114066 99057 62114 62857 77827 83158 67636 66364 96167 1933 94369 31522 \
         20284 122495 15986 105077 115513 39887 109927 127894 7462 54978 47153 75800 86991 \
         29783 20624 36079 15077 55959; do
    frag_cmds+=("write -P $((0x80 + i)) $((c * 65536)) 64k")
    i=$((i + 1))
done
for c in 1007 1006 1005 1004 1003 1002 1001 1000; do
    frag_cmds+=("write -P $((0x80 + i)) $((c * 65536)) 64k")
    i=$((i + 1))
done
qio fragmented.qcow2 "${frag_cmds[@]}"

# big_empty: 1 TiB, nothing written (L1 of 2048 entries, file ~212 KiB).
mk big_empty.qcow2 1T

# ---------------------------------------------------------------------------------------------
# issue 9: fidelity at the edges
# ---------------------------------------------------------------------------------------------
# Byte patches below go through fidpatch (a few lines of Python, defined here): qemu-img and
# qemu-io cannot make any of this damage. Each image says what it shows and what QEMU does.
cat >"$WORK/fidpatch.py" <<'PY'
"""fidpatch FILE OP...: byte patches for the issue-9 images. OPs: u32@OFF=V, u64@OFF=V (V may be
an expression of l1 / rt / size / L1[i] / RT[i] / L2E(guest)), append@HEX, truncate@N, copy-l2e@A:B
(guest cluster A's L2 entry := B's), feat@I=TYPE:BIT:NAME (feature table entry I), ext-magic@OLD=NEW,
luks-u32@REL=V (a field of the LUKS header, REL bytes into it)."""
import os
import struct
import sys

path, *ops = sys.argv[1:]
f = open(path, "r+b")


def rd(off, fmt):
    f.seek(off)
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def env():
    cs = 1 << rd(20, ">I")
    l1, rt = rd(40, ">Q"), rd(48, ">Q")
    return dict(cs=cs, l1=l1, rt=rt, size=os.path.getsize(path),
                L1=lambda i: rd(l1 + 8 * i, ">Q"), RT=lambda i: rd(rt + 8 * i, ">Q"),
                L2E=lambda g: (rd(l1 + 8 * (g // cs // (cs // 8)), ">Q") & 0xFFFFFFFFFFFE00)
                + 8 * (g // cs % (cs // 8)))


def exts():
    """(offset, magic, length) of the header extensions."""
    off = rd(100, ">I")
    while True:
        magic, length = rd(off, ">I"), rd(off + 4, ">I")
        yield off, magic, length
        if magic == 0:
            return
        off += 8 + (length + 7) // 8 * 8


for op in ops:
    kind, arg = op.split("@", 1)
    if kind in ("u32", "u64"):
        where, val = arg.split("=", 1)
        pos, data = eval(where, env()), struct.pack(">I" if kind == "u32" else ">Q", eval(val, env()))
        f.seek(pos)
        f.write(data)
    elif kind == "append":
        f.seek(0, 2)
        f.write(bytes.fromhex(arg))
    elif kind == "truncate":
        f.truncate(eval(arg, env()))
    elif kind == "copy-l2e":
        a, b = (eval(x, env()) for x in arg.split(":"))
        e = env()
        pos, data = e["L2E"](a), struct.pack(">Q", rd(e["L2E"](b), ">Q"))
        f.seek(pos)
        f.write(data)
    elif kind == "feat":
        i, spec = arg.split("=", 1)
        typ, bit, name = spec.split(":", 2)
        [(off, _m, length)] = [x for x in exts() if x[1] == 0x6803F857]
        assert (int(i) + 1) * 48 <= length
        f.seek(off + 8 + 48 * int(i))
        f.write(bytes([int(typ), int(bit)]) + name.encode().ljust(46, b"\0"))
    elif kind == "luks-u32":  # a 32-bit field of the LUKS header, at REL bytes into it
        rel, val = (int(x, 0) for x in arg.split("=", 1))
        [off] = [x[0] for x in exts() if x[1] == 0x0537BE77]
        f.seek(off + 8)
        f.seek(struct.unpack(">Q", f.read(8))[0] + rel)
        f.write(struct.pack(">I", val))
    elif kind == "ext-magic":
        old, new = (int(x, 0) for x in arg.split("="))
        [off] = [x[0] for x in exts() if x[1] == old]
        f.seek(off)
        f.write(struct.pack(">I", new))
    else:
        raise SystemExit(f"fidpatch: unknown op {op}")
f.close()
PY
fp() { python3 "$WORK/fidpatch.py" "$@"; }

# fid_overflow: refcount_bits=1 (refcount_max 1); PATCH guest cluster 1's L2 entry to point at
# guest cluster 0's host cluster. The second reference overflows: qcow2_inc_refcounts_imrt prints
# "ERROR: overflow cluster offset=..." and the amend/convert hint, counts a corruption and does
# not count it; the orphaned host cluster is leaked.
mk -o refcount_bits=1 fid_overflow.qcow2 1M
qio fid_overflow.qcow2 "write -P 0x91 0 64k" "write -P 0x92 64k 64k"
fp fid_overflow.qcow2 copy-l2e@65536:0

# fid_refblock_unaligned: PATCH refcount table entry 0 to point 512 bytes into its block: check
# prints "refcount block 0 is not cluster aligned", then qcow2_get_refcount fails (EIO) for every
# cluster: one "Can't get refcount for cluster N" line each, after one "Image is corrupt" line.
mk fid_refblock_unaligned.qcow2 16M
qio fid_refblock_unaligned.qcow2 "write -P 0x93 0 192k" "write -P 0x94 8M 64k"
fp fid_refblock_unaligned.qcow2 "u64@rt=RT(0)+512"

# fid_many_messages: 512-byte clusters, 1.5 MiB written (3072 data clusters); PATCH refcount table
# entries 1.. to 0: every cluster they covered has refcount 0 -> more than 2,000 check messages
# (qemu-img prints all of them; so must qinspect).
mk -o cluster_size=512 fid_many_messages.qcow2 4M
qio fid_many_messages.qcow2 "write -P 0x95 0 1536k"
fp fid_many_messages.qcow2 $(for i in $(seq 1 40); do echo "u64@rt+8*$i=0"; done)

# fid_l1_int64: PATCH the active L1 offset to 2^63 - 64 KiB (cluster aligned) with 16384
# entries: the table would end past INT64_MAX -> "Active L1 table offset invalid".
mk fid_l1_int64.qcow2 64M
fp fid_l1_int64.qcow2 "u32@36=16384" "u64@40=(1<<63)-65536"

# fid_l1_misaligned_empty: virtual size 0 (no L1 entries); PATCH the L1 offset to 0x30008:
# qcow2_validate_table refuses a misaligned table even when it is empty.
mk fid_l1_misaligned_empty.qcow2 0
fp fid_l1_misaligned_empty.qcow2 "u64@40=l1+8"

# fid_snap_misaligned_empty: no snapshots; PATCH snapshots_offset to 0x10200: refused at open
# ("Snapshot table offset invalid"); check, which skips the table at open, fails in its own
# snapshot check ("ERROR snapshot table offset invalid", "Check failed: Invalid argument").
mk fid_snap_misaligned_empty.qcow2 16M
qio fid_snap_misaligned_empty.qcow2 "write -P 0x96 0 64k"
fp fid_snap_misaligned_empty.qcow2 "u64@64=0x10200"

# fid_ext_short: PATCH backing_file_offset to header_length + 4, backing_file_size 0: the
# extension area is 4 bytes, too short for an extension header -> "Header extension too large".
mk fid_ext_short.qcow2 16M
fp fid_ext_short.qcow2 "u64@8=112+4" "u32@16=0"

# fid_backing_empty: PATCH backing_file_offset to 0x800 (past the extensions), size 0: an empty
# backing file name, which QEMU reads as no backing file.
mk fid_backing_empty.qcow2 16M
qio fid_backing_empty.qcow2 "write -P 0x97 1M 64k"
fp fid_backing_empty.qcow2 "u64@8=0x800" "u32@16=0"

# fid_norefcount_table: PATCH refcount_table_clusters to 0: info refuses ("Image does not contain
# a reference count table"); check opens with BDRV_O_CHECK and reports every cluster (exit 2).
mk fid_norefcount_table.qcow2 16M
qio fid_norefcount_table.qcow2 "write -P 0x98 0 128k"
fp fid_norefcount_table.qcow2 "u32@56=0"

# fid_snap_past_eof: PATCH nb_snapshots to 3 and snapshots_offset to 1 GiB, past the end of the
# file: reads past EOF return zeros (block/io.c), so info lists 3 empty snapshots and check calls
# each entry incomplete and the table's region past the end of the file.
mk fid_snap_past_eof.qcow2 16M
qio fid_snap_past_eof.qcow2 "write -P 0x99 0 64k"
fp fid_snap_past_eof.qcow2 "u32@60=3" "u64@64=1<<30"

# fid_l1_cut: PATCH a copy of the L1 table's first 4 bytes (0x80000000) onto the end of the
# file and point l1_table_offset at them: the entry is cut after 4 bytes and reads as
# 0x8000000000000000 (not 0). Its L2 offset is 0, so check reads the header cluster as an L2
# table and counts the damage; map calls the guest unallocated.
mk fid_l1_cut.qcow2 64M
qio fid_l1_cut.qcow2 "write -P 0x9a 0 128k"
fp fid_l1_cut.qcow2 append@80000000 "u64@40=size-4"

# fid_data_file_unnamed: an external-data-file image whose data-file-name extension is PATCHED
# into an unknown extension: the incompatible bit says a data file is required, none is named.
# Debian's qemu-img 7.2 (CVE-2024-4467 fix) opens it for info without the data file (exit 0);
# map and check need the data file and fail.
mk -o data_file=fid_data_file_unnamed.data fid_data_file_unnamed.qcow2 1M
fp fid_data_file_unnamed.qcow2 ext-magic@0x44415441=0x44415440
rm fid_data_file_unnamed.data

# fid_features_named: PATCH incompatible feature bits 61, 62, 63 on, and two entries of the
# feature name table into (incompatible, 61, "test1") and (incompatible, 62, "test2"): QEMU
# refuses with "Unsupported qcow2 feature(s): test1, test2, Unknown incompatible feature:
# 8000000000000000".
mk fid_features_named.qcow2 16M
fp fid_features_named.qcow2 "u64@72=0xE000000000000000" "feat@0=0:61:test1" "feat@1=0:62:test2"

# luks_keyslot_corrupt (found by the fuzz comparison): a copy of luks.qcow2 whose key slot 0 has
# its anti-forensic stripe count PATCHED from 4000 to 3999 (key slot 0 starts at byte 208 of the
# LUKS header; stripes is its last field, at +44). qcrypto_block_luks_check_header refuses it at
# open, with or without the key: info (BDRV_O_NO_IO: no key needed) fails with "Keyslot 0 is
# corrupted (stripes 3999 != 4000)"; map and check without the key fail earlier, on the missing
# key. Listed in catalog.d/fidelity_luks.json (not a fid_ name: its check golden is keyless).
cp luks.qcow2 luks_keyslot_corrupt.qcow2
fp luks_keyslot_corrupt.qcow2 "luks-u32@252=3999"

# ---------------------------------------------------------------------------------------------
# issue 10: hostile images and names
# ---------------------------------------------------------------------------------------------
# (images for this section go here)

# ---------------------------------------------------------------------------------------------
# issue 11: diagnosis (one image per finding)
# ---------------------------------------------------------------------------------------------
# Each shows one finding above its threshold (1 MiB and 10 % for space findings). Stored
# non-sparse like every sample; tests/test_diagnose_fixes.py builds sparse ones at test time.
# free-space: 6 MiB of data discarded in the middle of the file (refcount 0, still on disk).
mk diag_free.qcow2 32M
qio diag_free.qcow2 "write -P 0x51 0 8M" "write -P 0x52 16M 64k" "discard 0 6M"
# snapshot-space: snapshot 'old' alone holds the first version of 4 MiB of data.
mk diag_snapshots.qcow2 32M
qio diag_snapshots.qcow2 "write -P 0x61 0 4M"
qemu-img snapshot -c old diag_snapshots.qcow2
qio diag_snapshots.qcow2 "write -P 0x62 0 4M"
# zero-clusters (deep): 4 MiB of zeros written as data.
mk diag_zeros.qcow2 32M
qio diag_zeros.qcow2 "write -P 0 0 4M" "write -P 0x71 8M 64k"
# backing-duplicates (deep) and cow-amplification (info: QEMU's default 64 KiB clusters, no
# extended L2): 2 MiB rewritten unchanged over the backing file, 60 scattered 4 KiB writes.
mk diag_dup_base.qcow2 32M
qio diag_dup_base.qcow2 "write -P 0xd0 0 16M"
mk -b diag_dup_base.qcow2 -F qcow2 diag_dup_top.qcow2
args=("write -P 0xd0 0 2M")
for k in $(seq 0 59); do args+=("write -P $((0x40 + k)) $(( (k * 7919 * 4096) % (28 << 20) + 4 * 1048576 )) 4k"); done
qio diag_dup_top.qcow2 "${args[@]}"
# scattered-metadata: 71 L2 tables allocated in reverse guest order (a 4 KiB write every 512 MiB
# from the top of a 40 GiB disk down).
mk diag_scattered.qcow2 40G
args=()
for k in $(seq 70 -1 0); do args+=("write -P $((k % 200 + 1)) $((k * 512))M 4k"); done
qio diag_scattered.qcow2 "${args[@]}"
# truncated: the last data cluster cut short by 40000 bytes (reads as zeros; qemu-img check is clean).
mk diag_truncated.qcow2 16M
qio diag_truncated.qcow2 "write -P 1 0 64k" "write -P 2 1M 64k" "write -P 3 2M 64k"
truncate -s $(( $(stat -c %s diag_truncated.qcow2) - 40000 )) diag_truncated.qcow2
# (backing-missing is built at test time by tests/test_diagnose_fixes.py: the golden check
# comparison has no case yet for an image qemu-img info opens but check cannot.)

# ---------------------------------------------------------------------------------------------
# issue 16: scan
# ---------------------------------------------------------------------------------------------
# (images for this section go here)

# ---------------------------------------------------------------------------------------------
# spare
# ---------------------------------------------------------------------------------------------
# (images for this section go here)

# ---------------------------------------------------------------------------------------------
# non-sparse, compress, install
# ---------------------------------------------------------------------------------------------
qh densify "$B"/*

OUT=$WORK/out
mkdir -p "$OUT"
for f in "$B"/*; do
    n=$(basename "$f")
    if [ "$(stat -c %s "$f")" -gt "$GZIP_OVER" ] && [[ "$KEEP_PLAIN" != *" $n "* ]]; then
        gzip -9n -c "$f" >"$OUT/$n.gz"
    else
        cp "$f" "$OUT/$n"
    fi
done

# replace the previous build (only generated files; build.sh, README.md, catalog.json stay)
rm -rf "$HERE/golden"
find "$HERE" -maxdepth 1 -type f \( -name '*.qcow2' -o -name '*.qcow2.gz' -o -name '*.raw' \
    -o -name '*.raw.gz' -o -name '*.data' -o -name '*.data.gz' \) -delete
cp "$OUT"/* "$HERE"/

# ---------------------------------------------------------------------------------------------
# goldens, from a directory holding exactly the committed bytes (decompressed, non-sparse)
# ---------------------------------------------------------------------------------------------
G=$WORK/golden_src
mkdir -p "$G" "$HERE/golden" "$WORK/raw"
for f in "$OUT"/*; do
    n=$(basename "$f")
    case $n in
        *.gz) gzip -dc "$f" >"$G/${n%.gz}" ;;
        *) cp "$f" "$G/$n" ;;
    esac
done
qh densify "$G"/*

python3 - "$HERE/catalog.json" "$G" "$HERE/golden" "$WORK/raw" <<'PY'
import concurrent.futures, hashlib, json, os, subprocess, sys

catalog_path, src, gold, rawdir = sys.argv[1:]
here = os.path.dirname(os.path.abspath(catalog_path))
# catalog.json plus catalog.d/*.json (one file per topic, so parallel work does not collide)
catalog_files = [catalog_path] + sorted(
    os.path.join(here, "catalog.d", n) for n in os.listdir(os.path.join(here, "catalog.d")) if n.endswith(".json")
) if os.path.isdir(os.path.join(here, "catalog.d")) else [catalog_path]
catalog = []
os.chdir(src)

for cpath in catalog_files:
    part = json.load(open(cpath))
    changed = False
    for e in part:   # keep "file" in step with what was installed (plain or .gz)
        plain = e["file"].removesuffix(".gz")
        actual = plain if os.path.exists(os.path.join(here, plain)) else plain + ".gz"
        if actual != e["file"]:
            e["file"], changed = actual, True
    if changed:
        with open(cpath, "w") as f:
            json.dump(part, f, indent=2, ensure_ascii=False)
            f.write("\n")
    catalog.extend(part)
for e in catalog:
    for need in [e["file"], *e["backing"], *([e["data_file"]] if "data_file" in e else [])]:
        if not (os.path.exists(os.path.join(here, need)) or os.path.exists(os.path.join(here, need + ".gz"))):
            sys.exit(f"catalog.json: {e['name']} needs {need}, which was not built")
built = {n for n in os.listdir(src) if n.endswith(".qcow2")}
listed = {e["file"].removesuffix(".gz") for e in catalog}
if built != listed:
    sys.exit(f"catalog.json and build.sh disagree: only built {sorted(built - listed)}, "
             f"only listed {sorted(listed - built)}")

MEASURE_OPTS = ["", "cluster_size=4k", "cluster_size=2M", "extended_l2=on",
                "cluster_size=128k,extended_l2=on", "refcount_bits=64", "compat=0.10"]
RAW_LIMIT = 16 << 30   # larger guests are not hashed (see catalog "notes")


def sha256_sparse(path):
    """sha256 of a (sparse) file; holes are hashed from a zero buffer instead of being read."""
    h = hashlib.sha256()
    zero = memoryview(bytes(1 << 22))
    buf = bytearray(1 << 22)
    with open(path, "rb", buffering=0) as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole remains
                data = size
            while pos < data:
                n = min(data - pos, len(zero))
                h.update(zero[:n])
                pos += n
            if pos >= size:
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            os.lseek(fd, pos, os.SEEK_SET)
            while pos < hole:
                n = f.readinto(memoryview(buf)[: min(hole - pos, len(buf))])
                h.update(memoryview(buf)[:n])
                pos += n
    return h.hexdigest()


def run(args):
    p = subprocess.run(args, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def put(name, text):
    with open(os.path.join(gold, name), "w") as f:
        f.write(text)


def record(stem, cmd, args, out_name):
    rc, out, err = run(args)
    if rc == 0:
        put(f"{stem}.{out_name}", out)
    else:
        put(f"{stem}.{cmd}.exit", f"{rc}\n")
        put(f"{stem}.{cmd}.stderr", err)
    return rc, out


def goldens(e):
    fn = e["file"].removesuffix(".gz")
    stem = fn.removesuffix(".qcow2")
    record(stem, "info", ["qemu-img", "info", "--output=json", fn], "info.json")
    if e["backing"]:
        record(stem, "info-chain", ["qemu-img", "info", "--output=json", "--backing-chain", fn],
               "info-chain.json")
    record(stem, "map", ["qemu-img", "map", "--output=json", fn], "map.json")

    rc, out, err = run(["qemu-img", "check", "--output=json", fn])
    put(f"{stem}.check.json", out)
    put(f"{stem}.check.exit", f"{rc}\n")
    put(f"{stem}.check.stderr", err)

    measures = {}
    first_failure = None
    for opts in MEASURE_OPTS:
        args = ["qemu-img", "measure", "--output=json", "-O", "qcow2"]
        if opts:
            args += ["-o", opts]
        rc, out, err = run(args + [fn])
        if rc == 0:
            measures[opts] = json.loads(out)
        elif opts == "":
            first_failure = (rc, err)
    if measures:
        put(f"{stem}.measure.json", json.dumps(measures, indent=4) + "\n")
    if first_failure:
        put(f"{stem}.measure.exit", f"{first_failure[0]}\n")
        put(f"{stem}.measure.stderr", first_failure[1])

    rc, out, _ = run(["qemu-img", "info", "--output=json", fn])
    if rc != 0:  # refused at open (issue 9 samples): nothing to convert
        return
    vsize = json.loads(out)["virtual-size"]
    if vsize > RAW_LIMIT:
        return
    out_raw = os.path.join(rawdir, stem + ".raw")
    rc, _, err = run(["qemu-img", "convert", "-O", "raw", fn, out_raw])
    if rc == 0:
        put(f"{stem}.raw.sha256", sha256_sparse(out_raw) + "\n")
        put(f"{stem}.raw.size", f"{os.path.getsize(out_raw)}\n")
    else:
        put(f"{stem}.convert.exit", f"{rc}\n")
        put(f"{stem}.convert.stderr", err)
    if os.path.exists(out_raw):
        os.remove(out_raw)


# the work is subprocess- and hashlib-bound (both release the GIL); biggest image first
with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    order = sorted(catalog, key=lambda e: e["name"] != "fragmented")
    for f in [pool.submit(goldens, e) for e in order]:
        f.result()
PY

# LUKS extra: map with the key (the plain command cannot open the payload without it).
(cd "$G" && qemu-img map --output=json --object secret,id=sec0,data=qinspect \
    --image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0 \
    >"$HERE/golden/luks.map-with-key.json")

echo "built $(ls "$OUT" | wc -l) files into $HERE; goldens in $HERE/golden"
