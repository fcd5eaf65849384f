"""The CPU communicator: collectives between the rank threads of one spmd() world, on host
memory (buffers, host tensors through DLPack, numbers, lists of numbers).

A world (World) is one rendezvous shared by its ranks: a condition variable, a generation
counter (collectives completed), one slot per rank and the abort state. Each rank snapshots its
contribution into its slot and waits for the generation to move; the last rank to arrive
checks that every rank called the same collective with the same kind, format and length,
reduces in rank order (so every rank gets bit-identical values), publishes the result and
bumps the generation. The first failure (a rank's exception, a timeout, the cluster
watchdog's abort through _runtime) wakes every waiter, which raises CanceledError or
TimedOutError. CpuComm is one rank's handle on its world; it is also the reference the NCCL
communicator (comm/nccl.py) is tested against, and keeps its signatures.
"""

import array
import copy
import numbers
import threading
import time

from threadloom import _core, errors
from threadloom.comm import buckets

__all__ = ["CpuComm", "OPS"]

OPS = ("sum", "max", "min", "avg")      # buckets.OPS but prod
FORMATS = ("d", "f", "q", "i")          # the typed element formats reductions accept


def _error(name, detail):
    """The threadloom exception for TL_E<name> with `detail` (see threadloom.errors)."""
    return errors.error(name, detail)


# ---------------------------------------------------------------------------------------------
# values: buffer-protocol objects and Python numbers / lists of numbers
# ---------------------------------------------------------------------------------------------

def _typed_view(obj, what, bytes_ok=False):
    """A flat memoryview of `obj` in its element format, or None when obj has no buffer.

    Reductions need one of FORMATS; broadcast/allgather (bytes_ok) take any buffer, viewed as
    bytes ('B') when its format is not one of FORMATS (a threadloom Buffer, bytes, bytearray).
    Objects without the buffer protocol but with __dlpack__ (a torch CPU tensor) are viewed
    through threadloom.from_dlpack, in place; a CUDA tensor raises InvalidArgumentError saying
    to use the NcclComm."""
    try:
        m = memoryview(obj)
    except TypeError:
        if not hasattr(obj, "__dlpack__") or isinstance(obj, (bytes, bytearray, memoryview)):
            return None
        m = _core.from_dlpack(obj)   # a host tensor (torch CPU, numpy): a view of its memory
    fmt = m.format.lstrip("@=<")
    if len(fmt) == 1 and fmt in FORMATS and m.format[0] in "@=<" + fmt:
        if not m.c_contiguous:
            raise ValueError("%s: the buffer is not C-contiguous" % what)
        return m.cast("B").cast(fmt)
    if not bytes_ok:
        raise TypeError("%s: buffer format %r is not supported; use one of %s (array.array or a "
                        "memoryview cast to it)" % (what, m.format, ", ".join(FORMATS)))
    if not m.c_contiguous:
        raise ValueError("%s: the buffer is not C-contiguous" % what)
    return m.cast("B")


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class _Value:
    """One rank's contribution: kind 'buf' (fmt, values list, view or None), 'num', 'list'."""

    __slots__ = ("kind", "fmt", "values", "view", "obj")

    def __init__(self, kind, fmt, values, view, obj):
        self.kind, self.fmt, self.values, self.view, self.obj = kind, fmt, values, view, obj

    @property
    def signature(self):
        return (self.kind, self.fmt, len(self.values) if self.kind != "num" else None)


def _value(x, what, bytes_ok=False):
    view = _typed_view(x, what, bytes_ok)
    if view is not None:
        return _Value("buf", view.format, view.tolist(), view, x)
    if _is_number(x):
        return _Value("num", None, [x], None, x)
    if isinstance(x, (list, tuple)) and all(_is_number(v) for v in x):
        return _Value("list", None, list(x), None, x)
    raise TypeError("%s takes a buffer (array.array / memoryview of %s), a number or a list of "
                    "numbers, not %s" % (what, "/".join(FORMATS), type(x).__name__))


def _reduce(lists, op, world):
    """Element-wise reduction in rank order (deterministic: every rank gets the same values)."""
    acc = list(lists[0])
    if op in ("sum", "avg"):
        for other in lists[1:]:
            acc = [a + b for a, b in zip(acc, other)]
        if op == "avg":
            acc = [a / world for a in acc]
    elif op == "max":
        for other in lists[1:]:
            acc = [b if b > a else a for a, b in zip(acc, other)]
    else:
        for other in lists[1:]:
            acc = [b if b < a else a for a, b in zip(acc, other)]
    return acc


