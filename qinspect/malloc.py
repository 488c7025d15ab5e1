"""Allocator tuning for the bulk walks (map, check, layout): keep freed memory for reuse.

The walks process tables in cache-sized batches, and every numpy temporary of a batch is a few
hundred KiB. With glibc's defaults those blocks go back to the kernel when freed (heap trimming,
mmap/munmap) and come back as fresh zeroed pages: on a 1 TiB image that is ~450,000 page faults
and about twice the run time. Raising the trim and mmap thresholds lets the heap reuse them.
Only glibc has `mallopt`; elsewhere this does nothing. Call it from a command, not on import.
"""

from __future__ import annotations

import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_done = False


def tune_for_bulk_work(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set glibc's mmap and trim thresholds (once per process); True if it was done."""
    global _done
    if _done:
        return True
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError, AttributeError):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
