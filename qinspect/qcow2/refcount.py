"""Refcount table and refcount blocks at every width (1 to 64 bits).

`decode_refcount_block` turns one refcount block into a uint64 array in one array operation;
sub-byte widths are packed LSB-first as the spec (and QEMU) do.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]


def decode_refcount_block(raw: bytes | memoryview | npt.NDArray[np.uint8], refcount_order: int) -> U64:
    """All refcounts of one block (or of several concatenated blocks) as uint64."""
    bits = 1 << min(refcount_order, 6)  # an order > 6 is refused at open; never build a huge dtype
    if bits >= 8:
        return np.frombuffer(raw, dtype=f">u{bits // 8}").astype(np.uint64)
    b = np.frombuffer(raw, dtype=np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (b[:, None] >> shifts[None, :]) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


def refcount_entry_location(index: int, refcount_order: int) -> tuple[int, int, int]:
    """(byte offset in the block, bit shift, width in bits) of refcount entry `index`."""
    bits = 1 << min(refcount_order, 6)
    if bits >= 8:
        return index * (bits // 8), 0, bits
    return (index * bits) // 8, (index * bits) % 8, bits
