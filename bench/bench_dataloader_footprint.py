"""Loader start-up and memory, each configuration in a fresh process:

  first batch  seconds from constructing the loader to the first batch in hand, worker start-up
               included, with the `python` workload (bench/_workload.py), in a new interpreter
               per measurement (nothing warm: no imported worker modules, no earlier pool), best
               of --reps, for 2 and 8 workers (--first-workers);
  memory       peak total PSS and RSS of the loader's process and all its descendants (worker
               processes, multiprocessing's helpers), sampled by this process from
               /proc/PID/smaps_rollup every --interval s while the child loads one epoch of the
               `records` workload (a list of --records small Python objects that every sample
               reads all over), and once more after the last batch, before the workers are shut
               down; for 2, 4 and 8 workers (--mem-workers).

Loaders: threadloom.DataLoader (threads, one process), three times: sharing the dataset
(replicate=None), sharing it made immortal (replicate="share": threadloom.share() once, when the
loader is built, so its time is in the first batch) and with its default replicate="copy" (a
deep copy of the dataset per worker thread, made on that thread before its first sample),
torch.utils.data.DataLoader with the fork and spawn start methods (on the interpreter given by
--torch-python, which imports torch; torch's default on Linux is fork), and multiprocessing.Pool
with fork and spawn (on this interpreter, collating each batch into an array.array in the worker,
as bench_dataloader.py's Pool loader does). With spawn the dataset is pickled to each worker (as
torch does), so each worker holds its own full copy.

The parent only starts children and reads /proc; every number comes from a child that runs one
loader (`--child SPEC`) and prints one JSON line. bench_vision.py runs the same children and
sampler (run_child) with the `vision` workload (examples/vision_pipeline.py's JPEGs; torch is
imported in every such child, so both sides collate into torch tensors). Without --torch-python, or when that
interpreter cannot import torch, the torch rows are left out and the JSON says why.

    python3.13t bench/bench_dataloader_footprint.py [--torch-python PY] [--quick] [--reps R]
        [--first-workers 2,8] [--mem-workers 2,4,8] [--records N] [--json PATH]
"""

import argparse
import array
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _workload import (Records, Tokens, batch_len, describe_batch, parse_threads,  # noqa: E402
                       vision_dataset)

# (loader key, what the report calls it, interpreter: "tl" = this one, "torch" = --torch-python)
FIRST_LOADERS = [("threadloom-shared", "threadloom.DataLoader replicate=None", "tl"),
                 ("threadloom-share", "threadloom.DataLoader replicate='share'", "tl"),
                 ("threadloom", "threadloom.DataLoader (replicas)", "tl"),
                 ("torch-fork", "torch DataLoader (fork)", "torch"),
                 ("torch-spawn", "torch DataLoader (spawn)", "torch"),
                 ("pool-fork", "multiprocessing.Pool (fork)", "tl"),
                 ("pool-spawn", "multiprocessing.Pool (spawn)", "tl")]
MEM_LOADERS = [("threadloom-shared", "threadloom.DataLoader replicate=None", "tl"),
               ("threadloom-share", "threadloom.DataLoader replicate='share'", "tl"),
               ("threadloom", "threadloom.DataLoader (replicas)", "tl"),
               ("torch-fork", "torch DataLoader (fork)", "torch"),
               ("torch-spawn", "torch DataLoader (spawn)", "torch"),
               ("pool-fork", "multiprocessing.Pool (fork)", "tl")]


# ------------------------------------------------------------------------------------------------
# The child: one loader, one measurement, one JSON line on stdout
# ------------------------------------------------------------------------------------------------

_ds = None


def _pool_init(ds):
    global _ds
    if ds is not None:  # spawn: the pickled dataset; fork: inherited as the module global
        _ds = ds


def _pool_batch(idx):
    return array.array("q", [_ds[i] for i in idx])


def _own_memory():
    """(PSS, RSS) of this process in bytes, from /proc/self/smaps_rollup."""
    return smaps_rollup(os.getpid())


def _loader(spec, ds):
    """An iterable of batches for spec["loader"], and a function that releases it."""
    kind, w, b = spec["loader"], spec["workers"], spec["batch"]
    if kind.startswith("threadloom"):
        import threadloom
        dl = threadloom.DataLoader(ds, batch_size=b, num_workers=w, replicate={
            "threadloom-shared": None, "threadloom-share": "share"}.get(kind, "copy"))
        return dl, dl.close
    if kind.startswith("torch-"):
        import torch.utils.data as torch_data
        dl = torch_data.DataLoader(ds, batch_size=b, num_workers=w,
                                   multiprocessing_context=kind[len("torch-"):])
        return dl, lambda: None
    if kind.startswith("pool-"):
        global _ds
        method = kind[len("pool-"):]
        _ds = ds
        pool = multiprocessing.get_context(method).Pool(
            w, initializer=_pool_init, initargs=(ds if method == "spawn" else None,))
        idx = [list(range(k, min(k + b, len(ds)))) for k in range(0, len(ds), b)]
        return pool.imap(_pool_batch, idx), pool.terminate
    raise ValueError("unknown loader %r" % kind)


