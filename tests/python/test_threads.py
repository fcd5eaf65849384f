"""Many Python threads calling into _core at once, on the free-threaded interpreter."""

import os
import sys
import threading

import pytest

import threadloom
from threadloom import _core
from conftest import TOPOLOGIES

THREADS = 16
ENOSPC = {cls: code for code, _, _, cls in _core.error_table()}[threadloom.NoSpaceError]
ROUNDS = 40


def test_many_threads_share_the_module():
    xml = os.path.join(TOPOLOGIES, "nvidiaDGX2.xml")
    barrier = threading.Barrier(THREADS)
    errors = []
    results = [None] * THREADS

    def worker(i):
        try:
            barrier.wait()
            seen = set()
            for r in range(ROUNDS):
                t = _core.topology(xml)
                seen.add((t["pus"], len(t["gpus"])))
                with pytest.raises(threadloom.NoSpaceError) as ei:
                    _core._raise_error(ENOSPC, "t%d r%d" % (i, r))
                # the detail of this thread's failure, never another thread's
                assert ei.value.detail == "t%d r%d" % (i, r)
                try:
                    _core.cuda_device_count()
                except threadloom.Error:
                    pass
            results[i] = seen
        except BaseException as e:  # reported below with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker hung"
    assert not errors, errors
    assert all(r == {(4, 16)} for r in results)
    if hasattr(sys, "_is_gil_enabled") and threadloom.info()["interpreter"]["free_threaded_build"]:
        assert not sys._is_gil_enabled()
