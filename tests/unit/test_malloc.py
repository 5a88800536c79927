"""glibc's mmap threshold stays where tune_malloc puts it (thumbtune/core/malloc.py).

Each case runs in its own interpreter: malloc settings are process-wide and cannot be undone. A 4 MiB
block is allocated and freed (which, by default, raises the threshold to 4 MiB), then a 1 MiB block is
allocated: with the threshold fixed at 128 KiB it is mapped on its own (mallinfo2's hblkhd grows and the
block goes back to the OS when freed); by default it comes from the heap.
"""

import ctypes
import subprocess
import sys

import pytest

from thumbtune.core import malloc

PROBE = """
import ctypes, sys
from thumbtune.core.malloc import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tune_malloc(int(sys.argv[1]), int(sys.argv[2]))
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before)
"""

pytestmark = pytest.mark.skipif(
    malloc._LIBC is None or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"), reason="needs glibc >= 2.33"
)


def _mapped_after_free(threshold: int, arenas: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold), str(arenas)], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_a_fixed_threshold_maps_large_blocks_after_a_larger_one_was_freed():
    assert _mapped_after_free(131072, 2) >= 1 << 20


def test_glibc_default_grows_the_threshold_so_the_block_comes_from_the_heap():
    assert _mapped_after_free(0, 0) == 0


def test_release_freed_memory_runs():
    malloc.release_freed_memory()
