"""The torch DataLoader baseline of bench_dataloader.py: same dataset, same sweep, any interpreter.

torch is installed for a GIL interpreter (Debian's python3.11 here, python3.12 on the GPU
machine), not for the free-threaded one threadloom runs on, so this script imports no threadloom
and bench/run.sh runs it with the interpreter bootstrap.env's TORCH_PYTHON names. It measures
torch.utils.data.DataLoader with num_workers=0 and with the worker processes of the sweep
(torch's default start method, fork on Linux; the default collate), including worker start-up as
bench_dataloader.py includes it for every loader, for each workload, and writes the rows in
bench_dataloader.py's JSON format, with this interpreter's single-thread cost per sample and each
first batch's type and size. Without torch it writes {"skipped": reason} so the report can say
why the series is missing.

    python3 bench/bench_dataloader_torch.py [--samples N] [--batch B] [--threads 1,2,4]
                                            [--workloads python,native] [--reps R] [--json PATH]
"""

import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _workload import WORKLOADS, consume, make_dataset, parse_args, per_sample_cost  # noqa: E402


def run_torch(torch_data, wl, n, b, work, workers):
    ds = make_dataset(wl, n, work)
    t0 = time.perf_counter()
    return consume(torch_data.DataLoader(ds, batch_size=b, num_workers=workers), t0)


def main():
    a, cores, ws = parse_args(__doc__.splitlines()[0])
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    res = {"python": sys.version.split()[0], "executable": sys.executable, "gil": gil,
           "cores": cores, "samples": a.samples, "batch": a.batch, "work": a.work, "reps": a.reps,
           "workloads": a.workloads}
    try:
        import torch
        import torch.utils.data as torch_data
    except ImportError as e:
        res["skipped"] = "torch is not importable by %s (%s)" % (sys.executable, e)
        print("torch DataLoader baseline skipped: %s" % res["skipped"])
    else:
        # the sweep goes past the cores on purpose (the curve flattening is the point): torch's
        # "suggested max number of worker" warning would repeat for every such count
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        res["torch"] = torch.__version__
        res["start_method"] = torch.multiprocessing.get_start_method()
        print("torch %s on python %s, GIL %s, %d CPUs, start method %s; %d samples, batch %d, %d "
              "dict lookups per sample (workload python); workers %s"
              % (torch.__version__, res["python"], "on" if gil else "off", cores,
                 res["start_method"], a.samples, a.batch, a.work, ",".join(map(str, ws))))
        rows = res["rows"] = []
        cost = res["per_sample_s"] = {}
        for wl in a.workloads:
            cost[wl] = per_sample_cost(make_dataset(wl, a.samples, a.work))
            print("-- workload %s: %s; one sample costs %.1f us of CPU on one thread, no loader"
                  % (wl, WORKLOADS[wl], cost[wl] * 1e6), flush=True)
            for w in [0] + ws:
                runs = [run_torch(torch_data, wl, a.samples, a.batch, a.work, w)
                        for _ in range(a.reps)]
                n, dt, first, desc = min(runs, key=lambda r: r[1])
                rows.append({"workload": wl, "loader": "torch DataLoader", "workers": w,
                             "samples_per_s": n / dt, "first_batch_s": first,
                             "batch_type": desc["type"], "batch_nbytes": desc["nbytes"],
                             "runs_samples_per_s": [r[0] / r[1] for r in runs]})
                print("%-34s workers=%-2d %10.0f samples/s   first batch %7.1f ms   (%s, %d bytes)"
                      % ("torch DataLoader", w, n / dt, first * 1e3, desc["type"], desc["nbytes"]),
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
