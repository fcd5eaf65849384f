"""threadloom.Pipeline: ordering, errors, early stop, bounded memory, per-worker state."""

import random
import signal
import threading
import time
import traceback

import pytest

import threadloom
from conftest import run_python


def jitter(x):
    time.sleep(random.random() * 0.002)  # completion order differs from source order
    return x


def test_ordered_output_is_in_order():
    out = list(threadloom.Pipeline(range(300)).map(jitter, workers=4).map(lambda x: x * 2, workers=3))
    assert out == [2 * i for i in range(300)]


def test_completion_order_yields_everything():
    out = list(threadloom.Pipeline(range(300), ordered=False).map(jitter, workers=4))
    assert sorted(out) == list(range(300))


def fails_on_13(x):
    if x == 13:
        raise ValueError("bad item 13")
    return x


def test_stage_error_raises_with_original_traceback_and_stops():
    p = threadloom.Pipeline(range(10_000)).map(fails_on_13, workers=3).map(jitter, workers=2)
    with pytest.raises(ValueError, match="bad item 13") as ei:
        for _ in p:
            pass
    assert "fails_on_13" in [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    assert p._workers.pool.closed  # its threads are joined


@pytest.mark.parametrize("feed", ["thread", "consumer"])
def test_ordered_errors_come_at_their_turn(feed):
    """Ordered: the earliest failing item's error, after every result before it, even when a
    later item fails first (here item 6 at once, item 3 after 0.2 s); every run the same."""
    def fn(x):
        if x == 3:
            time.sleep(0.2)
            raise ValueError("item 3")
        if x == 6:
            raise KeyError("item 6")
        return x

    got = []
    p = threadloom.Pipeline(range(100), capacity=8, feed=feed).map(fn, workers=4).map(jitter, workers=2)
    with pytest.raises(ValueError, match="item 3"):
        for x in p:
            got.append(x)
    assert got == [0, 1, 2]
    assert p._workers.pool.closed
    # unordered: the first error raised stops it at once (item 6 here)
    p = threadloom.Pipeline(range(100), ordered=False, capacity=8, feed=feed).map(fn, workers=4)
    with pytest.raises(KeyError, match="item 6"):
        list(p)


def test_skip_policy_counts_and_limits():
    p = threadloom.Pipeline(range(100), ordered=True).map(
        lambda x: 1 // (x % 10), workers=2, on_error="skip", max_errors=20)
    out = list(p)
    assert len(out) == 90
    assert p.stats()[0]["errors"] == 10 and p.stats()[0]["items"] == 90
    p = threadloom.Pipeline(range(100)).map(lambda x: 1 // (x % 10), on_error="skip", max_errors=3)
    with pytest.raises(RuntimeError, match="max_errors=3") as ei:
        list(p)
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


def test_consumer_breaking_early_stops_the_pipeline():
    pulled = []

    def source():
        for i in range(10**9):
            pulled.append(i)
            yield i

    p = threadloom.Pipeline(source()).map(jitter, workers=2)
    for x in p:
        if x == 5:
            break
    # the loop's iterator is gone: the pipeline closed and joined its threads, the feeder too,
    # so the source cannot advance any more
    assert p._workers.pool.closed
    assert len(pulled) <= 5 + 64


def test_memory_stays_bounded_with_a_slow_consumer():
    pulled = []
    cap = 8

    def source():
        for i in range(10**6):
            pulled.append(i)
            yield i

    p = threadloom.Pipeline(source(), capacity=cap).map(lambda x: x, workers=2)
    it = iter(p)
    for _ in range(3):
        next(it)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:  # give the producers time to run ahead as far as they can
        time.sleep(0.01)
    assert len(pulled) <= 3 + cap + 1
    p.close()


def test_state_is_created_once_per_worker_and_never_shared():
    made, lock = [], threading.Lock()

    def factory():
        st = {"thread": threading.get_ident(), "rng": random.Random(0)}
        with lock:
            made.append(st)
        return st

    def use(st, x):
        assert st["thread"] == threading.get_ident()
        return x + int(st["rng"].random() * 0)

    out = list(threadloom.Pipeline(range(500)).map(use, workers=4, state=factory))
    assert out == list(range(500))
    assert 1 <= len(made) <= 4
    assert len({st["thread"] for st in made}) == len(made)


def test_stats_while_running_and_timeout():
    gate, returned = threading.Event(), threading.Event()

    def wait_for_gate(x):
        if x == 3:
            gate.wait(60)
            returned.set()
        return x

    p = threadloom.Pipeline(range(10), timeout=0.3).map(wait_for_gate, name="gated")
    it = iter(p)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    s = p.stats()[0]  # readable while running
    assert s["name"] == "gated" and s["items"] >= 3 and s["workers"] == 1
    # issue 22: a timeout fires on time, while the stage call is still stuck (it waited for
    # the call before: Pipeline(timeout=0.5) with a 6 s stage raised after 6 s), and names it
    with pytest.raises(TimeoutError, match="gated: 3 done") as ei:
        next(it)
    assert not returned.is_set()
    assert "gated worker 0 for" in str(ei.value) and "item 3 (3)" in str(ei.value)
    assert "gate.wait(60)" in str(ei.value)
    gate.set()
    returned.wait(30)
    assert p.close() is None and p._workers.pool.closed  # joined once the call returned


def test_bad_arguments():
    with pytest.raises(ValueError):
        threadloom.Pipeline([]).map(print, workers=0)
    with pytest.raises(ValueError):
        threadloom.Pipeline([]).map(print, on_error="ignore")
    with pytest.raises(ValueError):
        iter(threadloom.Pipeline([1]))
    with pytest.raises(TypeError):
        threadloom.Pipeline([1]).map(print, state=42)
    p = threadloom.Pipeline([1, 2]).map(lambda x: x)
    assert list(p) == [1, 2]
    with pytest.raises(RuntimeError, match="runs once"):
        iter(p)


def test_source_error_propagates():
    def source():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(threadloom.Pipeline(source()).map(lambda x: x))


def test_keyboard_interrupt_stops_promptly():
    code = (
        "import os, signal, threading, time, threadloom\n"
        "def slow(x):\n"
        "    time.sleep(0.01); return x\n"
        "threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "try:\n"
        "    for x in threadloom.Pipeline(iter(int, 1)).map(slow, workers=2): pass\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', threading.active_count())\n"
    )
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("interrupted")


@pytest.mark.parametrize("feed", ["thread", "consumer"])
def test_stop_iteration_in_a_stage_is_an_error(feed):
    # issue 22: it ended the consumer's loop early without a word; a source's StopIteration is
    # still its end
    def stage(x):
        if x == 3:
            raise StopIteration
        return x

    with pytest.raises(RuntimeError, match="stage 'stage', on item 3 \\(3\\), raised "
                                           "StopIteration") as ei:
        list(threadloom.Pipeline(range(10), feed=feed).map(stage, workers=2))
    assert isinstance(ei.value.__cause__, StopIteration)

    def state():
        raise StopIteration

    with pytest.raises(RuntimeError, match="state=factory"):
        list(threadloom.Pipeline(range(10), feed=feed).map(lambda s, x: x, state=state))


def test_interpreter_exit_with_a_running_pipeline():
    code = (
        "import threadloom\n"
        "it = iter(threadloom.Pipeline(iter(int, 1)).map(lambda x: x, workers=2))\n"
        "next(it)\n"
        "print('leaving')\n"
    )
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "leaving"


def test_consumer_feed_runs_the_source_on_the_consumer_and_keeps_capacity_in_flight():
    pulled, threads, cap = [], set(), 8

    def source():
        for i in range(200):
            threads.add(threading.get_ident())
            pulled.append(i)
            yield i

    p = (threadloom.Pipeline(source(), capacity=cap, feed="consumer")
         .map(jitter, workers=3).map(lambda x: x * 2, workers=2))
    it = iter(p)
    assert len(pulled) == cap  # handed over before the first result is asked for
    assert p._workers.pool.size == 5  # the stages' workers; no feeder thread
    out = []
    for k in range(1, 20):
        out.append(next(it))
        # the source advances only on this thread, one item per result taken: no race to wait for
        assert len(pulled) == k + cap
    out += list(it)
    assert out == [2 * i for i in range(200)]
    assert threads == {threading.get_ident()}
    assert p._workers.pool.closed


def test_consumer_feed_unordered_and_source_error():
    out = list(threadloom.Pipeline(range(300), ordered=False, feed="consumer").map(jitter, workers=4))
    assert sorted(out) == list(range(300))

    def source():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone") as ei:
        list(threadloom.Pipeline(source(), feed="consumer").map(lambda x: x))
    assert "source" in [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    with pytest.raises(ValueError, match="feed must be 'thread' or 'consumer'"):
        threadloom.Pipeline([1], feed="main")
    with pytest.raises(TypeError):  # not iterable: raised by iter(), the pipeline closed
        iter(threadloom.Pipeline(42, feed="consumer").map(lambda x: x))


@pytest.mark.parametrize("ordered", [True, False])
def test_idle_work_runs_only_while_no_result_is_ready(ordered):
    # the iterator's idle hook (the DataLoader's replicate="share" walk) runs on the consumer's
    # thread instead of blocking, a slice per call, until it says it is done; the results are
    # those without it
    gate = threading.Event()
    slices = []

    def slow(x):
        if x == 0:
            gate.wait(10)  # no result until the hook has run a few slices
        return x

    def idle():
        slices.append(threading.get_ident())
        if len(slices) == 3:
            gate.set()
        return len(slices) >= 5  # done after 5 slices: dropped then

    it = iter(threadloom.Pipeline(range(50), ordered=ordered).map(slow, workers=2))
    it.idle = idle
    got = list(it)
    assert sorted(got) == list(range(50)) and (got == list(range(50)) or not ordered)
    assert 3 <= len(slices) <= 5 and set(slices) == {threading.get_ident()}
    assert it.idle is None or len(slices) < 5
