"""Process memory settings for CPU training. No ``ray`` here; nothing happens at import.

A CPU training step frees and allocates the same large buffers every step. The biggest is
the word-embedding gradient: a dense (vocab x hidden) fp32 tensor, 47 MB for MiniLM
(30,522 x 384). glibc's malloc serves a block that large with ``mmap`` and unmaps it when it
is freed, so every step the kernel faults in and zeroes ~12,000 fresh pages. Without that,
MiniLM steps on 2 CPUs ran 10-14% faster, alternated within one process (docs/benchmarks.md;
between separate bench processes the gain is lost in the machine's noise). PyTorch's CPU
performance guides fix this by preloading jemalloc or tcmalloc; :func:`keep_freed_memory`
gets the same reuse from glibc itself, with no extra library.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_HEAP_MAX = 64 << 20
"""The size of a glibc thread-arena heap on 64-bit Linux (2 x the 32 MB mmap threshold cap)."""


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse, instead of returning it to the OS.

    Three ``mallopt`` settings, process-wide:
      - no ``mmap`` for large blocks (they come from the heap, so a freed one is reused);
      - no trimming of a heap's free top (it would be faulted in again next step);
      - a 64 MB top pad, because a thread's heap whose only block was freed is otherwise
        unmapped whole; Ray Train runs the training function in a thread, so its blocks
        live in such a heap.
    The cost: the process keeps its peak heap size (RSS stays at the peak instead of dipping
    between steps). Blocks over 64 MB in a thread (BERT-base's 94 MB embedding gradient) still
    use ``mmap``: glibc falls back to it when no heap can hold them.

    Returns False, changing nothing, where the C library is not glibc (musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: the parameter numbers above are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, _HEAP_MAX)))
