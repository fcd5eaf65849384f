"""The threaded training loop with torch: one process, one driver thread per rank.

The same loop as examples/train_threads.py with a torch model and optimizer: each rank thread
(threadloom.spmd) reads its shard through threadloom.DataLoader (batches come back as torch
tensors over arena memory), runs forward and backward, averages the gradients in place with
ctx.comm.allreduce_buckets([p.grad ...]) and steps its optimizer, so every replica stays
identical. The mean loss goes through ctx.host_comm (a Python float).

Two worlds, one loop:
- CPU (the default without CUDA, or --cpu): --ranks threads, ctx.comm is the CpuComm, which
  reads and writes the CPU gradient tensors in place through DLPack. This is what runs, and is
  tested (tests/torch/test_train_torch.py), on this project's machines.
- GPUs (torch.cuda available and CUDA GPUs visible to threadloom): one rank per GPU
  (spmd(devices=...)), the model and batches on ctx.device, ctx.comm an NcclComm reducing the
  CUDA gradients on torch's current stream. That path has never run here (no GPU on this
  project's CI machines): treat it as untested.

Needs torch: its cp313t wheel on the free-threaded interpreter (make build: build/venv has it),
or a GIL Python with threadloom installed too (make build-gil: build/venv-gil; the rank threads
then take turns in Python, torch's kernels still run in parallel). Without torch this program
says so and exits 0.

    python examples/train_torch.py [--steps 100] [--ranks 2] [--cpu]
"""

import argparse
import array
import random
import sys

try:
    import torch
except ImportError as e:
    torch = None
    WHY = "%s: %s" % (type(e).__name__, e)

import threadloom  # noqa: E402
from threadloom.data import Dataset  # noqa: E402

FEATURES = 8


class Regression(Dataset):
    """y = true_w . x + noise; x as a float32 buffer (collated into one tensor per batch)."""

    def __init__(self, n, seed=0):
        rng = random.Random(seed)
        self.true_w = [rng.uniform(-2, 2) for _ in range(FEATURES)]
        self.samples = []
        for _ in range(n):
            x = [rng.gauss(0, 1) for _ in range(FEATURES)]
            y = sum(a * b for a, b in zip(self.true_w, x)) + rng.gauss(0, 0.01)
            self.samples.append((array.array("f", x), y))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def train(ctx, ds, steps, batch_size, lr):
    dev = torch.device("cpu" if ctx.device is None else "cuda:%d" % ctx.device)
    if ctx.device is not None:
        torch.cuda.set_device(dev)
    g = torch.Generator().manual_seed(0)                   # same initial weights in every rank
    model = torch.nn.Linear(FEATURES, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, FEATURES, generator=g) * 0.1)
        model.bias.zero_()
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = threadloom.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   generator=random.Random(1))
    losses = []
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x, y = x.float().to(dev), y.float().to(dev)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        ctx.comm.allreduce_buckets([p.grad for p in model.parameters()])  # average, in place
        opt.step()
        losses.append(ctx.host_comm.allreduce(loss.item(), op="avg"))
    loader.close()
    return losses, [p.detach().cpu().reshape(-1).tolist() for p in model.parameters()]


def gpu_devices():
    """The CUDA indices of the GPU world, or [] for the CPU one."""
    if not torch.cuda.is_available():
        return []
    try:
        return list(range(threadloom._core.cuda_device_count()))
    except threadloom.Error:
        return []


def run(steps=100, ranks=2, batch_size=32, lr=0.05, cpu=False, n=2048):
    """Trains; returns (world, per-rank (losses, flat parameters), the data set)."""
    torch.set_num_threads(1)                  # the ranks are the parallelism
    ds = Regression(n)
    devices = [] if cpu else gpu_devices()
    world = "%d GPU(s), NcclComm" % len(devices) if devices else "CPU, %d ranks" % ranks
    res = threadloom.spmd(train, devices=devices or "cpu", cpu_world=ranks,
                          args=(ds, steps, batch_size, lr), timeout=60)
    return world, res, ds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the CPU world")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--cpu", action="store_true", help="the CPU world even where GPUs are")
    a = ap.parse_args(argv)
    if torch is None:
        print("train_torch: skipped: torch is not importable by %s (%s)" % (sys.executable, WHY))
        return 0
    world, res, ds = run(a.steps, a.ranks, a.batch_size, a.lr, a.cpu)
    losses, params = res[0]
    same = all(p == params for _, p in res)
    err = max(abs(w - t) for w, t in zip(params[0], ds.true_w))
    print("train_torch: torch %s, %s, %d steps: loss %.5f -> %.5f; replicas identical: "
          "%s; max |w - true w| %.4f" % (torch.__version__, world, a.steps, losses[0],
                                         losses[-1], same, err))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
