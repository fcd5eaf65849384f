"""The torch DataLoader baseline of bench_dataloader.py: same dataset, same sweep, any interpreter.

torch is installed for a GIL interpreter (python3.12 on the GPU machine), not for the
free-threaded one threadloom runs on, so this script imports no threadloom and bench/run.sh runs
it with whichever interpreter can import torch. It measures torch.utils.data.DataLoader with
num_workers=0 and with the worker processes of the sweep (torch's default start method, the
default collate), including worker start-up as bench_dataloader.py includes it for every loader,
and writes the rows in bench_dataloader.py's JSON format. Without torch it writes
{"skipped": reason} so the report can say why the series is missing.

    python3.12 bench/bench_dataloader_torch.py [--samples N] [--batch B] [--threads 1,2,4]
                                               [--reps R] [--json PATH]
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _workload import Tokens, parse_args  # noqa: E402


def run_torch(torch_data, n, b, work, workers):
    ds = Tokens(n, work)
    t0 = time.perf_counter()
    first = None
    count = 0
    for batch in torch_data.DataLoader(ds, batch_size=b, num_workers=workers):
        if first is None:
            first = time.perf_counter() - t0
        count += len(batch)
    return count, time.perf_counter() - t0, first


def main():
    a, cores, ws = parse_args(__doc__.splitlines()[0])
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    res = {"python": sys.version.split()[0], "executable": sys.executable, "gil": gil,
           "cores": cores, "samples": a.samples, "batch": a.batch, "work": a.work, "reps": a.reps}
    try:
        import torch
        import torch.utils.data as torch_data
    except ImportError as e:
        res["skipped"] = "torch is not importable by %s (%s)" % (sys.executable, e)
        print("torch DataLoader baseline skipped: %s" % res["skipped"])
    else:
        res["torch"] = torch.__version__
        print("torch %s on python %s, GIL %s, %d CPUs; %d samples, batch %d, %d dict lookups per "
              "sample; workers %s" % (torch.__version__, res["python"], "on" if gil else "off",
                                      cores, a.samples, a.batch, a.work, ",".join(map(str, ws))))
        rows = res["rows"] = []
        for w in [0] + ws:
            runs = [run_torch(torch_data, a.samples, a.batch, a.work, w) for _ in range(a.reps)]
            n, dt, first = min(runs, key=lambda r: r[1])
            rows.append({"loader": "torch DataLoader", "workers": w, "samples_per_s": n / dt,
                         "first_batch_s": first})
            print("%-34s workers=%-2d %10.0f samples/s   first batch %7.1f ms"
                  % ("torch DataLoader", w, n / dt, first * 1e3), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
