"""threadloom.Executor: the concurrent.futures contract, on the C scheduler."""

import asyncio
import concurrent.futures as cf
import os
import threading
import traceback

import pytest

import threadloom
from conftest import run_python


def square(x):
    return x * x


def boom(x):
    raise KeyError("item %d" % x)


def test_submit_and_results():
    with threadloom.Executor(max_workers=4) as ex:
        futs = [ex.submit(square, i) for i in range(200)]
        assert [f.result(timeout=30) for f in futs] == [i * i for i in range(200)]
        assert ex.submit(lambda a, b=0: a + b, 1, b=2).result(timeout=30) == 3


def test_exception_keeps_its_traceback():
    with threadloom.Executor(max_workers=2) as ex:
        f = ex.submit(boom, 7)
        with pytest.raises(KeyError, match="item 7") as ei:
            f.result(timeout=30)
        frames = [fr.name for fr in traceback.extract_tb(ei.value.__traceback__)]
        assert "boom" in frames


@pytest.mark.parametrize("chunksize", [1, 3, 64])
def test_map_in_order_with_chunks(chunksize):
    with threadloom.Executor(max_workers=3) as ex:
        assert list(ex.map(square, range(500), chunksize=chunksize)) == [i * i for i in range(500)]
        assert list(ex.map(pow, [2, 3], [5, 2], chunksize=chunksize)) == [32, 9]
        with pytest.raises(KeyError):
            list(ex.map(boom, range(10), chunksize=chunksize))
        with pytest.raises(ValueError):
            ex.map(square, [1], chunksize=0)


def test_map_timeout():
    gate = threading.Event()
    with threadloom.Executor(max_workers=1) as ex:
        it = ex.map(lambda x: gate.wait(30), range(2), timeout=0.2)
        with pytest.raises(cf.TimeoutError):
            next(it)
        gate.set()


def test_wait_as_completed_and_asyncio():
    with threadloom.Executor(max_workers=4) as ex:
        futs = [ex.submit(square, i) for i in range(50)]
        done, not_done = cf.wait(futs, timeout=30)
        assert len(done) == 50 and not not_done
        assert sorted(f.result() for f in cf.as_completed(futs)) == sorted(i * i for i in range(50))

        async def main():
            return await asyncio.wrap_future(ex.submit(square, 12))

        assert asyncio.run(main()) == 144


def test_shutdown_cancel_futures_cancels_what_is_queued():
    gate, started = threading.Event(), threading.Event()

    def blocker():
        started.set()
        gate.wait(30)
        return "ran"

    ex = threadloom.Executor(max_workers=1)
    running = ex.submit(blocker)
    started.wait(30)
    queued = [ex.submit(square, i) for i in range(20)]
    closer = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True})
    closer.start()
    cf.wait(queued, timeout=30)
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert running.result(timeout=30) == "ran"
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_initializer_and_broken_pool():
    seen, lock = set(), threading.Lock()

    def init(tag):
        with lock:
            seen.add((tag, threading.get_ident()))

    with threadloom.Executor(max_workers=3, initializer=init, initargs=("x",)) as ex:
        list(ex.map(square, range(30)))
    assert len(seen) == 3 and all(tag == "x" for tag, _ in seen)

    def bad_init():
        raise OSError("no")

    ex = threadloom.Executor(max_workers=2, initializer=bad_init)
    try:  # workers start at once, so the pool may be known broken before the first submit
        f = ex.submit(square, 2)
    except cf.thread.BrokenThreadPool:
        pass
    else:
        with pytest.raises(cf.thread.BrokenThreadPool):
            f.result(timeout=30)
    with pytest.raises(cf.thread.BrokenThreadPool):
        ex.submit(square, 3)
    ex.shutdown()


def test_many_submitting_threads():
    n, per = 16, 200
    with threadloom.Executor(max_workers=4, capacity=8) as ex:  # small queue: backpressure
        barrier = threading.Barrier(n)
        out = [None] * n

        def producer(k):
            barrier.wait()
            out[k] = [ex.submit(square, k * per + i) for i in range(per)]

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [f.result(timeout=60) for fs in out for f in fs]
        assert got == [i * i for i in range(n * per)]
        assert ex.pool.stats()["executed"] >= n * per


