"""LVM2 physical volumes: the label, the PV header, the text metadata, and the logical volumes in it.

The label (`LABELONE` ... `LVM2 001`) sits in one of the first four sectors and points at the PV
header, which lists the metadata areas. The first metadata area's header (`mda_header`) names the
current copy of the volume group's text metadata (a circular buffer), parsed here with LVM's
config grammar. Each logical volume becomes a `Volume` whose segments are the linear
(`striped`, one stripe) segments on this PV; an LV with segments elsewhere (another PV, RAID,
thin pools, snapshots) is listed with a problem and its filesystem is not read.
"""

from __future__ import annotations

import re
import struct

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import GuestError, Segment, Volume, VolumeKind

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MAX_METADATA = 4 << 20
MAX_AREAS = 16
MAX_LVS = 4096
MAX_SEGMENTS = 4096
MAX_NESTING = 32

Value = str | int | list["Value"] | dict[str, "Value"]
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|-?\d+|[A-Za-z0-9_.+\-]+|[=\[\]{},]')


def parse_config(text: str) -> dict[str, Value]:
    """LVM's text format: `name = value`, `name { ... }`, values are strings, integers and [lists]."""
    toks: list[str] = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def value() -> Value:
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t == "[":
            items: list[Value] = []
            while toks[pos] != "]":
                if toks[pos] == ",":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        if t.startswith('"'):
            return t[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        return t

    def section(depth: int) -> dict[str, Value]:
        nonlocal pos
        if depth > MAX_NESTING:
            raise GuestError("LVM2 metadata nests too deeply")
        out: dict[str, Value] = {}
        while pos < len(toks) and toks[pos] != "}":
            name = toks[pos]
            pos += 1
            if toks[pos] == "=":
                pos += 1
                out[name] = value()
            elif toks[pos] == "{":
                pos += 1
                out[name] = section(depth + 1)
                if toks[pos] != "}":
                    raise GuestError("LVM2 metadata: unbalanced braces")
                pos += 1
            else:
                raise GuestError(f"LVM2 metadata: unexpected {toks[pos][:20]!r} after {name[:40]!r}")
        return out

    try:
        result = section(0)
    except IndexError:
        raise GuestError("LVM2 metadata ends in the middle of a value") from None
    if pos != len(toks):
        raise GuestError("LVM2 metadata: unbalanced braces")
    return result


def _pv_header(pv: VolumeReader) -> tuple[str, list[tuple[int, int]]]:
    """(PV uuid with dashes, metadata areas as (offset, size) from the PV start)."""
    head = pv.read(0, min(4 * SECTOR, pv.size))
    for sector in range(4):
        at = sector * SECTOR
        if head[at : at + 8] == LABEL_ID and head[at + 24 : at + 32] == LABEL_TYPE:
            break
    else:
        raise GuestError("no LVM2 label")
    offset_xl = struct.unpack_from("<I", head, at + 20)[0]
    hdr_at = at + offset_xl
    if not 32 <= offset_xl <= SECTOR - 40:
        raise GuestError(f"LVM2 label: PV header offset {offset_xl} is invalid")
    raw = pv.read(hdr_at, min(SECTOR, pv.size - hdr_at))
    uuid = raw[:32].decode("ascii", "replace")
    pos = 40
    lists: list[list[tuple[int, int]]] = [[], []]
    for which in (0, 1):  # data areas, then metadata areas, each ending with a zero entry
        while True:
            if pos + 16 > len(raw):
                raise GuestError("LVM2 PV header: area lists run past its sector")
            off, size = struct.unpack_from("<QQ", raw, pos)
            pos += 16
            if off == 0 and size == 0:
                break
            if len(lists[which]) >= MAX_AREAS:
                raise GuestError("LVM2 PV header: too many areas")
            lists[which].append((off, size))
    dashed = "-".join((uuid[0:6], uuid[6:10], uuid[10:14], uuid[14:18], uuid[18:22], uuid[22:26], uuid[26:32]))
    return dashed, lists[1]


def read_metadata(pv: VolumeReader) -> tuple[str, dict[str, Value]]:
    """The PV's uuid and the volume group's current text metadata, parsed."""
    uuid, mdas = _pv_header(pv)
    if not mdas:
        raise GuestError("LVM2 PV has no metadata area (metadata is on another PV)")
    mda_off, mda_size = mdas[0]
    hdr = pv.read(mda_off, SECTOR)
    if hdr[4:20] != MDA_MAGIC:
        raise GuestError("LVM2 metadata area header has a bad magic number", mda_off)
    _start, size = struct.unpack_from("<QQ", hdr, 24)
    off, ln = struct.unpack_from("<QQ", hdr, 40)
    if not ln or ln > MAX_METADATA or off >= mda_size or size != mda_size:
        raise GuestError(f"LVM2 metadata location {off}+{ln} in an area of {mda_size} bytes is invalid", mda_off)
    first = min(ln, mda_size - off)
    text = pv.read(mda_off + off, first)
    if first < ln:  # the circular buffer wraps to just after the header
        text += pv.read(mda_off + SECTOR, ln - first)
    meta = parse_config(text.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return uuid, meta


def logical_volumes(pv: VolumeReader, pv_volume: Volume) -> list[Volume]:
    """The logical volumes of the VG with segments on this PV, as volumes in disk coordinates."""
    uuid, meta = read_metadata(pv)
    vgs = [(name, vg) for name, vg in meta.items() if isinstance(vg, dict) and "physical_volumes" in vg]
    if not vgs:
        raise GuestError("LVM2 metadata has no volume group")
    vg_name, vg = vgs[0]
    ext = vg.get("extent_size")
    pvs = vg.get("physical_volumes")
    if not isinstance(ext, int) or ext <= 0 or not isinstance(pvs, dict):
        raise GuestError("LVM2 metadata: no extent size or physical volumes")
    ext_bytes = ext * SECTOR
    mine = [k for k, p in pvs.items() if isinstance(p, dict) and p.get("id") == uuid]
    if not mine:
        raise GuestError(f"LVM2 metadata of VG {vg_name} does not list this PV ({uuid})")
    pv_key = mine[0]
    pe_start = pvs[pv_key].get("pe_start") if isinstance(pvs[pv_key], dict) else None  # type: ignore[union-attr]
    if not isinstance(pe_start, int) or pe_start < 0:
        raise GuestError("LVM2 metadata: this PV has no pe_start")
    pv_volume.name = vg_name
    lvs = vg.get("logical_volumes", {})
    out: list[Volume] = []
    if not isinstance(lvs, dict):
        return out
    for k, (lv_name, lv) in enumerate(list(lvs.items())[:MAX_LVS]):
        if not isinstance(lv, dict):
            continue
        segs: list[Segment] = []
        problems: list[str] = []
        for seg_name, seg in list(lv.items())[: MAX_SEGMENTS + 8]:
            if not (seg_name.startswith("segment") and isinstance(seg, dict)):
                continue
            start, count, stype = seg.get("start_extent"), seg.get("extent_count"), seg.get("type")
            stripes = seg.get("stripes")
            if (stype != "striped" or seg.get("stripe_count") != 1 or not isinstance(stripes, list)
                    or len(stripes) != 2 or not isinstance(start, int) or not isinstance(count, int)
                    or not isinstance(stripes[1], int)):
                problems.append(f"{seg_name}: a {stype} segment is not mapped (only linear segments are)")
                continue
            if stripes[0] != pv_key:
                problems.append(f"{seg_name}: lies on another physical volume ({stripes[0]})")
                continue
            disk_off = pe_start * SECTOR + stripes[1] * ext_bytes
            if start < 0 or count <= 0 or stripes[1] < 0 or disk_off + count * ext_bytes > pv.size:
                problems.append(f"{seg_name}: extents {stripes[1]}+{count} lie outside the physical volume")
                continue
            d = pv.to_disk_offset(disk_off)
            if d is None:
                continue
            segs.append(Segment(start * ext_bytes, d, count * ext_bytes))
        segs.sort(key=lambda s: s.volume_offset)
        pos = 0
        for s in segs:
            if s.volume_offset != pos:
                problems.append(f"segments leave a gap or overlap at LV offset {pos}")
                break
            pos += s.length
        v = Volume(k + 1, VolumeKind.LVM_LV, segs[0].disk_offset if segs else pv_volume.start, pos, segs if not
                   problems else [], type_name="LVM2 logical volume", name=f"{vg_name}/{lv_name}")
        v.problems = problems
        if problems:
            v.length = sum(s.length for s in segs)
        out.append(v)
    return out
