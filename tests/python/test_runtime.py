"""threadloom._runtime: the one registry of process-lifetime objects, its exit hook and abort_all.

What registers in the package (Executor, Pipeline, the DataLoader's engines, spmd worlds, the
cluster bootstrap's NCCL communicators) is tested where those live, interpreter exit included
(test_executor.py, test_pipeline.py); here the registry's own rules."""

import gc
import threading

import pytest

import threadloom
from threadloom import _runtime
from threadloom.comm import cpu, nccl

from conftest import run_python


class Thing:
    def __init__(self, log, name):
        self.log, self.name = log, name


def closer(t):
    t.log.append(("close", t.name))


def aborter(t, reason):
    t.log.append(("abort", t.name, reason))
    return True


def test_newest_first_owner_filter_and_counts():
    log, owner = [], object()
    a, b, c = Thing(log, "a"), Thing(log, "b"), Thing(log, "c")
    try:
        _runtime.register(a, close=closer, abort=aborter)
        _runtime.register(b, abort=aborter, owner=owner)
        _runtime.register(c, close=closer)
        assert _runtime.abort_all("why", owner=owner) == 1
        assert log == [("abort", "b", "why")]
        del log[:]
        assert _runtime.abort_all("all") >= 2
        assert [e for e in log if e[0] == "abort"] == [("abort", "b", "all"), ("abort", "a", "all")]
    finally:
        for t in (a, b, c):
            _runtime.unregister(t)
    del log[:]
    assert _runtime.abort_all("after unregister", owner=owner) == 0 and log == []


def test_holds_objects_weakly():
    log = []
    t = Thing(log, "gone")
    _runtime.register(t, abort=aborter, owner=log)
    del t
    gc.collect()
    assert _runtime.abort_all("x", owner=log) == 0 and log == []


def test_one_failing_abort_does_not_stop_the_others():
    log, owner = [], object()

    def boom(t, reason):
        raise RuntimeError("abort of %s failed" % t.name)

    a, b = Thing(log, "a"), Thing(log, "b")
    _runtime.register(a, abort=aborter, owner=owner)
    _runtime.register(b, abort=boom, owner=owner)
    try:
        with pytest.raises(RuntimeError, match="abort of b failed"):
            _runtime.abort_all("r", owner=owner)
        assert log == [("abort", "a", "r")]
    finally:
        _runtime.unregister(a)
        _runtime.unregister(b)


def test_register_needs_close_or_abort():
    with pytest.raises(TypeError, match="close= or abort="):
        _runtime.register(Thing([], "x"))


def test_abort_all_cancels_a_running_spmd_world():
    """What the cluster watchdog does: every rank's collective raises CanceledError with the
    reason, and spmd() re-raises it."""
    ready, go, out = threading.Barrier(2), threading.Event(), {}

    def fn(ctx):
        if ctx.rank == 1:
            ready.wait(30)
        else:
            go.wait(30)
        ctx.barrier()

    def caller():
        try:
            threadloom.spmd(fn, cpu_world=2, pin=False)
        except BaseException as e:  # noqa: BLE001
            out["e"] = e

    t = threading.Thread(target=caller)
    t.start()
    ready.wait(30)
    n = _runtime.abort_all("the job aborts: node 3 died")
    go.set()
    t.join(30)
    assert n == 1
    assert isinstance(out["e"], threadloom.CanceledError) and "node 3 died" in str(out["e"])


def test_nccl_comms_abort_once_open_only():
    c = nccl.closed(2, 0, 0)
    assert nccl.abort(c, "why") is False          # a closed communicator is not aborted again
    owner = object()
    _runtime.register(c, abort=nccl.abort, owner=owner)
    assert _runtime.abort_all("x", owner=owner) == 0
    _runtime.unregister(c)
    w = cpu.World(2, None)
    assert cpu.abort_world(w, "stop") is True and cpu.abort_world(w, "again") is False


def test_one_exit_hook_closes_what_is_still_open():
    """An executor with queued work and a pipeline abandoned mid-iteration, both left open: the
    exit hook runs the queued work, joins every thread, and the process ends."""
    code = """if 1:
        import threading, threadloom
        gate = threading.Event()
        ex = threadloom.Executor(max_workers=1)
        ex.submit(gate.wait, 5)
        ex.submit(print, "queued work ran", flush=True)
        it = iter(threadloom.Pipeline(range(1000), capacity=2).map(lambda x: x, workers=2))
        next(it)
        threading.Timer(0.2, gate.set).start()
        """
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "queued work ran"


def test_iterators_left_alive_at_exit_say_nothing():
    """Loader and pipeline iterators left in module globals (mid-epoch, closed, exhausted) are
    stopped by the exit hook; their __del__ at interpreter teardown, when module globals are
    already gone, must not print 'Exception ignored' tracebacks."""
    code = """if 1:
        import threadloom
        class DS:
            def __len__(self): return 64
            def __getitem__(self, i): return i
        mid = iter(threadloom.DataLoader(DS(), batch_size=4, num_workers=2))
        next(mid)
        closed = iter(threadloom.DataLoader(DS(), batch_size=4, num_workers=2))
        next(closed)
        closed.close()
        done = iter(threadloom.DataLoader(DS(), batch_size=32, num_workers=2))
        batches = list(done)
        pipe = iter(threadloom.Pipeline(range(1000), capacity=2).map(lambda x: x, workers=2))
        next(pipe)
        print("ok", flush=True)
        """
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert r.stderr == "", r.stderr
