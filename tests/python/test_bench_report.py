"""bench/report.py and bench/svgplot.py on synthetic results, and a --quick bench end to end.

The synthetic directory holds what bench/run.sh writes (meta.json and each benchmark's JSON) with
round numbers, so the tables' values and ratios can be checked exactly; the SVGs are parsed with
xml.etree and their series, points and labels counted. No numbers are timed here.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import report  # noqa: E402
import svgplot  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
LOADERS = ["threadloom.DataLoader (replicas)", "threadloom.DataLoader replicate=None",
           "naive threads, shared dataset", "multiprocessing.Pool (spawn)"]
WS = [1, 2, 4]
WORKLOADS = ["python", "native"]
MIB = 2**20


def footprint(torch):
    """bench_dataloader_footprint.py's JSON: threadloom's first batch 10 ms (shared) and 40 ms
    (replicas), torch fork's 100 ms; threadloom 100 MiB PSS, torch fork 200 MiB + 100 per worker."""
    first_ms = {"threadloom.DataLoader replicate=None": 10, "threadloom.DataLoader (replicas)": 40,
                "multiprocessing.Pool (fork)": 50, "multiprocessing.Pool (spawn)": 300}
    mem = {"threadloom.DataLoader replicate=None": (100, 0, 1),
           "threadloom.DataLoader (replicas)": (100, 50, 1),
           "multiprocessing.Pool (fork)": (80, 60, None)}  # (before, per worker, processes)
    if torch:
        first_ms.update({"torch DataLoader (fork)": 100, "torch DataLoader (spawn)": 2000})
        mem["torch DataLoader (fork)"] = (200, 100, None)
    out = {"python": "3.13.5", "gil": False, "cores": 2, "quick": False, "reps": 3, "batch": 32,
           "first_samples": 2000, "work": 300, "records": 500000, "interval_s": 0.02,
           "first": [{"loader": k, "workers": w, "first_batch_s": v / 1000.0,
                      "all_s": [v / 1000.0], "python": "3.13.5", "batch_nbytes": 256}
                     for w in (2, 8) for k, v in first_ms.items()],
           "memory": [{"loader": k, "workers": w, "python": "3.13.5",
                       "peak_pss": (b + p * w) * MIB, "peak_rss": (b + 2 * p * w) * MIB,
                       "procs": n or w + 1, "mem_samples": 10, "dataset_pss": b * MIB,
                       "dataset_rss": b * MIB, "epoch_s": 1.0,
                       "first_batch_s": 2.0 if "replicas" in k else 0.1}
                      for w in (2, 4, 8) for k, (b, p, n) in mem.items()],
           "failed": []}
    if torch:
        out.update(torch="2.5", torch_python="3.12.3")
    else:
        out["torch_skipped"] = "no --torch-python given"
    return out


def write(d, name, obj):
    with open(os.path.join(d, name + ".json"), "w") as f:
        json.dump(obj, f)


def synthetic(d, torch=False):
    write(d, "meta", {"machine": "2cpu-nogpu", "gpu": "nogpu", "commit": "abc123", "cores": 2,
                      "command": "bench/run.sh PY", "quick": False, "date": "2026-01-01 00:00 UTC",
                      "cpu_model": "Test CPU", "memory_gib": 8, "kernel": "6.1", "python": "3.13.5",
                      "gil": False})
    rows = []
    for k, wl in enumerate(WORKLOADS):  # the native workload: every rate times 2
        rows.append({"workload": wl, "loader": "threadloom.DataLoader num_workers=0", "workers": 0,
                     "samples_per_s": 1000.0 * (k + 1), "first_batch_s": 0.001,
                     "batch_type": "memoryview", "batch_nbytes": 80})
        for i, name in enumerate(LOADERS):
            for w in WS:
                rows.append({"workload": wl, "loader": name, "workers": w,
                             "samples_per_s": 1000.0 * w / (i + 1) * (k + 1),
                             "first_batch_s": 0.01 * (i + 1),
                             "batch_type": "array.array" if "Pool" in name else "memoryview",
                             "batch_nbytes": 80})
    write(d, "dataloader", {"python": "3.13.5", "gil": False, "cores": 2, "samples": 100,
                            "batch": 10, "work": 300, "reps": 1, "rows": rows,
                            "per_sample_s": {"python": 60e-6, "native": 100e-6}})
    if torch:
        write(d, "dataloader_torch", {"torch": "2.5", "python": "3.12.3", "gil": True,
                                      "start_method": "fork",
                                      "per_sample_s": {"python": 30e-6, "native": 100e-6},
                                      "rows": [
            {"workload": wl, "loader": "torch DataLoader", "workers": w,
             "samples_per_s": 500.0 * max(w, 1), "first_batch_s": 0.5,
             "batch_type": "torch.Tensor", "batch_nbytes": 80}
            for wl in WORKLOADS for w in [0] + WS]})
        write(d, "footprint", footprint(torch=True))
    else:
        write(d, "dataloader_torch", {"skipped": "torch is not importable by /usr/bin/python3"})
        write(d, "footprint", footprint(torch=False))
    write(d, "executor", {"gil": False, "cores": 2, "item_us": 10.0, "rows": [
        {"load": load, "workers": w, "threadloom": 3000.0 * w, "tpe": 1000.0 * w, "mp": 1500.0 * w}
        for load in ("shared", "state") for w in WS]})
    write(d, "scheduler", {"cores": 2, "reps": 1, "scale": 1, "rows": [
        {"shape": s, "workers": w, "tasks": 100, "threadloom": 2e6 * w, "baseline": 1e6 * w}
        for s in ("tree", "batch", "inject") for w in WS]})
    write(d, "share", {"python": "3.13.5", "cores": 2, "threads": [2], "items": 100, "reps": 3,
                       "rounds": 2, "loadavg": 0.1, "rows": [
        {"workload": wl, "variant": v, "items": 100, "items_per_s_1": 1000.0, "note": None,
         "threads": {"2": {"items_per_s": 1000.0 * sp, "speedup": sp, "speedup_min": sp - 0.1,
                           "speedup_max": sp + 0.1}}}
        for wl, v, sp in [("loader", "plain", 1.2), ("loader", "share", 1.9),
                          ("globals", "plain", 1.0), ("globals", "share", 1.6)]]})
    write(d, "checkpoint", {"size_mib": 128, "cores": 2, "sizes": [
        {"size_mib": m, "save_stall_s": m / 1000, "save_commit_s": m / 100, "sync_write_s": m / 250,
         "sync_write_fsync_s": m / 200, "memcpy_s": m / 2000} for m in (64, 128)],
        "bandwidth": [{"staging": "staging 256 MiB (streams)", "raw_MBps": 800.0, "ckpt_MBps": 760.0,
                       "ratio": 0.95}],
        "stall": {"save_s": 0.011, "save_best_s": 0.010, "memcpy_s": 0.010, "memcpy_best_s": 0.009,
                  "ratio": 1.1, "save_alone_s": 0.015, "copy_threads": 2,
                  "saves_s": [0.011] * 5, "alone_s": [0.015] * 5, "memcpy_all_s": [0.010] * 5},
        "training": {"threads": 2, "with_save": [90.0], "without": [100.0], "ratio": 0.9}})
    write(d, "arena", {"cores": 2, "duration_s": 1.0, "pin_detail": "not pinned: no GPU", "rows": [
        {"size": s, "threads": w, "live": lv, "arena": 3000.0 * w, "glibc": 2000.0 * w,
         "arena_vs_glibc": 1.45, "arena_vs_glibc_rounds": [1.6, 1.45, 1.3]}
        for lv in (0, 8) for s in (65536, 1 << 20) for w in WS]})
    write(d, "startup", {"median_s": {"python3.13t": 0.040, "threadloom run": 0.044}, "ratio": 1.1,
                         "n": 5})


