"""Bounded queues that can be closed, and the threads that serve them: what a Pipeline and the
DataLoader's iterable engine are built from.

``Queue``: a bounded FIFO whose close() wakes every waiter at once (put returns False, get
returns ``CLOSED``); ``END`` is the marker a producer puts when it has no more items.

``Workers``: the threads of one engine: a threadloom scheduler pool (pinned through
placement.loader_plan() with pin=True), the queues its threads read and write, the first error
any of them met, and the one shutdown: close() stops every queue, so each thread returns from
its wait at once, and joins the pool. An engine registers its own close with _runtime (the
engine may have more to stop than its workers, e.g. a feeder waiting for room); Workers never
outlives it.
"""

import collections
import threading
import time

from threadloom import _core, placement

CLOSED = object()  # what get() returns once the queue is closed
END = object()     # no more items from upstream


class Queue:
    """A bounded FIFO that can be closed: put() waits while full, get() while empty; after
    close() both return at once (put: False, get: CLOSED) and queued items are dropped (the
    engine is stopping). Two conditions on one lock, so a put wakes only getters and a get
    only putters."""

    def __init__(self, maxsize):
        self._items = collections.deque()
        self._maxsize = maxsize
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)
        self._closed = False

    def put(self, item):
        with self._not_full:
            while len(self._items) >= self._maxsize and not self._closed:
                self._not_full.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._not_empty.notify()
            return True

    def get(self, timeout=None):
        """An item, CLOSED after close(), or None when `timeout` seconds passed first."""
        with self._not_empty:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items and not self._closed:
                if deadline is None:
                    self._not_empty.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._not_empty.wait(left)
            if self._closed:
                return CLOSED
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def close(self):
        with self._not_empty:
            self._closed = True
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def __len__(self):
        return len(self._items)


class Workers:
    """`threads` scheduler threads and the queues they use.

    pin: pin them through placement.loader_plan(threads); plan / role / gpu: to that plan's
    slots instead. name: the threads' name prefix. Submit each thread's loop with submit().

    Invariants: `closed` and `error` are written under `_lock`; `closed` goes from False to
    True once, and readers without the lock (a feeder polling it) see it late at worst, never
    torn. fail() records the first error and closes the queues; close() also joins the pool,
    except from one of its own threads (it would join itself: the queues are closed, so those
    threads return by themselves)."""

    def __init__(self, threads, queues, *, pin=False, plan=None, role="loader", gpu=None,
                 name="threadloom"):
        if pin and plan is None:
            plan = placement.loader_plan(threads)
        self.queues = list(queues)
        self.pool = _core.Pool(threads, plan=plan, role=role, gpu=gpu, capacity=threads,
                               name=name[:12])
        self.closed = False
        self.error = None
        self._lock = threading.Lock()

    def submit(self, fn):
        self.pool.submit(fn)

    def fail(self, exc):
        """Records `exc` if it is the first error and stops every queue (the threads and the
        consumer wake up; the consumer raises self.error)."""
        with self._lock:
            if self.error is None:
                self.error = exc
        self._close_queues()

    def _close_queues(self):
        for q in self.queues:
            q.close()

    def close(self):
        """Stops the queues and joins the threads; safe to call more than once, from any
        thread. Returns False when it was already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
        self._close_queues()
        if self.pool.worker_index() < 0:
            self.pool.close(cancel=True)
        return True
