"""threadloom.memory.tune_malloc: glibc's malloc thresholds, set once per process by the
DataLoader, and every case where it must leave them alone. Each case runs in a child process:
the setting is process-wide and for good."""

import json
import os
import subprocess
import sys

import pytest


def _glibc():
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


GLIBC = _glibc()

# the child: the tuning before and after, and where glibc puts 16 MiB and 40 MiB blocks
# (mallinfo2's hblks counts chunks that have a mapping of their own)
CHILD = r"""
import ctypes, json, sys
import threadloom
from threadloom import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

def own_mapping(n):
    before = libc.mallinfo2().hblks
    p = libc.malloc(n)
    mapped = libc.mallinfo2().hblks > before
    libc.free(p)
    return mapped

out = {"before": memory.malloc_tuning()}
if sys.argv[1] == "loader":
    for _ in threadloom.DataLoader(list(range(8)), batch_size=4):
        pass
else:
    out["first"] = list(memory.tune_malloc())
    out["again"] = list(memory.tune_malloc())
out["after"] = list(memory.malloc_tuning())
out["mapped_16"] = own_mapping(16 << 20)
out["mapped_40"] = own_mapping(40 << 20)
print(json.dumps(out))
"""


def child(mode="call", **env):
    e = dict(os.environ)
    for k in ("THREADLOOM_MALLOC_TUNE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        e.pop(k, None)
    e.update(env)
    p = subprocess.run([sys.executable, "-c", CHILD, mode], env=e, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only (this C library is not)")


@needs_glibc
def test_tune_malloc_sets_glibcs_ceiling_once():
    r = child()
    assert r["before"] is None  # importing threadloom changes nothing
    assert r["first"][0] is True and "32 MiB" in r["first"][1] and "64 MiB" in r["first"][1]
    assert r["again"] == r["first"] == r["after"]
    # 16 MiB now comes from a heap, 40 MiB (above the threshold) still gets its own mapping
    assert r["mapped_16"] is False and r["mapped_40"] is True


@needs_glibc
def test_a_dataloader_epoch_tunes_malloc():
    r = child("loader")
    assert r["before"] is None
    assert r["after"][0] is True
    assert r["mapped_16"] is False


@pytest.mark.parametrize("env, says", [
    ({"THREADLOOM_MALLOC_TUNE": "0"}, "THREADLOOM_MALLOC_TUNE=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, "GLIBC_TUNABLES"),
])
def test_tune_malloc_leaves_a_tuned_environment_alone(env, says):
    r = child(**env)
    assert r["first"][0] is False and says in r["first"][1]
    assert r["after"] == r["first"]
    if GLIBC and "MALLOC_MMAP_THRESHOLD_" not in env:
        # untouched: a 16 MiB block above glibc's own (dynamic, <= 32 MiB) threshold at start
        # is still mapped on its own in a fresh process
        assert r["mapped_16"] is True


def test_tune_malloc_names_a_preloaded_allocator(tmp_path):
    # a path that is not loaded (the dynamic loader warns and goes on): only its name counts
    r = child(LD_PRELOAD=str(tmp_path / "libjemalloc.so.2"))
    assert r["first"][0] is False and "jemalloc" in r["first"][1]
