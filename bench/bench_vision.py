"""bench/bench_vision.py: a realistic vision input pipeline, threadloom.DataLoader (worker threads)
on this free-threaded interpreter against torch's DataLoader (worker processes) on the GIL
interpreter --torch-python names, on the same JPEGs with the same code, in one run.

The workload is examples/vision_pipeline.py's JpegImages (bench/_workload.py loads it): JPEG
decode with Pillow, a random 224 x 224 crop of 320 x 256 and a flip seeded per sample, normalize
with numpy; batches [float32 (B, 3, 224, 224), int64 (B,)] of torch tensors on both sides (each
child imports torch first, as a training script has it). The JPEGs are written once at start
(write_jpegs, --seed) into a temporary directory both interpreters read: nothing is downloaded.

  throughput    samples/s of one epoch (--samples in batches of --batch), worker start-up
                included, for num_workers 0 (in the loop) and the sweep (default 1, 2, 4, 8 and the
                core count, up to 16), each loader in a child process on its interpreter; the two
                loaders' children alternate --reps times, so drift on a shared machine hits both.
                Every run is kept (the report shows the spread), the best is reported, and each
                interpreter's single-thread cost of one sample without a loader.
  same batches  one more epoch per loader, untimed, with 2 workers: the sha256 of every batch's
                bytes. The two digests must be equal: the script exits 1 otherwise.
  first batch   at torch's best num_workers (the best of >= 1 when 0 is torch's best): seconds from
                constructing the loader to the first batch in hand, each in a fresh process
                (bench_dataloader_footprint.py's children), best of --first-reps, every run kept.
  memory        at the same num_workers: peak total PSS and RSS of the loader's process and all
                its descendants over one epoch (bench_dataloader_footprint.py's sampler).

Both loaders run with their defaults: threadloom's replicate, torch's start method (fork) and
torch's intra-op threads (as many as cores). In the loop (0 workers) the latter matter: torch's
default_collate stacks each batch with torch.stack on those threads, which then compete with the
decode for the same cores (on the 2-core VM 115-260 samples/s, 600-690 with
torch.set_num_threads(1)); threadloom's stacks with numpy.stack on the loader's thread, and
torch's worker processes run one intra-op thread each.

Without --torch-python, or when it cannot import torch, only threadloom's rows are measured and
the JSON says why torch's are missing.

    python3.13t bench/bench_vision.py [--torch-python PY] [--quick] [--images N] [--samples N]
        [--batch B] [--threads 1,2,4] [--reps R] [--first-reps R] [--seed S] [--json PATH]
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _workload import (batch_digest, consume, parse_threads, per_sample_cost,  # noqa: E402
                       thread_sweep, vision_dataset, vision_example)
from bench_dataloader_footprint import run_child, torch_version  # noqa: E402

TL, TORCH = "threadloom.DataLoader", "torch DataLoader"
DIGEST_WORKERS = 2


# ------------------------------------------------------------------------------------------------
# The child: one loader on its interpreter, one JSON line on stdout
# ------------------------------------------------------------------------------------------------

def make_loader(kind, ds, batch, workers):
    if kind == TL:
        import threadloom
        return threadloom.DataLoader(ds, batch_size=batch, num_workers=workers)
    import torch.utils.data as torch_data
    return torch_data.DataLoader(ds, batch_size=batch, num_workers=workers)


def child(spec):
    import torch  # noqa: F401  (threadloom's default_collate stacks into torch tensors with it)
    # the sweep goes past the cores on purpose: neither loader's warning about it should repeat
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    logging.getLogger("threadloom.data").setLevel(logging.ERROR)
    kind = spec["loader"]
    ds = vision_dataset(spec["images"], spec["samples"], spec["seed"])
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
           "intra_op_threads": torch.get_num_threads()}  # torch's default, left as it is
    if spec["mode"] == "digest":
        out["digest"], out["batches"] = batch_digest(make_loader(kind, ds, spec["batch"],
                                                                 spec["workers"]))
    else:
        if spec["cost"]:
            # and the minor page faults per sample over the same passes (3 of `count`): memory
            # the allocator hands out fresh costs a fault per 4 KiB page touched
            count = min(100, len(ds))
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out["per_sample_s"] = per_sample_cost(ds, count=count)
            out["faults_per_sample"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                        - f0) / (3 * count)
        # warm-up, untimed, the same for both: the first batches of a process pay for lazy
        # imports and first touches of the files (without it torch's first epoch in the loop
        # measured 99 samples/s on the 2-core VM, later ones 560-750)
        for _, _b in zip(range(2), make_loader(kind, ds, spec["batch"], 0)):
            pass
        rows = out["rows"] = []
        for w in spec["workers"]:
            t0 = time.perf_counter()
            n, dt, first, desc = consume(make_loader(kind, ds, spec["batch"], w), t0)
            rows.append({"workers": w, "samples": n, "seconds": dt, "first_batch_s": first,
                         "batch_type": desc["type"], "batch_nbytes": desc["nbytes"]})
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent
# ------------------------------------------------------------------------------------------------

def run(python, spec, timeout=900):
    """One child; its JSON. Raises RuntimeError with the child's stderr when it fails."""
    p = subprocess.run([python, os.path.abspath(__file__), "--child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError("%s (%s) failed (exit %d): %s" % (spec["loader"], spec["mode"],
                                                             p.returncode, p.stderr.strip()[-2000:]))
    return json.loads(p.stdout.strip().splitlines()[-1])


