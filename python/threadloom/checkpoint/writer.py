"""Writing checkpoints: Checkpointer, one save's files, its progress and its commit.

How a save flows: save() walks the state on the calling (training) thread (format.flatten),
lays the tensors out in safetensors files (device state in files of their own, per device), and
copies their bytes, in file order, into staging slots (staging.py), helped by the idle I/O
threads; device bytes by D2H copies into pinned slots of their device (device.py: ordered after
the caller's stream at save(), waited for by the writers, not by save()). Each full slot goes to its file's
queue; one drain task per file (on a threadloom.Executor) hashes the bytes (xxh3_64, streaming
per tensor) and hands each chunk to a write task at its offset (fileops.FileOps). When every
file is written and fsynced, and the previous save has committed, the commit writes
manifest.json, fsyncs the temporary directory, renames it to step-<N>, fsyncs the parent,
points `latest` at it and applies retention (layout.py).
"""

import concurrent.futures as cf
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque

from threadloom import _core, errors
from threadloom.checkpoint import layout, reader
from threadloom.checkpoint.device import DeviceSource, Snapshot
from threadloom.checkpoint.fileops import FileOps
from threadloom.checkpoint.format import (MANIFEST, file_metadata, flatten, manifest,
                                         manifest_bytes, safetensors_header)
from threadloom.checkpoint.staging import Copies, Staging
from threadloom.executor import Executor

log = logging.getLogger("threadloom.checkpoint")


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class Progress:
    """How far one save is. Readable from any thread while the save runs; ``on_progress``
    callbacks get this object (on an I/O thread: keep them short).

    step, total_bytes (the safetensors files), bytes_written, staged (True once save() returned),
    stall_s (seconds save() blocked the caller), wait_s (the part of it spent waiting for staging
    slots: the checkpoint did not fit the budget), done, error; rate (bytes/s so far), eta (seconds
    left at that rate, None before the first byte), fraction (0..1).

    How the files were written, filled in as each file closes: io ("buffered", "direct",
    "uring", or "mixed" when files differ; None before the first file closes), io_why (why a
    file got a lower mode than asked, e.g. the file system refuses O_DIRECT; None when none
    did), direct_bytes and buffered_bytes (bytes written with O_DIRECT and through the page
    cache: with direct I/O only each file's unaligned tail is buffered)."""

    def __init__(self, step, total_bytes):
        self.step = step
        self.total_bytes = total_bytes
        self.bytes_written = 0
        self.started = time.monotonic()
        self.finished = None
        self.staged = False
        self.stall_s = 0.0
        self.wait_s = 0.0
        self.done = False
        self.error = None
        self.io = None
        self.io_why = None
        self.direct_bytes = 0
        self.buffered_bytes = 0

    def _file_io(self, mode, why, direct, buffered):
        """Adds one closed file's I/O stats (under the save's lock)."""
        self.io = mode if self.io in (None, mode) else "mixed"
        if why and self.io_why is None:
            self.io_why = why
        self.direct_bytes += direct
        self.buffered_bytes += buffered

    @property
    def elapsed(self):
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self):
        e = self.elapsed
        return self.bytes_written / e if e > 0 else 0.0

    @property
    def eta(self):
        if self.done:
            return 0.0
        r = self.rate
        return (self.total_bytes - self.bytes_written) / r if r > 0 else None

    @property
    def fraction(self):
        return 1.0 if self.total_bytes == 0 else self.bytes_written / self.total_bytes

    def __repr__(self):
        return ("<Progress step=%d %d/%d bytes %.0f MB/s eta=%s%s>"
                % (self.step, self.bytes_written, self.total_bytes, self.rate / 1e6,
                   "-" if self.eta is None else "%.2fs" % self.eta,
                   " done" if self.done else ""))


# ---------------------------------------------------------------------------------------------
# One save
# ---------------------------------------------------------------------------------------------

_END = object()   # a file's queue ends: no more chunks


