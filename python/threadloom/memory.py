"""NUMA-local memory for batches: one shared Arena per NUMA node.

    buf = threadloom.arena().alloc(nbytes)     # from the node the calling thread runs on

Each thread that allocates gets its own heap inside its node's arena (mimalloc), so pinned
loader threads allocate without sharing anything; any thread may free any Buffer. Such a thread
also keeps up to 8 blocks it freed (at most 1/16 of the arena) and hands them out again for
requests of the same size: Arena.stats() counts them as cached_bytes, and Arena.trim() gives
them back (threads also give them back when they exit). The arena of
a node is created on first use, page-locked when a GPU is present. Its size is
THREADLOOM_ARENA_MB (default 1024) MiB of address space; each allocating thread needs about
64 MiB of it for its own segments, plus the blocks it holds. Pages become resident (on the node)
when first written, so an arena costs memory only for what is used, and creating one is quick
(THREADLOOM_ARENA_PREFAULT=1 makes every page resident up front instead: ~0.7 ms per MiB).
"""

import os
import threading

from threadloom import _core

_lock = threading.Lock()
_arenas = {}
_core_nodes = None


def _default_size():
    raw = os.environ.get("THREADLOOM_ARENA_MB", "1024")
    try:
        mb = int(raw)
        if mb <= 0:
            raise ValueError
    except ValueError:
        raise ValueError("THREADLOOM_ARENA_MB must be a positive number of MiB, not %r" % raw) from None
    return mb << 20


def _cpulist(text):
    """The CPU numbers of a Linux cpulist ("0-3,8,10-11")."""
    out = []
    for part in text.strip().split(","):
        if part:
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b or a) + 1))
    return out


def _cpu_nodes():
    """{CPU number: NUMA node} of this machine: from sysfs (/sys/devices/system/node/node*/
    cpulist, a fraction of a millisecond), else from the hwloc topology (~11 ms to load, and it
    describes HWLOC_XMLFILE's machine when that is set, not this one)."""
    base = "/sys/devices/system/node"
    nodes = {}
    try:
        for name in os.listdir(base):
            if name.startswith("node") and name[4:].isdigit():
                with open(os.path.join(base, name, "cpulist")) as f:
                    for cpu in _cpulist(f.read()):
                        nodes[cpu] = int(name[4:])
    except OSError:
        nodes = {}
    if nodes:
        return nodes
    for c in _core.topology()["core_list"]:
        for pu in _cpulist(c["pus"]):
            nodes[pu] = c["numa_node"]
    return nodes


def current_numa_node():
    """The NUMA node of the CPUs the calling thread may run on (the first of them), or -1."""
    global _core_nodes
    if _core_nodes is None:
        _core_nodes = _cpu_nodes()
    first = _core.pin_current().split(",")[0].split("-")[0]
    return _core_nodes.get(int(first), -1)


def arena(numa_node=None, pin="auto"):
    """The process's Arena for `numa_node` (default: the calling thread's node), created on
    first use with THREADLOOM_ARENA_MB MiB and the given pin policy."""
    node = current_numa_node() if numa_node is None else numa_node
    with _lock:
        a = _arenas.get(node)
        if a is None:
            a = _core.Arena(numa_node=node, size=_default_size(), pin=pin,
                            prefault=os.environ.get("THREADLOOM_ARENA_PREFAULT", "0") == "1")
            _arenas[node] = a
        return a


# -- glibc malloc's thresholds ------------------------------------------------------------------

# glibc's own ceiling for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), and
# the trim threshold it sets beside it (twice the mmap threshold): where glibc ends up by itself
# once the process has freed one 32 MiB block
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_MMAP_MAX_")
_malloc_tuning = None  # (applied, why), decided once per process


def tune_malloc():
    """Starts glibc's malloc at the thresholds it would reach by itself after freeing one
    32 MiB block (mmap threshold 32 MiB, trim threshold 64 MiB), once per process; returns
    (applied, why). A DataLoader calls it when it starts an epoch.

    Why: numpy and Pillow allocate array data with malloc. A sample of a few hundred KiB to a
    few MiB is above glibc's starting mmap threshold (128 KiB), and the memory a freed sample
    leaves at the top of a heap is above its trim threshold, so each sample's arrays land on
    pages the kernel has to fault in and zero again: 291 minor faults per sample of the vision
    workload on 3.13t, where the interpreter's own objects go to mimalloc and never lift glibc's
    thresholds as a GIL interpreter's large frees do (docs/design.md, "Page faults in a sample
    loop"). At these values freed memory up to 64 MiB per malloc arena stays mapped for reuse.

    Not applied (and `why` says so) when THREADLOOM_MALLOC_TUNE=0, when the environment already
    tunes malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
    MALLOC_MMAP_MAX_, or glibc.malloc in GLIBC_TUNABLES), when LD_PRELOAD names another
    allocator (jemalloc, tcmalloc, mimalloc), or when the C library is not glibc."""
    global _malloc_tuning
    with _lock:
        if _malloc_tuning is None:
            _malloc_tuning = _decide_malloc()
        return _malloc_tuning


def malloc_tuning():
    """tune_malloc()'s (applied, why), or None when it has not been called in this process."""
    return _malloc_tuning


def _decide_malloc():
    env = os.environ
    if env.get("THREADLOOM_MALLOC_TUNE", "1") == "0":
        return False, "THREADLOOM_MALLOC_TUNE=0"
    given = [k for k in _MALLOC_ENV if k in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        given.append("GLIBC_TUNABLES (glibc.malloc)")
    if given:
        return False, "malloc is tuned by the environment already: %s" % ", ".join(given)
    preload = env.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return False, "LD_PRELOAD loads %s: glibc's malloc is not the one in use" % name
    if not _core.malloc_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD):
        return False, "the C library is not glibc (or refused the thresholds)"
    return True, ("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB"
                  % (MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20))