def test_shutdown_from_a_worker_is_refused():
    with threadloom.Executor(max_workers=2) as ex:
        f = ex.submit(lambda: ex.shutdown(wait=True))
        with pytest.raises(RuntimeError, match="own workers"):
            f.result(timeout=30)


def test_pinned_workers_each_get_a_core():
    with threadloom.Executor(max_workers=2, pin=True) as ex:
        cpus = list(ex.map(lambda _: frozenset(os.sched_getaffinity(0)), range(50)))
    allowed = os.sched_getaffinity(0)
    assert all(c <= allowed for c in cpus)
    assert ex.pool.closed


def test_interpreter_exit_runs_queued_work_and_joins():
    code = (
        "import threading, threadloom\n"
        "done = []\n"
        "ex = threadloom.Executor(max_workers=2)\n"
        "for i in range(100): ex.submit(done.append, i)\n"
        "import atexit\n"
        "atexit.register(lambda: print('tasks', len(done)))\n"
    )
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tasks 100"


# -- issue 22: stuck tasks, Ctrl-C, deadlocks, absurd sizes -------------------------------------

CTRL_C = """
import os, signal, threading, time, threadloom
release = threading.Event()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
%s
except KeyboardInterrupt:
    print("interrupted", flush=True)
release.set()
"""


@pytest.mark.parametrize("blocked", [
    # shutdown() waiting for a task that does not return
    "    ex = threadloom.Executor(max_workers=1)\n"
    "    ex.submit(release.wait)\n"
    "    ex.shutdown()\n",
    # the with statement's exit, the same
    "    with threadloom.Executor(max_workers=1) as ex:\n"
    "        ex.submit(release.wait)\n",
    # submit() waiting for room in a bounded queue
    "    ex = threadloom.Executor(max_workers=1, capacity=2)\n"
    "    while True: ex.submit(release.wait)\n",
], ids=["shutdown", "with", "submit"])
def test_ctrl_c_interrupts_blocking_calls(blocked):
    r = run_python("-c", CTRL_C % blocked, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "interrupted\n"


def test_submitting_more_than_the_queue_holds_to_tasks_that_wait_for_the_submitter():
    # concurrent.futures' queue is unbounded, so this runs there; a bounded queue deadlocked
    # (the submitter waited for room, the tasks for the submitter)
    code = ("import threading, threadloom\n"
            "go = threading.Event()\n"
            "with threadloom.Executor(max_workers=2) as ex:\n"
            "    futures = [ex.submit(go.wait, 60) for _ in range(2000)]\n"
            "    go.set()\n"
            "    print(sum(f.result() for f in futures))\n")
    r = run_python("-c", code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2000\n"


def test_unbounded_submit_keeps_every_task_and_shutdown_runs_or_cancels_them():
    gate = threading.Event()
    ex = threadloom.Executor(max_workers=1)
    futs = [ex.submit(gate.wait, 30)] + [ex.submit(square, i) for i in range(500)]
    gate.set()
    assert [f.result(timeout=30) for f in futs[1:]] == [i * i for i in range(500)]
    gate.clear()
    more = [ex.submit(gate.wait, 30)] + [ex.submit(square, i) for i in range(500)]
    closer = threading.Thread(target=ex.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    cf.wait(more[1:], timeout=30)
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and all(f.cancelled() for f in more[1:])


@pytest.mark.parametrize("n,error", [(10 ** 6, ValueError), (10 ** 12, ValueError),
                                     ("2", TypeError), (2.0, TypeError)])
def test_max_workers_beyond_what_the_system_can_start_is_refused(n, error):
    # 10**6 hung in the constructor (threads started one by one until the system refused)
    code = ("import threadloom\n"
            "try:\n"
            "    threadloom.Executor(max_workers=%r)\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n" % (n,))
    r = run_python("-c", code, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(error.__name__ + " max_workers"), r.stdout
