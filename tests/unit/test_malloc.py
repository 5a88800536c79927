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


# --- jemalloc ---------------------------------------------------------------------------------------------

ALLOCATOR_PROBE = """
import json, os, sys
from thumbtune.core.malloc import jemalloc_loaded, use_allocator
use_allocator(sys.argv[1])
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "jemalloc": jemalloc_loaded(),
                  "conf": os.environ.get("MALLOC_CONF")}))
"""

PURGE_PROBE = """
import ctypes
from thumbtune.core.malloc import jemalloc_loaded, release_freed_memory
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MiB in 64 KiB blocks, touched
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks:
    libc.free(b)
before = rss_mb()
release_freed_memory()
print(jemalloc_loaded(), before - rss_mb())
"""

needs_jemalloc = pytest.mark.skipif(malloc.find_jemalloc() is None, reason="jemalloc not installed")


def _probe(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )


@needs_jemalloc
def test_use_allocator_restarts_the_process_on_jemalloc_keeping_pid_arguments_and_an_operators_conf():
    import json

    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOCATOR_PROBE, "jemalloc"], stdout=subprocess.PIPE, text=True
    )
    out = json.loads(proc.communicate(timeout=60)[0])
    assert out == {"pid": proc.pid, "argv": ["jemalloc"], "jemalloc": True, "conf": malloc.JEMALLOC_CONF}
    own = json.loads(_probe(ALLOCATOR_PROBE, "jemalloc", env={"MALLOC_CONF": "narenas:2"}).stdout)
    assert own["jemalloc"] and own["conf"] == "narenas:2"


def test_glibc_means_no_restart_and_no_jemalloc():
    import json

    out = json.loads(_probe(ALLOCATOR_PROBE, "glibc", env={"LD_PRELOAD": ""}).stdout)
    assert out["jemalloc"] is False and out["conf"] is None


def test_without_jemalloc_installed_it_stays_on_glibc_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(malloc, "JEMALLOC_DIRS", ("/nonexistent",))
    monkeypatch.setattr(malloc, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(malloc.os, "execve", lambda *a: pytest.fail("restarted without jemalloc"))
    malloc.use_allocator("jemalloc")
    assert "apt install libjemalloc2" in caplog.text


def test_jemalloc_goes_first_in_ld_preload_and_an_operators_malloc_conf_wins():
    env = malloc.jemalloc_env({"LD_PRELOAD": "/opt/x.so", "MALLOC_CONF": "narenas:1"}, "/lib/je.so")
    assert env["LD_PRELOAD"] == "/lib/je.so /opt/x.so" and env["MALLOC_CONF"] == "narenas:1"
    assert malloc.jemalloc_env({}, "/lib/je.so")["MALLOC_CONF"] == malloc.JEMALLOC_CONF


@needs_jemalloc
def test_release_freed_memory_purges_jemalloc_arenas():
    """With jemalloc's own decay off, only the purge gives 200 MiB of freed blocks back to the OS."""
    env = {"LD_PRELOAD": malloc.find_jemalloc(), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    loaded, returned_mb = _probe(PURGE_PROBE, env=env).stdout.split()
    assert loaded == "True" and int(returned_mb) >= 150


# --- Python's heap -----------------------------------------------------------------------------------------

FREEZE_PROBE = """
import collections, gc, sys
from thumbtune.core.malloc import freeze_startup_heap
startup = [[i] for i in range(1_000_000)]  # a big long-lived heap, like a loaded model's
gc.collect()
if sys.argv[1] == "freeze":
    freeze_startup_heap()
before = gc.get_stats()[2]["collections"]
window = collections.deque(maxlen=20_000)
for _ in range(200_000):  # cycles that live a while, then are garbage: as timed-out kafka futures
    a = {}; a["self"] = a; window.append(a)
print(gc.get_stats()[2]["collections"] - before)
"""


def test_a_frozen_startup_heap_lets_full_collections_come_while_cyclic_garbage_piles_up():
    """Unfrozen, 180k cycles become garbage in the oldest generation without a full collection (a quarter of a
    million long-lived objects must be promoted first); frozen, full collections come all along."""
    assert int(_probe(FREEZE_PROBE, "no").stdout) == 0
    assert int(_probe(FREEZE_PROBE, "freeze").stdout) >= 2
