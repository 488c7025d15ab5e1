"""The LUKS1 header held in a qcow2 image's encryption region (crypt_method 2).

Only the header is decoded (cipher, mode, IV generator, hash, UUID, payload offset, key slots), as
`qemu-img info` shows it without a key. Key material is never touched.

`luks_open_refusal` applies the rules QEMU checks when it opens the header, even without a key
(`qemu-img info` opens with BDRV_O_NO_IO, which skips only the unlocking): the qcow2 read function's
bounds (`qcow2_crypto_hdr_read_func`), then `qcrypto_block_luks_check_header` and
`qcrypto_block_luks_parse_header` (crypto/block-luks.c). An image failing them is refused by every
qemu-img command.
"""

from __future__ import annotations

from qinspect.qcow2.constants import BDRV_MAX_LENGTH
from qinspect.qcow2.errors import Problem, Severity
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_HEADER as HDR
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_KEY_SLOT as SLOT
from qinspect.qcow2.fields import QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS, key_slot_offset
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.value import Value

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_PHDR_SIZE = HDR.size  # 592
LUKS_KEY_SLOT_ENABLED = 0x00AC71F3
LUKS_SECTOR_SIZE = 512
LUKS_KEY_SLOT_DISABLED = 0x0000DEAD
LUKS_VERSION = 1
LUKS_STRIPES = 4000
LUKS_KEY_SLOT_OFFSET = 4096
_HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET // LUKS_SECTOR_SIZE

# QEMU's name tables (qapi enums, matched case-sensitively; crypto/block-luks.c's cipher map).
_HASH_DIGEST_LEN = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20}
_CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGEN_ALGS = ("plain", "plain64", "essiv")
_CIPHER_KEY_BYTES = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32), "twofish": (16, 24, 32)}
_ESSIV_FAMILY = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}


# The records are immutable values (`qinspect.qcow2.value.Value`: no dataclasses on the info path).
class LuksKeySlot(Value):
    """One of the 8 LUKS1 key slots."""

    __slots__ = ("active", "iterations", "key_offset", "stripes")
    FIELDS = ("active", "iterations", "key_offset", "stripes")

    active: bool
    iterations: int
    key_offset: int
    stripes: int

    def __init__(self, active: bool, iterations: int, key_offset: int, stripes: int) -> None:
        self._assign(active, iterations, key_offset, stripes)


class LuksHeader(Value):
    """The LUKS1 partition header, with names the way qemu-img info reports them."""

    __slots__ = ("cipher_mode_spec", "cipher_name", "hash_spec", "key_bytes", "master_key_iters", "payload_offset",
                 "slots", "uuid", "version")
    FIELDS = ("version", "cipher_name", "cipher_mode_spec", "hash_spec", "payload_offset", "key_bytes",
              "master_key_iters", "uuid", "slots")

    version: int
    cipher_name: str
    cipher_mode_spec: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    master_key_iters: int
    uuid: str
    slots: list[LuksKeySlot]

    def __init__(self, version: int, cipher_name: str, cipher_mode_spec: str, hash_spec: str, payload_offset: int,
                 key_bytes: int, master_key_iters: int, uuid: str, slots: list[LuksKeySlot]) -> None:
        self._assign(version, cipher_name, cipher_mode_spec, hash_spec, payload_offset, key_bytes, master_key_iters,
                     uuid, slots)

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


def _u32(v: int) -> int:
    return v & 0xFFFFFFFF