def child(spec):
    # the loader's module is imported before the clock starts, as a training script has it
    if spec["loader"].startswith("torch-"):
        import torch  # noqa: F401
        import warnings
        warnings.filterwarnings("ignore", message="This DataLoader will create")  # > cores: on purpose
    elif spec["loader"].startswith("threadloom"):
        import threadloom  # noqa: F401
    if spec["workload"] == "records":
        ds = Records(spec["samples"], spec["per_sample"])
    elif spec["workload"] == "vision":  # bench_vision.py: batches of torch tensors on both sides
        import torch  # noqa: F401
        ds = vision_dataset(spec["images"], spec["samples"], spec["seed"])
    else:
        ds = Tokens(spec["samples"], spec["work"])
    before = _own_memory()
    t0 = time.perf_counter()
    loader, close = _loader(spec, ds)
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter() - t0
    out = {"first_batch_s": first, "batch": describe_batch(batch), "before_pss": before[0],
           "before_rss": before[1], "python": sys.version.split()[0]}
    if spec["epoch"]:
        # Every batch but the last through next(): after the last one the workers are still
        # alive (torch shuts them down on the StopIteration), so the parent's final sample,
        # taken between "epoch-done" and our reading its reply, sees them with every page the
        # epoch touched.
        count = batch_len(batch)
        while count < len(ds):
            count += batch_len(next(it))
        out["epoch_s"] = time.perf_counter() - t0
        out["samples"] = count
        print("epoch-done", flush=True)
        sys.stdin.readline()
    del it
    close()
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: start a child, sample its process tree's memory
# ------------------------------------------------------------------------------------------------

def smaps_rollup(pid):
    """(Pss, Rss) of pid in bytes, or None if it is gone."""
    pss = rss = 0
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return pss, rss


