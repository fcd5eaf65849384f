"""Small Python callables on threadloom.Executor vs ThreadPoolExecutor vs multiprocessing.Pool.

Each item is ~10 us of Python work. All three run in this process run, on this interpreter, at
1, 2, 4, 8 and 16 workers; the report gives items/s and the ratios against the baselines, and
the scaling of threadloom from 1 worker (the 16-thread goals need 16 cores: on a smaller machine
the extra threads only oversubscribe and the scaling column says so).

Two workloads:
  shared  - every call builds and walks a small list (no Python object shared between threads)
  state   - every call draws from a random.Random owned by its worker thread (threading.local),
            the per-worker-state pattern the scheduler is designed for

Each cell is the best of --reps runs (default 3), the three executors interleaved in every round
so drift on the machine hits them alike.

    python bench/bench_executor.py [--items N] [--threads 1,2,4,8,16] [--reps R] [--json FILE]
"""

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import sys
import threading
import time

import threadloom  # the installed package (make bench: build/venv)

SPIN = 120  # loop iterations: about 10 us of Python on a current core (calibrated below)


def work(x):
    s = 0
    for i in range(SPIN):
        s += (i * x) & 7
    return s


_local = threading.local()


def work_state(x):
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = random.Random(x)  # once per worker thread
    s = 0
    for i in range(SPIN // 2):
        s += int(rng.random() * 8) + ((i * x) & 7)
    return s


def calibrate():
    t0 = time.perf_counter()
    for i in range(20000):
        work(i)
    return (time.perf_counter() - t0) / 20000


def run_tpe(fn, n, items):
    with cf.ThreadPoolExecutor(n) as ex:
        list(ex.map(fn, range(min(items, 1000))))  # warm up threads
        t0 = time.perf_counter()
        list(ex.map(fn, range(items)))
        return time.perf_counter() - t0


def run_tl(fn, n, items, chunksize):
    with threadloom.Executor(n) as ex:
        list(ex.map(fn, range(min(items, 1000)), chunksize=chunksize))
        t0 = time.perf_counter()
        list(ex.map(fn, range(items), chunksize=chunksize))
        return time.perf_counter() - t0


def run_mp(fn, n, items, chunksize):
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        pool.map(fn, range(n * 4), chunksize=1)  # workers up
        t0 = time.perf_counter()
        pool.map(fn, range(items), chunksize=chunksize)
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--chunksize", type=int, default=64)
    ap.add_argument("--no-mp", action="store_true", help="skip multiprocessing.Pool")
    ap.add_argument("--reps", type=int, default=3, help="best of this many runs per cell")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    if a.reps < 1 or a.items < 1 or any(t < 1 for t in threads):
        ap.error("--reps, --items and --threads must be positive")
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    per = calibrate()
    cores = len(os.sched_getaffinity(0))
    print("executor benchmark: %s %s, GIL %s, %d usable cores, %d items of %.1f us, chunksize %d, "
          "best of %d" % (sys.implementation.name, sys.version.split()[0], "on" if gil else "off",
                          cores, a.items, per * 1e6, a.chunksize, a.reps), flush=True)
    rows = []
    for wl, fn in (("shared", work), ("state", work_state)):
        base = None
        print("\n%-7s %7s %12s %12s %12s %8s %8s %9s" % (
            "load", "workers", "tl items/s", "TPE items/s", "mp items/s", "tl/TPE", "tl/mp",
            "scaling"), flush=True)
        for n in threads:
            t_tl, t_tpe, t_mp = [], [], []
            for _ in range(a.reps):
                t_tl.append(run_tl(fn, n, a.items, a.chunksize))
                t_tpe.append(run_tpe(fn, n, a.items))
                if not a.no_mp:
                    t_mp.append(run_mp(fn, n, a.items, a.chunksize))
            tl, tpe = a.items / min(t_tl), a.items / min(t_tpe)
            mp = a.items / min(t_mp) if t_mp else None
            if base is None:
                base = tl / n
            scaling = tl / (base * n)
            note = "" if n <= cores else " (>%d cores)" % cores
            print("%-7s %7d %12.0f %12.0f %12s %7.2fx %8s %8.0f%%%s" % (
                wl, n, tl, tpe, "%.0f" % mp if mp else "-", tl / tpe,
                "%.2fx" % (tl / mp) if mp else "-", 100 * scaling, note), flush=True)
            rows.append({"load": wl, "workers": n, "threadloom": tl, "tpe": tpe, "mp": mp,
                         "tl_over_tpe": tl / tpe, "scaling": scaling, "cores": cores,
                         "runs": {"threadloom": [a.items / t for t in t_tl],
                                  "tpe": [a.items / t for t in t_tpe],
                                  "mp": [a.items / t for t in t_mp]}})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gil": gil, "cores": cores, "item_us": per * 1e6, "reps": a.reps, "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
