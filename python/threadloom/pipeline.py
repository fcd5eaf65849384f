"""threadloom.Pipeline: stages with their own threads, bounded queues between them.

    pipe = (threadloom.Pipeline(paths, ordered=True)
            .map(read, workers=4)                          # I/O-bound: more threads
            .map(decode, workers=8, state=make_decoder)    # decode(state, item), state per thread
            .map(to_batch, workers=2))
    for batch in pipe:                                     # in source order
        train(batch)
    print(pipe.stats())                                    # per stage, readable while running

Memory is fixed: at most ``capacity`` items are between the source and the consumer at any time
(a slow consumer stops the source, it does not grow queues). Each stage's workers are threads of
one threadloom scheduler pool, pinned when asked. Errors: by default an exception raised by a
stage stops the pipeline and is re-raised to the consumer with its original traceback; ordered,
at its item's turn, after every result before it (the same error whatever the thread count and
timing, as torch's DataLoader re-raises a worker's error at its batch), unordered as soon as it
is raised; ``on_error="skip"`` drops failing items and counts them, raising once more than
``max_errors`` failed. The pipeline also stops promptly when the consumer breaks out of the
loop, drops the iterator, is interrupted (KeyboardInterrupt), or the interpreter exits.

The source is iterated on a thread of its own by default. ``feed="consumer"`` iterates it on the
consumer's thread instead, topping up to ``capacity`` items in flight each time the consumer
takes a result (as torch's DataLoader does with its sampler): one thread and one thread hand-off
less per item, for a source that is cheap and does not block (threadloom.DataLoader's samplers).

Per-worker state: ``state=factory`` calls ``factory()`` once on each worker thread of the stage
and passes the result as the first argument of every call on that thread, so hot Python objects
(tokenizers, random generators, vocabularies) are never shared between threads: on 3.13t,
threads sharing such objects stop scaling past a few threads.
"""

import reprlib
import sys
import threading
import time

from threadloom._queue import CLOSED, END, Queue, Workers

_SKIP = object()    # an item that failed under on_error="skip": its slot in the order


class _Failed:
    """Ordered mode, on_error="raise": an item whose stage raised. It keeps the item's place in
    the order (later stages pass it on), and the consumer raises `exc` when its turn comes, so
    the error is the earliest failing item's, not the quickest worker's."""
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


def _item(what, describe=reprlib.repr):
    """How a report names what a stage worker is busy with: what = (seq, item)."""
    seq, item = what
    return "item %d (%s)" % (seq, describe(item))


class _Stage:
    def __init__(self, fn, workers, state, on_error, max_errors, name, queue_size, describe):
        self.fn = fn
        self.describe = describe  # what reports call the item a worker is busy with
        self.workers = workers
        self.state = state
        self.on_error = on_error
        self.max_errors = max_errors
        self.name = name
        self.queue_size = queue_size
        # one counter list per worker, written by that worker only: [items, errors, busy, wait]
        self.counters = [[0, 0, 0.0, 0.0] for _ in range(workers)]
        self.inq = None
        self.remaining = workers  # workers still running; under the pipeline's end lock


