"""Process-level performance settings for CPU training.

:func:`tune_cpu_allocator` keeps glibc's ``malloc`` from handing every large tensor
back to the kernel when it is freed. Training allocates and frees the same few tens of
MB-sized activations every iteration; by default each of them is a fresh ``mmap`` whose
pages fault in (and are zeroed) on first touch, which costs several percent of a CPU
iteration. With ``M_MMAP_MAX=0`` and a large trim threshold the freed memory is reused
instead, and ``M_ARENA_MAX=1`` keeps oneDNN's worker threads on the same (reused) heap
rather than per-thread arenas that are trimmed and faulted in again. The price: the
process does not shrink its resident memory after a peak.

It is called by the ``qimera`` console script and the benchmarks; library users may call
it themselves. ``QIMERA_DEFAULT_MALLOC=1`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def tune_cpu_allocator() -> bool:
    """Apply the malloc settings once; returns True when they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("QIMERA_DEFAULT_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
              and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    return ok
