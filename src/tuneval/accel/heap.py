"""Keep freed memory in the process heap during CPU training (glibc only).

Each training step frees and re-allocates every gradient (90 MB for MiniLM). glibc serves blocks
that large with mmap and hands them back to the kernel on free, so every step page-faults them in
again and the kernel zeroes each page first: 8-10% of a MiniLM step on 2 cores (measured,
benchmarks/speed.py). With mmap off and trimming raised, freed blocks are reused from the heap,
as a caching allocator (tcmalloc, jemalloc, CUDA's) would. The price is that the process keeps its
peak heap until exit, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Switch glibc malloc to heap reuse once per process; False where there is no glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, musl: their allocators behave differently
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not _done:
        log.debug("mallopt refused; CPU training keeps glibc's default allocation")
    return _done