class _File:
    """One safetensors file of a save. `queue`, `running`, `writes` and `ended` are guarded by
    `lock`: the training thread appends chunks, one drain task at a time hashes them in order
    (so per-tensor hashes stream in order; it is started when the queue goes from idle to
    non-empty) and submits one write task per chunk; whichever of the drain (on _END) and the
    writes sees ended and writes == 0 last fsyncs and closes the file. `fd` is set by the drain
    before the first write is submitted and cleared by that last one."""

    def __init__(self, name, path, tensors, metadata, device=None):
        self.name = name
        self.path = path
        self.device = device    # the Device of its tensors (device state), or None (host)
        self.tensors = tensors
        self.header = safetensors_header(tensors, metadata)
        self.size = len(self.header) + (tensors[-1].end if tensors else 0)
        self.fd = None
        self.lock = threading.Lock()
        self.queue = deque()
        self.running = False
        self.writes = 0         # write tasks submitted and not finished
        self.ended = False      # the drain has seen _END: the last write to finish closes it


class _Save:
    def __init__(self, owner, step, tree, tensors, files, metadata):
        self.owner = owner
        self.step = step
        self.tree = tree
        self.tensors = tensors
        self.files = files
        self.metadata = metadata
        self.name = layout.step_name(step)
        self.tmpdir = None          # set by _layout
        self.future = cf.Future()
        self.progress = Progress(step, sum(f.size for f in files))
        self.future.progress = self.progress
        self.retired = cf.Future()      # set after the commit's retention: the next commit waits
        self.lock = threading.Lock()    # guards error, pending, progress counters, tmp_made
        self.error = None
        self.pending = len(files) + 1   # files still writing + the previous save's commit
        self.tmp_made = False
        self.hold = False               # drains wait until staging ends (training thread only)
        self.snap = None                # the device.Snapshot of a save with device state

    def fail(self, exc):
        with self.lock:
            if self.error is None:
                self.error = exc

    def ensure_tmpdir(self):
        with self.lock:
            if not self.tmp_made:
                self.owner._ops.mkdir(self.tmpdir)
                self.tmp_made = True

    def wrote(self, n):
        with self.lock:
            self.progress.bytes_written += n
        self.owner._notify(self.progress)

    def part_done(self):
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.owner._executor.submit(self.owner._commit, self)


# ---------------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------------

def _nice_io_thread():
    """Executor initializer: the calling writer thread gets nice +10 (Linux nice is per thread)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except OSError as e:  # a sandbox without setpriority: the writers keep normal priority
        log.debug("could not lower the checkpoint writer's priority: %s", e)


def _idle_io_thread():
    """Executor initializer: the calling writer thread runs SCHED_IDLE."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as e:
        log.debug("could not make the checkpoint writer SCHED_IDLE: %s", e)


_IO_PRIORITIES = {"low": _nice_io_thread, "idle": _idle_io_thread, "normal": None}


