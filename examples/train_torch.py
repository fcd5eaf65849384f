"""The threaded training loop with torch: one process, one driver thread per rank.

The same loop as examples/train_threads.py with a torch model and optimizer: each rank thread
(threadloom.spmd, a CPU world here) reads its shard through threadloom.DataLoader (batches come
back as torch tensors over arena memory), runs forward and backward, averages the gradients
with ctx.comm.allreduce_buckets and steps its optimizer, so every replica stays identical.

Needs torch. On the free-threaded interpreter torch is rarely installed; with a GIL Python that
has torch, build threadloom for it (README: "building the extension for a GIL Python"; the
rank threads then take turns in Python, torch's kernels still run in parallel). Without torch
this program says so and exits 0. The gradients travel through host lists because the CPU
communicator is the one built (the NCCL communicator, for device tensors, is not yet).

    python examples/train_torch.py [--steps 100] [--ranks 2]
"""

import argparse
import array
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

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
    g = torch.Generator().manual_seed(0)                   # same initial weights in every rank
    model = torch.nn.Linear(FEATURES, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, FEATURES, generator=g) * 0.1)
        model.bias.zero_()
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
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.float()).squeeze(1), y.float())
        loss.backward()
        params = list(model.parameters())
        flat = [p.grad.reshape(-1).tolist() for p in params]
        ctx.comm.allreduce_buckets(flat)                    # averaged over the ranks, in place
        with torch.no_grad():
            for p, f in zip(params, flat):
                p.grad.copy_(torch.tensor(f, dtype=p.grad.dtype).view_as(p.grad))
        opt.step()
        losses.append(ctx.comm.allreduce(loss.item(), op="avg"))
    loader.close()
    return losses, [p.detach().reshape(-1).tolist() for p in model.parameters()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    a = ap.parse_args(argv)
    if torch is None:
        print("train_torch: skipped: torch is not importable by %s (%s)" % (sys.executable, WHY))
        return 0
    torch.set_num_threads(1)                  # the ranks are the parallelism
    ds = Regression(2048)
    res = threadloom.spmd(train, devices="cpu", cpu_world=a.ranks,
                          args=(ds, a.steps, a.batch_size, a.lr), timeout=60)
    losses, params = res[0]
    same = all(p == params for _, p in res)
    err = max(abs(w - t) for w, t in zip(params[0], ds.true_w))
    print("train_torch: torch %s, %d ranks, %d steps: loss %.5f -> %.5f; replicas identical: "
          "%s; max |w - true w| %.4f" % (torch.__version__, a.ranks, a.steps, losses[0],
                                         losses[-1], same, err))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
