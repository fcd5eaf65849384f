"""The device communicator: ``ctx.comm`` of an spmd() world on devices, one API on every backend.

    def train(ctx):                                  # spmd(train, devices=threadloom.devices())
        g = ctx.stream.alloc(4 * n).cast("f")        # device memory, float32
        ctx.stream.copy(g, host_grads)               # H2D on the rank's stream
        ctx.comm.allreduce(g, op="avg")              # ordered on ctx.stream, in place
        ctx.stream.copy(host_grads, g)               # D2H after the reduction

``DeviceComm`` keeps CpuComm's signatures (allreduce, broadcast, allgather, reduce_scatter,
allreduce_buckets, barrier) plus ``stream=`` (default: the rank's stream, ctx.stream), and
routes each value by where it lives:

  device values  DeviceBuffers of the rank's device (typed with DeviceBuffer.cast) and, on
                 cuda, CUDA tensors through DLPack (torch). On cuda: the rank's NcclComm,
                 enqueued on the stream; the call returns once enqueued. On sim: the world's
                 host collectives (comm/cpu.py) on the buffer's memory, which is host memory,
                 ordered on the stream: the rank's thread first waits for the stream (its queued
                 work and whatever it waits on), then reduces in place and returns, so work
                 queued on the stream afterwards sees the result. Same values, same results:
                 the sim world reduces in rank order as CpuComm does (bit-identical to a CPU
                 world); NCCL's order is its own.
  host values    numbers, lists, Python objects and host buffers: the host collectives, as
                 ctx.host_comm (in a sim world a host buffer may be sim memory seen through
                 DLPack, e.g. a torch CPU tensor over a sim buffer: the stream is waited for
                 first there too).

Device values take no per-call ``timeout=`` on either backend (the world's, spmd(timeout=),
bounds them: NCCL's is fixed when its communicator is made); allgather and reduce_scatter of
device values need ``out=`` on both (no hidden device allocation), so code written for one
backend runs on the other. A failure anywhere (an exception in a rank, a lost device) aborts
the world: host collectives raise CanceledError, NCCL communicators are aborted.
"""

from threadloom import _core
from threadloom.comm import buckets
from threadloom.comm.cpu import FORMATS

__all__ = ["DeviceComm"]

_KDLCPU, _KDLCUDA = 1, 2


