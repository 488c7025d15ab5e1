"""Freed memory goes back to the system (glibc's allocator only; elsewhere a no-op).

The scans allocate and drop arrays of several MiB (per L1 entry, per host cluster). glibc raises its
mmap threshold each time such a block is freed, up to 32 MiB, so the next ones come from the heap
and, once freed, stay in the process: on an image whose L1 table has 2 Mi entries the TUI's peak
RSS grew by ~100 MiB of memory nothing used any more. A fixed threshold keeps big blocks mmap'ed
(returned to the system when freed), as the first ones were.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10  # bytes: blocks this big or bigger are mmap'ed
TRIM_THRESHOLD = 4 << 20  # bytes of free heap top kept before it is given back

_done = False


def return_freed_memory() -> bool:
    """Set glibc's thresholds once (True when they were set now or before)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


__all__ = ["return_freed_memory"]
