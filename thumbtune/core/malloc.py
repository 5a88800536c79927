"""How a long-running process hands freed memory back to the OS (glibc's allocator; a no-op elsewhere).

glibc's malloc keeps freed memory for reuse, which a serving process that allocates and frees tensors of
every size for hours turns into resident memory that only grows (docs/BENCHMARKS.md, "Soak"). Two causes:

- The mmap threshold is dynamic: a block of at least M_MMAP_THRESHOLD bytes (128 KiB at start) gets its
  own mmap and is unmapped when freed, but freeing one raises the threshold to that block's size (up to
  32 MiB). After the first few tensors are freed, every activation and KV block comes from the heap, whose
  free space fragments and is rarely returned. Setting the threshold fixes it (and turns the rise off).
- Each thread that allocates may get its own arena (up to 8 per core), each with its own free lists:
  M_ARENA_MAX bounds them.

``tune_malloc`` sets either once at start-up, before the model is loaded (both off by default: on the same
machine, bench soak with the threshold at 128 KiB and 2 arenas kept RSS flat before its broker pause, where
glibc's defaults swing by 40 MB, but every large activation then paid a fresh mapping: 573 answers in 30
minutes instead of 745, and RSS still rose after the pause; docs/BENCHMARKS.md, "Soak");
``release_freed_memory`` returns the free top of every heap (malloc_trim) after a burst of frees, such as
adapters unloaded.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""mallopt's parameter numbers (glibc's malloc.h)."""


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def tune_malloc(mmap_threshold: int, arena_max: int) -> None:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes and its arenas at ``arena_max`` (0: leave
    glibc's default for that one). Call before the model is loaded: the heap made before stays as it is."""
    if _LIBC is None:
        if mmap_threshold or arena_max:
            log.info("not glibc: the malloc settings do not apply")
        return
    for name, param, value in (
        ("mmap threshold", M_MMAP_THRESHOLD, mmap_threshold),
        ("arena max", M_ARENA_MAX, arena_max),
    ):
        if value and _LIBC.mallopt(param, value) != 1:
            raise ValueError(f"glibc refused malloc {name} = {value}")


def release_freed_memory() -> None:
    """Hand the free pages at the top of every heap back to the OS (malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