def md_table(md, heading, nth=0):
    """The nth Markdown table after `heading`, as a list of rows (lists of cells), header first."""
    lines = md.splitlines()
    i = lines.index(heading)
    tables, cur = [], []
    for line in lines[i + 1:]:
        if line.startswith("## ") and line != heading:
            break
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    t = tables[nth]
    return [t[0]] + t[2:]  # drop the |---| line


def svg_series(path):
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg"
    out = {}
    for g in root.iter(SVG + "g"):
        if g.get("class") == "series":
            out[g.get("data-name")] = (len(g.findall(SVG + "circle")), len(g.findall(SVG + "polyline")))
    return root, out


def texts(root, cls):
    return [t.text for t in root.iter(SVG + "text") if t.get("class") == cls]


def test_report_tables(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    plots = report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert md.startswith("# Benchmark report: 2cpu-nogpu\n")
    for s in ("**commit**: `abc123`", "**command**: `bench/run.sh PY`", "Test CPU",
              "2026-01-01 00:00 UTC"):
        assert s in md
    # DataLoader: per workload, one row per worker count plus the in-loop row; ratios
    # tl(replicas) / baseline
    t = md_table(md, "### Workload `python`")
    assert t[0] == ["workers", "threadloom.DataLoader (replicas)", "threadloom.DataLoader replicate=None",
                    "naive threads", "multiprocessing.Pool (spawn)", "tl / naive threads",
                    "tl / multiprocessing.Pool (spawn)"]
    assert [r[0] for r in t[1:]] == ["0 (in the loop)", "1", "2", "4"]
    assert t[2] == ["1", "1,000", "500", "333", "250", "3.00x", "4.00x"]
    t = md_table(md, "### Workload `native`")
    assert t[2] == ["1", "2,000", "1,000", "667", "500", "3.00x", "4.00x"]
    assert "One sample costs 60.0 us of CPU on one thread without a loader on Python 3.13.5" in md
    assert ("First batch handed over: array.array 80 bytes, memoryview 80 bytes (the same bytes "
            "from every loader)") in md
    assert "torch DataLoader: left out: torch is not importable by /usr/bin/python3." in md
    # First batch and memory without torch: threadloom and Pool only, no ratio to torch
    t = md_table(md, "## DataLoader: time to first batch, fresh process")
    assert t[0] == ["workers", "threadloom.DataLoader replicate=None", "threadloom.DataLoader (replicas)",
                    "multiprocessing.Pool (fork)", "multiprocessing.Pool (spawn)",
                    "tl shared / torch (fork)", "tl replicas / torch (fork)"]
    assert t[2] == ["8", "10.0 ms", "40.0 ms", "50.0 ms", "300.0 ms", "-", "-"]
    t = md_table(md, "## DataLoader: total memory of all processes")
    assert [r[1] for r in t[1:4]] == ["threadloom.DataLoader replicate=None",
                                      "threadloom.DataLoader (replicas)", "multiprocessing.Pool (fork)"]
    assert t[3] == ["2", "multiprocessing.Pool (fork)", "3", "200.0 MiB", "320.0 MiB", "80.0 MiB",
                    "120.0 MiB", "", "", "1.00 s"]
    assert md.count("torch DataLoader: left out: no --torch-python given.") == 2
    t = md_table(md, "## DataLoader goals (issue #6)")
    assert t[1:] == [["H2D batches", ">= 90% of pinned bandwidth", "-", "needs a GPU: not run"]]
    # Scheduler: threadloom is twice the baseline everywhere
    t = md_table(md, "## Scheduler (C): empty tasks per second vs threads")
    assert t[0] == ["shape", "workers", "threadloom", "mutex+condvar pool", "tl / baseline"]
    assert len(t) == 1 + 9 and all(r[4] == "2.00x" for r in t[1:])
    assert t[1][:4] == ["tree", "1", "2.00", "1.00"]
    # Checkpoint stall: torch.save-like / save() = (m/250) / (m/1000) = 4
    t = md_table(md, "## Checkpoint: training stall vs state size")
    assert [r[0] for r in t[1:]] == ["64 MiB", "128 MiB"]
    assert all(r[5] == "4.00x" for r in t[1:])
    t = md_table(md, "## Checkpoint: training stall vs state size", 1)
    assert t == [["", "stall", "/ memcpy"], ["save()", "0.011 s", "1.10x"],
                 ["save(), copy_threads=0", "0.015 s", "1.50x"], ["memcpy", "0.010 s", "1.00x"]]
    # Arena, executor, start-up
    t = md_table(md, "## Arena: allocation rate vs glibc malloc")
    # the median of the rounds' ratios (not the ratio of the medians) and the rounds' range
    assert t[0][5:7] == ["arena / glibc", "range"]
    assert len(t) == 1 + 12 and all(r[5:7] == ["1.45x", "1.30-1.60"] for r in t[1:])
    t = md_table(md, "## Executor: small Python tasks vs threads")
    assert [r[4] for r in t[1:]] == ["3.00x"] * 3 and [r[5] for r in t[1:]] == ["2.00x"] * 3
    t = md_table(md, "## Start-up: `threadloom run` vs `python3.13t`")
    assert t[1] == ["44.0 ms", "40.0 ms", "1.10x"]
    # Summary: one line per benchmark
    t = md_table(md, "## Summary")
    assert [r[0] for r in t[1:]] == ["DataLoader (python)", "DataLoader (native)",
                                     "Executor (shared)", "Scheduler (C, tree)",
                                     "Checkpoint stall (128 MiB)", "Arena (1 MiB, live 8)", "Start-up",
                                     "Shared data (loader workload, 2 threads)"]
    assert t[1][2:4] == ["multiprocessing.Pool 500", "4.00x"]  # 2 workers: 2000 / 500
    # GPU placeholders say why, and every plot is linked
    assert md.count("needs a GPU: not run on this machine.") == 2
    assert sorted(plots) == sorted(["dataloader_python.svg", "dataloader_native.svg",
                                    "first_batch.svg", "memory.svg", "executor_shared.svg",
                                    "executor_state.svg",
                                    "scheduler.svg", "checkpoint_stall.svg", "arena_live0.svg",
                                    "arena_live8.svg", "launch.svg", "h2d.svg"])
    for p in plots:
        assert "](%s)" % p in md


def test_report_share_section(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## Shared data: threads with and without threadloom.share()")
    assert t[0] == ["workload", "variant", "1 thread items/s", "2 threads items/s",
                    "speed-up at 2"]
    assert t[2] == ["loader", "import hook + threadloom.share(dataset)", "1,000", "1,900",
                    "1.90x (1.90, 1.80-2.00)"]
    assert "At 2 threads with share: 1.90x, 1.60x (goal >= 1.8x: NOT met)." in md
    s = md_table(md, "## Summary")
    assert ["Shared data (loader workload, 2 threads)", "1.90x", "unshared 1.20x", "1.58x",
            "speed-up over 1 thread"] in s
    # replicate='share' in the footprint: its goals against replicate=None
    fp = footprint(torch=True)
    share = "threadloom.DataLoader replicate='share'"
    for row in list(fp["first"]):
        if row["loader"] == "threadloom.DataLoader replicate=None":
            fp["first"].append(dict(row, loader=share, first_batch_s=row["first_batch_s"] * 1.5))
    for row in list(fp["memory"]):
        if row["loader"] == "threadloom.DataLoader replicate=None":
            fp["memory"].append(dict(row, loader=share, peak_pss=row["peak_pss"] * 1.04))
    write(d, "footprint", fp)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## DataLoader goals (issue #6)")
    assert ["first batch, 8 workers (threadloom, shared immortal)", "<= replicate=None (issue #19)",
            "15.0 ms vs 10.0 ms", "NOT met"] in t
    assert ["total memory, 8 workers (threadloom, shared immortal)",
            "<= replicate=None + 5% (issue #19)", "104.0 MiB vs 100.0 MiB PSS", "met"] in t


def test_report_svgs(tmp_path):
    d = str(tmp_path)
    synthetic(d, torch=True)
    report.build(d)
    for wl in WORKLOADS:
        root, series = svg_series(os.path.join(d, "dataloader_%s.svg" % wl))
        assert list(series) == ["threadloom.DataLoader (replicas)", "threadloom.DataLoader replicate=None",
                                "naive threads", "multiprocessing.Pool (spawn)", "torch DataLoader"]
        # the 0-worker rows (in the loop) are drawn in the default's and torch's lines
        assert series == {k: (len(WS) + (1 if k in ("threadloom.DataLoader (replicas)",
                                                    "torch DataLoader") else 0), 1)
                          for k in series}
        assert texts(root, "x-label") == ["workers (log scale)"]
        assert texts(root, "y-label") == ["samples/s"]
        assert texts(root, "x-tick") == ["0 (loop)", "1", "2", "4"]
        assert texts(root, "mark-label") == ["2 cores"]
        assert texts(root, "legend") == list(series)
        assert len(texts(root, "y-tick")) >= 3
    md = open(os.path.join(d, "README.md")).read()
    assert "torch 2.5 on Python 3.12.3 with the GIL on (torch is not built for the free-threaded " \
        "interpreter), start method fork" in md
    assert md_table(md, "### Workload `python`")[1][5] == "500"
    assert ("60.0 us of CPU on one thread without a loader on Python 3.13.5 (GIL off), 30.0 us on "
            "Python 3.12.3 (GIL on, torch's interpreter): the free-threaded interpreter is 2.00x "
            "slower per sample") in md
    assert "threadloom.DataLoader would load 0.50x torch's samples/s on this workload" in md
    assert ("First batch handed over: array.array 80 bytes, memoryview 80 bytes, torch.Tensor 80 "
            "bytes (the same bytes from every loader)") in md
    # first batch: threadloom 10 / 40 ms vs torch fork 100 ms
    t = md_table(md, "## DataLoader: time to first batch, fresh process")
    assert t[0][-2:] == ["tl shared / torch (fork)", "tl replicas / torch (fork)"]
    assert t[2][0] == "8" and t[2][3:5] == ["100.0 ms", "2000.0 ms"] and t[2][-2:] == ["0.10x", "0.40x"]
    root, series = svg_series(os.path.join(d, "first_batch.svg"))
    assert len(series) == 6 and all(v == (2, 1) for v in series.values())
    assert texts(root, "y-label") == ["milliseconds (log scale)"]
    # memory at 8 workers: threadloom 100 (shared) and 500 (replicas) MiB vs torch fork 1000
    t = md_table(md, "## DataLoader: total memory of all processes")
    row = {(r[0], r[1]): r for r in t[1:]}
    assert row["8", "threadloom.DataLoader replicate=None"][3:] == [
        "100.0 MiB", "100.0 MiB", "100.0 MiB", "0.0 MiB", "0.10x", "0.06x", "1.00 s"]
    assert row["8", "torch DataLoader (fork)"][2:7] == ["9", "1000.0 MiB", "1800.0 MiB", "200.0 MiB",
                                                        "800.0 MiB"]
    assert ("hand over the first batch after 2000.0 ms at 8 workers, vs 100.0 ms sharing the "
            "dataset and 100.0 ms for torch (fork)") in md
    root, series = svg_series(os.path.join(d, "memory.svg"))
    assert len(series) == 4 and all(v == (3, 1) for v in series.values())
    # the goals: best against best (num_workers=0 included) and the 8-worker ratios
    t = md_table(md, "## DataLoader goals (issue #6)")
    assert t[1:] == [
        ["throughput, workload native (best vs best)", ">= 1.5x torch",
         "4.00x (8,000 at 4 vs 2,000 at 4 workers)", "met"],
        ["throughput, workload python (best vs best)", ">= 1.5x torch",
         "2.00x (4,000 at 4 vs 2,000 at 4 workers)", "met"],
        ["first batch, 8 workers (threadloom, shared dataset)", "<= 0.20x torch (fork), 8+ workers",
         "0.10x (10.0 ms vs 100.0 ms)", "met"],
        ["first batch, 8 workers (threadloom, replicas)", "<= 0.20x torch (fork), 8+ workers",
         "0.40x (40.0 ms vs 100.0 ms)", "NOT met"],
        ["total memory, 8 workers (threadloom, shared dataset)", "<= 0.33x torch (fork)",
         "0.10x PSS (100.0 MiB vs 1000.0 MiB), 0.06x RSS", "met"],
        ["total memory, 8 workers (threadloom, replicas)", "<= 0.33x torch (fork)",
         "0.50x PSS (500.0 MiB vs 1000.0 MiB), 0.50x RSS", "NOT met"],
        ["H2D batches", ">= 90% of pinned bandwidth", "-", "needs a GPU: not run"]]
    t = md_table(md, "## Summary")
    assert t[3] == ["First batch (fresh process)", "40.0 ms", "torch (fork) 100.0 ms", "0.40x",
                    "8 workers, lower is better"]
    assert t[4] == ["Memory (peak total PSS), default replicas", "500.0 MiB",
                    "torch (fork) 1000.0 MiB", "0.50x", "8 workers, lower is better"]
    root, series = svg_series(os.path.join(d, "scheduler.svg"))
    assert len(series) == 6 and all(v == (3, 1) for v in series.values())
    assert texts(root, "y-label") == ["tasks/s (log scale)"]
    root, series = svg_series(os.path.join(d, "checkpoint_stall.svg"))
    assert len(series) == 4 and all(v == (2, 1) for v in series.values())
    assert texts(root, "x-label") == ["state size (MiB) (log scale)"]
    root, series = svg_series(os.path.join(d, "arena_live8.svg"))
    assert len(series) == 4 and texts(root, "title") == [
        "Arena vs glibc: alloc+touch+free per second (live 8)"]
    for name in ("launch.svg", "h2d.svg"):
        root, series = svg_series(os.path.join(d, name))
        assert series == {} and texts(root, "note") == ["needs a GPU: not run on this machine"]


def test_report_missing_and_unknown(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    os.unlink(os.path.join(d, "scheduler.json"))
    os.unlink(os.path.join(d, "dataloader_torch.json"))
    os.unlink(os.path.join(d, "footprint.json"))
    write(d, "mystery", {"x": 1})
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert "Not in this run: no scheduler.json here" in md
    assert md.count("Not in this run: no footprint.json here") == 2
    fp = footprint(torch=False)
    fp["first"] = fp["memory"] = []
    write(d, "footprint", fp)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert "No first-batch rows in footprint.json: every child failed" in md
    assert "No memory rows in footprint.json: every child failed" in md
    assert "torch DataLoader: not run (no dataloader_torch.json)." in md
    assert "Not drawn by this report: mystery.json." in md
    assert not os.path.exists(os.path.join(d, "scheduler.svg"))


def test_report_generic_gpu_json(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    write(d, "h2d", {"x_label": "batch size (bytes)", "y_label": "GB/s", "threadloom": "feeder",
                     "baseline": "cudaMemcpy", "series": {
                         "feeder": [[1024, 2.0], [4096, 8.0]], "cudaMemcpy": [[1024, 1.0], [4096, 4.0]]}})
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## GPU: launch rate and host-to-device bandwidth")
    assert t[0] == ["batch size (bytes)", "feeder", "cudaMemcpy", "tl / baseline"]
    assert [r[3] for r in t[1:]] == ["2.00x", "2.00x"]
    _, series = svg_series(os.path.join(d, "h2d.svg"))
    assert series == {"feeder": (2, 1), "cudaMemcpy": (2, 1)}
    assert md.count("needs a GPU: not run on this machine.") == 1  # launch still a placeholder


def test_report_devices(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    write(d, "devices", {"backend": "sim", "seconds": 1, "scaling_2": 1.9, "scaling_2_cpu": 2.0,
                         "submit": [{"threads": t, "per_thread": 4e6, "slowest": 4e6,
                                     "total": 4e6 * t, "per_thread_cpu": 5e6, "loadavg": 0.5,
                                     "device": "sim:0"} for t in (1, 2)],
                         "feeder": [{"mib": 1, "feeder_gbs": 9.0, "raw_gbs": 10.0, "vs_raw": 0.9,
                                     "utilization": 0.95, "model_gbs": 10.0,
                                     "host_memcpy_gbs": 20.0}]})
    write(d, "device", {"backend": "sim",
                        "launch": {"device": "sim:0", "rows": [{"threads": 1, "per_thread": 8e6},
                                                               {"threads": 2, "per_thread": 8e6}]},
                        "alloc": {"device": "sim:0", "rows": [
                            {"size": 512, "threads": 1, "cached_per_thread": 2e7, "uncached": 1e5}]},
                        "timing": [{"spin": "0us", "model_h2d_gbs": 1.0, "wall_ms": 101.0,
                                    "model_ms": 100.0, "busy_ms": 100.0, "late_mean_us": 50.0,
                                    "late_max_us": 900.0, "roundtrip_us": 160.0}]})
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    h = "## Devices (sim): submission, launch rate, feeder, allocator"
    t = md_table(md, h)
    assert t[1] == ["1", "4,000,000", "5,000,000", "8,000,000", "0.50x", "0.5"]
    assert "2 threads over 1: 1.90x wall clock, 2.00x per CPU second." in md
    assert md_table(md, h, 1)[1] == ["1 MiB", "9.00", "10.00", "90.0%", "95.0%", "10.00", "20.0"]
    assert md_table(md, h, 2)[1] == ["512 B", "1", "20,000,000", "100,000", "200.00x"]
    assert md_table(md, h, 3)[1][4] == "+1.00%"
    _, series = svg_series(os.path.join(d, "devices_submit.svg"))
    assert series == {"Python threads": (2, 1), "raw C": (2, 1)}
    t = md_table(md, "## Summary")
    assert ["Device submission (Python, sim)", "4,000,000/s per thread", "raw C 8,000,000",
            "0.50x", "1 thread"] in t


def _launch_case(model, loaders, ratios):
    rows = [{"threads": t, "ratio": q, "ratio_cpu": q,
             "python": {"total": 1e6 * q * t, "per_thread": 1e6 * q, "per_thread_cpu": 2e7},
             "c": {"total": 1e6 * t, "per_thread": 1e6, "per_thread_cpu": 1.25e8}}
            for t, q in zip((1, 8), ratios)]
    return {"model": model, "spec": "sim:8", "devices": 8, "device": "sim:0",
            "loaders_per_device": loaders, "loader_threads": 8 * loaders,
            "loader_lines_per_s": 1e5, "loader_slots_on_launch_cores": 16 if loaders else 0,
            "cores": 2, "rows": rows, "loadavg": 1.0}


def test_report_launch_rate(tmp_path):
    """bench_devices.py's launch section: the table, the goal sentences, the summary lines."""
    d = str(tmp_path)
    synthetic(d)
    write(d, "devices", {"backend": "sim", "seconds": 1, "submit": [], "feeder": [],
                         "launch": [_launch_case("overhead", 0, (0.15, 0.16)),
                                    _launch_case("launch 1us", 0, (0.95, 0.9)),
                                    _launch_case("launch 1us", 2, (0.9, 0.4))]})
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## Devices (sim): submission, launch rate, feeder, allocator")
    assert t[0] == ["device", "loader threads", "threads", "Python launches/s", "raw C launches/s",
                    "Python / C", "per CPU second"]
    assert t[6] == ["launch 1us", "16 (16 on launch cores)", "8", "3,200,000", "8,000,000",
                    "40.0%", "40.0%"]
    assert "At 8 threads: Python 90.0% of raw C (goal >= 50%: met)." in md
    assert "At 8 threads with loader threads busy: Python 40.0% of raw C (goal >= 50%: NOT met)." in md
    assert "own cost per launch from one Python thread: 50 ns of CPU (raw C: 8 ns)" in md
    _, series = svg_series(os.path.join(d, "devices_launch.svg"))
    assert set(series) == {"Python threads", "raw C", "Python threads (loaders busy)",
                           "raw C (loaders busy)"}
    s = md_table(md, "## Summary")
    assert ["Launch rate, loaders busy (launch 1us)", "3,200,000/s", "raw C 8,000,000/s", "0.40x",
            "8 threads"] in s


def test_report_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(report.ReportError, match="no meta.json.*make bench"):
        report.build(d)
    synthetic(d)
    with open(os.path.join(d, "executor.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(report.ReportError, match="executor.json: not readable JSON"):
        report.build(d)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"),
                        os.path.join(d, "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_svgplot_lines_breaks_and_axes():
    svg = svgplot.line_chart("t", "x", "y", [svgplot.Series("a", [(1, 1), (2, None), (3, 2), (4, 3)]),
                                             svgplot.Series("b", [(1, 5), (4, 6)])])
    root = ET.fromstring(svg)
    g = [e for e in root.iter(SVG + "g") if e.get("class") == "series"]
    # a: the gap at x=2 leaves one point alone (no line) and a run of two
    assert [(len(e.findall(SVG + "circle")), len(e.findall(SVG + "polyline"))) for e in g] == [(3, 1), (2, 1)]
    assert texts(root, "y-tick")[0] == "0"  # a linear y axis starts at 0
    with pytest.raises(ValueError, match="log y axis needs y > 0"):
        svgplot.line_chart("t", "x", "y", [svgplot.Series("a", [(1, 0), (2, 1)])], log_y=True)
    with pytest.raises(ValueError, match="no points"):
        svgplot.line_chart("t", "x", "y", [svgplot.Series("a", [(1, None)])])
    assert [svgplot.si(v) for v in (0, 1500, 2e6, 0.25, 0.002)] == ["0", "1.5k", "2M", "0.25", "2m"]


def test_svgplot_error_bars():
    svg = svgplot.line_chart("t", "x", "y", [svgplot.Series("a", [(1, 10), (2, 20), (4, 15)],
                                                            errors=[(8, 12), None, (5, 40)])],
                             log_x=True, x_tick_labels={1: "one"})
    root = ET.fromstring(svg)
    bars = [e for e in root.iter(SVG + "line") if e.get("class") == "error-bar"]
    caps = [e for e in root.iter(SVG + "line") if e.get("class") == "error-cap"]
    assert len(bars) == 2 and len(caps) == 4
    assert float(texts(root, "y-tick")[-1]) >= 40          # the axis holds the bars' ends
    assert texts(root, "x-tick") == ["one", "2", "4"]
    tips = [c.find(SVG + "title").text for c in root.iter(SVG + "circle") if c.find(SVG + "title") is not None]
    assert tips[0] == "a: x=one, y=10 (runs 8-12)" and tips[1] == "a: x=2, y=20"
    with pytest.raises(ValueError, match="2 error bars for 3 points"):
        svgplot.Series("a", [(1, 1), (2, 2), (3, 3)], errors=[None, None])


def test_quick_bench_end_to_end(tmp_path):
    """bench/run.sh --quick: every benchmark runs, writes JSON, and the report draws them (about
    10-20 s on a 2-core machine)."""
    for b in ("tl-bench-scheduler", "tl-bench-arena"):
        if not os.access(os.path.join(ROOT, "build", "bench", b), os.X_OK):
            pytest.skip("build/bench/%s is not built: run `make build`" % b)
    out = str(tmp_path / "results")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "run.sh"), "--quick", "--out", out,
                        sys.executable], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "MAKELEVEL"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bench: report in %s/README.md" % out in r.stdout
    for name in ("scheduler", "arena", "executor", "startup", "checkpoint", "dataloader",
                 "dataloader_torch", "footprint", "share", "vision", "meta"):
        with open(os.path.join(out, name + ".json")) as f:
            json.load(f)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["quick"] is True and meta["cores"] >= 1
    md = open(os.path.join(out, "README.md")).read()
    assert "Not in this run" not in md
    ck = json.load(open(os.path.join(out, "checkpoint.json")))
    # asked in a child: torch imported here would change what later tests collate into
    has_dcp = subprocess.run([sys.executable, "-c", "import torch.distributed.checkpoint"],
                             capture_output=True).returncode == 0
    if not has_dcp:
        assert ck["sync_baseline"] == "torch.save-like" and ck["async_save_skipped"]
    else:  # the real anchor, in the same run
        assert ck["sync_baseline"].startswith("torch.save ")
        assert all(x["async_save_stall_s"] > 0 for x in ck["sizes"])
    vision = json.load(open(os.path.join(out, "vision.json")))
    assert vision["failed"] == [] and vision["digests"]["threadloom.DataLoader"]["batches"] == 8
    if "torch DataLoader" in vision["interpreters"]:  # the GIL baseline with torch is there
        assert vision["same_batches"] is True
        assert {x["loader"] for x in vision["memory"]} == {"threadloom.DataLoader", "torch DataLoader"}
    for name in ("dataloader_python", "dataloader_native", "first_batch", "memory",
                 "executor_shared", "scheduler", "checkpoint_stall", "arena_live8", "vision"):
        _, series = svg_series(os.path.join(out, name + ".svg"))
        assert series and all(c >= 1 for c, _ in series.values())


def test_report_device_state(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    write(d, "device_state", {
        "backend": "sim", "quick": False,
        "loader": {"device": "sim:0", "link": 0.5, "device_gbs": 4.5, "host_gbs": 10.0,
                   "model_gbs": 5.0, "vs_model": 0.9, "utilization": 0.95,
                   "wait_per_batch_us": 400.0, "staging_waits": 1200, "in_place_fraction": 1.0},
        "stall": {"state_mib": 256, "stalls": [0.001] * 3, "stall_s": 0.001, "copy_s": 0.05,
                  "stall_vs_copy": 0.02, "save_s": 0.2, "model_gbs": 5.0},
        "training": {"kernel_ms": 2.0, "depth": 3, "state_mib": 64, "save_every_s": 2.0,
                     "saves": 6, "rounds": 3, "plain_steps_per_s": 500.0,
                     "saving_steps_per_s": 480.0, "step_ratio": 0.96, "plain_busy": 1.0,
                     "saving_busy": 0.96, "busy_ratio": 0.96}})
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    h = "## Device state (sim): DataLoader to the device, device checkpoints"
    assert md_table(md, h)[1] == ["4.50", "10.00", "5.00", "90.0%", "95.0%", "met", "400.0 us",
                                  "1,200", "100%"]
    assert md_table(md, h, 1)[1] == ["1.0 ms", "50.0 ms", "0.02x", "met", "200.0 ms"]
    assert md_table(md, h, 2)[1] == ["500.0", "480.0", "96.0%", "100.0%", "96.0%", "96.0%",
                                     "NOT met"]
    t = md_table(md, "## Summary")
    assert ["Device checkpoint stall (sim)", "1.0 ms", "D2H copy 50.0 ms", "0.02x",
            "256 MiB"] in t
    assert ["Training during device saves (sim)", "480.0 steps/s", "500.0 without saves",
            "96.0%", "save every 2.0 s"] in t


# -- issue 22, "The report": each of these failed before the fix ----------------------------------

def summary_rows(d):
    return md_table(open(os.path.join(d, "README.md")).read(), "## Summary")[1:]


def test_summary_uses_the_defaults_or_says_loudly_it_does_not(tmp_path):
    """The memory line was replicate=None's (0.10x here) while the default, replicas, was 0.50x
    and NOT met: the default comes first, and a non-default line says so."""
    d = str(tmp_path)
    synthetic(d, torch=True)
    report.build(d)
    rows = summary_rows(d)
    mem = [r for r in rows if r[0].startswith("Memory")]
    assert mem[0] == ["Memory (peak total PSS), default replicas", "500.0 MiB",
                      "torch (fork) 1000.0 MiB", "0.50x", "8 workers, lower is better"]
    assert mem[1][0] == "Memory (peak total PSS), replicate=None: **not the default**"
    assert mem[1][3] == "0.10x" and len(mem) == 2


def test_summary_has_the_default_replicas_first_batch_on_the_records_dataset(tmp_path):
    """1.15 s vs torch's 0.165 s on the 500k-record dataset was only in a paragraph."""
    d = str(tmp_path)
    synthetic(d, torch=True)
    report.build(d)
    assert ["First batch, 500,000-record dataset, default replicas", "2000.0 ms",
            "torch (fork) 100.0 ms", "20.00x", "8 workers, lower is better"] in summary_rows(d)


def test_throughput_plot_shows_every_baseline_point_the_ratios_use(tmp_path):
    """torch at 0 workers is its best here, and best-vs-best quotes it: the plot must draw it."""
    d = str(tmp_path)
    synthetic(d, torch=True)
    tdl = json.load(open(os.path.join(d, "dataloader_torch.json")))
    for x in tdl["rows"]:
        if x["workers"] == 0:
            x["samples_per_s"] = 9000.0
    write(d, "dataloader_torch", tdl)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert "torch DataLoader, 0 workers, 9,000" in md            # the ratio uses the 0 point
    root, _ = svg_series(os.path.join(d, "dataloader_python.svg"))
    torch_g = [g for g in root.iter(SVG + "g") if g.get("data-name") == "torch DataLoader"][0]
    tips = [c.find(SVG + "title").text for c in torch_g.findall(SVG + "circle")]
    assert "torch DataLoader: x=0 (loop), y=9000" in tips, tips
    assert len(tips) == 1 + len(WS)
    tl_g = [g for g in root.iter(SVG + "g")
            if g.get("data-name") == "threadloom.DataLoader (replicas)"][0]
    assert "threadloom.DataLoader (replicas): x=0 (loop), y=1000" in [
        c.find(SVG + "title").text for c in tl_g.findall(SVG + "circle")]


def error_bars(path, name):
    root = ET.parse(path).getroot()
    g = [g for g in root.iter(SVG + "g") if g.get("data-name") == name][0]
    return [e for e in g.iter(SVG + "line") if e.get("class") == "error-bar"]


def test_best_of_n_figures_show_their_spread_and_noise_is_flagged(tmp_path):
    """No spread anywhere, and the arena's "149.65x, range 20.93-301.13" read as a result."""
    d = str(tmp_path)
    synthetic(d, torch=True)
    dl = json.load(open(os.path.join(d, "dataloader.json")))
    dl["reps"] = 3
    for x in dl["rows"]:
        v = x["samples_per_s"]
        x["runs_samples_per_s"] = [v, 0.9 * v, (0.5 if x["workers"] == 2 else 0.8) * v]
    write(d, "dataloader", dl)
    ex = json.load(open(os.path.join(d, "executor.json")))
    ex["reps"] = 3
    for x in ex["rows"]:
        x["runs"] = {k: [x[k], 0.95 * x[k], 0.9 * x[k]] for k in ("threadloom", "tpe", "mp")}
    write(d, "executor", ex)
    sc = json.load(open(os.path.join(d, "scheduler.json")))
    for x in sc["rows"]:
        x["runs"] = {"threadloom": [x["threadloom"], x["threadloom"] / 3], "baseline": [x["baseline"]] * 2}
    write(d, "scheduler", sc)
    ar = json.load(open(os.path.join(d, "arena.json")))
    ar["rows"][-1].update(arena_vs_glibc=149.65, arena_vs_glibc_rounds=[20.93, 149.65, 301.13])
    write(d, "arena", ar)
    ck = json.load(open(os.path.join(d, "checkpoint.json")))
    for x in ck["sizes"]:
        x["runs"] = {k: [x[k], 1.1 * x[k]] for k in x if k.endswith("_s")}
    mb = 128 * MIB / 1e6                                    # 128 MiB at 760 and 380 MB/s
    ck["bandwidth"][0].update(ckpt_s=[mb / 760, mb / 380], raw_s=[mb / 800, mb / 700])
    write(d, "checkpoint", ck)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "### Workload `python`")
    assert t[2][1] == "1,000 (median 900, worst 800)"                       # 1 worker
    assert t[3][1] == "2,000 (median 1,800, worst 1,000) \u26a0 noisy"      # 2 workers: 2x apart
    assert t[3][-1].endswith("\u26a0 noisy")                               # and its ratio
    assert "the best of 3 runs, then the median and the worst run" in md
    assert len(error_bars(os.path.join(d, "dataloader_python.svg"),
                          "threadloom.DataLoader (replicas)")) == 1 + len(WS)
    t = md_table(md, "## Executor: small Python tasks vs threads")
    assert t[1][1] == "3,000 (median 2,850, worst 2,700)"
    assert len(error_bars(os.path.join(d, "executor_shared.svg"), "ThreadPoolExecutor")) == len(WS)
    t = md_table(md, "## Scheduler (C): empty tasks per second vs threads")
    assert t[1][2] == "2.00 (median 1.33, worst 0.67) \u26a0 noisy" and t[1][4] == "2.00x \u26a0 noisy"
    assert ["Scheduler (C, tree)", "4.0 Mtasks/s", "mutex+condvar pool 2.0", "2.00x \u26a0 noisy",
            "2 workers"] in summary_rows(d)
    t = md_table(md, "## Arena: allocation rate vs glibc malloc")
    assert t[-1][5:7] == ["149.65x \u26a0 noisy", "20.93-301.13"]
    assert t[1][5] == "1.45x"                                               # 1.3-1.6: not flagged
    t = md_table(md, "## Checkpoint: training stall vs state size")
    assert t[1][1] == "0.064 s (median 0.067 s, worst 0.070 s)"
    assert len(error_bars(os.path.join(d, "checkpoint_stall.svg"), "threadloom save() stall")) == 2
    t = md_table(md, "## Checkpoint: training stall vs state size", 2)
    assert t[1] == ["staging 256 MiB (streams)", "760 (median 570, worst 380) \u26a0 noisy",
                    "800 (median 750, worst 700)", "95% \u26a0 noisy"]
    # fresh-process first batch: its all_s
    fp = json.load(open(os.path.join(d, "footprint.json")))
    for x in fp["first"]:
        x["all_s"] = [x["first_batch_s"], 2 * x["first_batch_s"], 3 * x["first_batch_s"]]
    write(d, "footprint", fp)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## DataLoader: time to first batch, fresh process")
    assert t[1][1] == "10.0 ms (median 20.0 ms, worst 30.0 ms) \u26a0 noisy"
    assert len(error_bars(os.path.join(d, "first_batch.svg"),
                          "threadloom.DataLoader replicate=None")) == 2


def ckpt_with_async_save(d):
    ck = json.load(open(os.path.join(d, "checkpoint.json")))
    ck["sync_baseline"] = "torch.save 2.12.0"
    for x in ck["sizes"]:
        m = x["size_mib"]
        x.update(async_save_stall_s=m / 500, async_save_commit_s=m / 50)
    write(d, "checkpoint", ck)


def test_checkpoint_compares_with_torch_async_save(tmp_path):
    """The checkpoint baseline was a "torch.save-like" stand-in: with torch, async_save is the
    anchor, in the table, the plot and the summary; a run without it says so in bold."""
    d = str(tmp_path)
    synthetic(d)
    ckpt_with_async_save(d)
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    t = md_table(md, "## Checkpoint: training stall vs state size")
    assert t[0] == ["state", "save() stall", "async_save stall", "torch.save", "+ fsync", "memcpy",
                    "async_save / save()", "torch.save / save()", "save() committed after",
                    "async_save committed after"]
    assert t[2][:3] == ["128 MiB", "0.128 s", "0.256 s"] and t[2][6:8] == ["2.00x", "4.00x"]
    assert "torch.distributed.checkpoint.async_save" in md
    _, series = svg_series(os.path.join(d, "checkpoint_stall.svg"))
    assert "torch async_save stall" in series
    assert ["Checkpoint stall (128 MiB)", "0.128 s", "torch async_save 0.256 s", "0.50x",
            "lower is better"] in summary_rows(d)
    synthetic(d)                          # a checkpoint.json without async_save
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert "**no async_save** (not measured by this bench_checkpoint.py)" in md
    assert ["Checkpoint stall (128 MiB)", "0.128 s",
            "torch.save-like 0.512 s (no async_save in this run)", "0.25x",
            "lower is better"] in summary_rows(d)


# -- the vision pipeline (issue 18) -----------------------------------------------------------------

def vision_json(torch=True, same=True):
    """bench_vision.py's JSON: threadloom 100 samples/s per worker (80 in the loop), torch 60 per
    worker (70 in the loop); first batch 20 vs 200 ms, peak PSS 300 vs 1200 MiB at 2 workers."""
    rows = []
    for k, per, zero in (("threadloom.DataLoader", 100.0, 80.0), ("torch DataLoader", 60.0, 70.0)):
        if k.startswith("torch") and not torch:
            continue
        for w in (0, 1, 2, 4):
            v = zero if w == 0 else per * min(w, 2)
            rows.append({"loader": k, "workers": w, "samples_per_s": v, "first_batch_s": 0.1,
                         "runs_samples_per_s": [v, 0.9 * v, 0.8 * v], "batch_type": "list",
                         "batch_nbytes": 32 * 3 * 224 * 224 * 4 + 32 * 8})
    out = {"cores": 2, "quick": False, "images": 64, "image_size": [320, 256], "crop": 224,
           "samples": 1024, "batch": 32, "reps": 3, "first_reps": 3, "seed": 0,
           "workers": [1, 2, 4], "digest_workers": 2, "rows": rows, "failed": [],
           "per_sample_s": {"threadloom.DataLoader": 1.7e-3},
           "interpreters": {"threadloom.DataLoader": {"python": "3.13.5", "gil": False,
                                                      "torch": "2.12.0"}},
           "digests": {"threadloom.DataLoader": {"sha256": "ab" * 32, "batches": 32}},
           "first": [{"loader": "threadloom.DataLoader", "workers": 2, "first_batch_s": 0.02,
                      "all_s": [0.02, 0.021, 0.025]}],
           "memory": [{"loader": "threadloom.DataLoader", "workers": 2, "peak_pss": 300 * MIB,
                       "peak_rss": 320 * MIB, "procs": 1, "before_pss": 250 * MIB,
                       "epoch_s": 5.0, "mem_samples": 100}],
           "footprint_workers": 2}
    if torch:
        out["per_sample_s"]["torch DataLoader"] = 1.6e-3
        out["interpreters"]["torch DataLoader"] = {"python": "3.11.2", "gil": True,
                                                   "torch": "2.12.0"}
        out["digests"]["torch DataLoader"] = {"sha256": ("ab" if same else "cd") * 32,
                                              "batches": 32}
        out["same_batches"] = same
        out["first"].append({"loader": "torch DataLoader", "workers": 2, "first_batch_s": 0.2,
                             "all_s": [0.2, 0.3, 0.5]})
        out["memory"].append({"loader": "torch DataLoader", "workers": 2, "peak_pss": 1200 * MIB,
                              "peak_rss": 2000 * MIB, "procs": 3, "before_pss": 500 * MIB,
                              "epoch_s": 6.0, "mem_samples": 100})
    else:
        out["torch_skipped"] = "no --torch-python given"
    return out


def test_report_vision_section(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    write(d, "vision", vision_json())
    plots = report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    h = "## Vision pipeline: JPEG decode, crop, flip, normalize (issue #18)"
    t = md_table(md, h)
    assert t[0] == ["workers", "threadloom.DataLoader", "torch DataLoader", "tl / torch"]
    assert t[1] == ["0 (in the loop)", "80 (median 72, worst 64)", "70 (median 63, worst 56)",
                    "1.14x"]
    assert t[3][0] == "2" and t[3][3] == "1.67x"
    assert "Same batches: yes, the two loaders delivered the same bytes" in md
    assert "on Python 3.11.2 (GIL on), torch 2.12.0" in md
    t = md_table(md, h, 1)
    assert t[1] == ["threadloom.DataLoader", "20.0 ms (median 21.0 ms, worst 25.0 ms)", "1",
                    "300.0 MiB", "320.0 MiB", "250.0 MiB", "50.0 MiB"]
    assert t[2][1] == "200.0 ms (median 300.0 ms, worst 500.0 ms) \u26a0 noisy"
    t = md_table(md, h, 2)                   # the goals, best vs best: 200 at 2 vs 120 at 2
    assert t[1:] == [
        ["throughput (best vs best)", ">= 1.5x torch", "1.67x (200 at 2 vs 120 at 2 workers)", "met"],
        ["first batch, 2 workers", "<= 0.20x torch", "0.10x (20.0 ms vs 200.0 ms)",
         "met \u26a0 noisy"],
        ["total memory, 2 workers", "<= 0.33x torch", "0.25x PSS (300.0 MiB vs 1200.0 MiB), "
         "0.16x RSS", "met"]]
    assert "**Where threads win, and why.** Pillow's JPEG decoder and numpy's arithmetic release" in md
    assert "In the loop (no workers) they load 80 vs 70 samples/s (1.14x)." in md
    assert "the loaders added 50.0 MiB (threads) and 700.0 MiB (3 processes)" in md
    s = summary_rows(d)
    assert ["Vision pipeline (best vs best)", "200 samples/s", "torch DataLoader 120", "1.67x",
            "2 vs 2 workers"] in s
    assert ["Vision memory (peak total PSS)", "300.0 MiB", "torch 1200.0 MiB", "0.25x",
            "2 workers, lower is better"] in s
    assert "vision.svg" in plots
    root, series = svg_series(os.path.join(d, "vision.svg"))
    assert series == {"threadloom.DataLoader": (4, 1), "torch DataLoader": (4, 1)}
    assert texts(root, "x-tick") == ["0 (loop)", "1", "2", "4"]
    assert len(error_bars(os.path.join(d, "vision.svg"), "torch DataLoader")) == 4


def test_report_vision_different_batches_and_no_torch(tmp_path):
    d = str(tmp_path)
    synthetic(d)
    write(d, "vision", vision_json(same=False))
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert ("**NO: the loaders delivered different batches, so the numbers below do not "
            "compare**") in md
    write(d, "vision", vision_json(torch=False))
    report.build(d)
    md = open(os.path.join(d, "README.md")).read()
    assert "torch's DataLoader (worker processes, fork) on **not run**: no --torch-python given" in md
    assert not any(r[0].startswith("Vision") for r in summary_rows(d))
    os.unlink(os.path.join(d, "vision.json"))
    report.build(d)
    assert "Not in this run: no vision.json here" in open(os.path.join(d, "README.md")).read()
