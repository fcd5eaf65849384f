"""Start-up time of `threadloom run empty.py` against `python3.13t empty.py`.

Both run the same free-threaded interpreter in the same run, alternating, so drift on the machine
hits both alike; the medians of N runs each (default 30) and their ratio are printed. The goal
(issue 9) is a ratio <= 1.2. `--alloc` instead times a threaded allocation workload under
MIMALLOC_* settings, the measurement behind the launcher setting none (interp/main.c).

    python3.13t bench/bench_startup.py [-n 30] [--launcher PATH] [--json FILE]

The launcher is by default the `threadloom` installed beside this interpreter (build/venv/bin).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ALLOC = """\
import threading, sys
def work():
    for _ in range(60):
        d = [{"k%d" % i: [i] * 8} for i in range(20000)]
        del d
ts = [threading.Thread(target=work) for _ in range(int(sys.argv[1]))]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def clean_env():
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("MIMALLOC_", "PYTHON")) or k in ("OMP_NUM_THREADS",):
            env.pop(k)
    return env


def timed(cmd, env):
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def startup(args):
    fd, empty = tempfile.mkstemp(suffix=".py")
    os.close(fd)
    env = clean_env()
    cmds = {"python3.13t": [args.python, empty], "threadloom run": [args.launcher, "run", empty]}
    try:
        for cmd in cmds.values():  # warm the page cache and the .pyc files
            timed(cmd, env)
        times = {k: [] for k in cmds}
        for _ in range(args.n):
            for k, cmd in cmds.items():
                times[k].append(timed(cmd, env))
    finally:
        os.unlink(empty)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["threadloom run"] / med["python3.13t"]
    for k, v in med.items():
        print("%-16s median %6.1f ms  (min %6.1f, max %6.1f, n=%d)"
              % (k, v * 1e3, min(times[k]) * 1e3, max(times[k]) * 1e3, args.n))
    print("ratio %.2fx (goal <= 1.20x): %s" % (ratio, "met" if ratio <= 1.2 else "NOT met"))
    return {"median_s": med, "ratio": ratio, "n": args.n}


def alloc(args):
    fd, path = tempfile.mkstemp(suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(ALLOC)
    settings = {"none": {}, "ARENA_EAGER_COMMIT=1": {"MIMALLOC_ARENA_EAGER_COMMIT": "1"},
                "PURGE_DELAY=-1": {"MIMALLOC_PURGE_DELAY": "-1"},
                "ALLOW_LARGE_OS_PAGES=1": {"MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}}
    threads = str(len(os.sched_getaffinity(0)))
    times = {k: [] for k in settings}
    try:
        for _ in range(args.n):
            for k, extra in settings.items():
                env = clean_env()
                env.update(extra)
                times[k].append(timed([args.launcher, "run", path, threads], env))
    finally:
        os.unlink(path)
    base = statistics.median(times["none"])
    for k, v in times.items():
        m = statistics.median(v)
        print("%-24s median %7.1f ms  (%+.1f%% vs none, spread %.1f ms, n=%d)"
              % (k, m * 1e3, (m / base - 1) * 100, (max(v) - min(v)) * 1e3, args.n))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=30, help="runs of each (default 30)")
    p.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    p.add_argument("--launcher", default=os.path.join(os.path.dirname(sys.executable), "threadloom"))
    p.add_argument("--alloc", action="store_true", help="time MIMALLOC_* settings instead")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    if not os.access(args.launcher, os.X_OK):
        sys.exit("bench_startup: no launcher at %s: run `make build`" % args.launcher)
    res = alloc(args) if args.alloc else startup(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
