"""Threads that really run in parallel: the smallest threadloom program.

A Python-heavy per-item transform (tokenize a line, count words in a dict, draw random numbers)
runs first on one thread, then on one thread per core this process may use, as threadloom's
topology reports them. On a free-threaded interpreter the threads run at the same time; on a
GIL build they take turns and the speed-up stays near 1x.

Each worker builds its own objects (vocabulary dict, random.Random), but all of them read the
module-level WORDS list and its strings: on 3.13t every read of a shared object writes its
reference count atomically, from every core, and the threads stop scaling (0.93x on 2 cores
here). The second round makes WORDS immortal with threadloom.share(WORDS) (it is never freed
then: fine for data that lives as long as the program), after which no thread writes its count.

    make demo                                   # runs this after `python -m threadloom info`
    python examples/free_threads.py --items 20000 --threads 8
"""

import argparse
import random
import sys
import threading
import time

import threadloom

WORDS = ("the quick brown fox jumps over the lazy dog while seven loud engines hum and "
         "threads feed every GPU from one process").split()


def make_worker_state(seed):
    """Per-thread objects: never shared between threads, created once, reused per item."""
    return {"rng": random.Random(seed), "vocab": {w: i for i, w in enumerate(WORDS)}, "counts": {}}


def transform(state, item):
    """One item of Python-heavy work: build a line, tokenize, look up, count."""
    rng, vocab, counts = state["rng"], state["vocab"], state["counts"]
    line = " ".join(WORDS[(item * 7 + k) % len(WORDS)] for k in range(24))
    ids = [vocab[w] for w in line.split()]
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return sum(ids) + int(rng.random() * 10)


def run(nthreads, items):
    """Processes `items` items on `nthreads` threads; returns (seconds, checksum)."""
    barrier = threading.Barrier(nthreads + 1)
    sums = [0] * nthreads
    errors = []

    def worker(k):
        try:
            state = make_worker_state(k)
            barrier.wait()
            total = 0
            for item in range(k, items, nthreads):
                total += transform(state, item)
            sums[k] = total
        except BaseException as e:  # surfaced by the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name="demo-%d" % k) for k in range(nthreads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt, sum(sums)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=60000, help="items per run (default 60000)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for the parallel run (default: the cores this process may use)")
    args = p.parse_args(argv)
    if args.items < 1 or args.threads < 0:
        p.error("--items must be >= 1 and --threads >= 0")

    topo = threadloom.topology()
    n = args.threads or max(1, topo["allowed_cores"])
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    print("free_threads: %d item(s), 1 thread vs %d thread(s) (%d core(s) allowed), GIL %s"
          % (args.items, n, topo["allowed_cores"], "ENABLED" if gil else "disabled"), flush=True)

    # Round 1: WORDS as any Python object is. Round 2: WORDS shared (immortal, for good).
    speedups = []
    for label in ("without share", "with share"):
        if label == "with share":
            print("  %s" % threadloom.share(WORDS, name="WORDS"), flush=True)
        t1, c1 = run(1, args.items)
        tn, cn = run(n, args.items)
        # Same items, same per-item work: the totals differ only by each thread's random draws.
        assert abs(c1 - cn) <= 10 * args.items, (c1, cn)
        speedups.append(t1 / tn)
        print("  %-13s: 1 thread %8.0f items/s, %d threads %8.0f items/s: speed-up %.2fx on %d "
              "thread(s)" % (label, args.items / t1, n, args.items / tn, t1 / tn, n), flush=True)
    if gil:
        print("  (the GIL serializes the threads: use a free-threaded interpreter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
