"""threadloom.spmd: a data-parallel training loop as threads of one process.

    def train(ctx, steps):
        for step in range(steps):
            grads = compute_grads(ctx.rank)               # this rank's shard
            ctx.comm.allreduce_buckets(grads)            # average across ranks, in place
            ...
        return loss

    losses = threadloom.spmd(train, args=(100,))       # one driver thread per device (or CPU rank)
    threadloom.spmd(train, devices=threadloom.devices())   # the same on every device: sim or cuda

spmd() starts one driver thread per rank, pinned to its device's ``launch`` slot of
threadloom.placement.device_plan() (on a machine without devices, to the loader slots of a
``gpus=0`` plan), runs ``fn(ctx, *args, **kwargs)`` in each and returns the per-rank results in
rank order.

Failure: the first exception in any rank aborts the world. Every other rank's blocking
collective (and barrier) then raises threadloom.CanceledError, so no rank hangs; once every
thread has returned, spmd() re-raises the original exception, with its traceback and a note
naming the rank and its device. A failing device (a lost GPU, or a sim device with an injected
loss) fails the rank that uses it with threadloom.DeviceLostError the same way. With
``timeout=``, a rank that waits longer than that in a collective aborts the world with
threadloom.TimedOutError naming the collective and the ranks that did not arrive; every rank
fails with TimedOutError. A thread cannot be killed: a rank busy outside the communicator finds
the abort at its next collective call, and spmd() waits for it.

The communicator (``ctx.comm``; the communicators are threadloom.comm's, this module only runs
the ranks): in a CPU world the CpuComm (host values: buffers, host tensors through DLPack,
numbers, lists); in a world of devices a threadloom.comm.DeviceComm per rank, one API on both
backends: device buffers (DeviceBuffer.cast typed) and CUDA tensors go through NCCL on cuda
(one NcclComm per rank thread: ncclGetUniqueId once here, then each thread's non-blocking
ncclCommInitRank) and through the host collectives on sim, whose buffers are host memory,
ordered on the rank's stream; host values go to the host collectives. Each rank of a device
world also gets ``ctx.stream``, a stream of its device made by its thread and current on it
while fn runs. ``ctx.host_comm`` is the CpuComm in every world (numbers such as a loss, host
buffers), and ctx.barrier() uses it. A failing rank aborts every rank's NcclComm
(ncclCommAbort), so ranks blocked on NCCL return with CanceledError as CPU ones do.
"""

import threading

from threadloom import _core, _runtime, errors, placement
from threadloom.comm.cpu import OPS, CpuComm, World, abort_world
from threadloom.comm.device import DeviceComm
from threadloom.comm.nccl import NcclComm
from threadloom.devices import api as device_api

__all__ = ["spmd", "SpmdContext", "CpuComm", "OPS"]


# ---------------------------------------------------------------------------------------------
# spmd()
# ---------------------------------------------------------------------------------------------

class SpmdContext:
    """What fn receives: rank, world_size, device (this rank's threadloom Device, None in a CPU
    world), stream (a Stream of that device, current on this thread while fn runs; None in a
    CPU world), comm (CpuComm in a CPU world, this rank's DeviceComm in a world of devices),
    host_comm (the CpuComm, in every world: numbers and host buffers), barrier(), pinning (the
    threadloom.Pinning of this thread, or None)."""

    def __init__(self, rank, world_size, device, comm, host_comm=None):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = None
        self.comm = comm
        self.host_comm = comm if host_comm is None else host_comm
        self.pinning = None

    def barrier(self, timeout=None):
        self.host_comm.barrier(timeout=timeout)

    def __repr__(self):
        return "<SpmdContext rank %d of %d, device %s>" % (self.rank, self.world_size, self.device)


def _world_devices(devices, cpu_world):
    """The world's devices, one per rank: threadloom Devices of one kind, or [None] * n for a
    CPU world."""
    if devices is None or devices == "cpu":
        found = device_api.devices() if devices is None else []
        if found:
            return found
        if not isinstance(cpu_world, int) or cpu_world < 1:
            raise ValueError("cpu_world must be a positive int, not %r" % (cpu_world,))
        return [None] * cpu_world
    if isinstance(devices, (str, int, _core.Device)):
        devices = [devices]
    wanted = list(devices)
    if not wanted:
        raise ValueError("devices must name at least one device")
    out = []
    for d in wanted:
        try:
            out.append(device_api.device(d))
        except (ValueError, TypeError, _core.Error) as e:
            n = len(device_api.devices())
            raise errors.error("ENODEV", "threadloom.spmd: device %r is not a device of this "
                               "process (%d of the %s backend; threadloom.devices() lists them): %s"
                               % (d, n, device_api.backend()["name"], e)) from None
    kinds = sorted({d.kind for d in out})
    if len(kinds) > 1:
        raise ValueError("devices mixes %s devices: one world runs on one kind" % " and ".join(kinds))
    if len(set(out)) != len(out):
        raise ValueError("devices lists a device twice: %r" % (wanted,))
    return out


