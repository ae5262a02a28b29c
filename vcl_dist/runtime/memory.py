"""Keep freed large blocks in the process on CPU, so that each training step does not pay
the OS for fresh pages again.

glibc serves allocations above its mmap threshold (128 KiB to 32 MiB, adjusted on the fly)
with fresh ``mmap`` pages and returns them on free: every ``[B, B]`` score matrix or large
activation of a step then costs a page fault per 4 KiB on first touch, which on the CPU
costs as much as the arithmetic of an elementwise op. Raising the mmap and trim thresholds
keeps such blocks in the heap for reuse, the same effect jemalloc or tcmalloc give (PyTorch's
CPU performance guide recommends those for this reason). The price: the process keeps its
peak heap instead of returning it to the OS, which a training worker reuses every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory_for_reuse() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