def throughput(res, loaders, base, ws, reps):
    """The sweep, the loaders' children alternating; fills res["rows"] and res["per_sample_s"]."""
    runs = {}  # (loader, workers) -> [(samples/s, first batch s, row)]
    for rep in range(reps):
        for kind, python in loaders:
            out = run(python, dict(base, loader=kind, mode="sweep", workers=[0] + ws,
                                   cost=rep == 0))
            if rep == 0:
                res["per_sample_s"][kind] = out["per_sample_s"]
                res["faults_per_sample"][kind] = out.get("faults_per_sample")
                res["interpreters"][kind] = {"python": out["python"], "gil": out["gil"],
                                             "torch": out["torch"], "executable": python,
                                             "intra_op_threads": out["intra_op_threads"]}
            for x in out["rows"]:
                runs.setdefault((kind, x["workers"]), []).append(
                    (x["samples"] / x["seconds"], x["first_batch_s"], x))
            print("  round %d/%d, %s: %s" % (rep + 1, reps, kind, ", ".join(
                "%d workers %.0f/s" % (x["workers"], x["samples"] / x["seconds"])
                for x in out["rows"])), flush=True)
    for kind, _ in loaders:
        for w in [0] + ws:
            got = runs[kind, w]
            best = max(got, key=lambda g: g[0])
            res["rows"].append({"loader": kind, "workers": w, "samples_per_s": best[0],
                                "first_batch_s": best[1],
                                "runs_samples_per_s": [g[0] for g in got],
                                "batch_type": best[2]["batch_type"],
                                "batch_nbytes": best[2]["batch_nbytes"]})


