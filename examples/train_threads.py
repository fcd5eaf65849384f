"""Data-parallel training with threads: threadloom.spmd on the CPU world, no framework.

A linear regression model (weights in array.array) learns y = w.x + b from a synthetic data set.
Each rank is a thread: it reads its shard through threadloom.DataLoader(rank=, world_size=),
computes the gradients of its batch, averages them across ranks with
ctx.comm.allreduce_buckets (in place), and takes the same SGD step, so every replica keeps the
same weights. Rank 0 saves the model with threadloom.Checkpointer every --ckpt-every steps.

Run: python examples/train_threads.py --steps 200 --ranks 2
"""

import argparse
import array
import random
import sys
import tempfile
import time

import threadloom
from threadloom.data import Dataset

FEATURES = 8


class Regression(Dataset):
    """n samples (x, y) with y = true_w.x + true_b + noise, fixed by the seed."""

    def __init__(self, n, seed=0):
        rng = random.Random(seed)
        self.true_w = [rng.uniform(-2, 2) for _ in range(FEATURES)]
        self.true_b = rng.uniform(-1, 1)
        self.samples = []
        for _ in range(n):
            x = [rng.gauss(0, 1) for _ in range(FEATURES)]
            y = sum(a * b for a, b in zip(self.true_w, x)) + self.true_b + rng.gauss(0, 0.01)
            self.samples.append((x, y))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def batches(loader):
    """Batches without end: a new epoch (a new shuffle of this rank's shard) each pass."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(ctx, dataset, steps, batch_size, lr, ckpt_dir, ckpt_every, log_every):
    loader = threadloom.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   collate_fn=list, generator=random.Random(1))
    w = array.array("d", [0.0] * FEATURES)
    b = array.array("d", [0.0])
    ckpt = threadloom.Checkpointer(ckpt_dir, keep=2) if ctx.rank == 0 else None
    losses = []
    it = batches(loader)
    try:
        for step in range(1, steps + 1):
            batch = next(it)
            gw = array.array("d", [0.0] * FEATURES)
            gb = array.array("d", [0.0])
            loss = 0.0
            for x, y in batch:
                err = sum(wi * xi for wi, xi in zip(w, x)) + b[0] - y
                loss += err * err
                for j in range(FEATURES):
                    gw[j] += 2.0 * err * x[j]
                gb[0] += 2.0 * err
            n = len(batch)
            for j in range(FEATURES):
                gw[j] /= n
            gb[0] /= n
            ctx.comm.allreduce_buckets([gw, gb], bucket_bytes=64)     # average over ranks
            loss = ctx.comm.allreduce(loss / n, op="avg")
            for j in range(FEATURES):
                w[j] -= lr * gw[j]
            b[0] -= lr * gb[0]
            losses.append(loss)
            if ctx.rank == 0 and (step % log_every == 0 or step == 1):
                print("step %4d  loss %.6f" % (step, loss), flush=True)
            if ckpt is not None and step % ckpt_every == 0:
                ckpt.save({"w": w, "b": b, "step": step}, step=step)
    finally:
        if ckpt is not None:
            ckpt.close()
        loader.close()
    return {"losses": losses, "w": list(w), "b": b[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--ckpt-dir", default=None, help="default: a temporary directory")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=20)
    a = ap.parse_args(argv)

    dataset = Regression(a.samples)
    tmp = None
    ckpt_dir = a.ckpt_dir
    if ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="train_threads-")
        ckpt_dir = tmp.name
    t0 = time.monotonic()
    results = threadloom.spmd(train, devices="cpu", cpu_world=a.ranks,
                              args=(dataset, a.steps, a.batch_size, a.lr, ckpt_dir,
                                    a.ckpt_every, a.log_every), timeout=60)
    dt = time.monotonic() - t0
    r0 = results[0]
    same = all(r["w"] == r0["w"] and r["b"] == r0["b"] for r in results)
    with threadloom.Checkpointer(ckpt_dir) as c:
        saved = c.steps()
    err = max(abs(a_ - b_) for a_, b_ in zip(r0["w"] + [r0["b"]], dataset.true_w + [dataset.true_b]))
    print("summary: %d ranks, %d steps in %.2f s; loss %.6f -> %.6f; replicas identical: %s; "
          "max |w - true w| %.4f; checkpoints at steps %s"
          % (len(results), a.steps, dt, r0["losses"][0], r0["losses"][-1], same, err, saved))
    if tmp is not None:
        tmp.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
