"""NcclComm.allreduce_buckets' bucketing (threadloom.comm.nccl.allreduce_buckets) on torch
tensors, without a GPU: the communicator is a recording stand-in whose allreduce doubles its
tensor in place, so what is checked is the Python side only (grouping by dtype in list order,
bucket boundaries, flatten and copy back in place). The NCCL call itself needs a GPU."""
import pytest
import torch

from threadloom.comm import nccl


class Recorder:
    device = 0

    def __init__(self):
        self.calls = []

    def allreduce(self, x, op="sum", stream=None):
        self.calls.append((x.dtype, x.numel(), op, stream))
        x.mul_(2)
        return x


def test_buckets_by_dtype_in_list_order_and_copied_back_in_place():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)   # 24 bytes
    b = torch.ones(4, dtype=torch.float64)                   # 32 bytes
    c = torch.full((5,), 3.0)                                # 20 bytes, float32
    d = torch.arange(3, dtype=torch.float32)                 # 12 bytes
    grads = [a, b, c, d]
    want = [t * 2 for t in grads]
    rec = Recorder()
    out = nccl.allreduce_buckets(rec, grads, bucket_bytes=40, op="avg")
    assert out is grads and all(g is t for g, t in zip(out, [a, b, c, d]))
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    # float32 first (first seen): a+c reach 44 >= 40 bytes -> one bucket, then d alone
    assert rec.calls == [(torch.float32, 11, "avg", None), (torch.float32, 3, "avg", None),
                         (torch.float64, 4, "avg", None)]


def test_non_contiguous_gradient_goes_through_a_bucket():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    g = base.t()                                             # a non-contiguous view
    rec = Recorder()
    nccl.allreduce_buckets(rec, [g], bucket_bytes=1, op="sum")
    assert torch.equal(base, torch.arange(12, dtype=torch.float32).reshape(3, 4) * 2)
    assert rec.calls == [(torch.float32, 12, "sum", None)]


def test_checks():
    rec = Recorder()
    with pytest.raises(ValueError, match="op must be one of"):
        nccl.allreduce_buckets(rec, [torch.ones(1)], op="mean")
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        nccl.allreduce_buckets(rec, [torch.ones(1)], bucket_bytes=0)
    assert rec.calls == []
