"""threadloom.spmd: a data-parallel training loop as threads of one process.

    def train(ctx, steps):
        for step in range(steps):
            grads = compute_grads(ctx.rank)               # this rank's shard
            ctx.comm.allreduce_buckets(grads)            # average across ranks, in place
            ...
        return loss

    losses = threadloom.spmd(train, args=(100,))       # one driver thread per GPU (or CPU rank)

spmd() starts one driver thread per rank, each pinned to its slot of threadloom.plan() (a GPU's
``launch`` slot; on a machine without GPUs, the loader slots of a ``gpus=0`` plan), runs
``fn(ctx, *args, **kwargs)`` in each and returns the per-rank results in rank order.

Failure: the first exception in any rank aborts the world. Every other rank's blocking
collective (and barrier) then raises threadloom.CanceledError, so no rank hangs; once every
thread has returned, spmd() re-raises the original exception, with its traceback and a note
naming the rank. With ``timeout=``, a rank that waits longer than that in a collective aborts
the world with threadloom.TimedOutError naming the collective and the ranks that did not
arrive; every rank fails with TimedOutError. A thread cannot be killed: a rank busy outside the
communicator finds the abort at its next collective call, and spmd() waits for it.

The communicator (``ctx.comm``; the communicators are threadloom.comm's, this module only runs
the ranks): in a CPU world the CpuComm (host values: buffers, host tensors through DLPack,
numbers, lists); in a GPU world a threadloom.comm.NcclComm per rank (CUDA tensors through
DLPack, on ctx.device), made by the rank's thread (ncclGetUniqueId once here, then each
thread's non-blocking ncclCommInitRank). Both have allreduce(x, op),
broadcast(x, src), allgather(x, out), reduce_scatter(x, op, out), allreduce_buckets(grads,
bucket_bytes, op); the NcclComm's also take stream= and need out= for allgather/reduce_scatter.
``ctx.host_comm`` is the CpuComm in both worlds (numbers such as a loss, host buffers), and
ctx.barrier() uses it. A failing rank aborts every rank's NcclComm (ncclCommAbort), so ranks
blocked on NCCL return with CanceledError as CPU ones do.
"""

import threading

from threadloom import _core, _runtime, errors, placement
from threadloom.comm.cpu import OPS, CpuComm, World, abort_world
from threadloom.comm.nccl import NcclComm

__all__ = ["spmd", "SpmdContext", "CpuComm", "OPS"]


# ---------------------------------------------------------------------------------------------
# spmd()
# ---------------------------------------------------------------------------------------------

class SpmdContext:
    """What fn receives: rank, world_size, device (the CUDA index, None in a CPU world), comm
    (the communicator: CpuComm in a CPU world, this rank's NcclComm in a GPU world), host_comm
    (the CpuComm, in both worlds: numbers and host buffers), barrier(), pinning (the
    threadloom.Pinning of this thread, or None)."""

    def __init__(self, rank, world_size, device, comm, host_comm=None):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.comm = comm
        self.host_comm = comm if host_comm is None else host_comm
        self.pinning = None

    def barrier(self, timeout=None):
        self.host_comm.barrier(timeout=timeout)

    def __repr__(self):
        return "<SpmdContext rank %d of %d, device %s>" % (self.rank, self.world_size, self.device)


def _visible_gpus():
    try:
        return list(range(_core.cuda_device_count()))
    except _core.Error:
        return []


def spmd(fn, devices=None, args=(), kwargs=None, timeout=None, pin=True, *, cpu_world=2):
    """Runs fn(ctx, *args, **kwargs) in one driver thread per rank and returns the per-rank
    results (a list in rank order).

    devices: CUDA indices, one rank each. None: every GPU CUDA sees; on a machine without GPUs,
    a CPU world of `cpu_world` ranks (default 2) with ctx.device None. "cpu": that CPU world
    even where GPUs are present. pin: pin each rank thread
    to its plan slot (the GPU's launch slot; in a CPU world the loader slots of a gpus=0 plan).
    timeout: seconds a rank may wait in a collective before the world fails with
    threadloom.TimedOutError (None: no limit).

    The first exception in any rank cancels the others' collectives (threadloom.CanceledError;
    in a GPU world their NcclComms are aborted) and is re-raised here, with its traceback and a
    note naming the rank, once every thread is joined. In a GPU world each rank thread makes
    its NcclComm (threadloom.comm.NcclComm: one ncclGetUniqueId here, a non-blocking
    ncclCommInitRank per thread, bounded by `timeout` when given) after pinning, and closes it
    when fn returns. A rank that fails before joining leaves the others waiting in NCCL's init
    until `timeout` (without one, until they are interrupted): give a timeout on GPUs. The GPU
    world is untested on this project's CI (no GPU there).
    """
    kwargs = dict(kwargs or {})
    if devices is None or devices == "cpu":
        devices = _visible_gpus() if devices is None else []
        if not devices:
            if not isinstance(cpu_world, int) or cpu_world < 1:
                raise ValueError("cpu_world must be a positive int, not %r" % (cpu_world,))
            devices = [None] * cpu_world
    else:
        devices = list(devices)
        if not devices:
            raise ValueError("devices must name at least one GPU")
        if len(set(devices)) != len(devices):
            raise ValueError("devices lists a GPU twice: %r" % (devices,))
        n = len(_visible_gpus())
        for d in devices:
            if not isinstance(d, int) or not 0 <= d < n:
                raise errors.error("ENODEV", "threadloom.spmd: device %r is not a GPU CUDA "
                                   "sees (%d visible)" % (d, n))
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive or None, not %r" % (timeout,))
    world_size = len(devices)
    cpu = devices[0] is None
    plan = None
    if pin:
        plan = placement.plan(gpus=0, loaders_per_gpu=world_size, io_threads=0,
                              main_thread=False) if cpu else placement.default_plan()

    world = World(world_size, timeout)
    results = [None] * world_size
    uid = None if cpu else _core.nccl_unique_id()    # one id for the whole world
    _runtime.register(world, abort=abort_world)

    def run(rank):
        ctx = SpmdContext(rank, world_size, devices[rank], CpuComm(world, rank))
        nccl = None
        try:
            if pin:
                if cpu:
                    ctx.pinning = placement.pin(role="loader", rank=rank, plan=plan)
                else:
                    ctx.pinning = placement.pin(gpu=devices[rank], role="launch", rank=0,
                                                plan=plan)
            if not cpu:
                nccl = NcclComm(uid, world_size, rank, devices[rank], timeout=timeout)
                world.add_nccl(nccl)
                ctx.comm = nccl
            results[rank] = fn(ctx, *args, **kwargs)
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
