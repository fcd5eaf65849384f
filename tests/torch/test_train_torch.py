"""examples/train_torch.py for real: torch model, threadloom.spmd CPU world, CpuComm.

The gradients are the torch CPU tensors themselves (p.grad), reduced in place through DLPack.
Checked: every rank ends with bit-identical parameters and the same loss history, the loss goes
down, and the weights approach the data set's. The GPU world of the example (NcclComm on CUDA
gradients) needs GPUs and torch with CUDA: test_train_torch_gpu_world SKIPs without them.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import threadloom

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EXAMPLE = os.path.join(ROOT, "examples", "train_torch.py")


def load_example():
    spec = importlib.util.spec_from_file_location("train_torch_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ranks", [2, 3])
def test_cpu_world_replicas_stay_identical_and_loss_goes_down(ranks):
    ex = load_example()
    world, res, ds = ex.run(steps=60, ranks=ranks, cpu=True, n=1024)
    assert world == "CPU, %d ranks" % ranks and len(res) == ranks
    losses, params = res[0]
    for r, (l, p) in enumerate(res):
        assert p == params, "rank %d's parameters differ from rank 0's" % r
        assert l == losses, "rank %d saw another loss history" % r
    assert len(losses) == 60
    assert losses[-1] < losses[0] / 20
    assert sum(losses[-10:]) < sum(losses[:10]) / 20
    assert max(abs(w - t) for w, t in zip(params[0], ds.true_w)) < 0.1


def test_gradients_are_averaged_across_ranks_in_place():
    """What the example relies on: allreduce_buckets on CPU torch tensors averages them in
    place (each rank starts from its own gradient)."""
    def fn(ctx):
        g = [torch.full((2, 3), float(ctx.rank)), torch.arange(4, dtype=torch.float64) * ctx.rank]
        same = [t for t in g]
        out = ctx.comm.allreduce_buckets(g, bucket_bytes=16)
        assert out is g and all(a is b for a, b in zip(g, same))
        return [t.tolist() for t in g]

    got = threadloom.spmd(fn, devices="cpu", cpu_world=3, pin=False)
    assert got[0] == got[1] == got[2]
    assert got[0][0] == [[1.0] * 3] * 2                    # mean of 0, 1, 2
    assert got[0][1] == [0.0, 1.0, 2.0, 3.0]


def test_example_script_runs():
    p = subprocess.run([sys.executable, EXAMPLE, "--steps", "40", "--ranks", "2", "--cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "CPU, 2 ranks, 40 steps" in p.stdout and "replicas identical: True" in p.stdout


def test_train_torch_gpu_world():
    if not torch.cuda.is_available():
        pytest.skip("torch %s has no usable CUDA here: the example's GPU world (spmd devices=, "
                    "NcclComm) cannot run" % torch.__version__)
    ex = load_example()
    world, res, _ = ex.run(steps=40)
    assert "NcclComm" in world
    losses, params = res[0]
    assert all(p == params for _, p in res) and losses[-1] < losses[0] / 10