def _same_signature(values, what):
    sig = values[0].signature
    for r, v in enumerate(values):
        if v.signature != sig:
            raise ValueError("%s: rank %d passed %s, rank 0 passed %s (kind, format, length must "
                             "match in every rank)" % (what, r, v.signature, sig))
    return sig


def _store(view, values):
    """Writes `values` into the flat typed view (a length-checked slice assignment)."""
    if view.format in ("d", "f"):
        view[:] = array.array(view.format, values)
    elif view.format == "B":
        view[:] = bytes(values)
    else:
        view[:] = array.array(view.format, values)


def _new_buffer(fmt, values):
    return bytes(values) if fmt == "B" else array.array(fmt, values)


# ---------------------------------------------------------------------------------------------
# the world: one rendezvous shared by every rank
# ---------------------------------------------------------------------------------------------

class World:
    """Shared state of one spmd() run: a rendezvous per collective call (condition variable +
    generation counter; each rank contributes, the last arriving rank reduces) and the abort
    flag that wakes every waiter."""

    def __init__(self, world_size, timeout):
        self.size = world_size
        self.timeout = timeout
        self.cond = threading.Condition(threading.Lock())
        self.gen = 0                      # collectives completed
        self.arrived = 0
        self.op = None                    # the name of the collective in progress
        self.slots = [None] * world_size
        self.result = None
        self.failure = None               # (rank, exception) of the first failure
        self.abort_kind = None            # "CANCELED" or "TIMEDOUT": what other ranks raise
        self.abort_detail = None
        self.nccl = []                    # the ranks' NcclComms (under cond), aborted with it

    def abort(self, rank, exc, kind="CANCELED", detail=None):
        """Records the first failure and wakes every waiting rank. Returns True when this was
        the first failure."""
        with self.cond:
            if self.failure is not None:
                return False
            self.failure = (rank, exc)
            self.abort_kind = kind
            self.abort_detail = detail or ("threadloom.spmd: rank %d failed with %s: %s; the "
                                           "collectives of the other ranks are canceled"
                                           % (rank, type(exc).__name__, exc))
            self.cond.notify_all()
            comms = list(self.nccl)
        for c in comms:                   # ncclCommAbort: ranks inside NCCL return
            try:
                c.abort()
            except _core.Error:           # noqa: PERF203 (the first failure is what counts)
                pass
        return True

    def add_nccl(self, comm):
        """Registers a rank's NcclComm; aborts it at once when the world already failed."""
        with self.cond:
            self.nccl.append(comm)
            failed = self.failure is not None
        if failed:
            comm.abort()

    def _aborted_error(self, op):
        return _error("E" + self.abort_kind, "%s (in %s)" % (self.abort_detail, op))

    def rendezvous(self, rank, op, value, combine, timeout):
        """Contributes `value` to collective `op`; the last rank to arrive runs
        combine(slots) (rank-ordered); every rank gets its return value."""
        if timeout is None:
            timeout = self.timeout
        with self.cond:
            if self.failure is not None:
                raise self._aborted_error(op)
            gen = self.gen
            if self.arrived == 0:
                self.op = op
            elif self.op != op:
                raise ValueError("threadloom.spmd: rank %d called %s while other ranks are in %s: "
                                 "every rank must call the same collectives in the same order"
                                 % (rank, op, self.op))
            self.slots[rank] = value
            self.arrived += 1
            if self.arrived == self.size:
                result = combine(self.slots)       # an exception here fails this rank
                self.result = result
                self.slots = [None] * self.size
                self.arrived = 0
                self.gen += 1
                self.cond.notify_all()
                return result
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.gen == gen and self.failure is None:
                if deadline is None:
                    self.cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in range(self.size) if self.slots[r] is None]
                    waiting = [r for r in range(self.size) if self.slots[r] is not None]
                    detail = ("threadloom.spmd: %s (collective #%d) timed out after %g s: ranks %s "
                              "did not arrive (ranks %s waited)" % (op, gen, timeout, missing,
                                                                    waiting))
                    exc = _error("ETIMEDOUT", detail)
                    self.failure = (rank, exc)
                    self.abort_kind, self.abort_detail = "TIMEDOUT", detail
                    self.cond.notify_all()
                    raise exc
                self.cond.wait(left)
            if self.gen != gen:
                return self.result
            raise self._aborted_error(op)


