"""How a long-running process hands freed memory back to the OS: jemalloc by default, glibc's malloc tuned.

glibc's malloc keeps freed memory for reuse, which a serving process that allocates and frees tensors of
every size for hours turns into resident memory that swings and grows (docs/BENCHMARKS.md, "Soak"). Two
causes:

- The mmap threshold is dynamic: a block of at least M_MMAP_THRESHOLD bytes (128 KiB at start) gets its
  own mmap and is unmapped when freed, but freeing one raises the threshold to that block's size (up to
  32 MiB). After the first few tensors are freed, every activation and KV block comes from the heap, whose
  free space fragments and is rarely returned. Setting the threshold fixes it (and turns the rise off).
- Each thread that allocates may get its own arena (up to 8 per core), each with its own free lists:
  M_ARENA_MAX bounds them.

So the server runs on jemalloc where it is installed (``use_allocator``: THUMBTUNE_ALLOCATOR, default
jemalloc): it returns unused pages to the OS on its own after ~10 s (its decay), from a background thread.
In bench soak (30 minutes, one machine) RSS stayed within 1,039-1,063 MB for the ten minutes before the
broker pause, where glibc's defaults swung between 1,038 and 1,097 MB, for about as many answers (727
against 745); docs/BENCHMARKS.md, soak run 6.

With glibc (THUMBTUNE_ALLOCATOR=glibc, or jemalloc not installed), ``tune_malloc`` can fix the mmap
threshold and the arenas at start-up, before the model is loaded (both off by default: on one machine the
threshold at 128 KiB and 2 arenas kept RSS flat, but every large activation then paid a fresh mapping:
573 answers in 30 minutes instead of 745). ``release_freed_memory`` hands freed memory back after a burst
of frees, such as adapters unloaded: jemalloc purges its arenas, glibc trims its heaps (malloc_trim).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

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
    if _LIBC is None or jemalloc_loaded():
        if mmap_threshold or arena_max:
            log.info("not glibc's malloc: THUMBTUNE_MALLOC_MMAP_THRESHOLD and _ARENA_MAX do not apply")
        return
    for name, param, value in (
        ("mmap threshold", M_MMAP_THRESHOLD, mmap_threshold),
        ("arena max", M_ARENA_MAX, arena_max),
    ):
        if value and _LIBC.mallopt(param, value) != 1:
            raise ValueError(f"glibc refused malloc {name} = {value}")


def release_freed_memory() -> None:
    """Hand freed memory back to the OS now: jemalloc purges every arena's unused dirty pages; glibc returns
    the free pages of every heap (malloc_trim)."""
    if jemalloc_loaded():
        _purge_jemalloc()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


# --- jemalloc -------------------------------------------------------------------------------------------

JEMALLOC_LIBRARY = "libjemalloc.so.2"
JEMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
"""Where Debian/Ubuntu (libjemalloc2), Fedora/RHEL (jemalloc) and a source build install it."""
JEMALLOC_CONF = "background_thread:true"
"""jemalloc's own decay (unused dirty pages go back to the OS after ~10 s), run by a background thread, so a
server that goes quiet still shrinks. An operator's MALLOC_CONF wins."""
_MALLCTL_ARENAS_ALL = 4096
"""jemalloc's MALLCTL_ARENAS_ALL: ``arena.<i>.purge`` for every arena."""


def find_jemalloc(dirs: tuple[str, ...] | None = None) -> str | None:
    for directory in JEMALLOC_DIRS if dirs is None else dirs:
        path = Path(directory) / JEMALLOC_LIBRARY
        if path.is_file():
            return str(path)
    return None


def jemalloc_loaded() -> bool:
    """Whether this process allocates with jemalloc (preloaded: it is mapped into the process)."""
    try:
        return "/libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _purge_jemalloc() -> None:
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is not None:
        mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))


def jemalloc_env(env: Mapping[str, str], library: str | None) -> dict[str, str]:
    """``env`` with ``library`` preloaded (before anything an operator preloads) and jemalloc's settings."""
    preload = env.get("LD_PRELOAD", "")
    out = dict(env)
    out["LD_PRELOAD"] = f"{library} {preload}".strip()
    out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return out


def use_allocator(allocator: str) -> None:
    """Make this process allocate with ``allocator`` ('jemalloc' or 'glibc'), before it loads anything big.

    jemalloc replaces malloc only when preloaded, so the process starts itself again (same pid, arguments and
    environment, plus LD_PRELOAD) unless it already runs on it. Where jemalloc is not installed it stays on
    glibc and says so. Why jemalloc: bench soak, docs/BENCHMARKS.md ("Soak").
    """
    if allocator != "jemalloc" or jemalloc_loaded():
        return
    library = find_jemalloc()
    if library is None:
        log.warning(
            "THUMBTUNE_ALLOCATOR=jemalloc but %s is in none of %s (Debian: apt install libjemalloc2); "
            "running on glibc's malloc",
            JEMALLOC_LIBRARY,
            ", ".join(JEMALLOC_DIRS),
        )
        return
    if library in os.environ.get("LD_PRELOAD", "").split():  # preloaded, yet not loaded: do not loop
        log.warning("%s is in LD_PRELOAD but not loaded; running on glibc's malloc", library)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], jemalloc_env(os.environ, library))


# --- Python's own heap ----------------------------------------------------------------------------------


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model, torch, transformers: ~1M objects) out of the cyclic
    garbage collector's sight, as vLLM does after its start-up (vllm/utils/gc_utils.py, freeze_gc_heap).

    Python runs a full collection only once the objects promoted since the last one exceed a quarter of the
    long-lived ones, and each full collection walks them all, holding the GIL (the engine thread waits). With
    a million start-up objects that is ~250k objects of cyclic garbage first, such as the exceptions, frames
    and futures kafka-python leaves behind when requests to a frozen broker time out, then one long pause.
    Frozen, the start-up heap no longer counts: full collections come early and walk only what came since.
    (It did not remove bench soak's RSS step at the broker pause: docs/BENCHMARKS.md, soak run 6.) Objects
    frozen here are never collected if they become cyclic garbage later; start-up objects live as long as
    the process."""
    for generation in range(3):
        gc.collect(generation)
    gc.freeze()
    gc.collect()  # resets the long-lived count, taken at each full collection, to what is not frozen: ~0
