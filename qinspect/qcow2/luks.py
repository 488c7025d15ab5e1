"""The LUKS1 header held in a qcow2 image's encryption region (crypt_method 2).

Only the header is decoded (cipher, mode, IV generator, hash, UUID, payload offset, key slots), as
`qemu-img info` shows it without a key. Key material is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_HEADER as HDR
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_KEY_SLOT as SLOT
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS, key_slot_offset
from qinspect.qcow2.hostfile import HostFile

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_PHDR_SIZE = HDR.size  # 592
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
    if HDR["magic"].raw(raw) != LUKS_MAGIC:
        problems.append(Problem(Severity.ERROR, "LUKS header", "no LUKS magic in the encryption header region", offset))
        return None
    slots = []
    for i in range(QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS):
        at = key_slot_offset(i)
        slots.append(LuksKeySlot(SLOT["active"].get(raw, at) == LUKS_KEY_SLOT_ENABLED, SLOT["iterations"].get(raw, at),
                                 SLOT["key_offset_sector"].get(raw, at) * LUKS_SECTOR_SIZE,
                                 SLOT["stripes"].get(raw, at)))
    hdr = LuksHeader(HDR["version"].get(raw), _cstr(HDR["cipher_name"].raw(raw)), _cstr(HDR["cipher_mode"].raw(raw)),
                     _cstr(HDR["hash_spec"].raw(raw)), HDR["payload_offset_sector"].get(raw) * LUKS_SECTOR_SIZE,
                     HDR["master_key_len"].get(raw), HDR["master_key_iterations"].get(raw),
                     _cstr(HDR["uuid"].raw(raw)), slots)
    if hdr.payload_offset > length:
        problems.append(Problem(Severity.WARNING, "LUKS header",
                                f"LUKS payload offset {hdr.payload_offset} exceeds the region length {length}", offset))
    return hdr
