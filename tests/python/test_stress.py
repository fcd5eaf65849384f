"""Seeded stress: random pipelines and executor loads on many threads, checked exactly."""

import random
import threading

import pytest

import threadloom


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_pipelines(seed):
    rng = random.Random(seed)
    n = rng.randrange(200, 2000)
    stages = [(rng.randrange(1, 6), rng.randrange(1, 50), rng.random() < 0.5) for _ in range(rng.randrange(1, 4))]
    ordered = rng.random() < 0.7
    p = threadloom.Pipeline(range(n), ordered=ordered, capacity=rng.randrange(1, 64))
    expect = list(range(n))
    for workers, mod, skip in stages:
        def fn(x, mod=mod, skip=skip):
            if skip and x % mod == 0:
                raise ValueError(x)
            return x + 1
        p.map(fn, workers=workers, on_error="skip" if skip else "raise",
              queue_size=rng.randrange(1, 8))
        if not skip:
            expect = [x + 1 for x in expect]
        else:
            expect = [x + 1 for x in expect if x % mod != 0]
    out = list(p)
    if ordered:
        assert out == expect
    else:
        assert sorted(out) == sorted(expect)


def test_executor_tasks_that_submit_tasks():
    """Tasks submit more tasks from worker threads (their own deques), 16 producers at once."""
    rng = random.Random(7)
    depth = {i: rng.randrange(0, 6) for i in range(64)}
    done = []
    lock = threading.Lock()
    with threadloom.Executor(max_workers=4) as ex:
        def node(key, d):
            with lock:
                done.append(key)
            if d > 0:
                ex.submit(node, key, d - 1)
                ex.submit(node, key, d - 1)

        barrier = threading.Barrier(16)

        def producer(k):
            barrier.wait()
            for key in range(k * 4, k * 4 + 4):
                ex.submit(node, key, depth[key])

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # shutdown(wait=True) drains everything, including tasks submitted during the drain
    assert sorted(done) == sorted(k for k, d in depth.items() for _ in range(2 ** (d + 1) - 1))