def _splitkeylen_sectors(key_bytes: int, stripes: int) -> int:
    """qcrypto_block_luks_splitkeylen_sectors: (key_bytes * stripes, a 32-bit product) in sectors,
    rounded up to whole header-sized units."""
    split = _u32(key_bytes * stripes)
    sectors = -(-split // LUKS_SECTOR_SIZE)
    return -(-sectors // _HEADER_SECTORS) * _HEADER_SECTORS


def _ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    m = (1 << 64) - 1
    last1, last2 = (first1 + len1 - 1) & m, (first2 + len2 - 1) & m
    return not (last2 < first1 or last1 < first2)


def _nul_terminated(raw: bytes) -> str | None:
    """The string before the first NUL, or None when there is none (QEMU refuses that)."""
    if b"\0" not in raw:
        return None
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _check_header(raw: bytes) -> str | None:
    """qcrypto_block_luks_check_header, rule by rule in QEMU's order."""
    if HDR["magic"].raw(raw) != LUKS_MAGIC:
        return "Volume is not in LUKS format"
    version = HDR["version"].get(raw)
    if version != LUKS_VERSION:
        return f"LUKS version {version} is not supported"
    for name, what in (("cipher_name", "cipher name"), ("cipher_mode", "cipher mode"), ("hash_spec", "hash spec")):
        if _nul_terminated(HDR[name].raw(raw)) is None:
            return f"LUKS header {what} is not NUL terminated"
    payload = HDR["payload_offset_sector"].get(raw)
    if payload < _HEADER_SECTORS:
        return "LUKS payload is overlapping with the header"
    if HDR["master_key_iterations"].get(raw) == 0:
        return "LUKS key iteration count is zero"
    key_bytes = HDR["master_key_len"].get(raw)
    slots = [(SLOT["active"].get(raw, key_slot_offset(i)), SLOT["iterations"].get(raw, key_slot_offset(i)),
              SLOT["key_offset_sector"].get(raw, key_slot_offset(i)), SLOT["stripes"].get(raw, key_slot_offset(i)))
             for i in range(QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS)]
    for i, (active, iterations, start1, stripes) in enumerate(slots):
        len1 = _splitkeylen_sectors(key_bytes, stripes)
        if stripes != LUKS_STRIPES:
            return f"Keyslot {i} is corrupted (stripes {stripes - (1 << 32) if stripes >> 31 else stripes} " \
                   f"!= {LUKS_STRIPES})"
        if active not in (LUKS_KEY_SLOT_DISABLED, LUKS_KEY_SLOT_ENABLED):
            return f"Keyslot {i} state (active/disable) is corrupted"
        if active == LUKS_KEY_SLOT_ENABLED and iterations == 0:
            return f"Keyslot {i} iteration count is zero"
        if start1 < _HEADER_SECTORS:
            return f"Keyslot {i} is overlapping with the LUKS header"
        if _u32(start1 + len1) > payload:
            return f"Keyslot {i} is overlapping with the encrypted payload"
        for j in range(i + 1, QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS):
            start2, len2 = slots[j][2], _splitkeylen_sectors(key_bytes, slots[j][3])
            if _ranges_overlap(start1, len1, start2, len2):
                return f"Keyslots {i} and {j} are overlapping in the header"
    return None


def _parse_header(raw: bytes) -> str | None:
    """qcrypto_block_luks_parse_header: the cipher mode spec, cipher, hash and IV generator names."""
    spec = _nul_terminated(HDR["cipher_mode"].raw(raw)) or ""
    if "-" not in spec:
        return f"Unexpected cipher mode string format '{spec}'"
    mode, ivgen = spec.split("-", 1)
    ivhash: str | None = None
    if ":" in ivgen:
        ivgen, ivhash = ivgen.split(":", 1)
        if ivhash not in _HASH_DIGEST_LEN:
            return f"Hash algorithm '{ivhash}' not supported"
    if mode not in _CIPHER_MODES:
        return f"Cipher mode '{mode}' not supported"
    cipher = _nul_terminated(HDR["cipher_name"].raw(raw)) or ""
    key_bytes = HDR["master_key_len"].get(raw)
    if mode == "xts":
        key_bytes //= 2
    if key_bytes not in _CIPHER_KEY_BYTES.get(cipher, ()):
        return f"Algorithm '{cipher}' with key size {key_bytes} bytes not supported"
    hash_spec = _nul_terminated(HDR["hash_spec"].raw(raw)) or ""
    if hash_spec not in _HASH_DIGEST_LEN:
        return f"Hash algorithm '{hash_spec}' not supported"
    if ivgen not in _IVGEN_ALGS:
        return f"IV generator '{ivgen}' not supported"
    if ivgen == "essiv":
        if ivhash is None:
            return "Missing IV generator hash specification"
        digest = _HASH_DIGEST_LEN[ivhash]
        if digest != key_bytes:  # qcrypto_block_luks_essiv_cipher: a cipher of the digest's key size
            family = _ESSIV_FAMILY.get(cipher)
            if family is None:
                return f"Cipher {cipher}-{key_bytes * 8} not supported with essiv"
            if digest not in _CIPHER_KEY_BYTES[cipher]:
                return f"No {family} cipher with key size {digest} available"
    return None


def luks_open_refusal(f: HostFile, offset: int, length: int) -> str | None:
    """Why QEMU refuses to open the LUKS header at `offset` (region `length` bytes), or None.

    Bytes past the end of the file read as zeros (the block layer's rule), so a header there is
    "not in LUKS format"; a read ending past the block layer's maximum length fails.
    """
    if length < LUKS_PHDR_SIZE:
        return "Request for data outside of extension header"
    if offset + LUKS_PHDR_SIZE > BDRV_MAX_LENGTH:
        return "Could not read encryption header: Input/output error"
    raw = f.pread(offset, LUKS_PHDR_SIZE)
    return _check_header(raw) or _parse_header(raw)
