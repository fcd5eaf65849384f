"""threadloom.Executor: a concurrent.futures.Executor on threadloom's C scheduler.

    with threadloom.Executor(max_workers=16) as ex:
        futures = [ex.submit(work, i) for i in range(1000)]
        results = list(ex.map(work, range(100_000), chunksize=256))

Differences from ThreadPoolExecutor: workers are C threads of a work-stealing pool, each
attached to the interpreter once (one thread state per worker, reused), all started by the
constructor (which refuses more than the kernel would let it start); with pin=True (or a plan)
each worker is pinned to its own core; map() honours ``chunksize`` (one task per chunk), which
is what makes small callables cheap. On a free-threaded interpreter the workers run Python in
parallel.

Submitting, as ThreadPoolExecutor: submit() never waits. Tasks go to the pool's bounded
injection queue (64 per worker); while it is full they wait in a FIFO backlog that a feeder
thread (started then, gone after a second idle) moves into the pool as room frees, so tasks
may wait for the submitting thread without a deadlock. ``capacity=n`` asks for backpressure
instead: submit() waits while n tasks are queued (a producer far ahead of the workers then
waits instead of growing memory), and tasks must not wait for a submitter that may be waiting
for room. Tasks submitted from the executor's own workers never wait: they go to that
worker's own deque, whatever the capacity.

Blocking and exit: shutdown(wait=True) and the with statement's exit wait for the tasks, as
ThreadPoolExecutor's do (so does the interpreter's exit), and Ctrl-C interrupts every wait
(shutdown, a submit waiting for room). The pool is then closed on a thread of its own.
"""

import collections
import concurrent.futures
import concurrent.futures.thread
import itertools
import threading
import time

from threadloom import _core, _runtime, placement, sysinfo

FEEDER_IDLE_S = 1.0  # the backlog's feeder thread leaves after this long without work


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


