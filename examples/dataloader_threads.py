"""Replacing a multiprocessing DataLoader with threads: the diff is one import.

    - from torch.utils.data import DataLoader      # before: worker processes
    + from threadloom.data import DataLoader       # after: worker threads of this process

`epoch()` below is the user's code; it runs unchanged with both loaders, and this program times
both on this machine (samples/s and time to the first batch) and checks they delivered the
same batches. "Before" is torch's DataLoader where torch is importable; without torch it is
ProcessLoader, a small stand-in with the same arguments that does what torch's does on Linux:
fork worker processes, send them batches of indices, pickle the samples back.

Each threadloom worker deep-copies the dataset once on its own thread (replicate="copy", the
default), as each torch worker process gets its own copy: no hot Python object is shared
between threads, so their reference counts do not contend (see docs/user-guide.md, Tuning).

    python examples/dataloader_threads.py [--samples 6000] [--workers 2] [--batch-size 64]
"""

import argparse
import multiprocessing
import random
import sys
import time

from threadloom.data import Dataset


class Reviews(Dataset):
    """Synthetic text reviews, tokenized and scored per sample: Python-heavy work, like real
    preprocessing. Works with torch's DataLoader too (it returns numbers in a dict)."""

    def __init__(self, n, seed=0):
        rng = random.Random(seed)
        self.n = n
        self.words = ["%s%d" % (rng.choice(("good", "bad", "fine", "meh", "great")), i)
                      for i in range(2000)]
        self.polarity = {w: (1 if w.startswith(("good", "great")) else
                             -1 if w.startswith("bad") else 0) for w in self.words}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = random.Random(i)                  # sample i is the same in every worker
        text = " ".join(rng.choice(self.words) for _ in range(60))
        counts = {}
        for tok in text.lower().split():
            counts[tok] = counts.get(tok, 0) + 1
        score = sum(self.polarity[t] * c for t, c in counts.items())
        return {"index": i, "tokens": len(counts), "label": int(score > 0)}


# ---------------------------------------------------------------------------------------------
# "before" without torch: worker processes, as torch's DataLoader runs them on Linux
# ---------------------------------------------------------------------------------------------

_dataset = None


def _init(ds):
    global _dataset
    _dataset = ds


def _fetch(indices):
    return [_dataset[i] for i in indices]      # pickled back to the parent


class ProcessLoader:
    """torch.utils.data.DataLoader's arguments and behaviour for this example (in-order
    batches, dict collation into lists), with num_workers forked processes."""

    def __init__(self, dataset, batch_size=1, shuffle=False, num_workers=0, drop_last=False):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.shuffle, self.drop_last = shuffle, drop_last

    def __iter__(self):
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.shuffle(order)
        bs = self.batch_size
        batches = [order[k:k + bs] for k in range(0, len(order), bs)
                   if not self.drop_last or k + bs <= len(order)]
        collate = lambda samples: {k: [s[k] for s in samples] for k in samples[0]}  # noqa: E731
        if self.num_workers == 0:
            for b in batches:
                yield collate([self.dataset[i] for i in b])
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(self.num_workers, initializer=_init, initargs=(self.dataset,)) as pool:
            for samples in pool.imap(_fetch, batches):
                yield collate(samples)


# ---------------------------------------------------------------------------------------------
# the user's code: the same for both loaders
# ---------------------------------------------------------------------------------------------

def run(DataLoader, dataset, workers, batch_size, epochs):
    """`epochs` epochs; returns per epoch (seconds, seconds to the first batch, labels seen)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        first = None
        labels = []
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
            labels.extend(int(x) for x in batch["label"])     # a tensor, memoryview or list
        out.append((time.perf_counter() - t0, first, labels))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.samples < 1 or a.workers < 0 or a.batch_size < 1 or a.epochs < 1:
        ap.error("--samples, --batch-size and --epochs must be >= 1, --workers >= 0")
    ds = Reviews(a.samples)

    try:
        from torch.utils.data import DataLoader as Before
        before = "torch.utils.data.DataLoader (processes)"
    except ImportError:
        Before = ProcessLoader
        before = "ProcessLoader (processes; no torch here)"
    # Processes first: forking after threads exist is what torch users are warned about.
    runs = {before: run(Before, ds, a.workers, a.batch_size, a.epochs)}

    from threadloom.data import DataLoader as After     # the one-line change
    after = "threadloom.data.DataLoader (threads)"
    runs[after] = run(After, ds, a.workers, a.batch_size, a.epochs)

    print("%d samples, batch %d, num_workers=%d, %d epoch(s) each" % (a.samples, a.batch_size,
                                                                      a.workers, a.epochs))
    for name, epochs in runs.items():
        for k, (t, first, _) in enumerate(epochs):
            print("%-42s epoch %d: %7.0f samples/s, first batch %6.1f ms"
                  % (name if k == 0 else "", k + 1, a.samples / t, 1e3 * first))
    (tb, _, lb), (ta, _, la) = runs[before][-1], runs[after][-1]
    same = all(x[2] == y[2] for x, y in zip(runs[before], runs[after]))
    print("same batches in the same order: %s; last epoch, threads vs processes: %.2fx the "
          "samples/s" % (same, tb / ta))
    print("(the first epoch of threads includes the NUMA arena's one-time set-up; processes pay "
          "their start-up and pickling every epoch)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