def abort_world(world, reason):
    """_runtime's abort of a running world (the cluster watchdog's abort_all): every rank's
    collectives raise CanceledError with `reason`. True when this was the world's first
    failure."""
    return world.abort(-1, _error("ECANCELED", reason), detail=reason)


# ---------------------------------------------------------------------------------------------
# the CPU communicator
# ---------------------------------------------------------------------------------------------

class CpuComm:
    """The CPU communicator: collectives between the ranks of one spmd() run, on host memory.
    It is the fallback where no GPU is present and the reference the NCCL communicator (one
    ncclComm_t per rank thread) will be tested against; that one keeps these signatures.

    Values: buffer-protocol objects (array.array, memoryview; element formats d, f, q, i; any
    buffer, a threadloom Buffer included, as bytes for broadcast/allgather), Python numbers and
    lists of numbers. Every rank must pass the same kind, format and length. Buffers are updated
    in place when writable and returned; read-only buffers get a new array.array. Reductions run
    in rank order on Python floats/ints (float32 rounded once, when stored), so every rank gets
    bit-identical results. A blocking call raises threadloom.CanceledError when another rank
    failed, threadloom.TimedOutError when the world timed out; `timeout=` overrides spmd()'s
    for one call.
    """

    def __init__(self, world, rank):
        self._world = world
        self.rank = rank
        self.world_size = world.size

    # -- collectives -------------------------------------------------------------------------

    def barrier(self, timeout=None):
        """Returns once every rank has called barrier()."""
        self._world.rendezvous(self.rank, "barrier", True, lambda slots: None, timeout)

    def allreduce(self, x, op="sum", timeout=None):
        """Element-wise reduction (sum, max, min, avg) of x across ranks. A writable buffer is
        updated in place and returned; a number returns the reduced number; a list a new list.
        avg on integer buffers (q, i) is refused (TypeError), as NCCL has no integer average."""
        buckets.check_op(op, OPS)
        v = _value(x, "allreduce")
        if op == "avg" and v.kind == "buf" and v.fmt in ("q", "i"):
            raise TypeError("allreduce: op='avg' needs a float buffer (d, f), not format %r" % v.fmt)

        def combine(slots):
            _same_signature(slots, "allreduce")
            return _reduce([s.values for s in slots], op, self.world_size)

        out = self._world.rendezvous(self.rank, "allreduce", v, combine, timeout)
        return self._deliver(v, out)

    def broadcast(self, x, src=0, timeout=None):
        """Every rank gets rank src's value: buffers are overwritten in place (same length in
        every rank), other values are returned (a deep copy in ranks other than src)."""
        self._check_rank(src, "src")
        try:
            v = _value(x, "broadcast", bytes_ok=True)
        except TypeError:
            v = _Value("obj", None, None, None, x)

        def combine(slots):
            kinds = {s.kind for s in slots}
            if len(kinds) != 1:
                raise ValueError("broadcast: ranks passed different kinds of values: %s"
                                 % [s.kind for s in slots])
            if slots[0].kind in ("buf",):
                _same_signature(slots, "broadcast")
            return slots[src]

        got = self._world.rendezvous(self.rank, "broadcast", v, combine, timeout)
        if v.kind == "buf":
            return self._deliver(v, got.values)
        if self.rank == src:
            return x
        return copy.deepcopy(got.obj)

    def allgather(self, x, out=None, timeout=None):
        """Concatenation of every rank's x in rank order. Buffers: a new array.array (bytes for
        byte buffers) of world_size * len(x), or written into `out`; other values: a list of
        the per-rank values."""
        try:
            v = _value(x, "allgather", bytes_ok=True)
        except TypeError:
            v = _Value("obj", None, None, None, x)

        def combine(slots):
            if slots[0].kind == "buf" or any(s.kind == "buf" for s in slots):
                _same_signature(slots, "allgather")
                flat = []
                for s in slots:
                    flat.extend(s.values)
                return flat
            return [s.obj for s in slots]

        got = self._world.rendezvous(self.rank, "allgather", v, combine, timeout)
        if v.kind != "buf":
            return [copy.copy(o) if isinstance(o, list) else o for o in got]
        return self._into(out, v.fmt, got, "allgather")

    def reduce_scatter(self, x, op="sum", out=None, timeout=None):
        """Reduces x (length world_size * n) across ranks and returns this rank's chunk of n
        elements (chunk r goes to rank r): for buffers a new array.array or `out`, for lists a
        list."""
        buckets.check_op(op, OPS)
        v = _value(x, "reduce_scatter")
        if v.kind == "num":
            raise TypeError("reduce_scatter needs a buffer or a list, not a number")
        n, rem = divmod(len(v.values), self.world_size)
        if rem:
            raise ValueError("reduce_scatter: length %d is not a multiple of world_size %d"
                             % (len(v.values), self.world_size))
        if op == "avg" and v.kind == "buf" and v.fmt in ("q", "i"):
            raise TypeError("reduce_scatter: op='avg' needs a float buffer (d, f)")

        def combine(slots):
            _same_signature(slots, "reduce_scatter")
            return _reduce([s.values for s in slots], op, self.world_size)

        red = self._world.rendezvous(self.rank, "reduce_scatter", v, combine, timeout)
        chunk = red[self.rank * n:(self.rank + 1) * n]
        if v.kind == "list":
            return chunk
        return self._into(out, v.fmt, chunk, "reduce_scatter")

    def allreduce_buckets(self, grads, bucket_bytes=buckets.DEFAULT_BUCKET_BYTES, op="avg",
                          timeout=None):
        """Allreduces a list of gradients in buckets (comm/buckets.py): same-format gradients
        (in list order) are concatenated until a bucket holds bucket_bytes, each bucket is
        reduced with one allreduce, and the results are written back into each gradient in
        place. grads: writable buffers (d, f; q, i with op other than avg) or Python lists of
        numbers (bucketed as 8-byte floats, updated by slice assignment). Returns grads.

        Host tensors with __dlpack__ (torch CPU tensors: [p.grad for p in model.parameters()])
        are buffers here, updated in place. NcclComm.allreduce_buckets has this signature for
        CUDA tensors."""
        buckets.check(op, bucket_bytes, OPS)
        items = []            # (fmt, nbytes, (index, view or None, length))
        for i, g in enumerate(grads):
            view = _typed_view(g, "allreduce_buckets")
            if view is not None:
                if view.readonly:
                    raise ValueError("allreduce_buckets: gradient %d is read-only" % i)
                fmt, n = view.format, len(view)
            elif isinstance(g, list) and all(_is_number(v) for v in g):
                fmt, n = "d", len(g)
            else:
                raise TypeError("allreduce_buckets: gradient %d is a %s, not a buffer or a list "
                                "of numbers" % (i, type(g).__name__))
            items.append((fmt, n * array.array(fmt).itemsize, (i, view, n)))
        for fmt, bucket in buckets.plan(items, bucket_bytes):
            self._reduce_bucket(fmt, bucket, grads, op, timeout)
        return grads

    # -- helpers -----------------------------------------------------------------------------

    def _reduce_bucket(self, fmt, bucket, grads, op, timeout):
        flat = array.array(fmt)
        for i, view, n in bucket:
            if view is not None:
                flat.frombytes(view.cast("B"))
            else:
                flat.extend(float(v) for v in grads[i])
        self.allreduce(flat, op=op, timeout=timeout)
        pos = 0
        for i, view, n in bucket:
            if view is not None:
                view[:] = flat[pos:pos + n]
            else:
                grads[i][:] = flat[pos:pos + n].tolist()
            pos += n

    def _deliver(self, v, values):
        if v.kind == "num":
            return values[0]
        if v.kind == "list":
            return list(values)
        if not v.view.readonly:
            _store(v.view, values)
            return v.obj
        return _new_buffer(v.fmt, values)

    def _into(self, out, fmt, values, what):
        if out is None:
            return _new_buffer(fmt, values)
        view = _typed_view(out, what + " out", bytes_ok=True)
        if view is None or view.readonly:
            raise TypeError("%s: out must be a writable buffer" % what)
        if view.format != fmt or len(view) != len(values):
            raise ValueError("%s: out has format %r and %d elements; %r and %d needed"
                             % (what, view.format, len(view), fmt, len(values)))
        _store(view, values)
        return out

    def _check_rank(self, r, name):
        if not isinstance(r, int) or not 0 <= r < self.world_size:
            raise ValueError("%s must be a rank in 0..%d, not %r" % (name, self.world_size - 1, r))

    def __repr__(self):
        return "<CpuComm rank %d of %d>" % (self.rank, self.world_size)