class DeviceComm:
    """One rank's communicator in a world of devices (see the module docstring). Made by
    spmd(); attributes rank, world_size, device, stream (the default for device values),
    kind ("cuda" or "sim"), host (the CpuComm) and nccl (the NcclComm on cuda, else None)."""

    def __init__(self, host, device, stream, nccl=None, timeout=None):
        self.host = host
        self.rank = host.rank
        self.world_size = host.world_size
        self.device = device
        self.stream = stream
        self.kind = device.kind
        self.nccl = nccl
        self.timeout = timeout

    # -- routing -----------------------------------------------------------------------------

    def _where(self, x, what):
        """'device', 'hostbuf' (host memory with a buffer or DLPack) or 'host' (Python values)."""
        if isinstance(x, _core.DeviceBuffer):
            if x.device != self.device:
                raise ValueError("%s: the buffer is on %s, this rank's device is %s"
                                 % (what, x.device, self.device))
            return "device"
        dl = getattr(x, "__dlpack_device__", None)
        if dl is not None and not isinstance(x, (bytes, bytearray, memoryview)):
            dev_type, dev_id = dl()
            if dev_type == _KDLCUDA:
                if self.kind != "cuda" or dev_id != self.device.index:
                    raise ValueError("%s: a CUDA tensor on cuda:%d, this rank's device is %s"
                                     % (what, dev_id, self.device))
                return "device"
            return "hostbuf"
        try:
            memoryview(x).release()
            return "hostbuf"
        except TypeError:
            return "host"

    def _stream(self, stream):
        return self.stream if stream is None else stream

    def _sim_ready(self, stream, timeout, what):
        """Sim: waits (detached) for the stream's queued work before the host reads device
        memory. The result is written before the call returns: later work on any stream is
        ordered after it."""
        s = self._stream(stream)
        if not isinstance(s, _core.Stream) or s.device != self.device:
            raise ValueError("%s: stream= must be a threadloom Stream of %s (got %r)"
                             % (what, self.device, s))
        s.synchronize(timeout)

    def _no_timeout(self, timeout, what):
        if timeout is not None:
            raise ValueError("%s: device values are bounded by the world's timeout "
                             "(spmd(timeout=)), not per call: NCCL fixes it when its "
                             "communicator is made" % what)

    def _check_reducible(self, x, what):
        if isinstance(x, _core.DeviceBuffer) and self.kind == "sim" and x.format not in FORMATS:
            raise TypeError("%s: a DeviceBuffer of format %r cannot be reduced: cast it to its "
                            "element type first (buf.cast('f'); reductions take %s)"
                            % (what, x.format, ", ".join(FORMATS)))

    def _handle(self, stream):
        """The NCCL stream argument: the raw cudaStream_t of a threadloom Stream, else as given."""
        s = self._stream(stream)
        return s.handle if isinstance(s, _core.Stream) else s

    def _run(self, what, x, timeout, stream, host, nccl, reduces=False, out=False):
        """The one dispatch of every collective: host values to host(timeout); device values
        checked (a reduction needs an element type, allgather/reduce_scatter need out=, no
        per-call timeout), then nccl(stream handle) on cuda, or host(None) (the world's
        timeout) after waiting for the stream on sim."""
        where = self._where(x, what)
        if where != "device":
            if where == "hostbuf" and self.kind == "sim":
                self._sim_ready(stream, timeout, what)
            return host(timeout)
        if reduces:
            self._check_reducible(x, what)
        if out is not False:
            self._need_out(out, what)
        self._no_timeout(timeout, what)
        if self.kind == "cuda":
            return nccl(self._handle(stream))
        self._sim_ready(stream, self.timeout, what)
        return host(None)

    # -- collectives -------------------------------------------------------------------------

    def barrier(self, timeout=None):
        """Returns once every rank has called barrier() (host threads; streams are not waited)."""
        self.host.barrier(timeout=timeout)

    def allreduce(self, x, op="sum", timeout=None, *, stream=None):
        """Reduces x across ranks (sum, max, min, avg; NCCL also prod): device values in place
        on the stream (see the module docstring), host values as CpuComm.allreduce."""
        return self._run("allreduce", x, timeout, stream,
                         lambda t: self.host.allreduce(x, op, t),
                         lambda s: self.nccl.allreduce(x, op, stream=s), reduces=True)

    def broadcast(self, x, src=0, timeout=None, *, stream=None):
        """Every rank gets rank src's x: device values overwritten in place on the stream."""
        return self._run("broadcast", x, timeout, stream,
                         lambda t: self.host.broadcast(x, src, t),
                         lambda s: self.nccl.broadcast(x, src, stream=s))

    def allgather(self, x, out=None, timeout=None, *, stream=None):
        """Every rank's x in rank order. Device values: into `out` (world_size times x's
        elements, same format, on the same device), required. Host values: CpuComm.allgather."""
        return self._run("allgather", x, timeout, stream,
                         lambda t: self.host.allgather(x, out, t),
                         lambda s: self.nccl.allgather(x, out, stream=s), out=out)

    def reduce_scatter(self, x, op="sum", out=None, timeout=None, *, stream=None):
        """Chunk `rank` of the reduction of x (world_size chunks). Device values: into `out`,
        required. Host values: CpuComm.reduce_scatter."""
        return self._run("reduce_scatter", x, timeout, stream,
                         lambda t: self.host.reduce_scatter(x, op, out, t),
                         lambda s: self.nccl.reduce_scatter(x, op, out, stream=s),
                         reduces=True, out=out)

    def allreduce_buckets(self, grads, bucket_bytes=buckets.DEFAULT_BUCKET_BYTES, op="avg",
                          timeout=None, *, stream=None):
        """Reduces a list of gradients in buckets, in place (comm/buckets.py): device values
        (typed DeviceBuffers; torch CUDA tensors) on the stream, through NcclComm's
        allreduce_buckets on cuda and CpuComm's on sim; a list of host values as CpuComm's.
        Every gradient of one call lives in the same place. Returns grads."""
        grads = list(grads) if not isinstance(grads, list) else grads
        places = {self._where(g, "allreduce_buckets") for g in grads}
        if len(places) > 1:
            raise ValueError("allreduce_buckets: device and host gradients in one call; reduce "
                             "them in two calls")
        for g in grads:
            self._check_reducible(g, "allreduce_buckets")
        first = grads[0] if grads else None
        return self._run("allreduce_buckets", first, timeout, stream,
                         lambda t: self.host.allreduce_buckets(grads, bucket_bytes, op, t),
                         lambda s: self.nccl.allreduce_buckets(grads, bucket_bytes, op,
                                                               stream=s))

    def _need_out(self, out, what):
        if out is None:
            raise ValueError("%s of a device value needs out= (a DeviceBuffer on %s of "
                             "world_size times its elements, same format): no device memory is "
                             "allocated behind your back" % (what, self.device))
        if self._where(out, what + " out") != "device":
            raise ValueError("%s: out must be device memory on %s, like x" % (what, self.device))

    def __repr__(self):
        return "<DeviceComm rank %d of %d on %s (%s)>" % (
            self.rank, self.world_size, self.device, "NCCL" if self.kind == "cuda"
            else "host collectives on the stream")
