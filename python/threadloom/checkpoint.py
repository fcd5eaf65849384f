"""threadloom.Checkpointer: asynchronous, crash-safe, checksummed checkpoints.

    ckpt = threadloom.Checkpointer("ckpt/", keep=3)
    fut = ckpt.save({"model": weights, "opt": opt_state, "epoch": 3}, step=1000)  # returns fast
    ...                                   # training goes on while I/O threads write
    fut.result()                          # 'ckpt/step-1000' once committed (or the error)
    state = threadloom.load("ckpt/")      # newest complete checkpoint, every checksum verified

How a save flows: save() walks the state on the calling (training) thread, lays the tensors out
in safetensors files, and copies their bytes, in file order, into fixed-size staging slots drawn
from a bounded budget (``staging_bytes``), helped by the idle I/O threads (``copy_threads``).
Each full slot goes to its file's queue; one I/O task
per file (on a threadloom.Executor) hashes the bytes (xxh3_64, streaming per tensor) and writes
them at their offset. save() returns once the last byte is staged; when the checkpoint is larger
than the budget, the training thread waits only for the slots the writers have yet to free. When
every file is written and fsynced, and the previous save has committed, the commit step writes
manifest.json, fsyncs the temporary directory, renames it to ``step-<N>``, fsyncs the parent,
points ``latest`` at it (temporary file, fsync, rename, fsync) and applies retention.

Crash safety: a directory named ``step-<N>`` is complete by construction (it only ever appears
through the rename); temporaries are ``.tmp-step-<N>-<random>``, removed by the next Checkpointer
on the directory and never loaded; retention renames a checkpoint to ``.del-...`` before deleting
it, so a crash mid-delete leaves no half checkpoint. One Checkpointer writes a directory at a time
(an flock on ``.lock``).

Tensors on this path are host objects with the buffer protocol: memoryview (format and shape give
dtype and shape), array.array, bytes/bytearray and threadloom.Buffer (uint8, 1-D), numpy arrays,
CPU torch tensors (any dtype safetensors has: bfloat16 and bool included; non-contiguous ones
are made contiguous on the calling thread, requires_grad ones detached), and other CPU objects
with ``__dlpack__`` (imported with threadloom.from_dlpack). Device tensors need the cudactx
part's D2H snapshot (not built yet) and raise NotImplementedError. Views sharing one storage
are stored (and loaded) as separate tensors. Every other leaf is stored in the manifest: JSON
values as they are, the rest pickled (base64). load(..., framework="torch") returns torch
tensors. The on-disk format is documented in docs/checkpoint-format.md.
"""

import base64
import concurrent.futures as cf
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import pickle
import re
import secrets
import shutil
import struct
import sys
import threading
import time
from collections import deque

from threadloom import _core, errors

log = logging.getLogger("threadloom.checkpoint")

FORMAT = "threadloom-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIXES = (".tmp-step-", ".del-", ".latest-")

# ---------------------------------------------------------------------------------------------
# dtypes: struct format characters <-> safetensors dtype names
# ---------------------------------------------------------------------------------------------

_KINDS = {"b": "I", "h": "I", "i": "I", "l": "I", "q": "I", "n": "I",
          "B": "U", "H": "U", "I": "U", "L": "U", "Q": "U", "N": "U",
          "e": "F", "f": "F", "d": "F", "?": "BOOL"}
_LOAD_FORMATS = {"I8": "b", "U8": "B", "I16": "h", "U16": "H", "I32": "i", "U32": "I",
                 "I64": "q", "U64": "Q", "F16": "e", "F32": "f", "F64": "d", "BOOL": "?"}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def _dtype_of(fmt):
    """safetensors dtype of a struct format ('<f' -> 'F32'), or None when unsupported."""
    if sys.byteorder != "little":
        return None
    if len(fmt) == 2 and fmt[0] in "@=<":
        fmt = fmt[1:]
    kind = _KINDS.get(fmt)
    if kind is None:
        return None
    if kind == "BOOL":
        return "BOOL"
    return "%s%d" % (kind, 8 * struct.calcsize(fmt))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

