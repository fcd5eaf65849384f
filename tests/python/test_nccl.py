"""NcclComm's collectives from Python: argument checks without a GPU, the real thing on GPUs.

Without a GPU no communicator can be made (ncclCommInitRank needs a device), so the argument
checks run on threadloom.comm.nccl.closed(): a closed NcclComm, whose collectives check their
arguments (op, src, stream, the tensor's DLPack device, out=) and the exported tensors (a
ctypes DLPack producer that labels host memory kDLCUDA, never dereferenced: shape, dtype
agreement, read-only, the stream handed to __dlpack__) before they report ClosedError. A
ClosedError therefore means every check passed. What reaches NCCL (dtype and op mapping,
counts, pointers, streams, groups, aborts) is tested in C through a fake backend table
(tests/c/test-cudactx.c); the GPU tests below SKIP here, saying why.
"""
import array

import pytest

import threadloom
import ctypes

from threadloom import _core
from threadloom.comm import cpu, nccl
from test_dlpack import Producer

kDLCPU, kDLCUDA, kDLCUDAHost = 1, 2, 3


class Exported(Exception):
    """Raised by FakeTensor.__dlpack__: every check before the export passed."""


class FakeTensor:
    """Has the DLPack device protocol only: enough for the checks before __dlpack__."""

    def __init__(self, device=(kDLCUDA, 0)):
        self.device = device

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, **kwargs):
        raise Exported()