def footprint(res, loaders, base, w, reps):
    """First batch (fresh processes) and peak memory at `w` workers, through
    bench_dataloader_footprint.py's children and sampler."""
    key = {TL: "threadloom", TORCH: "torch-fork"}
    for kind, python in loaders:
        spec = dict(base, loader=key[kind], workers=w, workload="vision", epoch=False)
        runs = [run_child(python, spec) for _ in range(reps)]
        firsts = [r["first_batch_s"] for r in runs]
        res["first"].append({"loader": kind, "workers": w, "first_batch_s": min(firsts),
                             "all_s": firsts})
        print("first batch, %-22s %d workers: %7.1f ms  (runs: %s)" % (
            kind, w, min(firsts) * 1e3, ", ".join("%.0f" % (x * 1e3) for x in firsts)), flush=True)
    for kind, python in loaders:
        r = run_child(python, dict(base, loader=key[kind], workers=w, workload="vision",
                                      epoch=True), sample=0.02)
        res["memory"].append({"loader": kind, "workers": w, "peak_pss": r["peak_pss"],
                              "peak_rss": r["peak_rss"], "procs": r["procs"],
                              "before_pss": r["before_pss"], "epoch_s": r["epoch_s"],
                              "mem_samples": r["mem_samples"]})
        print("memory, %-22s %d workers: peak PSS %7.1f MiB, RSS %7.1f MiB in %d process(es) "
              "(before the loader %.1f MiB; epoch %.2f s)" % (
                  kind, w, r["peak_pss"] / 2**20, r["peak_rss"] / 2**20, r["procs"],
                  r["before_pss"] / 2**20, r["epoch_s"]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--torch-python", help="the GIL interpreter with torch (build/venv-gil)")
    ap.add_argument("--quick", action="store_true",
                    help="16 images, 128 samples in batches of 16, workers 0 and 2, 1 rep")
    ap.add_argument("--images", type=int, default=64, help="JPEG files (default 64)")
    ap.add_argument("--samples", type=int, default=1024, help="samples per epoch (default 1024)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", help="worker counts besides 0, e.g. 1,2,4 (default: 1, 2, 4, 8 "
                    "and the core count, up to 16)")
    ap.add_argument("--reps", type=int, default=3, help="throughput rounds (default 3)")
    ap.add_argument("--first-reps", type=int, default=3, help="fresh processes per first batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return 0
    cores = len(os.sched_getaffinity(0))
    if a.quick:
        a.images, a.samples, a.batch, a.reps, a.first_reps = 16, 128, 16, 1, 1
    try:
        ws = parse_threads("2" if a.quick else a.threads) if (a.quick or a.threads) \
            else thread_sweep(cores)
    except ValueError as e:
        ap.error("--threads: %s" % e)
    if min(a.images, a.samples, a.batch, a.reps, a.first_reps) < 1:
        ap.error("--images, --samples, --batch, --reps and --first-reps must be at least 1")
    tv, why = torch_version(a.torch_python)
    loaders = [(TL, sys.executable)] + ([(TORCH, a.torch_python)] if tv else [])
    res = {"cores": cores, "quick": a.quick, "images": a.images, "image_size": [320, 256],
           "crop": 224, "samples": a.samples, "batch": a.batch, "reps": a.reps,
           "first_reps": a.first_reps, "seed": a.seed, "workers": ws, "digest_workers":
           DIGEST_WORKERS, "per_sample_s": {}, "faults_per_sample": {}, "interpreters": {}, "rows": [], "first": [],
           "memory": [], "failed": []}
    if not tv:
        res["torch_skipped"] = why
    print("vision pipeline: %d JPEGs (320x256), %d samples in batches of %d, workers 0,%s, "
          "best of %d; threadloom on python %s; torch DataLoader: %s" % (
              a.images, a.samples, a.batch, ",".join(map(str, ws)), a.reps,
              sys.version.split()[0], "torch %s on python %s (%s)" % (tv[0], tv[1], a.torch_python)
              if tv else "left out: " + why), flush=True)
    with tempfile.TemporaryDirectory(prefix="tl-bench-vision-") as folder:
        vision_example().write_jpegs(folder, a.images, a.seed)
        base = {"images": folder, "samples": a.samples, "batch": a.batch, "seed": a.seed}
        try:
            throughput(res, loaders, base, ws, a.reps)
            digests = {}
            for kind, python in loaders:
                out = run(python, dict(base, loader=kind, mode="digest", workers=DIGEST_WORKERS))
                digests[kind] = {"sha256": out["digest"], "batches": out["batches"]}
            res["digests"] = digests
            if tv:
                res["same_batches"] = digests[TL] == digests[TORCH]
                print("same batches (sha256 of every batch, %d workers): %s" % (
                    DIGEST_WORKERS, "yes" if res["same_batches"] else
                    "NO: %s vs %s" % (digests[TL], digests[TORCH])), flush=True)
                if not res["same_batches"]:
                    res["failed"].append("the loaders delivered different batches")
            by = {(x["loader"], x["workers"]): x["samples_per_s"] for x in res["rows"]}
            top = TORCH if tv else TL
            best = max([0] + ws, key=lambda w: by[top, w])
            at = best if best > 0 else max(ws, key=lambda w: by[top, w])
            res["best_workers"] = {k: max([0] + ws, key=lambda w: by[k, w]) for k, _ in loaders}
            res["footprint_workers"] = at
            print("%s is best at %d workers: first batch and memory at %d" % (top, best, at),
                  flush=True)
            footprint(res, loaders, base, at, a.first_reps)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res["failed"].append(str(e))
            print("FAILED: %s" % e, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