def descendants(pid):
    """pid and every process below it, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


class TreeSampler:
    """Samples the total PSS and RSS of a process tree on a thread until stop(); keeps the peaks
    and the largest number of processes seen. sample() may also be called from the owner's
    thread: the peaks are only updated under self.lock."""

    def __init__(self, pid, interval):
        self.pid, self.interval = pid, interval
        self.lock = threading.Lock()
        self.peak_pss = self.peak_rss = self.procs = self.samples = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self):
        pss = rss = n = 0
        for p in descendants(self.pid):
            m = smaps_rollup(p)
            if m:
                pss, rss, n = pss + m[0], rss + m[1], n + 1
        with self.lock:
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.procs = max(self.procs, n)
            self.samples += 1

    def _run(self):
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self):
        self.done.set()
        self.thread.join()


def run_child(python, spec, sample=None, timeout=600):
    """Runs one child; returns its JSON result (plus the memory peaks when sample is an interval
    in seconds). Raises RuntimeError with the child's stderr when it fails."""
    cmd = [python, os.path.abspath(__file__), "--child", json.dumps(spec)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(p.pid, sample) if sample else None
    try:
        if spec["epoch"]:
            line = p.stdout.readline()
            if line.strip() == "epoch-done":
                if sampler:
                    sampler.sample()  # the workers are alive and have touched the whole epoch
                p.stdin.write("\n")
                p.stdin.flush()
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError("%s timed out after %d s" % (spec["loader"], timeout))
    finally:
        if sampler:
            sampler.stop()
    if p.returncode != 0 or not out.strip():
        raise RuntimeError("%s with %d workers failed (exit %s): %s"
                           % (spec["loader"], spec["workers"], p.returncode, err.strip()[-2000:]))
    res = json.loads(out.strip().splitlines()[-1])
    if sampler:
        res.update(peak_pss=sampler.peak_pss, peak_rss=sampler.peak_rss, procs=sampler.procs,
                   mem_samples=sampler.samples)
    return res


def torch_version(python):
    """torch.__version__ under `python`, or (None, why)."""
    if not python:
        return None, "no --torch-python given"
    try:
        r = subprocess.run([python, "-c", "import torch, sys; print(torch.__version__); "
                            "print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=120)
    except OSError as e:
        return None, "%s cannot run: %s" % (python, e)
    if r.returncode != 0:
        return None, "%s cannot import torch: %s" % (python, r.stderr.strip().splitlines()[-1:])
    return r.stdout.split(), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--torch-python", help="an interpreter that imports torch")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, 2 workers, 1 rep, no torch spawn in the memory phase")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--first-workers", default="2,8")
    ap.add_argument("--mem-workers", default="2,4,8")
    ap.add_argument("--records", type=int, default=500000,
                    help="records in the memory workload's list (100 per sample)")
    ap.add_argument("--interval", type=float, default=0.02, help="memory sampling period, s")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return 0
    try:
        fws = parse_threads("2" if a.quick else a.first_workers)
        mws = parse_threads("2" if a.quick else a.mem_workers)
    except ValueError as e:
        ap.error(str(e))
    reps = 1 if a.quick else a.reps
    records = 20000 if a.quick else a.records
    per_sample = 100
    if records < per_sample:
        ap.error("--records: at least %d" % per_sample)
    tv, why = torch_version(a.torch_python)
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    res = {"python": sys.version.split()[0], "gil": gil, "cores": len(os.sched_getaffinity(0)),
           "quick": a.quick, "reps": reps, "batch": 32, "first_samples": 2000, "work": 300,
           "records": records, "interval_s": a.interval, "first": [], "memory": []}
    if tv:
        res["torch"], res["torch_python"] = tv[0], tv[1]
    else:
        res["torch_skipped"] = why
    print("python %s (GIL %s), %d CPUs; torch: %s" % (
        res["python"], "on" if gil else "off", res["cores"],
        "%s on python %s (%s)" % (tv[0], tv[1], a.torch_python) if tv else "left out: " + why))
    pythons = {"tl": sys.executable, "torch": a.torch_python}
    failed = []

    def use(loaders):
        return [x for x in loaders if x[2] == "tl" or tv]

    print("-- time to first batch (fresh process each; workload python, batch 32), best of %d" % reps)
    for w in fws:
        for key, name, py in use(FIRST_LOADERS):
            spec = {"loader": key, "workers": w, "batch": 32, "workload": "python",
                    "samples": res["first_samples"], "work": 300, "epoch": False}
            try:
                runs = [run_child(pythons[py], spec) for _ in range(reps)]
            except RuntimeError as e:
                failed.append(str(e))
                print("  FAILED: %s" % e, flush=True)
                continue
            firsts = sorted(r["first_batch_s"] for r in runs)
            res["first"].append({"loader": name, "workers": w, "first_batch_s": firsts[0],
                                 "all_s": firsts, "python": runs[0]["python"],
                                 "batch_nbytes": runs[0]["batch"]["nbytes"]})
            print("%-38s workers=%d  first batch %8.1f ms   (runs: %s)"
                  % (name, w, firsts[0] * 1e3, ", ".join("%.0f" % (x * 1e3) for x in firsts)),
                  flush=True)

    print("-- memory: peak total PSS / RSS of all processes over one epoch of %d records "
          "(%d samples reading %d records each)" % (records, records // per_sample, per_sample))
    # --quick leaves out torch with spawn here: unpickling the dataset in each worker is the
    # slowest child, and the first-batch phase already runs it
    mem_loaders = [x for x in use(MEM_LOADERS) if not (a.quick and x[0] == "torch-spawn")]
    for w in mws:
        for key, name, py in mem_loaders:
            spec = {"loader": key, "workers": w, "batch": 32, "workload": "records",
                    "samples": records // per_sample, "per_sample": per_sample, "epoch": True}
            try:
                r = run_child(pythons[py], spec, sample=a.interval)
            except RuntimeError as e:
                failed.append(str(e))
                print("  FAILED: %s" % e, flush=True)
                continue
            res["memory"].append({"loader": name, "workers": w, "python": r["python"],
                                  "peak_pss": r["peak_pss"], "peak_rss": r["peak_rss"],
                                  "procs": r["procs"], "mem_samples": r["mem_samples"],
                                  "dataset_pss": r["before_pss"], "dataset_rss": r["before_rss"],
                                  "epoch_s": r["epoch_s"], "first_batch_s": r["first_batch_s"]})
            print("%-38s workers=%d  peak PSS %7.1f MiB  RSS %7.1f MiB  (%d processes; before "
                  "the loader %.1f MiB; epoch %.2f s, first batch %.0f ms)"
                  % (name, w, r["peak_pss"] / 2**20, r["peak_rss"] / 2**20, r["procs"],
                     r["before_pss"] / 2**20, r["epoch_s"], r["first_batch_s"] * 1e3), flush=True)
    res["failed"] = failed
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
