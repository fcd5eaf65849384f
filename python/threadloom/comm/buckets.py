"""What both communicators share: the reduction names and their one check, and the one bucket
planner behind CpuComm.allreduce_buckets and NcclComm.allreduce_buckets.

Bucketing (as torch's DistributedDataParallel does): gradients of one element type, in list
order, are concatenated into a bucket until it holds bucket_bytes or more; each bucket is then
reduced with one allreduce and scattered back into its gradients in place. The element types
come in the order they are first seen in the list, so every rank, given its gradients in the
same order, makes the same buckets and calls the same allreduces in the same order.
"""

DEFAULT_BUCKET_BYTES = 25 << 20

# The reductions (NCCL's ncclRedOp_t, threadloom's tl_nccl_op_t, in that order). The CPU
# communicator implements all but prod.
OPS = ("sum", "prod", "max", "min", "avg")


def check_op(op, ops=OPS):
    """Raises ValueError naming the reductions in `ops` when `op` is not one of them."""
    if op not in ops:
        raise ValueError("op must be one of %s, not %r" % (", ".join(ops), op))


def check(op, bucket_bytes, ops=OPS):
    """The arguments of allreduce_buckets, checked before any gradient is looked at."""
    check_op(op, ops)
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive, not %r" % (bucket_bytes,))


def plan(items, bucket_bytes):
    """The buckets of `items`, (kind, nbytes, item) in list order: a list of (kind, [item, ...])
    with the kinds in the order first seen and each kind's items in list order, a bucket
    closed as soon as it holds bucket_bytes or more."""
    groups, order = {}, []
    for kind, nbytes, item in items:
        if kind not in groups:
            groups[kind] = []
            order.append(kind)
        groups[kind].append((nbytes, item))
    buckets = []
    for kind in order:
        bucket, size = [], 0
        for nbytes, item in groups[kind]:
            bucket.append(item)
            size += nbytes
            if size >= bucket_bytes:
                buckets.append((kind, bucket))
                bucket, size = [], 0
        if bucket:
            buckets.append((kind, bucket))
    return buckets
