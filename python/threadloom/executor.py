"""threadloom.Executor: a concurrent.futures.Executor on threadloom's C scheduler.

    with threadloom.Executor(max_workers=16) as ex:
        futures = [ex.submit(work, i) for i in range(1000)]
        results = list(ex.map(work, range(100_000), chunksize=256))

Differences from ThreadPoolExecutor: workers are C threads of a work-stealing pool, each
attached to the interpreter once (one thread state per worker, reused); with pin=True (or a
plan) each worker is pinned to its own core; the submit queue is bounded (``capacity``), so a
producer far ahead of the workers waits instead of growing memory; map() honours ``chunksize``
(one task per chunk), which is what makes small callables cheap. On a free-threaded interpreter
the workers run Python in parallel.
"""

import concurrent.futures
import concurrent.futures.thread
import itertools
import os
import threading

from threadloom import _core, _runtime, placement


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "executor")

    def __init__(self, executor, future, fn, args, kwargs):
        self.executor = executor
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self):
        if not self.future.set_running_or_notify_cancel():
            return
        broken = self.executor._broken
        if broken:
            self.future.set_exception(concurrent.futures.thread.BrokenThreadPool(broken))
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the caller with its traceback
            self.future.set_exception(exc)
            self = None  # break the reference cycle through the traceback
        else:
            self.future.set_result(result)

    def cancel(self):
        # cancel, then notify: wait()/as_completed() count a future as done only once notified
        if self.future.cancel():
            self.future.set_running_or_notify_cancel()


def _run_chunk(fn, chunk):
    return [fn(*args) for args in chunk]


def _chunks(iterables, chunksize):
    it = zip(*iterables)
    while True:
        chunk = tuple(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def _flatten(results):
    for chunk in results:
        # hand out each result once, without keeping the chunk alive behind the consumer
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def _default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor whose workers are threadloom scheduler threads.

    max_workers: threads (default: the CPUs this process may use). thread_name_prefix,
    initializer, initargs: as ThreadPoolExecutor (a failing initializer breaks the executor:
    later submits raise BrokenThreadPool). capacity: tasks the submit queue holds before
    submit() waits (default 64 per worker). pin: pin each worker to its own core through a
    placement plan of this machine. plan / role / gpu: pin the workers to that plan's slots of
    (role, gpu) instead.
    """

    def __init__(self, max_workers=None, thread_name_prefix="threadloom", initializer=None,
                 initargs=(), *, capacity=None, pin=False, plan=None, role="loader", gpu=None):
        if max_workers is None:
            max_workers = _default_workers()
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if capacity is None:
            capacity = 64 * max_workers
        if pin and plan is None:
            plan = placement.plan(gpus=0, loaders_per_gpu=max_workers, io_threads=0,
                                  main_thread=False)
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._broken = None
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._closer = None
        self._pool = _core.Pool(
            max_workers, plan=plan, role=role, gpu=gpu, capacity=capacity,
            name=thread_name_prefix[:12] or "threadloom",
            on_start=self._on_worker_start if initializer is not None else None)
        # at interpreter exit: queued work finishes and every worker is joined, as
        # ThreadPoolExecutor does, so no worker is left attached during finalisation
        _runtime.register(self, close=Executor.shutdown)

    def _on_worker_start(self, index):
        try:
            self._initializer(*self._initargs)
        except BaseException as exc:
            self._broken = ("A thread initializer failed, the thread pool is not usable anymore "
                            "(%s: %s)" % (type(exc).__name__, exc))

    @property
    def pool(self):
        """The underlying threadloom._core.Pool (stats(), size)."""
        return self._pool

    def submit(self, fn, /, *args, **kwargs):
        if self._broken:
            raise concurrent.futures.thread.BrokenThreadPool(self._broken)
        # After shutdown() only the executor's own workers may submit: tasks running during the
        # drain can still add follow-up work (task trees complete), which shutdown(wait=True)
        # runs, or cancels with cancel_futures, before it returns.
        if self._shutdown and self._pool.worker_index() < 0:
            raise RuntimeError("cannot schedule new futures after shutdown")
        f = concurrent.futures.Future()
        item = _WorkItem(self, f, fn, args, kwargs)
        try:
            self._pool.submit(item.run, item.cancel)
        except _core.ClosedError:
            raise RuntimeError("cannot schedule new futures after shutdown") from None
        return f

    submit.__doc__ = concurrent.futures.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like Executor.map; with chunksize > 1 each task runs `chunksize` calls, in order."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        results = super().map(_run_chunk, itertools.repeat(fn), _chunks(iterables, chunksize),
                              timeout=timeout)
        return _flatten(results)

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._shutdown_lock:
            first = not self._shutdown
            self._shutdown = True
            if first and not wait:
                # close in the background; the atexit hook (or a later shutdown) joins it
                self._closer = threading.Thread(target=self._pool.close,
                                                kwargs={"cancel": cancel_futures},
                                                name="threadloom-shutdown", daemon=True)
                self._closer.start()
        if wait:
            if self._pool.worker_index() >= 0:
                raise RuntimeError("shutdown(wait=True) called from one of the executor's own "
                                   "workers would wait for itself; call it from another thread")
            if self._closer is not None:
                self._closer.join()
            self._pool.close(cancel=cancel_futures)
            _runtime.unregister(self)

    shutdown.__doc__ = concurrent.futures.Executor.shutdown.__doc__
