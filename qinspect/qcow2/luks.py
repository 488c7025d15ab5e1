"""The LUKS1 header held in a qcow2 image's encryption region (crypt_method 2).

Only the header is decoded (cipher, mode, IV generator, hash, UUID, payload offset, key slots), as
`qemu-img info` shows it without a key. Key material is never touched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.hostfile import HostFile

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_PHDR_SIZE = 592
LUKS_KEY_SLOT_ENABLED = 0x00AC71F3
LUKS_SECTOR_SIZE = 512


@dataclass(frozen=True)
class LuksKeySlot:
    """One of the 8 LUKS1 key slots."""

    active: bool
    iterations: int
    key_offset: int  # bytes, relative to the start of the LUKS region
    stripes: int


@dataclass(frozen=True)
class LuksHeader:
    """The LUKS1 partition header, with names the way qemu-img info reports them."""

    version: int
    cipher_name: str
    cipher_mode_spec: str
    hash_spec: str
    payload_offset: int  # bytes
    key_bytes: int
    master_key_iters: int
    uuid: str
    slots: list[LuksKeySlot]

    @property
    def cipher_mode(self) -> str:
        return self.cipher_mode_spec.split("-", 1)[0]

    @property
    def ivgen_alg(self) -> str:
        rest = self.cipher_mode_spec.split("-", 1)
        return rest[1].split(":", 1)[0] if len(rest) > 1 else "plain"

    @property
    def ivgen_hash_alg(self) -> str | None:
        rest = self.cipher_mode_spec.split(":", 1)
        return rest[1] if len(rest) > 1 else None

    @property
    def cipher_alg(self) -> str:
        bits = self.key_bytes * 8
        if self.cipher_mode == "xts":
            bits //= 2
        return f"{self.cipher_name}-{bits}"

    def info_json(self) -> dict[str, object]:
        """The `encrypt` object of qemu-img info's format-specific data."""
        out: dict[str, object] = {
            "ivgen-alg": self.ivgen_alg,
            "hash-alg": self.hash_spec,
            "cipher-alg": self.cipher_alg,
            "uuid": self.uuid,
            "format": "luks",
            "cipher-mode": self.cipher_mode,
        }
        if self.ivgen_hash_alg:
            out["ivgen-hash-alg"] = self.ivgen_hash_alg
        slots: list[dict[str, object]] = []
        for s in self.slots:
            d: dict[str, object] = {"active": s.active}
            if s.active:
                d["iters"] = s.iterations
                d["stripes"] = s.stripes
            d["key-offset"] = s.key_offset
            slots.append(d)
        out["slots"] = slots
        out["payload-offset"] = self.payload_offset
        out["master-key-iters"] = self.master_key_iters
        return out


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def read_luks_header(f: HostFile, offset: int, length: int, problems: list[Problem]) -> LuksHeader | None:
    """Parse the LUKS header at `offset`; None (with a problem) when it is not one."""
    if f.is_past_end(offset, LUKS_PHDR_SIZE):
        problems.append(Problem(Severity.ERROR, "LUKS header", "LUKS header lies past the end of the file", offset))
        return None
    raw = f.pread(offset, LUKS_PHDR_SIZE)
    if raw[:6] != LUKS_MAGIC:
        problems.append(Problem(Severity.ERROR, "LUKS header", "no LUKS magic in the encryption header region", offset))
        return None
    (version,) = struct.unpack_from(">H", raw, 6)
    cipher_name = _cstr(raw[8:40])
    cipher_mode = _cstr(raw[40:72])
    hash_spec = _cstr(raw[72:104])
    payload_sectors, key_bytes = struct.unpack_from(">II", raw, 104)
    (mk_iters,) = struct.unpack_from(">I", raw, 164)
    uuid = _cstr(raw[168:208])
    slots = []
    for i in range(8):
        active, iters = struct.unpack_from(">II", raw, 208 + i * 48)
        key_off, stripes = struct.unpack_from(">II", raw, 208 + i * 48 + 40)
        slots.append(LuksKeySlot(active == LUKS_KEY_SLOT_ENABLED, iters, key_off * LUKS_SECTOR_SIZE, stripes))
    hdr = LuksHeader(version, cipher_name, cipher_mode, hash_spec, payload_sectors * LUKS_SECTOR_SIZE,
                     key_bytes, mk_iters, uuid, slots)
    if hdr.payload_offset > length:
        problems.append(Problem(Severity.WARNING, "LUKS header",
                                f"LUKS payload offset {hdr.payload_offset} exceeds the region length {length}", offset))
    return hdr
