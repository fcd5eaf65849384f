"""Bounded queues that can be closed, and the threads that serve them: what a Pipeline and the
DataLoader's iterable engine are built from.

``Queue``: a bounded FIFO whose close() wakes every waiter at once (put returns False, get
returns ``CLOSED``); ``END`` is the marker a producer puts when it has no more items.

``Workers``: the threads of one engine: a threadloom scheduler pool (pinned through
placement.loader_plan() with pin=True), the queues its threads read and write, the first error
any of them met, what each thread is busy with (for timeouts and reports), and the one
shutdown: close() stops every queue, so each thread returns from its wait at once, and joins
the pool, waiting at most a grace period for a thread stuck in user code. Workers registers
with _runtime, so the exit hook closes it: a stuck thread never keeps the process from exiting.
"""

import collections
import logging
import sys
import threading
import time
import traceback

from threadloom import _core, _runtime, placement

CLOSED = object()  # what get() returns once the queue is closed
END = object()     # no more items from upstream
CLOSE_GRACE_S = 5.0  # how long Workers.close() waits for a thread still in a call, by default
STACK_FRAMES = 6     # innermost frames a report shows per busy thread
log = logging.getLogger("threadloom")


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
    slots instead. name: the threads' name prefix, and what reports call them. grace: how
    long close() waits for a thread still in a call (default CLOSE_GRACE_S, read at close).
    Submit each thread's loop with submit(); a loop calls started(slot) first, and around every
    call of user code busy_with(slot, label, what, describe) and idle(slot), so a timeout or a
    report can say which thread is stuck, on what (describe(what)) and where.

    Lifetime: a Workers registers with _runtime, so the interpreter's exit hook closes it; it
    unregisters once its threads are joined. close() never waits longer than the grace: a
    thread stuck in user code (a read that never returns) cannot be killed, so it is left to
    return on its own, reported with its stack, and the process can still exit (the C threads
    are no threading.Thread the interpreter would join; at exit CPython stops them as it stops
    daemon threads). Waits are interruptible (Ctrl-C).

    Invariants: `closed` and `error` are written under `_lock`; `closed` goes from False to
    True once, and readers without the lock (a feeder polling it) see it late at worst, never
    torn. fail() records the first error and closes the queues; close() also starts the one
    joining thread (the pool's close joins, which a thread of the pool cannot do for itself:
    the joiner is a thread of its own, so close() works from anywhere). `busy[k]` and
    `idents[k]` are written by slot k's thread only; reports read them without a lock (a
    stale entry at worst)."""

    def __init__(self, threads, queues, *, pin=False, plan=None, role="loader", gpu=None,
                 name="threadloom", grace=None):
        if pin and plan is None:
            plan = placement.loader_plan(threads)
        self.queues = list(queues)
        self.name = name
        self.grace = grace
        self.busy = [None] * threads    # per slot: (since, label, what, describe) in user code
        self.idents = [None] * threads  # per slot: the thread's threading.get_ident()
        self.pool = _core.Pool(threads, plan=plan, role=role, gpu=gpu, capacity=threads,
                               name=name[:12])
        self.closed = False
        self.error = None
        self._lock = threading.Lock()
        self._joiner = None     # the thread joining the pool, once close() began
        self._joined = False    # the joiner finished: every thread has returned
        self._reported = False  # the threads left running were reported (once)
        _runtime.register(self, close=Workers.close)

    def submit(self, fn):
        self.pool.submit(fn)

    def started(self, slot):
        """Called by slot `slot`'s loop on its thread, before anything else."""
        self.idents[slot] = threading.get_ident()

    def busy_with(self, slot, label, what, describe=repr):
        """Slot `slot` calls user code on `what` (label: how reports name the thread)."""
        self.busy[slot] = (time.monotonic(), label, what, describe)

    def idle(self, slot):
        self.busy[slot] = None

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

    def close(self, wait=True):
        """Stops the queues, so each thread returns once it is out of the call it is in, and
        joins the threads (on a thread of its own). wait: wait for that up to the grace, then
        report the threads still in a call and leave them (once; later closes do not wait
        again). Safe to call more than once, from any thread. Returns True once every thread
        has returned."""
        if self._joined:
            # nothing left to do, and nothing of threading is needed: a close from a __del__
            # at interpreter teardown (module globals already None) comes here
            return True
        with self._lock:
            first = not self.closed
            self.closed = True
            if first:
                self._close_queues()
                self._joiner = threading.Thread(target=self._join, name="%s-join" % self.name,
                                                daemon=True)
                self._joiner.start()
        joiner = self._joiner
        if not wait or self._reported or self.pool.worker_index() >= 0:
            return not joiner.is_alive()
        grace = CLOSE_GRACE_S if self.grace is None else self.grace
        joiner.join(grace)  # interruptible: Ctrl-C raises KeyboardInterrupt here
        if not joiner.is_alive():
            return True
        self._reported = True
        log.warning("threadloom %s: %s", self.name, self.report(
            "still in a call %.1f s after close, left running (a thread cannot be killed: it "
            "returns when its call does, and the process can exit meanwhile)" % grace))
        return False

    def _join(self):
        self.pool.close(cancel=True)
        _runtime.unregister(self)
        self._joined = True

    def report(self, why):
        """'N threads <why>:' and, per busy thread, what it is busy with, since when, and its
        stack (the innermost frames)."""
        now = time.monotonic()
        frames = sys._current_frames()
        rows = []
        for slot, entry in enumerate(self.busy):
            if entry is None:
                continue
            since, label, what, describe = entry
            rows.append("  %s for %.1f s with %s, at:\n%s" % (
                label, now - since, describe(what),
                _stack(frames.get(self.idents[slot]))))
        if not rows:
            return "no thread is in a call"
        return "%d thread%s %s:\n%s" % (len(rows), "" if len(rows) == 1 else "s", why,
                                         "\n".join(rows))


def _stack(frame, limit=STACK_FRAMES):
    if frame is None:
        return "    (stack not available)"
    text = "".join(traceback.format_stack(frame)[-limit:])
    return "\n".join("  " + line for line in text.splitlines())