class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor whose workers are threadloom scheduler threads.

    max_workers: threads (default: the CPUs this process may use). thread_name_prefix,
    initializer, initargs: as ThreadPoolExecutor (a failing initializer breaks the executor:
    later submits raise BrokenThreadPool). capacity: None (default) submit() never waits, as
    ThreadPoolExecutor's; n: submit() waits while n tasks are queued (see the module
    docstring). pin: pin each worker to its own core through a placement plan of this machine.
    plan / role / gpu: pin the workers to that plan's slots of (role, gpu) instead.

    Invariants: `_backlog` and `_pending` (tasks in the backlog or in the feeder's hands) are
    read and written under `_cv`, except the submit path's unlocked look at `_pending` (an
    int: a stale 0 only lets a task enter the pool ahead of older backlog ones); `_feeder` is
    set and cleared under `_cv`, so at most one feeder runs. `_shutdown` is written under
    `_shutdown_lock`.
    """

    def __init__(self, max_workers=None, thread_name_prefix="threadloom", initializer=None,
                 initargs=(), *, capacity=None, pin=False, plan=None, role="loader", gpu=None):
        if max_workers is None:
            max_workers = sysinfo.usable_cpus()
        max_workers = sysinfo.thread_count(max_workers, "max_workers")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 (or None: submit() never waits), not %r"
                             % (capacity,))
        if pin and plan is None:
            plan = placement.plan(gpus=0, loaders_per_gpu=max_workers, io_threads=0,
                                  main_thread=False)
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._broken = None
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._closer = None        # the thread closing the pool, once shutdown() began
        self._bounded = capacity is not None
        self._cv = threading.Condition()
        self._backlog = collections.deque()  # _WorkItems waiting for room in the pool, oldest first
        self._pending = 0          # tasks in the backlog or in the feeder's hands
        self._feeder = None        # the thread moving the backlog into the pool, while it runs
        self._cancel = False       # shutdown(cancel_futures=True): the backlog is dropped
        self._pool_name = thread_name_prefix[:12] or "threadloom"
        self._pool = _core.Pool(
            max_workers, plan=plan, role=role, gpu=gpu, capacity=capacity or 64 * max_workers,
            name=self._pool_name,
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
        pool = self._pool
        try:
            if self._bounded:
                self._submit_waiting(item)
            elif self._pending and pool.worker_index() < 0:
                self._to_backlog(item)  # behind the tasks already waiting there
            elif not pool.try_submit(item.run, item.cancel):
                self._to_backlog(item)  # (from a worker it goes to its own deque: never here)
        except _core.ClosedError:
            raise RuntimeError("cannot schedule new futures after shutdown") from None
        return f

    submit.__doc__ = concurrent.futures.Executor.submit.__doc__

    def _submit_waiting(self, item):
        """capacity=n: waits for room. The C submit waits detached, where no signal handler
        runs, so the main thread (the one Ctrl-C interrupts) polls instead, sleeping between
        tries (up to 10 ms): KeyboardInterrupt is raised from the sleep."""
        pool = self._pool
        if threading.current_thread() is not threading.main_thread():
            pool.submit(item.run, item.cancel)
            return
        delay = 0.0001
        while not pool.try_submit(item.run, item.cancel):
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _to_backlog(self, item):
        with self._cv:
            if self._cancel:
                raise _core.ClosedError("the executor is shutting down")
            self._backlog.append(item)
            self._pending += 1
            if self._feeder is None:
                self._feeder = threading.Thread(target=self._feed, daemon=True,
                                                name="%s-feeder" % self._pool_name)
                self._feeder.start()
            elif len(self._backlog) == 1:
                self._cv.notify_all()  # the feeder may be waiting for work

    def _feed(self):
        """The feeder thread: moves the backlog into the pool, oldest first, waiting
        (detached) for room; leaves after FEEDER_IDLE_S without work, or at shutdown once the
        backlog is empty."""
        submit = self._pool.submit
        while True:
            with self._cv:
                if not self._backlog:
                    self._cv.wait_for(lambda: self._backlog or self._shutdown, FEEDER_IDLE_S)
                if not self._backlog:
                    self._feeder = None
                    self._cv.notify_all()
                    return
                items, self._backlog = self._backlog, collections.deque()  # in one go
            for item in items:
                try:
                    submit(item.run, item.cancel)
                except _core.ClosedError:  # closed with cancel_futures meanwhile
                    item.cancel()
            with self._cv:
                self._pending -= len(items)
                if not self._pending:
                    self._cv.notify_all()  # shutdown waits for an empty backlog

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
        if wait and self._pool.worker_index() >= 0:
            raise RuntimeError("shutdown(wait=True) called from one of the executor's own "
                               "workers would wait for itself; call it from another thread")
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures:
                self._drop_backlog()
            if self._closer is None:
                # the pool is closed on a thread of its own, which the caller may wait for:
                # a wait in Python, which Ctrl-C interrupts (the C close joins detached)
                self._closer = threading.Thread(target=self._close, args=(cancel_futures,),
                                                name="%s-shutdown" % self._pool_name,
                                                daemon=True)
                self._closer.start()
        with self._cv:
            self._cv.notify_all()  # a feeder waiting for work sees the shutdown
        if wait:
            self._closer.join()
            _runtime.unregister(self)

    shutdown.__doc__ = concurrent.futures.Executor.shutdown.__doc__

    def _drop_backlog(self):
        with self._cv:
            self._cancel = True
            items = list(self._backlog)
            self._backlog.clear()
            self._pending -= len(items)
            self._cv.notify_all()
        for item in items:
            item.cancel()

    def _close(self, cancel):
        """The closing thread: the backlog goes into the pool first (unless canceled), then
        the pool runs (or cancels) what is queued and joins its workers."""
        with self._cv:
            self._cv.wait_for(lambda: not self._pending or self._cancel)
        self._pool.close(cancel=cancel or self._cancel)
