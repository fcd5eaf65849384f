"""The NCCL communicator: _core.NcclComm's collectives on CUDA tensors, and allreduce_buckets.

``NcclComm`` is the extension's communicator type (python/src/nccl.c: one ncclComm_t per
rank thread; allreduce, broadcast, allgather, reduce_scatter, check, abort, close) with the one
collective that is Python: allreduce_buckets, which flattens gradients with the tensors' own
library (torch.cat) through the bucket planner CpuComm uses (comm/buckets.py), then calls the C
allreduce once per bucket. The extension never calls back into Python for it.

spmd() makes one per rank of a GPU world; Rendezvous.nccl_bootstrap().init_comm() one per GPU
thread of a multi-node job.
"""

import sys

from threadloom import _core
from threadloom.comm import buckets

__all__ = ["NcclComm"]


class NcclComm(_core.NcclComm):
    __doc__ = _core.NcclComm.__doc__
    __slots__ = ("__weakref__",)   # _runtime holds communicators weakly

    def allreduce_buckets(self, grads, bucket_bytes=buckets.DEFAULT_BUCKET_BYTES, op="avg",
                          timeout=None, *, stream=None):
        """CpuComm.allreduce_buckets for CUDA tensors. torch tensors of one dtype (in list
        order) are flattened into buckets of about bucket_bytes (torch.cat), each bucket is
        reduced with one allreduce and copied back into its gradients in place; other DLPack
        tensors (cupy, JAX) are reduced one by one, in place. Returns grads.

        Streams: by default everything runs on torch's current stream of the device, in order
        with the backward pass that made the gradients. With stream= a side stream
        (torch.cuda.Stream), it first waits for the current stream, then flattens, reduces and
        copies back on the side stream, so the host returns at once and later compute on the
        current stream overlaps the communication: call
        torch.cuda.current_stream().wait_stream(stream) before using the gradients. timeout: an
        NcclComm's bound is the one given when it was made (spmd's timeout=); passing one here
        raises ValueError."""
        return allreduce_buckets(self, grads, bucket_bytes, op, timeout, stream=stream)


def allreduce_buckets(comm, grads, bucket_bytes=buckets.DEFAULT_BUCKET_BYTES, op="avg",
                      timeout=None, *, stream=None):
    """NcclComm.allreduce_buckets on any communicator with allreduce(x, op, stream=) and
    `device` (tests pass a recording stand-in)."""
    buckets.check(op, bucket_bytes)
    if timeout is not None:
        raise ValueError("NcclComm.allreduce_buckets: the timeout of an NcclComm is set when it "
                         "is made (NcclComm(..., timeout=), spmd(timeout=)), not per call")
    torch = sys.modules.get("torch")
    items = []
    for g in grads:
        if torch is not None and isinstance(g, torch.Tensor):
            items.append((g.dtype, g.numel() * g.element_size(), g))
        else:
            comm.allreduce(g, op, stream=stream)          # not torch: one tensor at a time
    if not items:
        return grads
    side = None
    if stream is not None:
        side = stream if hasattr(stream, "wait_stream") else torch.cuda.ExternalStream(stream)
        side.wait_stream(torch.cuda.current_stream(comm.device))

    def flush(bucket):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            comm.allreduce(bucket[0], op, stream=side)
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        comm.allreduce(flat, op, stream=side)
        pos = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[pos:pos + n].view_as(g))
            pos += n

    def run():
        for _, bucket in buckets.plan(items, bucket_bytes):   # same order in every rank
            flush(bucket)

    if side is None:
        run()
    else:
        with torch.cuda.stream(side):
            run()
    return grads


def closed(nranks, rank, device):
    """An NcclComm that is already closed, so tests reach the collectives' argument checks
    (allreduce_buckets' included) without a GPU."""
    return _core._nccl_comm_closed(nranks, rank, device, NcclComm)


def abort(comm, reason):
    """_runtime's abort of a communicator (the cluster watchdog's abort_all): ncclCommAbort
    when it is still open. True when it aborted it."""
    if comm.closed:
        return False
    comm.abort()
    return True