class CudaProducer(Producer):
    """A DLPack producer on (kDLCUDA, 0) that records the stream each export was asked for."""

    def __init__(self, n, shape=None, code=2, bits=32, **kw):
        kw.setdefault("device", (kDLCUDA, 0))
        self.raw = (ctypes.c_uint8 * (n * bits // 8))()
        super().__init__(self.raw, shape or (n,), code, bits, **kw)
        self.streams = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        return self.capsule()


class Stream:
    def __init__(self, handle):
        self.cuda_stream = handle


@pytest.fixture
def comm():
    c = nccl.closed(4, 1, 0)
    assert c.closed and not c.aborted
    assert (c.rank, c.nranks, c.world_size, c.device) == (1, 4, 4, 0)
    return c


def test_valid_arguments_reach_the_closed_check(comm):
    x, out = CudaProducer(4), CudaProducer(16)
    for call in (lambda: comm.allreduce(x),
                 lambda: comm.allreduce(x, "avg", stream=7),
                 lambda: comm.allreduce(x, op="prod", stream=Stream(0)),
                 lambda: comm.broadcast(x, 3, stream=Stream(12345)),
                 lambda: comm.allgather(x, out),
                 lambda: comm.reduce_scatter(out, "max", x)):
        with pytest.raises(threadloom.ClosedError, match="this NcclComm was closed"):
            call()
    with pytest.raises(Exported):
        comm.allreduce(FakeTensor())
    with pytest.raises(threadloom.ClosedError):
        comm.check()
    comm.abort()                                  # no-ops on a closed communicator
    comm.close()


def test_host_tensors_and_buffers_are_refused_with_what_to_do(comm):
    for dev in ((kDLCPU, 0), (kDLCUDAHost, 0)):
        with pytest.raises(threadloom.InvalidArgumentError) as ei:
            comm.allreduce(FakeTensor(dev))
        msg = str(ei.value)
        assert "NCCL reduces CUDA device memory" in msg and "CpuComm" in msg
        assert "x.to('cuda:0')" in msg
    arena = threadloom.Arena(size=1 << 20, pin="never")
    buf = arena.alloc(64)
    with pytest.raises(threadloom.InvalidArgumentError, match="threadloom Buffers"):
        comm.broadcast(buf)
    buf.free()
    arena.close()
    with pytest.raises(TypeError, match="host values .* go through CpuComm"):
        comm.allreduce(array.array("f", [1.0]))
    with pytest.raises(TypeError, match="not float"):
        comm.allreduce(1.5)


def test_device_mismatch(comm):
    with pytest.raises(threadloom.InvalidArgumentError, match="on cuda:1 but this communicator "
                                                              "drives cuda:0"):
        comm.allreduce(FakeTensor((kDLCUDA, 1)))
    with pytest.raises(threadloom.InvalidArgumentError, match="cuda:3 but"):
        comm.allgather(FakeTensor(), FakeTensor((kDLCUDA, 3)))


def test_bad_op_src_stream_out(comm):
    x = FakeTensor()
    with pytest.raises(ValueError, match="op must be one of sum, prod, max, min, avg"):
        comm.allreduce(x, "mean")
    with pytest.raises(ValueError, match="op must be one of"):
        comm.reduce_scatter(x, 3, FakeTensor())
    with pytest.raises(ValueError, match=r"src must be a rank in 0..3, not 4"):
        comm.broadcast(x, 4)
    with pytest.raises(ValueError, match="not -1"):
        comm.broadcast(x, -1)
    with pytest.raises(TypeError, match="stream must be None, an int cudaStream_t or an object "
                                        "with .cuda_stream"):
        comm.allreduce(x, stream="default")
    with pytest.raises(ValueError, match="non-negative"):
        comm.allreduce(x, stream=-2)
    with pytest.raises(ValueError, match="non-negative"):
        comm.allreduce(x, stream=Stream(-1))
    with pytest.raises(TypeError, match="needs out=.*world_size \\* x.numel"):
        comm.allgather(x)
    with pytest.raises(TypeError, match="needs out=.*x.numel\\(\\) // world_size"):
        comm.reduce_scatter(x, "sum")
    with pytest.raises(TypeError, match="__dlpack__ and __dlpack_device__"):
        comm.allgather(x, out=object())


def test_exported_tensor_checks_and_the_stream_handed_to_dlpack(comm):
    x = CudaProducer(6)
    with pytest.raises(threadloom.ClosedError):
        comm.allreduce(x)                          # torch not imported: the legacy stream
    with pytest.raises(threadloom.ClosedError):
        comm.allreduce(x, stream=0)                # DLPack spells the legacy stream 1
    with pytest.raises(threadloom.ClosedError):
        comm.broadcast(x, stream=Stream(0x7f00))
    assert x.streams == [1, 1, 0x7f00] and x.deleted == 0   # borrowed, never consumed
    with pytest.raises(BufferError, match="not compact row-major: dimension 1 has stride 2"):
        comm.allreduce(CudaProducer(6, (2, 3), strides=(1, 2)))
    with pytest.raises(BufferError, match="read-only"):
        comm.allreduce(CudaProducer(4, flags=1))
    with pytest.raises(threadloom.ClosedError):   # a read-only input of allgather is fine
        comm.allgather(CudaProducer(4, flags=1), CudaProducer(16))
    with pytest.raises(BufferError, match="read-only"):
        comm.allgather(CudaProducer(4), CudaProducer(16, flags=1))
    # sizes: world of 4
    with pytest.raises(ValueError, match="out has 20 elements and x 6; with 4 ranks"):
        comm.allgather(CudaProducer(6), CudaProducer(20))
    with pytest.raises(threadloom.ClosedError):
        comm.allgather(CudaProducer(6, (2, 3)), CudaProducer(24, (4, 2, 3)))
    with pytest.raises(ValueError, match="x has 24 elements and out 5"):
        comm.reduce_scatter(CudaProducer(24), "sum", CudaProducer(5))
    with pytest.raises(threadloom.ClosedError):
        comm.reduce_scatter(CudaProducer(24), "avg", CudaProducer(6))
    with pytest.raises(TypeError, match="different dtypes"):
        comm.allgather(CudaProducer(2, bits=64), CudaProducer(8))
    # the tensor itself on another device than __dlpack_device__ said
    odd = CudaProducer(4)
    odd.__dlpack_device__ = lambda: (kDLCUDA, 0)
    odd.managed.dl_tensor.device.device_id = 1
    with pytest.raises(threadloom.InvalidArgumentError, match="not on cuda:0 as "
                                                              "__dlpack_device__ said"):
        comm.allreduce(odd)


def test_allreduce_buckets_checks_then_reduces_through_allreduce(comm):
    with pytest.raises(ValueError, match="op must be one of"):
        comm.allreduce_buckets([FakeTensor()], op="mean")
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        comm.allreduce_buckets([FakeTensor()], bucket_bytes=0)
    with pytest.raises(ValueError, match="set when it is made"):
        comm.allreduce_buckets([FakeTensor()], timeout=5)
    assert comm.allreduce_buckets([]) == []
    # not torch tensors: each one goes through allreduce, which checks it
    with pytest.raises(threadloom.InvalidArgumentError, match="CpuComm"):
        comm.allreduce_buckets([FakeTensor((kDLCPU, 0))])
    x = CudaProducer(3)
    with pytest.raises(threadloom.ClosedError):
        comm.allreduce_buckets([x], op="sum", stream=3)
    assert x.streams == [3]


def test_constructor_checks_before_touching_nccl():
    with pytest.raises(ValueError, match="128 bytes"):
        _core.NcclComm(b"x", 1, 0, 0)
    for t in (0, -1, float("nan"), 1e9):
        with pytest.raises(ValueError, match="timeout must be positive"):
            _core.NcclComm(bytes(128), 1, 0, 0, timeout=t)


def test_spmd_world_abort_aborts_registered_nccl_comms():
    """The failure path of a GPU world without a GPU: _World aborts what add_nccl registered
    (a stand-in with abort(), as a closed NcclComm's abort is a no-op)."""
    class Rec:
        def __init__(self):
            self.aborts = 0

        def abort(self):
            self.aborts += 1

    w = cpu.World(2, None)
    a, b = Rec(), Rec()
    w.add_nccl(a)
    assert w.abort(0, RuntimeError("boom")) is True
    assert a.aborts == 1
    w.add_nccl(b)                       # joins after the failure: aborted at once
    assert b.aborts == 1
    assert w.abort(1, RuntimeError("again")) is False
    assert a.aborts == 1


# -- on GPUs -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_spmd_gpu_world_makes_nccl_comms(require_gpu):
    """spmd(devices=) on GPUs: each rank's DeviceComm has an NcclComm on its device, host_comm
    is the CpuComm, and the communicators are closed afterwards."""
    seen = []

    def fn(ctx):
        nccl = ctx.comm.nccl
        assert isinstance(nccl, _core.NcclComm) and nccl.device == ctx.device.index
        assert ctx.device.kind == "cuda" and ctx.stream.device == ctx.device
        assert isinstance(ctx.host_comm, cpu.CpuComm)
        nccl.check()
        seen.append(nccl)
        ctx.barrier()
        return ctx.host_comm.allreduce(ctx.rank)

    n = min(require_gpu, 2)
    assert threadloom.spmd(fn, devices=list(range(n)), timeout=120) == [sum(range(n))] * n
    assert all(c.closed for c in seen)
