"""Deterministic mutations: (seed, case index) → a `Case` of byte patches on one sample image.

Integer fields get the classic hostile values (0, 1, max, huge, negative-as-unsigned, sign bit,
off by one, a flipped bit), pointers also get unaligned values, offsets past the end of the file
and offsets of other structures; table entries keep their flag bits while the offset changes, or
get flag bits toggled; extended-L2 bitmaps get both bits of a subcluster set; strings get rewritten;
whole structures get zeroed, filled with 0xff or random bytes; the file gets truncated; the backing
file name gets pointed at the image itself, at a directory, at a device or at nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qinspect.qcow2 import constants as C

from .targets import Field, Targets


@dataclass
class Case:
    """One fuzz case: which sample image, what was done to it (`steps`), and the byte patches."""

    index: int
    image: str
    steps: list[str] = field(default_factory=list)
    patches: list[tuple[int, bytes]] = field(default_factory=list)
    truncate: int | None = None

    def describe(self) -> str:
        return f"case {self.index} on {self.image}: " + "; ".join(self.steps)


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class _Buf(bytearray):
    """The image's bytes being mutated, plus writes that start past their end (`far`), kept apart:
    a sample may point at structures far past its end (a snapshot table at 1 GiB) and extending
    the buffer to there would cost a gigabyte; written to the file they make it sparse instead."""

    far: dict[int, bytes]


def _get(data: bytes | bytearray, f: Field) -> int:
    if isinstance(data, _Buf) and f.offset in data.far and len(data.far[f.offset]) >= f.size:
        return int.from_bytes(data.far[f.offset][: f.size], "big")
    return int.from_bytes(data[f.offset : f.offset + f.size], "big") if f.offset + f.size <= len(data) else 0


def _int_values(rng: random.Random, orig: int, size: int) -> tuple[str, int]:
    m = _mask(size)
    bits = 8 * size
    choices: list[tuple[str, int]] = [
        ("0", 0), ("1", 1), ("max", m), ("max-1 (-2)", m - 1), ("sign bit", 1 << (bits - 1)),
        ("orig+1", orig + 1), ("orig-1", orig - 1), ("orig*2", orig * 2), ("orig*1000", orig * 1000),
        ("flip bit", orig ^ (1 << rng.randrange(bits))), ("random", rng.getrandbits(bits)),
        ("2^31", 1 << 31), ("2^32-1", 0xFFFFFFFF), ("65536", 65536), ("65537", 65537), ("4194305", 4194305),
    ]
    if bits >= 64:
        choices += [("2^40", 1 << 40), ("2^56", 1 << 56), ("2^62", 1 << 62), ("2^63", 1 << 63)]
    name, v = rng.choice(choices)
    return name, v & m


def _ptr_values(rng: random.Random, orig: int, size: int, t: Targets) -> tuple[str, int]:
    cs = t.cluster_size
    fs = t.file_size
    end = -(-fs // cs) * cs
    choices: list[tuple[str, int]] = [
        ("unaligned +1", orig + 1), ("unaligned +8", orig + 8), ("unaligned +512", orig + 512),
        ("unaligned +cs/2", orig + cs // 2), ("at EOF", end), ("EOF+1 cluster", end + cs),
        ("far past EOF", end * 1024), ("2^40", 1 << 40), ("2^55", 1 << 55), ("0", 0),
        ("header", 0), ("cluster 1", cs), ("last cluster", max(0, end - cs)),
    ]
    if t.structures:
        s = rng.choice(t.structures)
        choices += [(f"another structure {s:#x}", s)] * 4
    name, v = rng.choice(choices)
    return name, v & _mask(size)


_OFFSET_MASKS = {"l1e": C.L1E_OFFSET_MASK, "l2e": C.L2E_OFFSET_MASK, "rte": C.REFT_OFFSET_MASK,
                 "bte": C.BME_TABLE_ENTRY_OFFSET_MASK}


def _entry_values(rng: random.Random, orig: int, f: Field, t: Targets) -> tuple[str, int]:
    mask = _OFFSET_MASKS[f.kind]
    r = rng.random()
    if r < 0.45:
        name, off = _ptr_values(rng, orig & mask, 8, t)
        # keep the flag bits, change the offset; unaligned values may spill into the low flag bits
        return f"offset := {name}", (orig & ~mask & _mask(8)) | (off & _mask(8) & (mask | 0x1FF))
    if r < 0.75:
        flags = {
            "l1e": [63, *range(56, 63), 0, 1, 8],
            "l2e": [63, 62, 0, 1, 8, 56, 61],
            "rte": [0, 1, 8],
            "bte": [0, 1, 8, 56, 63],
        }[f.kind]
        b = rng.choice(flags)
        return f"toggle bit {b}", orig ^ (1 << b)
    if f.kind == "l2e" and r < 0.9:
        # turn it into a compressed descriptor with a hostile offset / sector count
        cb = t.cluster_size.bit_length() - 1
        shift = 62 - (cb - 8)
        nmask = (1 << (cb - 8)) - 1
        coff = rng.choice([t.file_size - 1, t.file_size - 100, t.file_size + 4096, orig & ((1 << shift) - 1),
                           (1 << shift) - 1, 0, 100])
        nb = rng.choice([0, 1, nmask, nmask // 2])
        coff &= (1 << shift) - 1
        return f"compressed coffset={coff} nb={nb}", (1 << 62) | (nb << shift) | coff
    return _int_values(rng, orig, 8)


def _bitmap_values(rng: random.Random, orig: int) -> tuple[str, int]:
    n = rng.randrange(32)
    choices = [
        (f"A and Z on subcluster {n}", orig | (1 << n) | (1 << (32 + n))),
        ("all A and all Z", 0xFFFFFFFFFFFFFFFF),
        ("all A", 0xFFFFFFFF), ("all Z", 0xFFFFFFFF << 32), ("0", 0),
        (f"flip A{n}", orig ^ (1 << n)), (f"flip Z{n}", orig ^ (1 << (32 + n))),
        ("random", rng.getrandbits(64)),
    ]
    return rng.choice(choices)


def _cdesc_values(rng: random.Random, orig: int, t: Targets) -> tuple[str, int]:
    cb = t.cluster_size.bit_length() - 1
    shift = 62 - (cb - 8)
    omask = (1 << shift) - 1
    nmask = (1 << (cb - 8)) - 1
    coff = orig & omask
    nb = (orig >> shift) & nmask
    choices = [
        ("nb_csectors max", (orig & ~(nmask << shift)) | (nmask << shift)),
        ("coffset near EOF", (orig & ~omask) | ((t.file_size - 3) & omask)),
        ("coffset past EOF", (orig & ~omask) | ((t.file_size + 10 * t.cluster_size) & omask)),
        ("coffset max", orig | omask),
        ("coffset +1", (orig & ~omask) | ((coff + 1) & omask)),
        ("nb 0", orig & ~(nmask << shift)),
        ("set COPIED", orig | (1 << 63)),
        ("clear compressed bit", orig & ~(1 << 62)),
        ("nb+1", (orig & ~(nmask << shift)) | (((nb + 1) & nmask) << shift)),
    ]
    return rng.choice(choices)


def _bytes_values(rng: random.Random, f: Field) -> tuple[str, bytes]:
    n = f.size
    choices: list[tuple[str, bytes]] = [
        ("zeros", bytes(n)), ("0xff", b"\xff" * n), ("random", rng.randbytes(n)),
        ("invalid utf-8", (b"\xc3\x28\xa0\xa1" * n)[:n]),
        ("slashes", (b"/" * n)), ("dots", (b"." * n)),
    ]
    if f.kind == "cdata":
        pos = rng.randrange(n)
        choices += [(f"flip byte {pos}", b""), ("zeroed second half", bytes(n // 2))]
    return rng.choice(choices)


def _backing_name(rng: random.Random, t: Targets, image_file: str, chain_tops: list[str]) -> tuple[str, bytes]:
    choices = [
        ("itself", image_file.encode()), ("a directory", b"."), ("/dev/null", b"/dev/null"),
        ("/dev/zero", b"/dev/zero"), ("a missing file", b"no-such-backing.qcow2"), ("empty name", b""),
        ("/proc/self/fd/0", b"/proc/self/fd/0"), ("/", b"/"), ("long name", b"x" * 1023),
        ("protocol", b"nbd://localhost:1/x"), ("json", b'json:{"file.filename":"x"}'),
        ("/dev/stdin", b"/dev/stdin"),
    ]
    if chain_tops:
        top = rng.choice(chain_tops)
        choices += [(f"loop via {top}", top.encode())] * 3
    return rng.choice(choices)


def make_case(index: int, seed: int, image: str, data: bytes, t: Targets, image_file: str,
              chain_tops: list[str], focus: str | None = None) -> Case:
    """The deterministic case `index` for `image` (pristine bytes `data`, targets `t`); with
    `focus` (one of `t.regions`), the first mutation changes a field of that region."""
    rng = random.Random(f"{seed}:{index}:{image}")
    case = Case(index, image)
    nmut = rng.choice([1, 1, 1, 1, 2, 2, 3])
    buf = _Buf(data)
    buf.far = {}
    for m in range(nmut):
        _one_mutation(rng, case, buf, t, image_file, chain_tops, focus if m == 0 else None)
    # Two mutations of the same bytes can cancel out: mutate again until something changed.
    for _ in range(4):
        if case.truncate is not None or len(buf) != len(data) or memoryview(buf) != memoryview(data) or buf.far \
                or all(s.startswith("(") for s in case.steps):
            break
        _one_mutation(rng, case, buf, t, image_file, chain_tops)
    # Store only the changed bytes as patches (the runner writes them into a private copy).
    lim = min(len(buf), len(data))
    case.patches = _runs(buf, _changed(data, buf, lim))
    if len(buf) > len(data):
        case.patches.append((len(data), bytes(buf[len(data):])))
    case.patches.extend(sorted(buf.far.items()))
    return case


def _changed(a: bytes, b: bytearray, lim: int) -> list[int]:
    out: list[int] = []
    # compare in blocks: cheap on multi-megabyte images with a few changed bytes
    step = 4096
    for s in range(0, lim, step):
        if a[s : s + step] != b[s : s + step]:
            out.extend(i for i in range(s, min(s + step, lim)) if a[i] != b[i])
    return out


def _runs(buf: bytearray, idx: list[int]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    start = prev = -2
    for i in idx:
        if i != prev + 1:
            if start >= 0:
                out.append((start, bytes(buf[start : prev + 1])))
            start = i
        prev = i
    if start >= 0:
        out.append((start, bytes(buf[start : prev + 1])))
    return out


_FAR_LIMIT = 1 << 40


def _write(buf: bytearray, off: int, b: bytes) -> None:
    if isinstance(buf, _Buf) and off > len(buf):
        if off + len(b) <= _FAR_LIMIT:  # (beyond it, no file system could hold the write)
            buf.far[off] = b
        return
    if off + len(b) > len(buf):
        buf.extend(bytes(off + len(b) - len(buf)))
    buf[off : off + len(b)] = b


def _one_mutation(rng: random.Random, case: Case, buf: bytearray, t: Targets, image_file: str,
                  chain_tops: list[str], focus: str | None = None) -> None:
    regions = sorted(t.regions)
    special = ["truncate", "fill structure", "flip bits in structure", "backing name", "table near INT64_MAX",
               "misaligned empty table", "truncate inside an entry", "short extension area"]
    # Weight real fields over the special operations.
    pick = focus if focus is not None else rng.choice(regions * 3 + special)
    if pick == "truncate":
        cut = rng.choice([0, 4, 71, 72, 103, 104, 512, t.cluster_size - 1, t.cluster_size,
                          *t.structures, *(s + 8 for s in t.structures), t.file_size - 1,
                          rng.randrange(max(1, t.file_size))])
        cut = max(0, min(cut, t.file_size))
        case.truncate = cut if case.truncate is None else min(case.truncate, cut)
        case.steps.append(f"truncate the file to {cut} bytes")
        return
    if pick in ("table near INT64_MAX", "misaligned empty table", "truncate inside an entry", "short extension area"):
        _edge_mutation(rng, case, buf, t, pick)
        return
    if pick == "fill structure" and t.structures:
        s = rng.choice(t.structures)
        n = rng.choice([8, 64, 512, t.cluster_size])
        how, fill = rng.choice([("zeros", bytes(n)), ("0xff", b"\xff" * n), ("random", rng.randbytes(n))])
        _write(buf, s, fill)
        case.steps.append(f"fill {n} bytes of the structure at {s:#x} with {how}")
        return
    if pick == "flip bits in structure" and t.structures:
        s = rng.choice(t.structures)
        span = min(t.cluster_size, 4096)
        flips = rng.randint(1, 8)
        for _ in range(flips):
            pos = s + rng.randrange(span)
            if pos < len(buf):
                buf[pos] ^= 1 << rng.randrange(8)
        case.steps.append(f"flip {flips} random bits in the first {span} bytes of the structure at {s:#x}")
        return
    if pick == "backing name":
        if t.backing_name_room is None:
            case.steps.append("(no room for a backing name)")
            return
        off, room = t.backing_name_room
        how, name = _backing_name(rng, t, image_file, chain_tops)
        name = name[:room]
        _write(buf, off, name)
        _write(buf, 8, off.to_bytes(8, "big"))
        _write(buf, 16, len(name).to_bytes(4, "big"))
        case.steps.append(f"backing file name := {how} ({name[:40]!r})")
        return
    if pick not in t.regions:
        case.steps.append(f"(no {pick})")
        return
    f = rng.choice(t.regions[pick])
    orig = _get(buf, f)
    if f.kind in ("bytes", "cdata"):
        how, b = _bytes_values(rng, f)
        if how.startswith("flip byte"):
            pos = f.offset + int(how.split()[-1])
            buf[pos] ^= 1 << rng.randrange(8)
        elif how == "zeroed second half":
            _write(buf, f.offset + f.size - len(b), b)
        else:
            _write(buf, f.offset, b[: f.size])
        case.steps.append(f"{f.region}: {f.name} := {how}")
        return
    if f.kind == "ptr":
        how, v = _ptr_values(rng, orig, f.size, t) if rng.random() < 0.7 else _int_values(rng, orig, f.size)
    elif f.kind in _OFFSET_MASKS:
        how, v = _entry_values(rng, orig, f, t)
    elif f.kind == "l2bm":
        how, v = _bitmap_values(rng, orig)
    elif f.kind == "small":
        how, v = ("small value", rng.randrange(0, 26)) if rng.random() < 0.6 else _int_values(rng, orig, f.size)
    elif f.kind == "features":
        bit = rng.choice([0, 1, 2, 3, 4, 5, 6, 20, 63])
        how, v = (f"toggle feature bit {bit}", orig ^ (1 << bit)) if rng.random() < 0.7 \
            else _int_values(rng, orig, f.size)
    elif f.kind == "extmagic":
        magics = [C.QCOW2_EXT_MAGIC_END, C.QCOW2_EXT_MAGIC_BACKING_FORMAT, C.QCOW2_EXT_MAGIC_FEATURE_TABLE,
                  C.QCOW2_EXT_MAGIC_CRYPTO_HEADER, C.QCOW2_EXT_MAGIC_BITMAPS, C.QCOW2_EXT_MAGIC_DATA_FILE]
        m = rng.choice(magics)
        how, v = (f"extension type 0x{m:08x}", m) if rng.random() < 0.7 else _int_values(rng, orig, f.size)
    elif f.kind == "cdesc":
        how, v = _cdesc_values(rng, orig, t) if rng.random() < 0.7 else _int_values(rng, orig, 8)
    else:
        how, v = _int_values(rng, orig, f.size)
    v &= _mask(f.size)
    _write(buf, f.offset, v.to_bytes(f.size, "big"))
    case.steps.append(f"{f.region}: {f.name} {orig:#x} := {v:#x} ({how})")


# The header tables qcow2_validate_table checks: (name, count field, count size, offset field, entry length).
_TABLES = [("L1 table", 36, 4, 40, 8), ("refcount table", 56, 4, 48, None), ("snapshot table", 60, 4, 64, 40)]


def _edge_mutation(rng: random.Random, case: Case, buf: bytearray, t: Targets, pick: str) -> None:
    """Issue 9's edges: table offsets near INT64_MAX, misaligned empty tables, the file cut inside
    a table entry, an extension area too short for an extension header."""
    cs = t.cluster_size
    if pick == "truncate inside an entry":
        s = rng.choice(t.structures) if t.structures else 0
        cut = min(t.file_size, s + 8 * rng.randrange(4) + rng.randrange(1, 8))
        case.truncate = cut if case.truncate is None else min(case.truncate, cut)
        case.steps.append(f"truncate the file to {cut} bytes, inside an entry of the table at {s:#x}")
        return
    if pick == "short extension area":
        hlen = int.from_bytes(buf[100:104], "big") if int.from_bytes(buf[4:8], "big") >= 3 else 72
        off = hlen + rng.choice([1, 4, 7, 9, 12, 15])
        _write(buf, 8, off.to_bytes(8, "big"))
        _write(buf, 16, bytes(4))
        case.steps.append(f"extensions: backing_file_offset := {off} (extension area {off - hlen} bytes), no name")
        return
    name, count_at, count_size, off_at, entry_len = rng.choice(_TABLES)
    count = int.from_bytes(buf[count_at : count_at + count_size], "big")
    orig = int.from_bytes(buf[off_at : off_at + 8], "big")
    if pick == "misaligned empty table":
        v = orig + rng.choice([8, 512, cs // 2])
        _write(buf, count_at, bytes(count_size))
        _write(buf, off_at, v.to_bytes(8, "big"))
        case.steps.append(f"{name}: 0 entries at {v:#x} (misaligned)")
        return
    n = count * (entry_len or cs)
    top = 1 << 63
    how, v = rng.choice([("2^63 - 1 cluster", top - cs), ("ends exactly at 2^63", top - -(-n // cs) * cs),
                         ("ends one cluster past 2^63", top - -(-n // cs) * cs + cs), ("2^63", top),
                         ("2^64 - 1 cluster", (1 << 64) - cs),
                         ("ends just below INT64_MAX", (top - n - cs) // cs * cs)])
    v &= (1 << 64) - 1
    _write(buf, off_at, v.to_bytes(8, "big"))
    case.steps.append(f"{name}: offset {orig:#x} := {v:#x} ({how}, {count} entries)")