class Checkpointer:
    """Asynchronous checkpoints of nested state into `directory` (created if missing; an
    empty string is refused rather than taken for the current directory: pass "." for that;
    one that cannot be created or written raises the errno's error, e.g.
    ReadOnlyFilesystemError, AccessDeniedError).

    keep: complete checkpoints kept (older ones are deleted after a new one commits; 0 keeps
    all). staging_bytes: the host memory budget for staging (the training thread waits only for
    what does not fit). chunk_bytes: the staging slot size (the write size). shard_bytes: the
    largest safetensors file (a bigger tensor gets a file of its own). io_threads: writer
    threads (a threadloom.Executor; pin=True pins them). on_progress: called with a Progress
    after each write and at the end, on an I/O thread. file_ops: a FileOps (tests inject faults).

    io: how data files are written. "direct": O_DIRECT from the (page-aligned) staging slots,
    so the page-cache copy, most of a buffered save's CPU, is not made; each file's unaligned
    tail goes through the page cache. "uring": the same through io_uring (several writes in
    flight per chunk; needs liburing at build time). "buffered": pwrite through the page cache.
    "auto" (default): "direct" (measured: the same bandwidth as buffered writes at a fraction
    of the CPU, bench/bench_checkpoint.py). A file system that refuses O_DIRECT (ramfs, tmpfs
    before Linux 6.6) falls back to buffered per file; Progress.io and io_why report it.
    io_priority: the writer threads' CPU priority, so the training thread wins a contended core:
    "low" (default: nice +10, about a tenth of a core's share when it competes), "idle"
    (SCHED_IDLE: only otherwise idle CPU; a save can then take long on saturated cores) or
    "normal". copy_threads: how many I/O threads help save() copy into staging while the
    saving thread copies too (default: all io_threads; the copies run detached from the
    interpreter, so in parallel with or without a GIL); they run at io_priority, so on
    saturated cores the saving thread does most of the copy itself.

    Thread-safety: save() may be called from any thread; saves are staged and committed in call
    order. One Checkpointer per directory (an flock on `directory/.lock`; a second one raises
    BusyError). Use as a context manager, or call close().
    """

    def __init__(self, directory, keep=3, *, staging_bytes=256 << 20, chunk_bytes=32 << 20,
                 shard_bytes=1 << 30, io_threads=2, pin=False, on_progress=None, file_ops=None,
                 io="auto", io_priority="low", copy_threads=None):
        if keep < 0:
            raise ValueError("keep must be >= 0 (0 keeps every checkpoint)")
        if io not in ("auto", "direct", "uring", "buffered"):
            raise ValueError("io must be 'auto', 'direct', 'uring' or 'buffered', not %r" % (io,))
        if io_priority not in _IO_PRIORITIES:
            raise ValueError("io_priority must be 'low', 'idle' or 'normal', not %r"
                             % (io_priority,))
        if copy_threads is None:
            copy_threads = io_threads
        if (isinstance(copy_threads, bool) or not isinstance(copy_threads, int)
                or not 0 <= copy_threads <= io_threads):
            raise ValueError("copy_threads must be an int from 0 to io_threads (%d), not %r"
                             % (io_threads, copy_threads))
        if staging_bytes <= 0 or chunk_bytes <= 0 or shard_bytes <= 0:
            raise ValueError("staging_bytes, chunk_bytes and shard_bytes must be positive")
        self.directory = layout.directory(directory)
        self.keep = keep
        self.shard_bytes = shard_bytes
        self.on_progress = on_progress
        self._ops = file_ops or FileOps()
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.directory, layout.LOCK),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise errors.from_errno(e.errno, "cannot open the checkpoint directory %s for "
                                    "writing: %s" % (self.directory, e),
                                    hint="give a directory this process can create and write "
                                         "to (threadloom.load(dir) reads checkpoints from a "
                                         "read-only one)") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise errors.error("EBUSY", "another Checkpointer writes into %s (it holds "
                               ".lock); close it first" % self.directory) from None
        layout.clean_stale(self.directory)
        self.io = "direct" if io == "auto" else io
        self.io_priority = io_priority
        self._copy_helpers = copy_threads
        slot = min(chunk_bytes, staging_bytes)
        if self.io != "buffered":  # whole aligned blocks: every chunk but a file's last is direct
            slot = -(-slot // _core.WFILE_ALIGN) * _core.WFILE_ALIGN
        self._staging = Staging(staging_bytes, slot)
        self._executor = Executor(max_workers=io_threads, thread_name_prefix="tl-ckpt", pin=pin,
                                  initializer=_IO_PRIORITIES[io_priority])
        self._save_lock = threading.Lock()   # save() staging, one caller at a time
        self._last = None                    # the newest _Save (guarded by _save_lock)
        self._closed = False

    # -- public ---------------------------------------------------------------------------------

    def save(self, state, step, *, metadata=None):
        """Snapshots `state` for `step` and returns a concurrent.futures.Future whose result is
        the committed directory (its `progress` attribute is the Progress). Returns once every
        host byte is staged and every device byte's D2H copy is queued (device.py: the copies
        see the work queued on the calling thread's current streams before save(); work queued
        there after it waits for them; host views of sim memory are copied before it returns);
        write errors (disk full, permission, read-only) and failed device copies go to the
        future, never raise here. Raises TypeError/NotImplementedError for leaves it cannot
        store, and the device's error when a copy cannot be queued (a lost device)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("step must be an int >= 0, not %r" % (step,))
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError("metadata must be JSON-serialisable: %s" % e) from None
        t0 = time.perf_counter()
        tensors, keys = [], set()
        tree = flatten(state, [], tensors, keys)
        # the device state as the caller's streams have it now (device.py)
        snap = Snapshot(tensors) if any(t.device is not None for t in tensors) else None
        with self._save_lock:
            if self._closed:
                raise RuntimeError("this Checkpointer is closed")
            job = self._layout(step, tree, tensors, metadata)
            job.snap = snap
            prev, self._last = self._last, job
            if prev is None:
                job.part_done()
            else:
                prev.retired.add_done_callback(lambda _f: job.part_done())
            self._stage(job)
            if snap is not None:
                snap.finish()  # the caller's later work waits for the copies (not this thread)
            if job.hold:
                job.hold = False
                for f in job.files:
                    self._enqueue(job, f, None)
        job.progress.staged = True
        job.progress.stall_s = time.perf_counter() - t0
        return job.future

    def wait(self, timeout=None):
        """Waits for every save made so far (and their retention); raises the error of the newest
        one if it failed."""
        with self._save_lock:
            last = self._last
        if last is not None:
            last.retired.result(timeout)  # commits are in order: the newest is the last
            last.future.result(0)

    @property
    def progress(self):
        """The Progress of the newest save (None before the first)."""
        last = self._last
        return last.progress if last is not None else None

    def steps(self):
        """The steps of the complete checkpoints in the directory, oldest first."""
        return sorted(layout.complete_steps(self.directory))

    def load(self, step=None, *, fallback=False, **kwargs):
        """threadloom.load(self.directory, step, fallback=..., framework=..., device=...)."""
        return reader.load(self.directory, step, fallback=fallback, **kwargs)

    def close(self):
        """Waits for the saves in flight, stops the I/O threads and releases the directory."""
        with self._save_lock:
            if self._closed:
                return
            self._closed = True
            last = self._last
        if last is not None:
            cf.wait([last.retired])
        self._executor.shutdown(wait=True)
        os.close(self._lock_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- save internals -------------------------------------------------------------------------

    def _layout(self, step, tree, tensors, metadata):
        # host tensors first, then each device's (in the order the state names the devices):
        # a file holds one device's tensors, so its chunks stage in that device's pinned slots
        by_dev = {None: []}
        for t in tensors:
            by_dev.setdefault(t.device, []).append(t)
        files = []
        for dev, group in by_dev.items():
            if dev is not None and not group:
                continue
            current, size = [], 0
            for t in group:
                if current and size + t.nbytes > self.shard_bytes:
                    files.append((dev, current))
                    current, size = [], 0
                t.begin, t.end = size, size + t.nbytes
                current.append(t)
                size += t.nbytes
            if current or dev is None and not tensors:
                files.append((dev, current))  # at least one file, even for a state without tensors
        tmp = layout.tmp_dir(self.directory, step)
        meta = file_metadata(step)
        objs = []
        for i, (dev, group) in enumerate(files):
            name = "shard-%05d-of-%05d.safetensors" % (i + 1, len(files))
            f = _File(name, os.path.join(tmp, name), group, meta, dev)
            for t in group:
                t.file = f
            objs.append(f)
        job = _Save(self, step, tree, tensors, objs, metadata)
        job.tmpdir = tmp
        # When the whole save fits in the staging budget, its writes start once save() has
        # staged everything: the copy then has the CPU to itself, which is what keeps the
        # training thread's stall at memcpy speed on machines with few cores. A save larger
        # than the budget streams: its writes start at once (they free the slots it waits for).
        slots = sum(-(-f.size // self._staging.slot_bytes) for f in objs)
        job.hold = slots <= self._staging.count
        return job

    def _stage(self, job):
        """Copies every file's bytes through staging slots into the file queues (the calling
        thread, helped by idle I/O threads: staging.Copies). The copies are planned into a batch
        while slots are free; the batch is copied, then its chunks are queued in file order,
        when a slot would have to be waited for (the writers free slots only for queued chunks)
        and at the end. Stops copying, but still closes every queue, once the save has failed. If
        staging itself raises, the save fails with that error, every slot goes back and every
        queue is closed (so the Checkpointer stays usable), and the error propagates."""
        st = self._staging
        size = st.slot_bytes
        batch, slot, ended = Copies(), None, 0
        try:
            for f in job.files:
                fill, chunk_off, segs, off = 0, 0, [], 0
                pieces = [(None, memoryview(f.header))] + [(t, t.src) for t in f.tensors]
                for t, src in pieces:
                    n, pos = len(src), 0
                    on_device = isinstance(src, DeviceSource)
                    if t is not None and n == 0:
                        t.checksum = _core.xxh3_64(b"")
                    while pos < n and job.error is None:
                        if slot is None:
                            slot = st.try_acquire(f.device)
                            if slot is None:
                                batch = self._copy_batch(job, batch)
                                slot, waited = st.acquire(f.device)
                                job.progress.wait_s += waited
                            fill, chunk_off, segs = 0, off, []
                        k = min(n - pos, size - fill)
                        if on_device:  # D2H into the pinned slot, queued now on the side stream
                            job.snap.copy(src, pos, k, slot, fill)
                        else:
                            batch.plan.add(slot[1], fill, src, pos, k)
                        segs.append((t, fill, fill + k, pos + k == n))
                        fill, pos, off = fill + k, pos + k, off + k
                        if fill == size:
                            batch.chunks.append((f, (slot, fill, chunk_off, segs)))
                            slot = None
                    if t is not None:
                        batch.sources.append(t)
                if slot is not None:  # the file's last chunk (a failed save's drain frees it)
                    batch.chunks.append((f, (slot, fill, chunk_off, segs)))
                    slot = None
                batch.chunks.append((f, _END))
                ended += 1
            self._copy_batch(job, batch)
        except BaseException as e:
            job.fail(e)
            job.hold = False          # the drains start now, see the error, free the slots
            batch.plan.close()        # waits for any helper still copying
            if slot is not None:
                st.release(slot)
            for f, item in batch.chunks:
                self._enqueue(job, f, item)
            for f in job.files[ended:]:
                self._enqueue(job, f, _END)
            raise

    def _copy_batch(self, job, batch):
        """Runs `batch`'s copies, queues its chunks; returns a new, empty batch."""
        batch.run(self._executor, self._copy_helpers)
        for t in batch.sources:
            t.src = None  # staged: drop the reference to the caller's memory
        while batch.chunks:  # each off the batch once queued (see _stage's except)
            f, item = batch.chunks[0]
            self._enqueue(job, f, item)
            del batch.chunks[0]
        return Copies()

    def _enqueue(self, job, f, item):
        """Queues `item` (None: only start the drain) for `f`'s drain, starting it if idle."""
        with f.lock:
            if item is not None:
                f.queue.append(item)
            start = not f.running and not job.hold and bool(f.queue)
            if start:
                f.running = True
        if start:
            self._executor.submit(self._drain, job, f)

    def _drain(self, job, f):
        """Hashes `f`'s queued chunks in order (an I/O thread; one drain per file at a time) and
        hands each to a write task: writes are positional, so they run in parallel, overlapping
        the next chunk's hash."""
        while True:
            with f.lock:
                if not f.queue:
                    f.running = False
                    return
                item = f.queue.popleft()
            if item is _END:
                with f.lock:
                    f.ended = True
                    last = f.writes == 0
                if last:
                    self._file_done(job, f)
                continue
            slot, n, off, segs = item
            if job.error is not None:  # the save failed: drop the chunk, free its slot
                self._staging.release(slot)
                continue
            try:
                if len(slot) == 3:  # a device slot: its D2H copies first (raises their error)
                    slot[0].wait()
                if f.fd is None:
                    job.ensure_tmpdir()
                    f.fd = self._ops.open(f.path, self.io)
                view = slot[1]
                for t, a, b, last in segs:
                    if t is not None:
                        t.hasher.update(view[a:b])
                        if last:
                            t.checksum = t.hasher.digest()
                            t.hasher = None
                with f.lock:
                    f.writes += 1
                self._executor.submit(self._write, job, f, slot, n, off)
            except BaseException as e:
                job.fail(e)
                self._staging.release(slot)

    def _write(self, job, f, slot, n, off):
        """Writes one staged chunk at its offset (an I/O thread), then frees its slot."""
        try:
            if job.error is None:
                self._ops.pwrite(f.fd, slot[1][:n], off)
                job.wrote(n)
        except BaseException as e:
            job.fail(e)
        finally:
            self._staging.release(slot)
            with f.lock:
                f.writes -= 1
                last = f.ended and f.writes == 0
            if last:
                self._file_done(job, f)

    def _file_done(self, job, f):
        """After the last write of `f` (exactly once): fsync and close it."""
        try:
            if f.fd is not None:
                if job.error is None:
                    self._ops.fsync(f.fd)
                st = f.fd.stats()
                with job.lock:
                    job.progress._file_io(st["mode"], st["why"], st["direct_bytes"],
                                          st["buffered_bytes"])
                self._ops.close(f.fd)
                f.fd = None
            elif job.error is None:  # cannot happen: every file's stream starts with its header
                raise AssertionError("file without data")
        except BaseException as e:
            job.fail(e)
        job.part_done()

    def _notify(self, progress):
        cb = self.on_progress
        if cb is None:
            return
        try:
            cb(progress)
        except Exception:
            log.exception("on_progress callback failed (ignored)")

    def _commit(self, job):
        """Manifest, fsyncs, rename, `latest`, retention (an I/O thread, after the previous save
        committed). Resolves the save's future."""
        ops, d = self._ops, self.directory
        final = os.path.join(d, job.name)
        committed = False
        try:
            if job.error is not None:
                raise job.error
            job.ensure_tmpdir()
            m = manifest(job.step, job.files, job.tensors, job.tree, job.metadata)
            ops.write_file(os.path.join(job.tmpdir, MANIFEST), manifest_bytes(m))
            ops.fsync_dir(job.tmpdir)
            old = None
            if os.path.exists(final):  # the same step saved again: swap, never merge
                old = layout.tomb(d, job.name)
                ops.rename(final, old)
            ops.rename(job.tmpdir, final)
            committed = True
            ops.fsync_dir(d)
            if old:
                ops.remove_tree(old)
            tmp = layout.latest_tmp(d)
            try:
                ops.write_file(tmp, (job.name + "\n").encode("ascii"))
                ops.rename(tmp, os.path.join(d, layout.LATEST))
            except BaseException:
                ops.remove_file(tmp)   # ENOSPC mid-write: no .latest-<hex> left behind
                raise
            ops.fsync_dir(d)
        except BaseException as e:
            if not committed and job.tmpdir and job.tmp_made:
                ops.remove_tree(job.tmpdir)
            err = self._save_error(job, e, committed)
            log.error("%s", err)
            job.progress.error = err
            job.progress.done = True
            job.progress.finished = time.monotonic()
            job.future.set_exception(err)
            job.retired.set_result(None)
            return
        job.progress.done = True
        job.progress.finished = time.monotonic()
        self._notify(job.progress)
        job.future.set_result(final)
        try:
            # after the result: deleting old checkpoints is nobody's wait
            layout.retain(self._ops, self.directory, self.keep, job.step)
        except Exception:
            log.exception("retention after step-%d failed (the checkpoint is committed)", job.step)
        finally:
            job.retired.set_result(None)

    def _save_error(self, job, exc, committed):
        if isinstance(exc, _core.Error) or not isinstance(exc, OSError):
            return exc
        prev = layout.read_latest(self.directory)
        if committed:
            what = ("%s was written and is complete, but `latest` could not be updated"
                    % job.name)
        else:
            what = ("the previous checkpoint (%s) is untouched, nothing of step %d was kept"
                    % ("none" if prev is None else "step-%d" % prev, job.step))
        detail = "saving step %d into %s: %s%s; %s; later saves can still run" % (
            job.step, self.directory, exc.strerror or exc,
            " (%s)" % exc.filename if exc.filename else "", what)
        err = errors.from_errno(exc.errno, detail)
        err.__cause__ = exc
        return err
