"""Keep freed large blocks in the heap while many curves are fitted (glibc only).

A batched iteration allocates and frees dozens of multi-megabyte temporaries.  By default glibc
serves such blocks with ``mmap`` and gives them back to the kernel on ``free``, so every
iteration pays page faults on fresh memory — measured here, that costs more than the arithmetic
(a Gaussian fit of 10⁴ curves runs about 1.5× faster with the blocks kept).  Inside
:func:`reuse_freed_memory` the blocks stay in the heap.  On exit the unused heap is returned to
the system and the thresholds are left where glibc's own dynamic tuning ends up after large
blocks have been freed (mmap threshold 32 MiB, trim threshold twice that): setting them at all
switches that tuning off, and its static 128 KiB start would slow large allocations later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from <malloc.h>
_MMAP_MAX = 32 * 2**20  # glibc's upper limit for the mmap threshold on 64-bit systems
_TRIM_KEEP = 2**31 - 1  # mallopt takes an int: in effect, never trim while fitting
_AFTER_TRIM = 2 * _MMAP_MAX  # glibc's dynamic rule: trim threshold = 2 x mmap threshold
_lock = threading.Lock()
_depth = 0


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, freed large allocations are reused instead of unmapped (nests)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_KEEP)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                _LIBC.malloc_trim(0)


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (every few chunks: blocks freed by one
    chunk do not always fit the next one's, and a long run would otherwise keep them all)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