_ERRNO_NAMES = {errno.ENOSPC: "TL_ENOSPC", errno.EDQUOT: "TL_ENOSPC", errno.EACCES: "TL_EACCES",
                errno.EPERM: "TL_EPERM", errno.EROFS: "TL_EROFS", errno.ENOENT: "TL_ENOENT",
                errno.EIO: "TL_EIO"}


def _code(name):
    return errors.CODES[name]


def _tl_error(name, detail):
    """The threadloom exception (code, name, hint, detail set) for TL_E* `name`."""
    return errors.error(name, detail)


class CorruptCheckpointError(_core.InputOutputError):
    """A checkpoint failed verification: a checksum mismatch, a truncated or unparsable file.
    Attributes: step, path (the checkpoint directory), file and key (the tensor; None when the
    problem is not one tensor's)."""

    def __init__(self, message, *, step=None, path=None, file=None, key=None):
        super().__init__("TL_EIO: checkpoint failed verification (%s). What to do: load an "
                         "older checkpoint (load(..., fallback=True) does it for you) and check "
                         "the disk." % message)
        self.code = _code("TL_EIO")
        self.name = "TL_EIO"
        self.hint = "load an older checkpoint and check the disk"
        self.detail = message
        self.step, self.path, self.file, self.key = step, path, file, key


# ---------------------------------------------------------------------------------------------
# File operations: the one table of system calls the writer makes (tests inject faults here)
# ---------------------------------------------------------------------------------------------

class FileOps:
    """The file-system calls of a save. Subclass and pass ``Checkpointer(..., file_ops=...)`` to
    inject faults (ENOSPC after N bytes, EACCES on open, ...) through the path the real writes
    take. Methods raise OSError like the os functions they wrap; any thread may call them.

    A file handle is what open() returned: an int descriptor for io="buffered", a
    threadloom._core.WFile for "direct" and "uring" (O_DIRECT writes of the aligned part of
    each range, the rest through the page cache; it falls back to buffered by itself where the
    file system refuses O_DIRECT, and its stats() say so). pwrite, fsync and close take either."""

    def mkdir(self, path):
        os.mkdir(path, 0o755)

    def open(self, path, io="buffered"):
        if io != "buffered":
            return _core.WFile(path, io)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def pwrite(self, fd, data, offset):
        if isinstance(fd, _core.WFile):
            fd.write(data, offset)  # all of it, detached, retrying short writes
            return
        view = memoryview(data)
        while len(view):
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def fsync(self, fd):
        if isinstance(fd, _core.WFile):
            fd.sync()
        else:
            os.fsync(fd)

    def close(self, fd):
        if isinstance(fd, _core.WFile):
            fd.close()
        else:
            os.close(fd)

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src, dst):
        os.rename(src, dst)

    def remove_tree(self, path):
        shutil.rmtree(path, ignore_errors=True)

    def write_file(self, path, data):
        """Creates `path` with `data`, fsynced (not the directory)."""
        fd = self.open(path)
        try:
            self.pwrite(fd, data, 0)
            self.fsync(fd)
        finally:
            self.close(fd)


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
# Staging: a fixed number of fixed-size slots, allocated on first use and reused
# ---------------------------------------------------------------------------------------------

class _Staging:
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
_COPY_PIECE = 2 << 20   # bytes per unit of copy work: what a helper may hold when save() is done


