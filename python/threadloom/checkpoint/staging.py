"""Staging: the bounded host memory a save's bytes are copied into before they are written,
and the copy itself, which the saving thread shares with idle I/O threads.

A save copies every tensor's bytes, in file order, into fixed-size slots (Staging) drawn from
a budget (Checkpointer's staging_bytes); each full slot goes to its file's write queue and
comes back once written, so a checkpoint larger than the budget streams through it. The copies
are planned into batches (Copies, over _core.CopyPlan) and run on the saving thread and up to
copy_threads I/O threads at once.

The files of device state (device.py) are staged in pinned slots of their device instead: a
StagingPool per device (page-locked, NUMA-local to the device, made on the first save from it,
`count` slots of slot_bytes), which the D2H copies write; such a slot is (StagingSlot,
memoryview, Device), and its readers wait for its event (wait()) first. Host and device slots
count against one budget: at most `count` are handed out at once.
"""

import mmap
import threading
import time

from threadloom import _core


class Staging:
    """The bounded staging budget: at most `count` slots of `slot_bytes` are handed out at once,
    host ones (anonymous mmaps, made on demand and kept) and device ones (from the device's
    StagingPool). acquire() blocks while all are in use; release() hands one back. Invariants
    (under `cond`): in_use <= count; len(free) + (host slots handed out) == created <= count.
    Host slots are page-aligned, as O_DIRECT writes from them need (slot_bytes is a multiple of
    WFILE_ALIGN then, so every chunk but a file's last starts and ends aligned); so are device
    slots (a StagingPool's slots start on 4 KiB boundaries)."""

    def __init__(self, budget, slot_bytes):
        self.slot_bytes = slot_bytes
        self.count = max(1, budget // slot_bytes)
        self.cond = threading.Condition()
        self.free = []
        self.created = 0
        self.in_use = 0
        self.pools = {}   # Device -> its StagingPool (made on first use; under cond)

    def acquire(self, device=None):
        """Returns a slot of slot_bytes, (mmap, memoryview) or for `device` (StagingSlot,
        memoryview, Device), and the seconds spent waiting."""
        t0 = None
        with self.cond:
            while self.in_use >= self.count:
                if t0 is None:
                    t0 = time.perf_counter()
                self.cond.wait()
            self.in_use += 1
            if device is None and self.free:
                return self.free.pop(), (time.perf_counter() - t0 if t0 else 0.0)
            if device is None:
                self.created += 1
            pool = self.pools.get(device) if device is not None else None
        try:
            if device is None:
                buf = mmap.mmap(-1, self.slot_bytes)
                slot = (buf, memoryview(buf))
            else:
                if pool is None:
                    pool = self._pool(device)
                # never long: at most `count` slots are out, and a released one is free once
                # its D2H copy (long done: its writer waited for it) has completed
                s = pool.acquire()
                slot = (s, memoryview(s), device)
        except BaseException:
            with self.cond:
                self.in_use -= 1
                if device is None:
                    self.created -= 1
                self.cond.notify()
            raise
        return slot, (time.perf_counter() - t0 if t0 else 0.0)

    def _pool(self, device):
        pool = _core.StagingPool(device, self.slot_bytes, self.count)
        with self.cond:
            return self.pools.setdefault(device, pool)

    def try_acquire(self, device=None):
        """A slot if one can be had without waiting, else None."""
        with self.cond:
            if self.in_use >= self.count:
                return None
        return self.acquire(device)[0]  # only this save's thread acquires: it cannot block now

    def release(self, slot):
        """Hands a slot back (from any thread). A device slot's memoryview is released first:
        every slice of it (hashing, pwrite) is gone by then."""
        if len(slot) == 3:
            try:
                slot[1].release()
                slot[0].release()
            except BufferError:  # a view still alive: the slot goes back when it dies
                pass
        with self.cond:
            self.in_use -= 1
            if len(slot) == 2:
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