def spmd(fn, devices=None, args=(), kwargs=None, timeout=None, pin=True, *, cpu_world=2):
    """Runs fn(ctx, *args, **kwargs) in one driver thread per rank and returns the per-rank
    results (a list in rank order).

    devices: the devices, one rank each: threadloom Devices (``threadloom.devices()``),
    "sim:3" / "cuda:0" strings, or ints (indices into threadloom.devices()); one kind per world.
    None: the selected backend's devices (every GPU CUDA sees, or THREADLOOM_DEVICES=sim:N's);
    without any, a CPU world of `cpu_world` ranks (default 2) with ctx.device None. "cpu": that
    CPU world even where devices are present. pin: pin each rank thread to its device's launch
    slot of placement.device_plan(devices) (in a CPU world the loader slots of a gpus=0 plan).
    timeout: seconds a rank may wait in a collective before the world fails with
    threadloom.TimedOutError (None: no limit).

    The first exception in any rank cancels the others' collectives (threadloom.CanceledError;
    on cuda their NcclComms are aborted) and is re-raised here, with its traceback and a note
    naming the rank and device, once every thread is joined. In a world of devices each rank
    thread takes a stream of its device (ctx.stream, its current stream while fn runs), makes
    its communicator after pinning (on cuda an NcclComm: one ncclGetUniqueId here, a
    non-blocking ncclCommInitRank per thread, bounded by `timeout` when given), and when fn
    returns waits for its stream, so a failure of work still queued (a lost device) is
    reported, not dropped; then it closes the NcclComm. A rank that fails before joining
    leaves the others waiting in NCCL's init until `timeout` (without one, until they are
    interrupted): give a timeout on GPUs. The cuda world has not run on a GPU yet (the sim
    world runs in CI).
    """
    kwargs = dict(kwargs or {})
    devices = _world_devices(devices, cpu_world)
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive or None, not %r" % (timeout,))
    world_size = len(devices)
    cpu = devices[0] is None
    cuda = not cpu and devices[0].kind == "cuda"
    plan = None
    if pin:
        plan = placement.plan(gpus=0, loaders_per_gpu=world_size, io_threads=0,
                              main_thread=False) if cpu else placement.device_plan(devices)

    world = World(world_size, timeout)
    results = [None] * world_size
    uid = _core.nccl_unique_id() if cuda else None    # one id for the whole world
    _runtime.register(world, abort=abort_world)

    def run(rank):
        dev = devices[rank]
        ctx = SpmdContext(rank, world_size, dev, CpuComm(world, rank))
        nccl = None
        try:
            if pin:
                if cpu:
                    ctx.pinning = placement.pin(role="loader", rank=rank, plan=plan)
                else:
                    ctx.pinning = placement.pin(gpu=rank, role="launch", rank=0, plan=plan)
            if cpu:
                results[rank] = fn(ctx, *args, **kwargs)
                return
            ctx.stream = device_api.Stream(dev)
            if cuda:
                nccl = NcclComm(uid, world_size, rank, dev.index, timeout=timeout)
                world.add_nccl(nccl)
            ctx.comm = DeviceComm(ctx.host_comm, dev, ctx.stream, nccl, timeout)
            with ctx.stream:
                results[rank] = fn(ctx, *args, **kwargs)
            ctx.stream.synchronize(timeout)   # work still queued fails here, not silently
        except BaseException as e:       # noqa: BLE001 (handed to the caller)
            world.abort(rank, e)
        finally:
            if nccl is not None:
                try:
                    nccl.close()
                except BaseException as e:   # noqa: BLE001 (handed to the caller)
                    world.abort(rank, e)

    threads = [threading.Thread(target=run, args=(r,), name="spmd-rank-%d" % r, daemon=True)
               for r in range(world_size)]
    started = 0
    try:
        for t in threads:
            t.start()
            started += 1
        for t in threads:
            t.join()
    except BaseException as e:
        # KeyboardInterrupt (or a failed start) in the caller: cancel every rank, then join
        world.abort(-1, e, detail="threadloom.spmd: the caller was interrupted (%s)"
                    % type(e).__name__)
        for t in threads[:started]:
            t.join()
        raise
    finally:
        _runtime.unregister(world)
    if world.failure is not None:
        rank, exc = world.failure
        if rank >= 0:
            exc.add_note("raised in threadloom.spmd rank %d of %d (device %s)"
                         % (rank, world_size, devices[rank]))
        raise exc
    return results
