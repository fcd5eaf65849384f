"""bench/_workload.py: the loader benchmarks' dataset, thread sweep and command line, with no
threadloom import.

bench_dataloader.py (free-threaded interpreter, threadloom) and bench_dataloader_torch.py (any
interpreter that has torch, e.g. a GIL python3.12 on the GPU machine) both load this module, so
every loader in the report runs the same per-sample work, and take the same options.
"""

import argparse
import os


class Tokens:
    """A map-style dataset with a shared vocabulary table and a Python-heavy transform: each
    sample is `work` dict lookups (about 30 us per sample for work=300 on a current core)."""

    def __init__(self, n, work=300):
        self.n = n
        self.work = work
        self.vocab = {("w%d" % i): i for i in range(5000)}
        self.words = list(self.vocab)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        words, vocab = self.words, self.vocab
        acc = 0
        for k in range(self.work):
            acc = (acc * 31 + vocab[words[(i * 7 + k) % 5000]]) & 0xFFFFFFFF
        return acc


def thread_sweep(cores, cap=16):
    """Worker counts to measure: 1, 2, 4, ... up to max(8, cores), never above `cap`, plus the
    core count itself. On a small machine the points past its cores show the curve flattening."""
    top = min(cap, max(8, cores))
    ws = set()
    w = 1
    while w <= top:
        ws.add(w)
        w *= 2
    if cores <= cap:
        ws.add(cores)
    return sorted(ws)


def parse_threads(text):
    """'1,2,4' -> [1, 2, 4]; raises ValueError naming the bad item."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok.isdigit() or int(tok) < 1:
            raise ValueError("thread counts are positive integers separated by commas, got %r" % tok)
        out.append(int(tok))
    return sorted(set(out))


def parse_args(description=None):
    """The loader benchmarks' command line -> (args, allowed cores, worker counts to sweep)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=int, default=300)
    ap.add_argument("--threads", help="worker counts, e.g. 1,2,4 (default: 1, 2, 4, 8 and the "
                    "core count, up to 16)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    try:
        ws = parse_threads(a.threads) if a.threads else thread_sweep(cores)
    except ValueError as e:
        ap.error("--threads: %s" % e)
    return a, cores, ws