class _Copies:
    """One batch of the staging copy: a _core.CopyPlan (the copies, planned on the saving
    thread, cut into pieces of about _COPY_PIECE bytes; C, because memoryview slices are not
    safe to make and drop on several threads at once: python/src/copyplan.c) and the chunks
    they fill, in file order. run() copies with the saving thread and up to `helpers` I/O
    threads and returns once every piece is copied and the plan has let go of the buffers, so
    no helper reads the caller's tensors or writes staging after save() returned."""

    def __init__(self):
        self.plan = _core.CopyPlan(_COPY_PIECE)
        self.chunks = []        # (file, item) to enqueue once copied
        self.sources = []       # tensors whose `src` is dropped once copied

    def run(self, executor, helpers):
        plan = self.plan
        if plan.nbytes < 2 * _COPY_PIECE:
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


# ---------------------------------------------------------------------------------------------
# The state tree: tensors out, everything else into the manifest
# ---------------------------------------------------------------------------------------------

class _Tensor:
    __slots__ = ("key", "path", "source", "src", "dtype", "shape", "nbytes", "file", "begin",
                 "end", "hasher", "checksum")

    def __init__(self, key, path, source, src, dtype, shape):
        self.key = key              # the safetensors name: the key path joined with "."
        self.path = path            # the key path, as a list of str/int
        self.source = source        # "memoryview", "bytes", "Buffer", ... (informational)
        self.src = src              # 1-D 'B' memoryview of the bytes; dropped once staged
        self.dtype = dtype
        self.shape = shape
        self.nbytes = len(src)
        self.file = None            # _File it is written to
        self.begin = self.end = 0   # data_offsets inside its file's data section
        self.hasher = _core.Hasher()
        self.checksum = None        # xxh3_64 once its last byte is hashed


def _device_error(where, dev):
    return NotImplementedError(
        "state leaf %s lives on a device (%s): device snapshots (D2H on a side stream into "
        "pinned staging) need threadloom's cudactx part, which is not built yet; copy it to the "
        "host first (e.g. t.cpu())" % (where, dev))


# safetensors dtype -> torch dtype name (torch 1.13 has no uint16/32/64)
_TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
                 "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                 "F64": "float64"}
_FROM_TORCH = {"torch." + v: k for k, v in _TORCH_DTYPES.items()}


