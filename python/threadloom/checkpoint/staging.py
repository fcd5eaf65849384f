"""Staging: the bounded host memory a save's bytes are copied into before they are written,
and the copy itself, which the saving thread shares with idle I/O threads.

A save copies every tensor's bytes, in file order, into fixed-size slots (Staging) drawn from
a budget (Checkpointer's staging_bytes); each full slot goes to its file's write queue and
comes back once written, so a checkpoint larger than the budget streams through it. The copies
are planned into batches (Copies, over _core.CopyPlan) and run on the saving thread and up to
copy_threads I/O threads at once.
"""

import mmap
import threading
import time

from threadloom import _core


class Staging:
    """The bounded staging budget: at most `count` slots of `slot_bytes` exist. acquire() blocks
    while all are in use; release() hands one back. Invariant (under `cond`): in_use +
    len(free) == created <= count. Slots are anonymous mmaps: page-aligned, as O_DIRECT writes
    from them need (slot_bytes is a multiple of WFILE_ALIGN then, so every chunk but a file's
    last starts and ends aligned)."""

    def __init__(self, budget, slot_bytes):
        self.slot_bytes = slot_bytes
        self.count = max(1, budget // slot_bytes)
        self.cond = threading.Condition()
        self.free = []
        self.created = 0

    def acquire(self):
        """Returns (mmap, memoryview) of slot_bytes and the seconds spent waiting."""
        t0 = None
        with self.cond:
            while not self.free and self.created >= self.count:
                if t0 is None:
                    t0 = time.perf_counter()
                self.cond.wait()
            if self.free:
                slot = self.free.pop()
                return slot, (time.perf_counter() - t0 if t0 else 0.0)
            self.created += 1
        try:
            buf = mmap.mmap(-1, self.slot_bytes)
        except BaseException:
            with self.cond:
                self.created -= 1
                self.cond.notify()
            raise
        return (buf, memoryview(buf)), (time.perf_counter() - t0 if t0 else 0.0)

    def try_acquire(self):
        """A slot if one is free or may still be created without waiting, else None."""
        with self.cond:
            if not self.free and self.created >= self.count:
                return None
        return self.acquire()[0]  # only this save's thread acquires: it cannot block now

    def release(self, slot):
        with self.cond:
            self.free.append(slot)
            self.cond.notify()


# The staging copy runs on the saving thread and, when the save is big enough, on the idle I/O
# threads too: one thread's memcpy is bounded by its own memory latency, not by the machine's
# bandwidth (measured here: 512 MiB in 0.047 s on one thread, 0.036 s on two).
COPY_PIECE = 2 << 20   # bytes per unit of copy work: what a helper may hold when save() is done


class Copies:
    """One batch of the staging copy: a _core.CopyPlan (the copies, planned on the saving
    thread, cut into pieces of about COPY_PIECE bytes; C, because memoryview slices are not
    safe to make and drop on several threads at once: python/src/copyplan.c) and the chunks
    they fill, in file order. run() copies with the saving thread and up to `helpers` I/O
    threads and returns once every piece is copied and the plan has let go of the buffers, so
    no helper reads the caller's tensors or writes staging after save() returned."""

    def __init__(self):
        self.plan = _core.CopyPlan(COPY_PIECE)
        self.chunks = []        # (file, item) to enqueue once copied
        self.sources = []       # tensors whose `src` is dropped once copied

    def run(self, executor, helpers):
        plan = self.plan
        if plan.nbytes < 2 * COPY_PIECE:
            helpers = 0
        try:
            for _ in range(min(helpers, plan.pieces - 1)):
                try:
                    executor.submit(plan.work)
                except RuntimeError:  # the executor is shutting down: copy without it
                    break
            plan.work()
        finally:
            plan.close()  # waits for the pieces helpers are copying