class Pipeline:
    """A source iterable followed by stages added with map(); iterate it to run it.

    ordered: yield results in source order (default) or as they complete. capacity: items in
    flight at most (default: 2 per worker plus the queues). timeout: seconds the consumer waits
    for the next result before TimeoutError (None: forever). pin: pin the workers through a
    placement plan of this machine; plan / role / gpu: pin them to that plan's slots instead.
    feed: "thread" (a thread of its own iterates the source) or "consumer" (the consumer's
    thread does, see the module docstring).
    """

    def __init__(self, source, *, ordered=True, capacity=None, timeout=None, pin=False,
                 plan=None, role="loader", gpu=None, name="pipeline", feed="thread"):
        if feed not in ("thread", "consumer"):
            raise ValueError("feed must be 'thread' or 'consumer', not %r" % (feed,))
        self._source = source
        self._feed_consumer = feed == "consumer"
        self._ordered = ordered
        self._capacity = capacity
        self._timeout = timeout
        self._pin = pin
        self._plan = plan
        self._role = role
        self._gpu = gpu
        self._name = name
        self._stages = []
        self._started = False
        self._lock = threading.Lock()   # guards the stages' `remaining` counts
        self._workers = None            # the threads and queues, once running

    def map(self, fn, *, workers=1, state=None, on_error="raise", max_errors=None, name=None,
            queue_size=None, describe=None):
        """Adds a stage calling fn(item), or fn(state, item) with state=factory; returns self.
        describe(item) -> str: how a timeout or a report on a stuck worker names the item the
        worker is on (default: a short repr)."""
        if self._started:
            raise RuntimeError("cannot add a stage to a pipeline that is running")
        if not callable(fn):
            raise TypeError("fn must be callable, not %r" % (fn,))
        if workers < 1:
            raise ValueError("workers must be >= 1, not %r" % (workers,))
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip', not %r" % (on_error,))
        if state is not None and not callable(state):
            raise TypeError("state must be a factory (a callable), not %r" % (state,))
        if max_errors is not None and on_error != "skip":
            raise ValueError("max_errors applies to on_error='skip'")
        qs = queue_size if queue_size is not None else 2 * workers
        if qs < 1:
            raise ValueError("queue_size must be >= 1")
        if describe is None:
            describe_item = _item
        else:
            def describe_item(what):
                return _item(what, describe)
        self._stages.append(_Stage(fn, workers, state, on_error, max_errors,
                                   name or getattr(fn, "__name__", "stage%d" % len(self._stages)),
                                   qs, describe_item))
        return self

    # -- running ----------------------------------------------------------------------------

    def __iter__(self):
        if self._started:
            raise RuntimeError("a Pipeline runs once; build a new one to run again")
        if not self._stages:
            raise ValueError("add at least one stage with map() before iterating")
        self._started = True
        workers = sum(s.workers for s in self._stages)
        cap = self._capacity or (2 * workers + sum(s.queue_size for s in self._stages))
        if self._feed_consumer:
            # at most `cap` items in flight plus one end marker per worker: the consumer's
            # put into the first queue never waits
            self._stages[0].queue_size = max(self._stages[0].queue_size, cap + self._stages[0].workers)
        for s in self._stages:
            s.inq = Queue(s.queue_size)
        self._out = Queue(1 << 30)  # bounded by the in-flight semaphore (or count)
        self._inflight = None if self._feed_consumer else threading.BoundedSemaphore(cap)
        threads = workers if self._feed_consumer else workers + 1
        # a stuck stage call is waited for at most `timeout` seconds when the pipeline closes
        self._workers = Workers(threads, [s.inq for s in self._stages] + [self._out],
                                pin=self._pin, plan=self._plan, role=self._role, gpu=self._gpu,
                                name=self._name, grace=self._timeout)
        slot = 0
        for k, s in enumerate(self._stages):
            for w in range(s.workers):
                self._workers.submit(lambda k=k, w=w, slot=slot: self._work(k, w, slot))
                slot += 1
        if not self._feed_consumer:
            self._workers.submit(lambda: self._feed(slot))
        it = _Iterator(self)
        if self._feed_consumer:
            it._capacity = cap
            try:
                it._source = iter(self._source)
                it._fill()
            except BaseException:
                self.close()
                raise
        return it

    @property
    def _closed(self):
        w = self._workers
        return w is not None and w.closed

    @property
    def _error(self):
        w = self._workers
        return w.error if w is not None else None

    def _fail(self, exc):
        """Records the first error and stops every queue (workers and consumer wake up)."""
        self._workers.fail(exc)

    def _feed(self, slot):
        q = self._stages[0].inq
        workers = self._workers
        workers.started(slot)
        seq = 0
        try:
            source = iter(self._source)
            while True:
                workers.busy_with(slot, "source", seq, _next_item)
                try:
                    item = next(source)
                except StopIteration:
                    break
                finally:
                    workers.idle(slot)
                while not self._inflight.acquire(timeout=0.1):
                    if self._closed:
                        return
                if not q.put((seq, item)):
                    return
                seq += 1
        except BaseException as exc:
            self._fail(exc)
            return
        self._ended(-1)

    def _ended(self, k):
        """Stage k (-1: the source) has no more items: the next stage's workers get one end
        marker each; after the last stage the consumer gets one."""
        nxt = k + 1
        if nxt < len(self._stages):
            for _ in range(self._stages[nxt].workers):
                self._stages[nxt].inq.put(END)
        else:
            self._out.put(END)

    def _work(self, k, w, slot):
        stage = self._stages[k]
        c = stage.counters[w]
        nxt = self._stages[k + 1].inq if k + 1 < len(self._stages) else self._out
        fn = stage.fn
        workers = self._workers
        workers.started(slot)
        label = "%s worker %d" % (stage.name, w)
        describe = stage.describe
        try:
            workers.busy_with(slot, label, None, _making_state)
            state = stage.state() if stage.state is not None else None
        except BaseException as exc:
            if isinstance(exc, StopIteration):
                exc = _stopped(exc, "the state=factory() of stage %r" % stage.name)
            self._fail(exc)
            return
        finally:
            workers.idle(slot)
        clock = time.perf_counter
        while True:
            t0 = clock()
            got = stage.inq.get()
            t1 = clock()
            c[3] += t1 - t0
            if got is CLOSED:
                return
            if got is END:
                with self._lock:
                    stage.remaining -= 1
                    last = stage.remaining == 0
                if last:
                    self._ended(k)
                return
            seq, item = got
            if item is not _SKIP and item.__class__ is not _Failed:
                workers.busy_with(slot, label, got, describe)
                try:
                    item = fn(item) if state is None else fn(state, item)
                except BaseException as exc:
                    workers.idle(slot)
                    if isinstance(exc, StopIteration):
                        exc = _stopped(exc, "stage %r, on %s," % (stage.name, describe(got)))
                    c[1] += 1
                    if stage.on_error == "raise":
                        if not self._ordered:
                            self._fail(exc)
                            return
                        item = _Failed(exc)  # raised at its turn; this worker goes on
                    else:
                        errors = sum(x[1] for x in stage.counters)
                        if stage.max_errors is not None and errors > stage.max_errors:
                            err = RuntimeError("stage %r: %d items failed, more than "
                                               "max_errors=%d; the last failure is the cause"
                                               % (stage.name, errors, stage.max_errors))
                            err.__cause__ = exc
                            self._fail(err)
                            return
                        item = _SKIP
                else:
                    workers.idle(slot)
                    c[0] += 1
            c[2] += clock() - t1
            if not nxt.put((seq, item)):
                return

    # -- inspection and shutdown ----------------------------------------------------------

    def stats(self):
        """Per stage: name, workers, items, errors, busy_s, wait_s, queue_depth, queue_size."""
        out = []
        for s in self._stages:
            rows = [list(c) for c in s.counters]
            out.append({
                "name": s.name, "workers": s.workers,
                "items": sum(r[0] for r in rows), "errors": sum(r[1] for r in rows),
                "busy_s": sum(r[2] for r in rows), "wait_s": sum(r[3] for r in rows),
                "queue_depth": len(s.inq) if s.inq is not None else 0,
                "queue_size": s.queue_size,
            })
        return out

    def close(self, wait=True):
        """Stops the pipeline and joins its threads; safe to call more than once, from any
        thread (a stage's too). wait: wait for a stage call in progress (a thread cannot be
        killed), at most `timeout` seconds (without one, _queue.CLOSE_GRACE_S); a call still
        running then is left to return on its own and reported with its stack (logging)."""
        w = self._workers
        if w is not None:
            w.close(wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _stopped(exc, where):
    """For a StopIteration `exc` raised `where`: a RuntimeError saying so (as PEP 479 does in
    generators), since the consumer would take the StopIteration for the end of the items."""
    err = RuntimeError("%s raised StopIteration: in a pipeline stage that is an error, not the "
                       "end of the source (PEP 479 makes it one inside generators too)" % where)
    err.__cause__ = exc
    return err


def _next_item(seq):
    return "next() of the source, for item %d" % seq


def _making_state(_):
    return "its state=factory() call"


class _Iterator:
    """What iterating a Pipeline returns. Dropping it (or breaking out of the loop) closes the
    pipeline."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._next_seq = 0
        self._held = {}  # ordered mode: results that arrived before their turn
        self._ended = False  # the end marker arrived: everything is in _held
        self._done = False
        # feed="consumer": the source's iterator (None once exhausted or failed), the next
        # sequence number, items handed to the first stage and not yet taken back, the limit
        self._source = None
        self._seq = 0
        self._inflight = 0
        self._capacity = 0
        # work to do while no result is ready (the DataLoader's replicate="share" walk): called
        # instead of blocking while the results queue is empty, a slice at a time; it returns
        # True when it is done (then it is dropped). Set by the consumer, run on its thread.
        self.idle = None

    def _fill(self):
        """feed="consumer": hands source items to the first stage until `capacity` are in
        flight. A source error stops the pipeline (the consumer gets it at its next result);
        KeyboardInterrupt and SystemExit go straight up."""
        p = self._pipe
        src = self._source
        if src is None:
            return
        q = p._stages[0].inq
        while self._inflight < self._capacity:
            try:
                item = next(src)
            except StopIteration:
                self._source = None
                p._ended(-1)
                return
            except Exception as exc:
                self._source = None
                p._fail(exc)
                return
            if not q.put((self._seq, item)):
                self._source = None
                return
            self._seq += 1
            self._inflight += 1

    def _release(self):
        """One result left the in-flight set: the source may hand over another item."""
        if self._pipe._inflight is not None:
            self._pipe._inflight.release()
        else:
            self._inflight -= 1
            self._fill()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self._next()
        except StopIteration:
            raise
        except BaseException as exc:
            # after a timeout or Ctrl-C the pipeline stops without waiting for stuck calls
            self._pipe.close(wait=not isinstance(exc, (TimeoutError, KeyboardInterrupt)))
            raise

    def _next(self):
        p = self._pipe
        while True:
            if self._done:
                raise StopIteration
            if p._ordered and self._next_seq in self._held:
                item = self._held.pop(self._next_seq)
                self._next_seq += 1
                self._release()
                if item is _SKIP:
                    continue
                if item.__class__ is _Failed:
                    p._fail(item.exc)
                    raise item.exc
                return item
            if self._ended:
                if self._held:
                    raise RuntimeError("threadloom bug: item %d never arrived" % self._next_seq)
                self._done = True
                p.close()
                raise StopIteration
            if self.idle is not None and not len(p._out) and not p._closed:
                if self.idle():
                    self.idle = None
                continue  # a result may have come meanwhile, or the work is done: look again
            got = p._out.get(timeout=p._timeout)
            if got is None and p._timeout is not None and not p._closed:
                stats = ", ".join("%s: %d done, %d queued" % (s["name"], s["items"], s["queue_depth"])
                                  for s in p.stats())
                raise TimeoutError("no result from the pipeline within %s s (%s); %s"
                                   % (p._timeout, stats, p._workers.report("busy")))
            if got is CLOSED:
                if p._error is not None:
                    raise p._error
                self._done = True
                raise StopIteration
            if got is END:
                self._ended = True
                continue
            seq, item = got
            if p._ordered:
                self._held[seq] = item
                continue
            self._release()
            if item is _SKIP:
                continue
            return item

    def close(self):
        self._pipe.close()

    def __del__(self, _finalizing=sys.is_finalizing):
        # at interpreter teardown the exit hook (_runtime.close_all) has stopped the threads
        # already, and module globals may be None: nothing to do
        if not _finalizing():
            self._pipe.close()