def _torch_leaf(obj, where):
    """(source, flat, dtype, shape) when `obj` is a torch tensor, else None. torch's own DLPack
    export refuses what a state_dict holds (requires_grad, bool, non-contiguous in torch 1.13;
    bfloat16 has no buffer format), so the tensor is detached, made contiguous (a copy, on the
    calling thread, only when it is not), viewed as bytes and imported through DLPack: `flat`
    shares the tensor's memory (the staging copy reads it before save() returns)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu":
        raise _device_error(where, "torch device %s" % obj.device)
    if obj.layout != torch.strided:
        raise TypeError("state leaf %s is a %s torch tensor: only dense (strided) tensors can "
                        "be stored; convert it first (e.g. t.to_dense())" % (where, obj.layout))
    dtype = _FROM_TORCH.get(str(obj.dtype))
    if dtype is None:
        raise TypeError("state leaf %s has torch dtype %s, which has no safetensors dtype "
                        "(supported: %s)" % (where, obj.dtype, ", ".join(sorted(_FROM_TORCH))))
    shape = list(obj.shape)
    t = obj.detach().resolve_neg()  # a lazily negated view (torch._neg_view) becomes its values
    if not t.is_contiguous():
        t = t.contiguous()
    flat = _core.from_dlpack(t.reshape(-1).view(torch.uint8))
    return type(obj).__name__, flat, dtype, shape


def _as_tensor(obj, where):
    """(source, memoryview) when `obj` is a tensor leaf, else None. Raises for device tensors
    and for CPU DLPack objects threadloom cannot import."""
    source = None
    if isinstance(obj, _core.Buffer):
        source = "Buffer"
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        source = type(obj).__name__
    elif type(obj).__name__ == "array" and type(obj).__module__ == "array":
        source = "array"
    elif hasattr(obj, "__dlpack_device__"):
        dev = tuple(obj.__dlpack_device__())
        if dev[0] not in (1, 3):  # kDLCPU, kDLCUDAHost
            raise _device_error(where, "DLPack device %r" % (dev,))
        source = type(obj).__name__
    if source is None:
        try:
            mv = memoryview(obj)
        except TypeError:
            return None
        source = type(obj).__name__
    else:
        try:
            mv = memoryview(obj)
        except TypeError:
            if not hasattr(obj, "__dlpack__"):
                raise TypeError("state leaf %s (%s) exports no buffer" % (
                    where, type(obj).__name__)) from None
            try:
                mv = _core.from_dlpack(obj)
            except (BufferError, TypeError, RuntimeError) as e:
                raise TypeError("state leaf %s (%s) is a CPU DLPack tensor threadloom cannot "
                                "import: %s" % (where, type(obj).__name__, e)) from e
    return source, mv


def _tensor_leaf(obj, where):
    """(source, flat 1-D uint8 memoryview, dtype, shape) when `obj` is a tensor, else None."""
    got = _torch_leaf(obj, where)
    if got is not None:
        return got
    got = _as_tensor(obj, where)
    if got is None:
        return None
    source, mv = got
    if isinstance(obj, (bytes, bytearray)) or source == "Buffer":
        dtype, shape = "U8", [mv.nbytes]
    else:
        dtype = _dtype_of(mv.format)
        if dtype is None:
            raise TypeError("state leaf %s has buffer format %r, which has no safetensors dtype "
                            "(supported: native little-endian b B h H i I l L q Q e f d ?)"
                            % (where, mv.format))
        shape = list(mv.shape)
    if mv.c_contiguous:
        flat = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    else:
        flat = memoryview(mv.tobytes())  # a C-order copy, made now on the calling thread
    return source, flat, dtype, shape


def _key_of(path):
    return ".".join(str(p) for p in path) or "tensor"


def _flatten(obj, path, tensors, keys):
    """The manifest node for `obj`, appending its tensors to `tensors`."""
    where = repr(_key_of(path)) if path else "(the whole state)"
    leaf = _tensor_leaf(obj, where)
    if leaf is not None:
        source, flat, dtype, shape = leaf
        key, n = _key_of(path), 1
        while key in keys or key == "__metadata__":
            key, n = "%s#%d" % (_key_of(path), n), n + 1
        keys.add(key)
        tensors.append(_Tensor(key, list(path), source, flat, dtype, shape))
        return {"tensor": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError("state dict keys must be str or int, not %r at %s"
                                % (type(k).__name__, where))
            items.append([k, _flatten(v, path + [k], tensors, keys)])
        return {"dict": items}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        nodes = [_flatten(v, path + [i], tensors, keys) for i, v in enumerate(obj)]
        return {"list" if type(obj) is list else "tuple": nodes}
    if obj is None or isinstance(obj, (bool, str)) or type(obj) is int or (
            type(obj) is float and math.isfinite(obj)):
        return {"value": obj}
    try:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError("state leaf %s (%s) is neither a tensor nor picklable: %s"
                        % (where, type(obj).__name__, e)) from e
    return {"pickle": base64.b64encode(blob).decode("ascii")}


# ---------------------------------------------------------------------------------------------
# One save
# ---------------------------------------------------------------------------------------------

_END = object()


class _File:
    """One safetensors file of a save. `queue`, `running`, `writes` and `ended` are guarded by
    `lock`: the training thread appends chunks, one drain task at a time hashes them in order
    (so per-tensor hashes stream in order; it is started when the queue goes from idle to
    non-empty) and submits one write task per chunk; whichever of the drain (on _END) and the
    writes sees ended and writes == 0 last fsyncs and closes the file. `fd` is set by the drain
    before the first write is submitted and cleared by that last one."""

    def __init__(self, name, path, tensors, metadata):
        self.name = name
        self.path = path
        self.tensors = tensors
        header = {"__metadata__": metadata}
        for t in tensors:
            header[t.key] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.begin, t.end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # 8-byte alignment of the data section
        self.header = struct.pack("<Q", len(raw)) + raw
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
        self.name = "step-%d" % step
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


def _complete_steps(directory):
    """{step: path} of the complete checkpoints (step-N directories with a manifest)."""
    out = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = _STEP_RE.match(name)
        path = os.path.join(directory, name)
        if m and os.path.isfile(os.path.join(path, MANIFEST)):
            out[int(m.group(1))] = path
    return out


def _read_latest(directory):
    try:
        with open(os.path.join(directory, LATEST), encoding="utf-8") as f:
            m = _STEP_RE.match(f.read().strip())
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


class Checkpointer:
    """Asynchronous checkpoints of nested state into `directory`.

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
        from threadloom.executor import Executor
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
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.shard_bytes = shard_bytes
        self.on_progress = on_progress
        self._ops = file_ops or FileOps()
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.directory, ".lock"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise _tl_error("TL_EBUSY", "another Checkpointer writes into %s (it holds "
                            ".lock); close it first" % self.directory) from None
        self._clean_stale()
        self.io = "direct" if io == "auto" else io
        self.io_priority = io_priority
        self._copy_helpers = copy_threads
        slot = min(chunk_bytes, staging_bytes)
        if self.io != "buffered":  # whole aligned blocks: every chunk but a file's last is direct
            slot = -(-slot // _core.WFILE_ALIGN) * _core.WFILE_ALIGN
        self._staging = _Staging(staging_bytes, slot)
        self._executor = Executor(max_workers=io_threads, thread_name_prefix="tl-ckpt", pin=pin,
                                  initializer=_IO_PRIORITIES[io_priority])
        self._save_lock = threading.Lock()   # save() staging, one caller at a time
        self._last = None                    # the newest _Save (guarded by _save_lock)
        self._closed = False

    # -- public ---------------------------------------------------------------------------------

    def save(self, state, step, *, metadata=None):
        """Snapshots `state` for `step` and returns a concurrent.futures.Future whose result is
        the committed directory (its `progress` attribute is the Progress). Returns once every
        byte is staged; write errors (disk full, permission, read-only) go to the future, never
        raise here. Raises TypeError/NotImplementedError for leaves it cannot store."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("step must be an int >= 0, not %r" % (step,))
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError("metadata must be JSON-serialisable: %s" % e) from None
        t0 = time.perf_counter()
        tensors, keys = [], set()
        tree = _flatten(state, [], tensors, keys)
        with self._save_lock:
            if self._closed:
                raise RuntimeError("this Checkpointer is closed")
            job = self._layout(step, tree, tensors, metadata)
            prev, self._last = self._last, job
            if prev is None:
                job.part_done()
            else:
                prev.retired.add_done_callback(lambda _f: job.part_done())
            self._stage(job)
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
        return sorted(_complete_steps(self.directory))

    def load(self, step=None, *, fallback=False, **kwargs):
        """threadloom.load(self.directory, step, fallback=...)."""
        return load(self.directory, step, fallback=fallback, **kwargs)

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

    def _clean_stale(self):
        removed = 0
        for name in os.listdir(self.directory):
            if name.startswith(_TMP_PREFIXES):
                path = os.path.join(self.directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                removed += 1
        if removed:
            log.info("removed %d leftover temporary entries from an interrupted save in %s",
                     removed, self.directory)

    def _layout(self, step, tree, tensors, metadata):
        files, current, size = [], [], 0
        for t in tensors:
            if current and size + t.nbytes > self.shard_bytes:
                files.append(current)
                current, size = [], 0
            t.begin, t.end = size, size + t.nbytes
            current.append(t)
            size += t.nbytes
        files.append(current)  # at least one file, even for a state without tensors
        tmp = os.path.join(self.directory, ".tmp-step-%d-%s" % (step, secrets.token_hex(4)))
        meta = {"format": FORMAT, "format_version": str(VERSION), "step": str(step)}
        objs = []
        for i, group in enumerate(files):
            name = "shard-%05d-of-%05d.safetensors" % (i + 1, len(files))
            f = _File(name, os.path.join(tmp, name), group, meta)
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
        thread, helped by idle I/O threads: _Copies). The copies are planned into a batch while
        slots are free; the batch is copied, then its chunks are queued in file order, when a
        slot would have to be waited for (the writers free slots only for queued chunks) and at
        the end. Stops copying, but still closes every queue, once the save has failed. If
        staging itself raises, the save fails with that error, every slot goes back and every
        queue is closed (so the Checkpointer stays usable), and the error propagates."""
        st = self._staging
        size = st.slot_bytes
        batch, slot, ended = _Copies(), None, 0
        try:
            for f in job.files:
                fill, chunk_off, segs, off = 0, 0, [], 0
                pieces = [(None, memoryview(f.header))] + [(t, t.src) for t in f.tensors]
                for t, src in pieces:
                    n, pos = len(src), 0
                    if t is not None and n == 0:
                        t.checksum = _core.xxh3_64(b"")
                    while pos < n and job.error is None:
                        if slot is None:
                            slot = st.try_acquire()
                            if slot is None:
                                batch = self._copy_batch(job, batch)
                                slot, waited = st.acquire()
                                job.progress.wait_s += waited
                            fill, chunk_off, segs = 0, off, []
                        k = min(n - pos, size - fill)
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
        return _Copies()

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
                if isinstance(f.fd, _core.WFile):
                    st = f.fd.stats()
                    io = (st["mode"], st["why"], st["direct_bytes"], st["buffered_bytes"])
                else:
                    io = ("buffered", "", 0, f.size)
                with job.lock:
                    job.progress._file_io(*io)
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

    def _manifest(self, job):
        tensors = {}
        for t in job.tensors:
            tensors[t.key] = {
                "file": t.file.name, "path": t.path, "dtype": t.dtype, "shape": t.shape,
                "data_offsets": [t.begin, t.end], "bytes": t.nbytes, "source": t.source,
                "xxh3_64": "%016x" % t.checksum}
        now = time.time()
        return {
            "format": FORMAT, "format_version": VERSION, "step": job.step, "time": now,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "checksum": "xxh3_64", "threadloom": _core.__version__,
            "files": [{"name": f.name, "bytes": f.size, "tensors": len(f.tensors)}
                      for f in job.files],
            "tensors": tensors, "tree": job.tree, "metadata": job.metadata}

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
            data = json.dumps(self._manifest(job), indent=1).encode("utf-8")
            ops.write_file(os.path.join(job.tmpdir, MANIFEST), data)
            ops.fsync_dir(job.tmpdir)
            old = None
            if os.path.exists(final):  # the same step saved again: swap, never merge
                old = os.path.join(d, ".del-%s-%s" % (job.name, secrets.token_hex(4)))
                ops.rename(final, old)
            ops.rename(job.tmpdir, final)
            committed = True
            ops.fsync_dir(d)
            if old:
                ops.remove_tree(old)
            tmp = os.path.join(d, ".latest-%s" % secrets.token_hex(4))
            ops.write_file(tmp, (job.name + "\n").encode("ascii"))
            ops.rename(tmp, os.path.join(d, LATEST))
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
            self._retain(job.step)  # after the result: deleting old checkpoints is nobody's wait
        except Exception:
            log.exception("retention after step-%d failed (the checkpoint is committed)", job.step)
        finally:
            job.retired.set_result(None)

    def _save_error(self, job, exc, committed):
        if isinstance(exc, _core.Error) or not isinstance(exc, OSError):
            return exc
        prev = _read_latest(self.directory)
        if committed:
            what = ("%s was written and is complete, but `latest` could not be updated"
                    % job.name)
        else:
            what = ("the previous checkpoint (%s) is untouched, nothing of step %d was kept"
                    % ("none" if prev is None else "step-%d" % prev, job.step))
        detail = "saving step %d into %s: %s%s; %s; later saves can still run" % (
            job.step, self.directory, exc.strerror or exc,
            " (%s)" % exc.filename if exc.filename else "", what)
        err = _tl_error(_ERRNO_NAMES.get(exc.errno, "TL_EIO"), detail)
        err.__cause__ = exc
        err.errno = exc.errno
        return err

    def _retain(self, newest):
        if self.keep == 0:
            return
        steps = _complete_steps(self.directory)
        older = sorted(s for s in steps if s != newest)
        drop = older[:max(0, len(older) - (self.keep - 1))]
        for s in drop:
            tomb = os.path.join(self.directory, ".del-step-%d-%s" % (s, secrets.token_hex(4)))
            try:
                self._ops.rename(steps[s], tomb)
                self._ops.remove_tree(tomb)
            except OSError as e:
                log.warning("retention could not delete %s: %s", steps[s], e)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _read_exact(f, offset, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(f, [view[got:]], offset + got)
        if k == 0:
            return None
        got += k
    return buf


def _as_loaded(buf, dtype, shape):
    fmt = _LOAD_FORMATS.get(dtype)
    if fmt == "B" and len(shape) == 1:
        return buf
    if fmt is None:  # BF16, F8: no struct format; the raw bytes
        return memoryview(buf)
    try:
        if 0 in shape:
            return memoryview(buf).cast(fmt)
        return memoryview(buf).cast(fmt, shape)
    except ValueError:  # F16 before Python 3.12: memoryview cannot cast to 'e'; the raw bytes
        return memoryview(buf)


def _as_torch(buf, dtype, shape, key):
    """A CPU torch tensor over `buf` (no copy: torch.frombuffer keeps the bytearray alive)."""
    import torch
    name = _TORCH_DTYPES.get(dtype)
    if name is None:
        raise TypeError("tensor %r has dtype %s, which torch has no dtype for; load without "
                        "framework='torch' to get it as a memoryview" % (key, dtype))
    tdtype = getattr(torch, name)
    if len(buf) == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(buf, dtype=tdtype).reshape(shape)


_FRAMEWORKS = (None, "torch")


def _load_dir(path, step, allow_pickle, framework=None):
    def corrupt(msg, file=None, key=None):
        return CorruptCheckpointError(msg, step=step, path=path, file=file, key=key)

    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt("manifest.json of %s does not parse: %s" % (path, e), MANIFEST) from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != VERSION:
        raise corrupt("%s is not a threadloom checkpoint of format version %d"
                      % (path, VERSION), MANIFEST)
    by_file = {}
    for key, t in manifest["tensors"].items():
        by_file.setdefault(t["file"], []).append((key, t))
    values = {}
    for fname, entries in by_file.items():
        fpath = os.path.join(path, fname)
        try:
            fd = os.open(fpath, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise corrupt("%s is missing" % fname, fname) from None
        try:
            head = _read_exact(fd, 0, 8)
            if head is None:
                raise corrupt("%s is truncated (no header)" % fname, fname)
            (hlen,) = struct.unpack("<Q", head)
            raw = _read_exact(fd, 8, hlen) if hlen < (100 << 20) else None
            try:
                header = json.loads(bytes(raw))
            except (TypeError, ValueError, UnicodeDecodeError):
                raise corrupt("%s: the safetensors header does not parse" % fname, fname) from None
            base = 8 + hlen
            for key, t in entries:
                h = header.get(key)
                if h is None or h.get("dtype") != t["dtype"] or h.get("shape") != t["shape"] \
                        or h.get("data_offsets") != t["data_offsets"]:
                    raise corrupt("tensor %r: the header of %s disagrees with manifest.json"
                                  % (key, fname), fname, key)
                b, e = t["data_offsets"]
                buf = _read_exact(fd, base + b, e - b)
                if buf is None:
                    raise corrupt("tensor %r in %s is truncated" % (key, fname), fname, key)
                got = "%016x" % _core.xxh3_64(buf)
                if got != t["xxh3_64"]:
                    raise corrupt("tensor %r in %s: checksum mismatch (manifest xxh3_64 %s, "
                                  "data %s)" % (key, fname, t["xxh3_64"], got), fname, key)
                if framework == "torch":
                    values[key] = _as_torch(buf, t["dtype"], t["shape"], key)
                else:
                    values[key] = _as_loaded(buf, t["dtype"], t["shape"])
        finally:
            os.close(fd)

    def build(node):
        if "tensor" in node:
            return values[node["tensor"]]
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"]}
        if "list" in node:
            return [build(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(build(v) for v in node["tuple"])
        if "value" in node:
            return node["value"]
        if "pickle" in node:
            if not allow_pickle:
                raise pickle.UnpicklingError("the checkpoint holds pickled values and "
                                             "allow_pickle=False")
            return pickle.loads(base64.b64decode(node["pickle"]))
        raise corrupt("manifest.json: unknown node %r" % sorted(node), MANIFEST)

    return build(manifest["tree"]), manifest


def load(directory, step=None, *, fallback=False, allow_pickle=True, with_info=False,
         framework=None):
    """Loads a checkpoint written by Checkpointer, verifying every tensor's xxh3_64.

    step: which one (default: the one `latest` names, or the newest complete one when `latest`
    is missing or dangling). fallback: when it fails verification or cannot be read, try the
    older complete checkpoints, newest first, logging which one was used. Tensors come back as
    memoryviews of their format and shape (uint8 1-D ones as bytearray; BF16 as raw bytes), or
    with framework="torch" as CPU torch tensors of their dtype and shape (writable, not sharing
    memory with anything else: model.load_state_dict(state["model"]) takes them; .to(device)
    moves them; loading straight into device memory waits for cudactx). Pickled leaves are
    unpickled: load only checkpoints you trust, or pass allow_pickle=False. with_info: return
    (state, info) where info has step, path, metadata, manifest and skipped (the (step, error)
    pairs fallback passed over). Raises CorruptCheckpointError naming the tensor and file,
    NotFoundError when there is no such checkpoint."""
    if framework not in _FRAMEWORKS:
        raise ValueError("framework must be None (memoryviews) or 'torch', not %r" % (framework,))
    if framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError("load(..., framework='torch') needs torch, which does not import "
                              "here (%s); install it, or load without framework= to get "
                              "memoryviews" % e) from e
    directory = os.path.abspath(os.fspath(directory))
    steps = _complete_steps(directory)
    if step is None:
        first = _read_latest(directory)
        if first not in steps:
            first = max(steps) if steps else None
    else:
        first = step
    if first is None or first not in steps:
        raise _tl_error("TL_ENOENT", "no complete checkpoint %sin %s" % (
            "" if step is None else "step-%d " % step, directory))
    order = [first] + (sorted((s for s in steps if s < first), reverse=True) if fallback else [])
    skipped = []
    for s in order:
        try:
            state, manifest = _load_dir(steps[s], s, allow_pickle, framework)
        except (CorruptCheckpointError, OSError) as e:
            if not fallback:
                raise
            skipped.append((s, e))
            log.warning("checkpoint step-%d in %s failed to load: %s", s, directory, e)
            continue
        if skipped:
            log.warning("loaded step-%d from %s instead (fallback past %s)", s, directory,
                        ", ".join("step-%d" % k for k, _ in skipped))
        if with_info:
            return state, {"step": s, "path": steps[s], "metadata": manifest.get("metadata"),
                           "manifest": manifest, "skipped": skipped}
        return state
    raise CorruptCheckpointError("no checkpoint in %s loads: %s" % (
        directory, "; ".join("step-%d: %s" % (k, e.detail if hasattr(e, "detail") else e)
                             for k, e in skipped)), path=directory)
