"""threadloom.Arena: NUMA-local blocks for batches, from many threads."""

import random
import threading

import pytest

import threadloom

MiB = 1 << 20


def test_alloc_write_read_free():
    a = threadloom.Arena(numa_node=0, size=64 * MiB)
    b = a.alloc(MiB)
    assert len(b) == b.nbytes == MiB and b.ptr % 64 == 0
    m = memoryview(b)
    m[:5] = b"hello"
    assert bytes(m[:5]) == b"hello"
    with pytest.raises(BufferError):
        b.free()  # a view is alive
    m.release()
    assert b.numa_node == 0
    s = a.stats()
    assert s["blocks_in_use"] == 1 and s["bytes_in_use"] >= MiB and s["numa_node"] == 0
    b.free()
    b.free()  # idempotent
    assert b.ptr == 0
    with pytest.raises(ValueError):
        memoryview(b)
    assert a.stats()["blocks_in_use"] == 0
    with a.alloc(4096, alignment=4096) as c:
        assert c.ptr % 4096 == 0
    assert a.stats()["blocks_in_use"] == 0
    a.close()


def test_pinning_policy_without_a_driver():
    n, _ = __import__("conftest").gpu_count_or_reason()
    if n:
        pytest.skip("a GPU is present: the pinned path is tested by make gpu-test")
    a = threadloom.Arena(size=64 * MiB)  # pin='auto': plain memory, and why
    s = a.stats()
    assert s["pinned"] is False and "cudaHostRegister" in s["pin_detail"]
    with pytest.raises((threadloom.NoDriverError, threadloom.NotBuiltError)):
        threadloom.Arena(size=64 * MiB, pin="require")
    with pytest.raises(ValueError):
        threadloom.Arena(pin="sometimes")


def test_exhaustion_is_an_error_and_recovers():
    a = threadloom.Arena(numa_node=0, size=64 * MiB, pin="never")
    blocks = []
    with pytest.raises(threadloom.OutOfMemoryError) as ei:
        while True:
            blocks.append(a.alloc(8 * MiB))
    assert "free blocks or create a larger arena" in str(ei.value)
    assert "64 MiB per allocating thread" in str(ei.value)
    assert 4 <= len(blocks) <= 8
    assert a.stats()["failed_allocs"] >= 1
    blocks.clear()  # dropping a Buffer frees its block
    a.alloc(8 * MiB).free()


def test_close_rules():
    a = threadloom.Arena(size=64 * MiB, pin="never")
    b = a.alloc(1000)
    with pytest.raises(threadloom.BusyError):
        a.close()
    b.free()
    a.close()
    with pytest.raises(threadloom.ClosedError):
        a.alloc(10)
    with pytest.raises(threadloom.ClosedError):
        a.stats()
    with pytest.raises(threadloom.ClosedError):
        a.trim()


def test_freed_blocks_are_cached_per_thread_and_trimmed():
    a = threadloom.Arena(numa_node=0, size=64 * MiB, pin="never")
    b = a.alloc(MiB)
    ptr = b.ptr
    b.free()
    s = a.stats()
    # the block is neither in use nor back in mimalloc: this thread's cache holds it
    assert (s["blocks_in_use"], s["cached_blocks"], s["cached_bytes"]) == (0, 1, MiB)
    with a.alloc(MiB) as c:  # the same size takes it back
        assert c.ptr == ptr
        s = a.stats()
        assert (s["cache_hits"], s["blocks_in_use"], s["cached_blocks"]) == (1, 1, 0)
    a.trim()
    s = a.stats()
    assert (s["cached_blocks"], s["cached_bytes"], s["bytes_in_use"]) == (0, 0, 0)
    a.close()


def test_many_threads_allocate_and_free_each_others_blocks():
    # mimalloc gives every allocating thread segments of its own: 64 MiB per thread, plus room
    n, rounds = 8, 300
    a = threadloom.Arena(numa_node=0, size=(n + 2) * 64 * MiB, pin="never")
    barrier = threading.Barrier(n)
    exchange, lock, errors = [], threading.Lock(), []

    def worker(seed):
        rng = random.Random(seed)  # per-thread: nothing hot is shared
        try:
            barrier.wait()
            for _ in range(rounds):
                b = a.alloc(rng.randrange(64 << 10, 1 << 20))
                memoryview(b)[0] = seed
                with lock:
                    exchange.append(b)
                    other = exchange.pop(rng.randrange(len(exchange)))
                other.free()  # often a block another thread allocated
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = a.stats()
    assert s["allocs"] == n * rounds and s["blocks_in_use"] == 0 and s["bytes_in_use"] == 0
    assert s["peak_bytes"] > 0
    assert s["cached_blocks"] == 0 and s["cached_bytes"] == 0  # emptied as the threads exited


def test_node_arena_is_shared_and_local(monkeypatch):
    monkeypatch.setenv("THREADLOOM_ARENA_MB", "256")
    node = threadloom.current_numa_node()
    assert node >= 0
    a = threadloom.arena()
    assert a is threadloom.arena(numa_node=node)
    with a.alloc(1 << 16) as b:
        assert b.numa_node == node
    monkeypatch.setenv("THREADLOOM_ARENA_MB", "lots")
    with pytest.raises(ValueError):
        threadloom.arena(numa_node=node + 1000)
    # leave the process-wide arena of this node to later tests at its default size
    from threadloom import memory
    with memory._lock:
        memory._arenas.pop(node).close()


def test_cpu_nodes_from_sysfs_match_the_topology(monkeypatch):
    """current_numa_node() reads sysfs (fast); its map agrees with hwloc's for this machine,
    and without sysfs it falls back to the topology."""
    from threadloom import memory, _core
    monkeypatch.delenv("HWLOC_XMLFILE", raising=False)
    fast = memory._cpu_nodes()
    want = {}
    for c in _core.topology()["core_list"]:
        for pu in memory._cpulist(c["pus"]):
            want[pu] = c["numa_node"]
    assert fast == want
    assert memory._cpulist("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]
    monkeypatch.setattr(memory.os, "listdir", lambda p: (_ for _ in ()).throw(FileNotFoundError(p)))
    assert memory._cpu_nodes() == want
