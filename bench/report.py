"""bench/report.py: the benchmark report of one machine, from the JSON its benchmarks wrote.

    python3 bench/report.py bench/results/<machine>

Reads meta.json (written by bench/run.sh: machine, date, commit, command) and each benchmark's
JSON in that directory, and writes there README.md (one section per benchmark: a table of
threadloom against its baseline with the ratio, a sentence on what it shows, the plot) and the
SVG plots (bench/svgplot.py). Standard library only: it runs on any Python 3.8+.

A benchmark whose JSON is missing gets a section saying so (it failed or was not run; its .txt
says why), and a JSON file the report does not know is listed at the end, so nothing is dropped
silently. The GPU plots (launch rate vs threads, H2D bandwidth vs batch size) are placeholders
saying why until launch.json / h2d.json exist; those take the generic format of plot_json().
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from svgplot import PALETTE, Series, line_chart, placeholder  # noqa: E402

KNOWN = {"meta", "dataloader", "dataloader_torch", "footprint", "vision", "executor", "scheduler", "checkpoint", "arena",
         "startup", "share", "launch", "h2d", "device", "devices", "device_cuda", "devices_cuda",
         "device_state", "device_state_cuda"}


class ReportError(Exception):
    """A results directory the report cannot read; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def load(d, name):
    path = os.path.join(d, name + ".json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError("%s: not readable JSON (%s): rerun the benchmark (bench/run.sh)"
                          % (path, e))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def num(v, digits=0):
    return "-" if v is None else "{:,.{}f}".format(v, digits)


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else "%.2fx" % (a / b)


def ms(v):
    return "-" if v is None else "%.1f ms" % (v * 1e3)


def at_cores(ws, cores):
    """The sweep point the ratios are quoted at: the largest <= cores (else the smallest)."""
    below = [w for w in ws if w <= cores]
    return max(below) if below else min(ws)


def size_label(b):
    if b >= 1 << 20 and b % (1 << 20) == 0:
        return "%d MiB" % (b >> 20)
    if b >= 1024 and b % 1024 == 0:
        return "%d KiB" % (b >> 10)
    return "%d B" % b


# ------------------------------------------------------------------------------------------------
# The spread of best-of-N figures
# ------------------------------------------------------------------------------------------------

NOISY = 1.5  # a figure whose runs differ by more than this (max / min) is flagged as noise
FLAG = "\u26a0 noisy"


def spread(runs):
    """(min, median, max) of a figure's runs, or None with fewer than 2 runs."""
    v = sorted(x for x in (runs or []) if x is not None)
    if len(v) < 2:
        return None
    n = len(v)
    return v[0], (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2), v[-1]


def noisy(runs):
    """True when the runs behind a figure differ by more than NOISY (max / min)."""
    s = spread(runs)
    return s is not None and s[0] > 0 and s[2] / s[0] > NOISY


def best_cell(best, runs, fmt, higher=True):
    """A best-of-N table cell: the best, then the median and the worst run, flagged when the
    runs differ by more than NOISY."""
    s = spread(runs)
    if s is None:
        return fmt(best)
    return "%s (median %s, worst %s)%s" % (fmt(best), fmt(s[1]), fmt(s[0] if higher else s[2]),
                                           " " + FLAG if noisy(runs) else "")


def error_bar(runs, scale=1.0):
    """(min, max) of the runs for a plot's error bar, or None."""
    s = spread(runs)
    return None if s is None else (s[0] * scale, s[2] * scale)


def flagged_ratio(text, *runs_lists):
    """A ratio's text, flagged when any figure it divides is noisy."""
    return text + (" " + FLAG if any(noisy(r) for r in runs_lists) else "")


def spread_note(r, n):
    """The sentence under a table of best-of-`n` cells."""
    if n and n > 1:
        r.md += ["", "Each cell: the best of %d runs, then the median and the worst run; %s marks "
                 "a cell whose runs differ by more than %.1fx (max / min): the machine's noise, "
                 "not a result (rerun on a quiet machine). The plot's error bars span each "
                 "point's runs." % (n, FLAG, NOISY)]


class Report:
    def __init__(self, d):
        self.d = d
        self.md = []
        self.plots = []  # SVG files written

    def svg(self, name, text, alt):
        with open(os.path.join(self.d, name), "w") as f:
            f.write(text)
        self.plots.append(name)
        self.md += ["", "![%s](%s)" % (alt, name)]

    def section(self, title, name):
        """Starts the section `title` and returns the results in <name>.json, or None (after a
        line saying they are missing) when the benchmark wrote none."""
        self.md += ["", "## " + title, ""]
        data = load(self.d, name)
        if data is None:
            self.missing(name)
        return data

    def missing(self, name):
        self.md += ["", "Not in this run: no %s.json here (the benchmark failed or was not run; "
                    "%s.txt says why)." % (name, name)]


# ------------------------------------------------------------------------------------------------
# The sections
# ------------------------------------------------------------------------------------------------

LOADERS = [("threadloom.DataLoader (replicas)", "threadloom.DataLoader (replicas)"),
           ("threadloom.DataLoader replicate=None", "threadloom.DataLoader replicate=None"),
           ("threadloom.DataLoader replicate='share'", "threadloom.DataLoader replicate='share'"),
           ("naive threads, shared dataset", "naive threads"),
           ("multiprocessing.Pool (spawn)", "multiprocessing.Pool (spawn)"),
           ("torch DataLoader", "torch DataLoader")]
WORKLOAD_TEXT = {"python": "a Python-heavy per-sample transform (%(work)d dict lookups in a shared "
                           "vocabulary per sample: pure Python, holds a GIL build's lock)",
                 "native": "a native-heavy per-sample transform (zlib.decompress + sha256 of 64 "
                           "KiB per sample: C code that releases a GIL build's lock)"}


def us(v):
    return "-" if v is None else "%.1f us" % (v * 1e6)


def section_dataloader(r, cores):
    """One subsection per workload; returns (summary lines, {workload: (tl best, torch best)})."""
    dl = r.section("DataLoader: loader throughput vs threads", "dataloader")
    if dl is None:
        return [], {}
    tdl = load(r.d, "dataloader_torch")
    rows = list(dl["rows"])
    torch_note = None
    if tdl is None:
        torch_note = "torch DataLoader: not run (no dataloader_torch.json)."
    elif "skipped" in tdl:
        torch_note = "torch DataLoader: left out: %s." % tdl["skipped"]
    else:
        rows += tdl["rows"]
        torch_note = ("torch DataLoader: torch %s on Python %s with the GIL %s (torch is not built "
                      "for the free-threaded interpreter), start method %s, so its per-sample cost "
                      "is that interpreter's (the single-thread costs above separate it from the "
                      "loaders' parallelism)." % (tdl.get("torch"), tdl.get("python"),
                                                  "on" if tdl.get("gil") else "off",
                                                  tdl.get("start_method", "its default")))
    for x in rows:
        x.setdefault("workload", "python")  # results from before the native workload
    workloads = [w for w in ("python", "native") if any(x["workload"] == w for x in rows)]
    r.md += ["Every loader's samples/s with worker start-up included and every batch collated "
             "(threadloom.DataLoader and the naive threads with threadloom's default_collate, the "
             "processes into an array.array, torch with its default collate), %d samples in "
             "batches of %d, best of %d runs; the ratios are threadloom.DataLoader (replicas) over "
             "each baseline (higher is better)." % (dl["samples"], dl["batch"], dl["reps"])]
    summaries, best = [], {}
    for wl in workloads:
        got = workload_section(r, cores, dl, tdl, [x for x in rows if x["workload"] == wl], wl)
        if got:
            summaries.append(got[0])
            best[wl] = got[1]
    if torch_note:
        r.md += ["", torch_note]
    return summaries, best


def workload_section(r, cores, dl, tdl, rows, wl):
    by = {(x["loader"], x["workers"]): x for x in rows}
    ws = sorted({x["workers"] for x in rows if x["workers"] > 0})
    present = [(k, short) for k, short in LOADERS if any(x["loader"] == k for x in rows)]
    r.md += ["", "### Workload `%s`" % wl, "",
             (lambda t: t[0].upper() + t[1:])(WORKLOAD_TEXT.get(wl, wl) % {"work": dl["work"]})
             + "."]
    cost = (dl.get("per_sample_s") or {}).get(wl)
    tcost = ((tdl or {}).get("per_sample_s") or {}).get(wl)
    if cost is not None:
        r.md += ["", "One sample costs %s of CPU on one thread without a loader on Python %s (GIL "
                 "%s)%s: that is the interpreter's speed, before any parallelism."
                 % (us(cost), dl.get("python"), "on" if dl.get("gil") else "off",
                    ", %s on Python %s (GIL %s, torch's interpreter): %s" % (
                        us(tcost), tdl.get("python"), "on" if tdl.get("gil") else "off",
                        "the free-threaded interpreter is %.2fx slower per sample" % (cost / tcost)
                        if cost > tcost else "the free-threaded interpreter is %.2fx faster per "
                        "sample" % (tcost / cost)) if tcost else "")]
        if tcost and cost > 1.2 * tcost:
            r.md += ["", "So with both loaders scaling perfectly at the same worker count, "
                     "threadloom.DataLoader would load %.2fx torch's samples/s on this workload: "
                     "threads beat processes here only where the processes lose more than that to "
                     "start-up, pickling and idle workers." % (tcost / cost)]
    sizes = sorted({(x.get("batch_type"), x.get("batch_nbytes")) for x in rows
                    if x.get("batch_nbytes") is not None})
    if sizes:
        nbytes = sorted({n for _, n in sizes})
        r.md += ["", "First batch handed over: %s (%s)." % (
            ", ".join("%s %d bytes" % (t, n) for t, n in sizes),
            "the same bytes from every loader" if len(nbytes) == 1 else
            "NOT the same size: the loaders do not collate the same output")]
    r.md += [""]
    tl = "threadloom.DataLoader (replicas)"
    base_cols = [(k, s) for k, s in present if not k.startswith("threadloom")]

    def val(k, w, f="samples_per_s"):
        x = by.get((k, w))
        return None if x is None else x[f]

    # the 0-worker rows (in the loop) go in the columns of threadloom's default and of torch
    zero = {tl: by.get(("threadloom.DataLoader num_workers=0", 0)),
            "torch DataLoader": by.get(("torch DataLoader", 0))}

    def row_at(k, w):
        return zero.get(k) if w == 0 else by.get((k, w))

    def runs(k, w):
        x = row_at(k, w)
        return None if x is None else x.get("runs_samples_per_s")

    def rate(k, w):
        x = row_at(k, w)
        return None if x is None else x["samples_per_s"]

    hdr = ["workers"] + [s for _, s in present] + ["tl / %s" % s for _, s in base_cols]
    body = []
    points = ([0] if any(zero.values()) else []) + ws
    for w in points:
        body.append(["0 (in the loop)" if w == 0 else w]
                    + [best_cell(rate(k, w), runs(k, w), num) if rate(k, w) is not None else "-"
                       for k, _ in present]
                    + [flagged_ratio(ratio(rate(tl, w), rate(k, w)), runs(tl, w), runs(k, w))
                       if rate(tl, w) is not None and rate(k, w) is not None else "-"
                       for k, _ in base_cols])
    r.md += table(hdr, body)
    spread_note(r, dl.get("reps"))
    r.md += ["", "Time to the first batch (in this warm process; the fresh-process measurement is "
             "in its own section):", ""]
    r.md += table(["workers"] + [s for _, s in present],
                  [[w] + [ms(val(k, w, "first_batch_s")) for k, _ in present] for w in ws])
    series = throughput_series(present, points, rate, runs)
    w = at_cores(ws, cores)
    best_w = max((x for x in ws if val(tl, x) is not None), key=lambda x: val(tl, x), default=None)
    text = []
    if val(tl, w) is not None:
        cmp_ = ", ".join("%s %s" % (ratio(val(tl, w), val(k, w)), s) for k, s in base_cols
                         if val(k, w) is not None)
        text.append("At %d worker%s (this machine has %d cores) threadloom.DataLoader loads %s "
                    "samples/s: %s." % (w, "s" if w > 1 else "", cores, num(val(tl, w)), cmp_))
    if best_w is not None and ws[-1] > cores:
        text.append("Its best is %s samples/s at %d worker%s; past %d workers there are no "
                    "more cores to use, so the points beyond show oversubscription and noise, "
                    "not scaling." % (num(val(tl, best_w)), best_w, "s" if best_w > 1 else "",
                                      cores))
    # best against best: any threadloom.DataLoader configuration (num_workers=0 included) vs
    # torch's best num_workers (0 included), as issue #6 states its goal
    tlbest = max((x for x in rows if x["loader"].startswith("threadloom.DataLoader")),
                 key=lambda x: x["samples_per_s"], default=None)
    tbest = max((x for x in rows if x["loader"] == "torch DataLoader"),
                key=lambda x: x["samples_per_s"], default=None)
    if tlbest is not None and tbest is not None:
        text.append("Best against best: %s%s, %s samples/s; torch DataLoader, %d "
                    "workers, %s: %s (issue #6's goal: >= 1.5x at 16 cores)."
                    % (tlbest["loader"], "" if tlbest["workers"] == 0 else
                       ", %d workers" % tlbest["workers"], num(tlbest["samples_per_s"]),
                       tbest["workers"], num(tbest["samples_per_s"]),
                       ratio(tlbest["samples_per_s"], tbest["samples_per_s"])))
    sh, others = "threadloom.DataLoader replicate='share'", (
        "threadloom.DataLoader (replicas)", "threadloom.DataLoader replicate=None")
    if val(sh, w) is not None and all(val(k, w) is not None for k in others):
        top = max(val(k, w) for k in others)
        text.append("With replicate='share' (the dataset made immortal once) %s samples/s at %d "
                    "workers, %s of the better of replicas and replicate=None (issue #19's goal: "
                    ">= 1x: %s)." % (num(val(sh, w)), w, ratio(val(sh, w), top),
                                     "met" if val(sh, w) >= top else "NOT met"))
    mp = "multiprocessing.Pool (spawn)"
    if val(tl, w, "first_batch_s") is not None and val(mp, w, "first_batch_s") is not None:
        text.append("The first batch comes after %s with threads vs %s with spawned processes "
                    "(which start an interpreter and import first)."
                    % (ms(val(tl, w, "first_batch_s")), ms(val(mp, w, "first_batch_s"))))
    r.md += ["", " ".join(text)]
    r.svg("dataloader_%s.svg" % wl, line_chart(
        "Loader throughput vs workers (workload: %s)" % wl, "workers", "samples/s", series,
        log_x=True, x_ticks=[ZERO_X if w == 0 else w for w in points],
        x_tick_labels={ZERO_X: "0 (loop)"}, mark_x=(cores, "%d cores" % cores),
        note=None if tdl and "rows" in tdl else "torch DataLoader: not run here (see the report)"),
        "loader throughput vs workers, %s" % wl)
    if val(tl, w) is None:
        return None
    tl_best = (tlbest["samples_per_s"], tlbest["workers"]) if tlbest else None
    t_best = (tbest["samples_per_s"], tbest["workers"]) if tbest else None
    base = ("torch DataLoader", "torch DataLoader") if val("torch DataLoader", w) is not None \
        else (mp, "multiprocessing.Pool")
    if val(base[0], w) is None:
        return None
    return (("DataLoader (%s)" % wl, "%s samples/s" % num(val(tl, w)), "%s %s"
             % (base[1], num(val(base[0], w))), ratio(val(tl, w), val(base[0], w)),
             "%d workers" % w), (tl_best, t_best))


ZERO_X = 0.5  # where a log x axis of workers draws the 0-worker point (labelled "0 (loop)")


def throughput_series(present, points, rate, runs):
    """The throughput plot's lines: every point the table (and so the ratios) uses, the
    0-worker one (in the loop) at ZERO_X, with error bars over each point's runs."""
    series = []
    for i, (k, s) in enumerate(present):
        ws = [w for w in points if rate(k, w) is not None]
        if ws:
            series.append(Series(s, [(ZERO_X if w == 0 else w, rate(k, w)) for w in ws],
                                 color=PALETTE[i], dash="" if k.startswith("threadloom") else "7,4",
                                 errors=[error_bar(runs(k, w)) for w in ws]))
    return series


FIRST = ["threadloom.DataLoader replicate=None", "threadloom.DataLoader (replicas)",
         "torch DataLoader (fork)", "torch DataLoader (spawn)", "multiprocessing.Pool (fork)",
         "multiprocessing.Pool (spawn)", "threadloom.DataLoader replicate='share'"]
MEM = ["threadloom.DataLoader replicate=None", "threadloom.DataLoader (replicas)",
       "torch DataLoader (fork)", "torch DataLoader (spawn)", "multiprocessing.Pool (fork)",
       "threadloom.DataLoader replicate='share'"]
TL_SHARED, TL_COPY, TORCH_FORK = FIRST[0], FIRST[1], FIRST[2]
TL_SHARE = FIRST[-1]
SHORT = {TL_SHARED: "threadloom, shared dataset", TL_COPY: "threadloom, replicas",
         TL_SHARE: "threadloom, shared immortal"}


def mib(v):
    return "-" if v is None else "%.1f MiB" % (v / 2**20)


def footprint_rows(r, fp, title, key, what):
    """Starts a footprint section; its rows, or None (the section says why) when
    footprint.json is missing or every child failed."""
    r.md += ["", "## " + title, ""]
    if fp is None:
        r.missing("footprint")
        return None
    rows = fp[key]
    if not rows:
        r.md += ["No %s rows in footprint.json: every child failed (footprint.txt says why)."
                 % what]
    return rows or None


def section_first_batch(r, cores, fp):
    """Fresh-process first-batch table + plot; returns (summary line or None, goal rows)."""
    rows = footprint_rows(r, fp, "DataLoader: time to first batch, fresh process", "first",
                          "first-batch")
    if not rows:
        return None, []
    by = {(x["loader"], x["workers"]): x["first_batch_s"] for x in rows}
    runs = {(x["loader"], x["workers"]): x.get("all_s") for x in rows}
    ws = sorted({x["workers"] for x in rows})
    present = [k for k in FIRST if any(x["loader"] == k for x in rows)]
    r.md += ["Seconds from constructing the loader to the first batch in hand, worker start-up "
             "included, each measurement in a new interpreter process (the loader's module "
             "imported before the clock starts; threadloom's arena is set up at its first use, "
             "inside the measurement), best of %d; workload `python`, %d samples, "
             "batches of %d (lower is better). The ratios are threadloom.DataLoader over torch's "
             "DataLoader with its default start method here (fork); issue #6's goal is <= 0.20x "
             "with 8+ workers." % (fp["reps"], fp["first_samples"], fp["batch"]), ""]
    cols = [k for k in (TL_SHARED, TL_COPY) if k in present]
    hdr = ["workers"] + present + ["%s / torch (fork)" % ("tl shared" if k == TL_SHARED else
                                                         "tl replicas") for k in cols]
    r.md += table(hdr, [[w] + [best_cell(by.get((k, w)), runs.get((k, w)), ms, higher=False)
                               for k in present]
                        + [flagged_ratio(ratio(by.get((k, w)), by.get((TORCH_FORK, w))),
                                         runs.get((k, w)), runs.get((TORCH_FORK, w)))
                           for k in cols]
                        for w in ws])
    spread_note(r, fp.get("reps"))
    if fp.get("torch_skipped"):
        r.md += ["", "torch DataLoader: left out: %s." % fp["torch_skipped"]]
    series = [Series(k, [(w, by[k, w] * 1e3) for w in ws if by.get((k, w))], PALETTE[i],
                     "" if k.startswith("threadloom") else "7,4",
                     errors=[error_bar(runs.get((k, w)), 1e3) for w in ws if by.get((k, w))])
              for i, k in enumerate(present)]
    r.svg("first_batch.svg", line_chart(
        "Time to first batch, fresh process", "workers", "milliseconds", series, log_x=True,
        log_y=True, x_ticks=ws, note="solid: threadloom threads; dashed: worker processes"),
        "time to first batch vs workers")
    w = max(ws)
    goals, summary = [], None
    for k in cols:
        if by.get((k, w)) and by.get((TORCH_FORK, w)):
            q = by[k, w] / by[TORCH_FORK, w]
            goals.append(("first batch, %d workers (%s)" % (w, SHORT[k]),
                          "<= 0.20x torch (fork), 8+ workers",
                          "%.2fx (%s vs %s)" % (q, ms(by[k, w]), ms(by[TORCH_FORK, w])),
                          "n/a (fewer than 8 workers)" if w < 8 else
                          "met" if q <= 0.2 else "NOT met"))
    if by.get((TL_SHARE, w)) and by.get((TL_SHARED, w)):
        goals.append(("first batch, %d workers (%s)" % (w, SHORT[TL_SHARE]),
                      "<= replicate=None (issue #19)", "%s vs %s" % (ms(by[TL_SHARE, w]),
                                                                     ms(by[TL_SHARED, w])),
                      "met" if by[TL_SHARE, w] <= by[TL_SHARED, w] else "NOT met"))
    if by.get((TL_COPY, w)) and by.get((TORCH_FORK, w)):
        summary = ("First batch (fresh process)", ms(by[TL_COPY, w]), "torch (fork) %s"
                   % ms(by[TORCH_FORK, w]), ratio(by[TL_COPY, w], by[TORCH_FORK, w]),
                   "%d workers, lower is better" % w)
    return summary, goals


def section_memory(r, cores, fp):
    """Peak total memory table + plot; returns (summary lines, goal rows)."""
    rows = footprint_rows(r, fp, "DataLoader: total memory of all processes", "memory",
                          "memory")
    if not rows:
        return [], []
    present = [k for k in MEM if any(x["loader"] == k for x in rows)]
    ws = sorted({x["workers"] for x in rows})
    by = {(x["loader"], x["workers"]): x for x in rows}
    r.md += ["One epoch over a dataset holding %s small Python objects in a list (tuples of an "
             "int, a str and a float; every sample reads 100 of them spread over the whole list, "
             "as a shuffled epoch does). Peak total PSS and RSS of the loader's process and every "
             "process below it (workers, multiprocessing's helpers), sampled from "
             "/proc/PID/smaps_rollup every %.0f ms by a separate process, and once after the "
             "last batch with the workers still alive (lower is better). PSS splits shared pages "
             "between the processes sharing them, so the sum is the tree's real total (shared "
             "libraries' pages are also split with other processes on the machine that map them, "
             "e.g. another torch program); RSS counts a shared page in each process. \"Before\" is "
             "the main process with the dataset built and the loader's module imported, before "
             "the loader: torch's own import is most of it. Ratios: threadloom over torch "
             "DataLoader (fork); issue #6's goal (total resident memory) is <= 0.33x, judged "
             "here on PSS."
             % (num(fp["records"]), fp["interval_s"] * 1e3), ""]
    body = []
    for w in ws:
        for k in present:
            x = by.get((k, w))
            if x is None:
                continue
            t = by.get((TORCH_FORK, w))
            tl_row = t and k.startswith("threadloom")
            body.append([w, k, x["procs"], mib(x["peak_pss"]), mib(x["peak_rss"]),
                         mib(x["dataset_pss"]), mib(x["peak_pss"] - x["dataset_pss"]),
                         ratio(x["peak_pss"], t["peak_pss"]) if tl_row else "",
                         ratio(x["peak_rss"], t["peak_rss"]) if tl_row else "",
                         "%.2f s" % x["epoch_s"]])
    r.md += table(["workers", "loader", "processes", "peak PSS", "peak RSS", "before (PSS)",
                   "added by the loader (PSS)", "PSS / torch (fork)", "RSS / torch (fork)",
                   "epoch"], body)
    r.md += ["", "The epoch column is the child's time from constructing the loader to the last "
             "batch, start-up included: threadloom's replicas deep-copy the dataset once per "
             "worker thread before its first sample, and torch's spawned workers unpickle it."]
    if fp.get("torch_skipped"):
        r.md += ["", "torch DataLoader: left out: %s." % fp["torch_skipped"]]
    series = [Series(k, [(w, by[k, w]["peak_pss"] / 2**20) for w in ws if (k, w) in by],
                     PALETTE[i], "" if k.startswith("threadloom") else "7,4")
              for i, k in enumerate(present)]
    r.svg("memory.svg", line_chart(
        "Peak total PSS of all the loader's processes", "workers", "MiB", series, log_x=True,
        x_ticks=ws, note="solid: threadloom (one process); dashed: worker processes"),
        "peak total PSS vs workers")
    w = max(ws)
    goals = []
    t = by.get((TORCH_FORK, w))
    for k in (TL_SHARED, TL_COPY):
        x = by.get((k, w))
        if x and t:
            q = x["peak_pss"] / t["peak_pss"]
            goals.append(("total memory, %d workers (%s)" % (w, SHORT[k]), "<= 0.33x torch (fork)",
                          "%.2fx PSS (%s vs %s), %s RSS" % (q, mib(x["peak_pss"]),
                                                           mib(t["peak_pss"]),
                                                           ratio(x["peak_rss"], t["peak_rss"])),
                          "met" if q <= 1 / 3 else "NOT met"))
    x, y = by.get((TL_SHARED, w)), by.get((TL_SHARE, w))
    if x and y:
        goals.append(("total memory, %d workers (%s)" % (w, SHORT[TL_SHARE]),
                      "<= replicate=None + 5% (issue #19)",
                      "%s vs %s PSS" % (mib(y["peak_pss"]), mib(x["peak_pss"])),
                      "met" if y["peak_pss"] <= 1.05 * x["peak_pss"] else "NOT met"))
    if x and t:
        added = (x["peak_pss"] - x["dataset_pss"], t["peak_pss"] - t["dataset_pss"])
        r.md += ["", "At %d workers: threadloom (shared dataset) %s PSS in one process vs torch "
                 "(fork) %s in %d processes, %s. Of that, the loaders themselves added %s "
                 "(threadloom) and %s (torch: the workers' copies of the pages they read); the "
                 "rest is each interpreter with its imports and the dataset (3.13t's objects are "
                 "larger than 3.11's)." % (w, mib(x["peak_pss"]), mib(t["peak_pss"]), t["procs"],
                                           ratio(x["peak_pss"], t["peak_pss"]), mib(added[0]),
                                           mib(added[1]))]
        c = by.get((TL_COPY, w))
        if c:
            r.md += ["", "On this dataset threadloom's default replicas (replicate=\"copy\": one "
                     "deepcopy of the dataset per worker thread) hand over the first batch after "
                     "%s at %d workers, vs %s sharing the dataset and %s for torch (fork)."
                     % (ms(c["first_batch_s"]), w, ms(x["first_batch_s"]),
                        ms(t["first_batch_s"]))]
    return memory_summary(by, w, fp), goals


def memory_summary(by, w, fp):
    """The memory section's summary lines at `w` workers: threadloom's default (replicas) first,
    replicate=None labelled as not the default, and the default's first batch on this dataset
    (the deep copies are made before each worker's first sample)."""
    t, c, x = by.get((TORCH_FORK, w)), by.get((TL_COPY, w)), by.get((TL_SHARED, w))
    if t is None:
        return []
    at = "%d workers, lower is better" % w
    out = []
    if c:
        out.append(("Memory (peak total PSS), default replicas", mib(c["peak_pss"]),
                    "torch (fork) %s" % mib(t["peak_pss"]), ratio(c["peak_pss"], t["peak_pss"]),
                    at))
    if x:
        out.append(("Memory (peak total PSS), replicate=None: **not the default**",
                    mib(x["peak_pss"]), "torch (fork) %s" % mib(t["peak_pss"]),
                    ratio(x["peak_pss"], t["peak_pss"]), at))
    if c:
        out.append(("First batch, %s-record dataset, default replicas" % num(fp["records"]),
                    ms(c["first_batch_s"]), "torch (fork) %s" % ms(t["first_batch_s"]),
                    ratio(c["first_batch_s"], t["first_batch_s"]), at))
    return out


VTL, VTORCH = "threadloom.DataLoader", "torch DataLoader"


def section_vision(r, cores):
    """bench_vision.py: the vision pipeline, threadloom's threads against torch's worker
    processes; its table, plot, goals (issue #18) and where threads win. Returns summary lines."""
    v = r.section("Vision pipeline: JPEG decode, crop, flip, normalize (issue #18)", "vision")
    if v is None:
        return []
    it = v.get("interpreters", {})
    tl_i, t_i = it.get(VTL, {}), it.get(VTORCH)
    r.md += ["examples/vision_pipeline.py's dataset: %d JPEGs of %dx%d written at the start of the "
             "run, decoded with Pillow, a random %dx%d crop and a flip seeded per sample, "
             "normalized with numpy; batches of %d as torch tensors [float32 (B, 3, %d, %d), int64 "
             "(B,)]. threadloom.DataLoader (worker threads, default replicate) on Python %s (GIL "
             "%s) against torch's DataLoader (worker processes, fork) on %s, the same code on the "
             "same files, each loader in its own process with torch imported, the two "
             "alternating; %d samples per epoch, worker start-up included, best of %d rounds."
             % (v["images"], v["image_size"][0], v["image_size"][1], v["crop"], v["crop"],
                v["batch"], v["crop"], v["crop"], tl_i.get("python", "?"),
                "on" if tl_i.get("gil") else "off",
                "Python %s (GIL %s), torch %s" % (t_i["python"], "on" if t_i["gil"] else "off",
                                                   t_i["torch"]) if t_i else "**not run**: %s"
                % v.get("torch_skipped", "no torch rows"), v["samples"], v["reps"])]
    cost = v.get("per_sample_s", {})
    if cost.get(VTL) and cost.get(VTORCH):
        faults = v.get("faults_per_sample") or {}
        r.md += ["", "One sample costs %s of CPU on one thread without a loader on the "
                 "free-threaded interpreter, %s on torch's: %.2fx%s." % (
                     us(cost[VTL]), us(cost[VTORCH]), cost[VTL] / cost[VTORCH],
                     " (%.0f vs %.0f minor page faults per sample)" % (faults[VTL], faults[VTORCH])
                     if faults.get(VTL) is not None and faults.get(VTORCH) is not None else "")]
    if "same_batches" in v:
        d = v["digests"][VTL]
        r.md += ["", "Same batches: %s (sha256 of every batch of an epoch with %d workers, %d "
                 "batches: %s)." % ("yes, the two loaders delivered the same bytes"
                                     if v["same_batches"] else "**NO: the loaders delivered "
                                     "different batches, so the numbers below do not compare**",
                                     v["digest_workers"], d["batches"],
                                     "%s..." % d["sha256"][:16] if v["same_batches"] else
                                     "%s... vs %s..." % (d["sha256"][:16],
                                                         v["digests"][VTORCH]["sha256"][:16]))]
    by = {(x["loader"], x["workers"]): x for x in v["rows"]}
    loaders = [k for k in (VTL, VTORCH) if any(x["loader"] == k for x in v["rows"])]
    points = sorted({x["workers"] for x in v["rows"]})

    def rate(k, w):
        x = by.get((k, w))
        return None if x is None else x["samples_per_s"]

    def runs(k, w):
        x = by.get((k, w))
        return None if x is None else x.get("runs_samples_per_s")

    r.md += [""]
    r.md += table(["workers"] + loaders + (["tl / torch"] if len(loaders) == 2 else []),
                  [["0 (in the loop)" if w == 0 else w]
                   + [best_cell(rate(k, w), runs(k, w), num) if rate(k, w) else "-"
                      for k in loaders]
                   + ([flagged_ratio(ratio(rate(VTL, w), rate(VTORCH, w)), runs(VTL, w),
                                     runs(VTORCH, w))] if len(loaders) == 2 else [])
                   for w in points])
    spread_note(r, v["reps"])
    r.svg("vision.svg", line_chart(
        "Vision pipeline: samples/s vs workers", "workers", "samples/s",
        throughput_series([(k, k) for k in loaders], points, rate, runs), log_x=True,
        x_ticks=[ZERO_X if w == 0 else w for w in points], x_tick_labels={ZERO_X: "0 (loop)"},
        mark_x=(cores, "%d cores" % cores),
        note="solid: threadloom threads (free-threaded); dashed: torch worker processes (GIL)"),
        "vision pipeline samples/s vs workers")
    if len(loaders) < 2:
        return []
    tb = max(points, key=lambda w: rate(VTL, w))
    wb = max(points, key=lambda w: rate(VTORCH, w))
    fw = v.get("footprint_workers", wb)
    first = {x["loader"]: x for x in v.get("first", [])}
    mem = {x["loader"]: x for x in v.get("memory", [])}
    if first:
        r.md += ["", "First batch in a fresh process and peak total memory of the loader's "
                 "processes over one epoch, at %d workers (torch's best num_workers%s):" % (
                     fw, "" if fw == wb else " with workers: its best overall is 0, in the loop"),
                 ""]
        body = []
        for k in loaders:
            f, m = first.get(k), mem.get(k)
            body.append([k, best_cell(f["first_batch_s"], f.get("all_s"), ms, higher=False)
                         if f else "-", m["procs"] if m else "-",
                         mib(m["peak_pss"]) if m else "-", mib(m["peak_rss"]) if m else "-",
                         mib(m["before_pss"]) if m else "-",
                         mib(m["peak_pss"] - m["before_pss"]) if m else "-"])
        r.md += table(["loader", "first batch", "processes", "peak PSS", "peak RSS",
                       "before the loader (PSS)", "added by the loader (PSS)"], body)
    goals, summary = [], []
    q = rate(VTL, tb) / rate(VTORCH, wb)
    goals.append(["throughput (best vs best)", ">= 1.5x torch",
                  "%.2fx (%s at %d vs %s at %d workers)" % (q, num(rate(VTL, tb)), tb,
                                                           num(rate(VTORCH, wb)), wb),
                  flagged_ratio("met" if q >= 1.5 else "NOT met", runs(VTL, tb), runs(VTORCH, wb))])
    summary.append(("Vision pipeline (best vs best)", "%s samples/s" % num(rate(VTL, tb)),
                    "torch DataLoader %s" % num(rate(VTORCH, wb)),
                    flagged_ratio("%.2fx" % q, runs(VTL, tb), runs(VTORCH, wb)),
                    "%d vs %d workers" % (tb, wb)))
    if VTL in first and VTORCH in first:
        a, b = first[VTL], first[VTORCH]
        qf = a["first_batch_s"] / b["first_batch_s"]
        goals.append(["first batch, %d workers" % fw, "<= 0.20x torch",
                      "%.2fx (%s vs %s)" % (qf, ms(a["first_batch_s"]), ms(b["first_batch_s"])),
                      flagged_ratio("met" if qf <= 0.2 else "NOT met", a.get("all_s"),
                                    b.get("all_s"))])
        summary.append(("Vision first batch (fresh process)", ms(a["first_batch_s"]),
                        "torch %s" % ms(b["first_batch_s"]),
                        flagged_ratio("%.2fx" % qf, a.get("all_s"), b.get("all_s")),
                        "%d workers, lower is better" % fw))
    if VTL in mem and VTORCH in mem:
        a, b = mem[VTL], mem[VTORCH]
        qm = a["peak_pss"] / b["peak_pss"]
        goals.append(["total memory, %d workers" % fw, "<= 0.33x torch",
                      "%.2fx PSS (%s vs %s), %s RSS" % (qm, mib(a["peak_pss"]), mib(b["peak_pss"]),
                                                       ratio(a["peak_rss"], b["peak_rss"])),
                      "met" if qm <= 1 / 3 else "NOT met"])
        summary.append(("Vision memory (peak total PSS)", mib(a["peak_pss"]),
                        "torch %s" % mib(b["peak_pss"]), "%.2fx" % qm,
                        "%d workers, lower is better" % fw))
    r.md += ["", "Goals (issue #18, against torch's best num_workers on this machine, %d cores):"
             % cores, ""]
    r.md += table(["goal", "target", "this run", "here"], goals)
    r.md += ["", "**Where threads win, and why.** %s" % vision_why(v, rate, tb, wb, first, mem)]
    return summary


def vision_why(v, rate, tb, wb, first, mem):
    """The paragraph on where threads win and lose on the vision pipeline, from this run's
    numbers."""
    cost = v.get("per_sample_s", {})
    nbytes = next((x["batch_nbytes"] for x in v["rows"] if x.get("batch_nbytes")), None)
    out = ["Pillow's JPEG decoder and numpy's arithmetic release a GIL build's lock, so this is "
           "the fair fight: torch's worker processes already decode and normalize in parallel on "
           "a GIL interpreter, and threads win only what processes pay for besides the work."]
    if cost.get(VTL) and cost.get(VTORCH):
        q = cost[VTL] / cost[VTORCH]
        out.append("On one thread the work costs %s per sample on the free-threaded interpreter "
                   "and %s on torch's (%s)." % (
                       us(cost[VTL]), us(cost[VTORCH]), "about the same" if abs(q - 1) < 0.15
                       else "%.2fx %s on the free-threaded one" % (
                           q if q > 1 else 1 / q, "slower" if q > 1 else "faster")))
        faults = v.get("faults_per_sample") or {}
        fa, fb = faults.get(VTL), faults.get(VTORCH)
        if q > 1.15 and fa is not None and fb is not None and fa > 2 * fb + 20:
            out.append("That loop is not the interpreter's speed alone: it took %.0f minor page "
                       "faults per sample against %.0f, i.e. glibc's malloc handed each sample's "
                       "arrays freshly mapped pages (docs/design.md, \"Page faults in a sample "
                       "loop\"); the loaders' workers are measured below." % (fa, fb))
    if rate(VTL, 0) and rate(VTORCH, 0):
        out.append("In the loop (no workers) they load %s vs %s samples/s (%s)%s." % (
            num(rate(VTL, 0)), num(rate(VTORCH, 0)), ratio(rate(VTL, 0), rate(VTORCH, 0)),
            ": torch's default_collate stacks each batch with torch.stack on its intra-op threads "
            "(%s here, its default), which compete with the next decode for the same cores; "
            "threadloom's stacks with numpy.stack on the loading thread" % (
                v["interpreters"][VTORCH].get("intra_op_threads", "?"))
            if rate(VTL, 0) > 1.2 * rate(VTORCH, 0) and VTORCH in v.get("interpreters", {})
            else ""))
    out.append("With workers, each of torch's batches%s is collated in a worker process into "
               "shared memory and its handle pickled to the training process, after the workers "
               "are forked and started; threadloom's workers are threads that collate in the "
               "training process itself: no processes to start, no batch crossing a process "
               "boundary, one interpreter with one copy of its imports. Best against best: %s "
               "(%d vs %d workers)." % (
                   " (%.1f MiB)" % (nbytes / 2**20) if nbytes else "",
                   ratio(rate(VTL, tb), rate(VTORCH, wb)), tb, wb))
    fw = v.get("footprint_workers")
    if VTL in first and VTORCH in first:
        out.append("That start-up is the first batch: %s vs %s at %d workers."
                   % (ms(first[VTL]["first_batch_s"]), ms(first[VTORCH]["first_batch_s"]), fw))
    if VTL in mem and VTORCH in mem:
        a, b = mem[VTL], mem[VTORCH]
        out.append("The memory is mostly each interpreter with torch imported (%s before the "
                   "loader here vs %s for torch's process): the loaders added %s (threads) and %s "
                   "(%d processes)." % (mib(a["before_pss"]), mib(b["before_pss"]),
                                        mib(a["peak_pss"] - a["before_pss"]),
                                        mib(b["peak_pss"] - b["before_pss"]), b["procs"]))
    return " ".join(out)


def section_goals(r, cores, meta, best, goals):
    """Issue #6's DataLoader goals against this run's ratios."""
    r.md += ["", "## DataLoader goals (issue #6)", "",
             "The goals are stated for a 16-core machine with a GPU; this run had %d core%s%s, so "
             "a ratio here says where threadloom stands on this machine, not whether the goal is "
             "met where it is set." % (cores, "s" if cores > 1 else "",
                                       " and no GPU" if meta.get("gpu", "nogpu") == "nogpu"
                                       else ""), ""]
    body = []
    for wl, (tl, t) in sorted(best.items()):
        if tl and t:
            q = tl[0] / t[0]
            body.append(["throughput, workload %s (best vs best)" % wl, ">= 1.5x torch",
                         "%.2fx (%s at %d vs %s at %d workers)" % (q, num(tl[0]), tl[1], num(t[0]),
                                                                  t[1]),
                         "met" if q >= 1.5 else "NOT met"])
    body += [list(g) for g in goals]
    body.append(["H2D batches", ">= 90% of pinned bandwidth", "-",
                 "needs a GPU: not run" if meta.get("gpu", "nogpu") == "nogpu" else
                 "no h2d.json: not measured"])
    r.md += table(["goal", "target", "this run", "here"], body)


def section_executor(r, cores):
    ex = r.section("Executor: small Python tasks vs threads", "executor")
    if ex is None:
        return None
    r.md += ["Calls of about %.0f us of Python each through threadloom.Executor, "
             "concurrent.futures.ThreadPoolExecutor and multiprocessing.Pool (spawn), items/s "
             "(higher is better). `shared`: every call builds and walks a small list; `state`: "
             "every call draws from a per-thread random.Random. Best of %s runs per cell."
             % (ex["item_us"], ex.get("reps", 1))]
    summary = None
    for load_ in ("shared", "state"):
        rows = [x for x in ex["rows"] if x["load"] == load_]
        if not rows:
            continue
        r.md += ["", "Workload `%s`:" % load_, ""]
        def runs(x, k):
            return (x.get("runs") or {}).get(k)

        r.md += table(["workers", "threadloom", "ThreadPoolExecutor", "multiprocessing.Pool",
                       "tl / TPE", "tl / mp"],
                      [[x["workers"]] + [best_cell(x.get(k), runs(x, k), num) if x.get(k) else "-"
                                         for k in ("threadloom", "tpe", "mp")]
                       + [flagged_ratio(ratio(x["threadloom"], x["tpe"]), runs(x, "threadloom"),
                                        runs(x, "tpe")),
                          flagged_ratio(ratio(x["threadloom"], x.get("mp")), runs(x, "threadloom"),
                                        runs(x, "mp")) if x.get("mp") else "-"]
                       for x in rows])
        spread_note(r, ex.get("reps"))
        ws = [x["workers"] for x in rows]
        by = {x["workers"]: x for x in rows}

        def line(name, k, color, dash=""):
            return Series(name, [(w, by[w].get(k)) for w in ws], color, dash,
                          errors=[error_bar(runs(by[w], k)) for w in ws])

        series = [line("threadloom.Executor", "threadloom", PALETTE[0]),
                  line("ThreadPoolExecutor", "tpe", PALETTE[1], "7,4")]
        if any(by[w].get("mp") for w in ws):
            series.append(line("multiprocessing.Pool", "mp", PALETTE[3], "2,3"))
        w = at_cores(ws, cores)
        best = max(rows, key=lambda x: x["threadloom"])
        r.md += ["", "At %d workers threadloom.Executor runs %s items/s, %s ThreadPoolExecutor%s; "
                 "its best is %s items/s at %d worker%s.%s"
                 % (w, num(by[w]["threadloom"]), ratio(by[w]["threadloom"], by[w]["tpe"]),
                    ", %s multiprocessing.Pool" % ratio(by[w]["threadloom"], by[w]["mp"])
                    if by[w].get("mp") else "", num(best["threadloom"]), best["workers"],
                    "s" if best["workers"] > 1 else "",
                    " Past %d workers the machine's cores are oversubscribed." % cores
                    if ws[-1] > cores else "")]
        r.svg("executor_%s.svg" % load_, line_chart(
            "Executor throughput vs threads (workload: %s)" % load_, "workers", "items/s", series,
            log_x=True, x_ticks=ws, mark_x=(cores, "%d cores" % cores)),
            "executor throughput vs threads, %s" % load_)
        if summary is None:
            summary = ("Executor (%s)" % load_, "%s items/s" % num(by[w]["threadloom"]),
                       "ThreadPoolExecutor %s" % num(by[w]["tpe"]),
                       flagged_ratio(ratio(by[w]["threadloom"], by[w]["tpe"]),
                                     runs(by[w], "threadloom"), runs(by[w], "tpe")),
                       "%d workers" % w)
    return summary


def section_scheduler(r, cores):
    sc = r.section("Scheduler (C): empty tasks per second vs threads", "scheduler")
    if sc is None:
        return None
    r.md += ["tl-bench-scheduler: empty C tasks through the work-stealing pool vs the textbook "
             "pool (N pthreads sharing one FIFO queue under a mutex and a condition variable), "
             "best of %d. `tree`: every task spawns two children; `batch`: one root per worker "
             "spawns a batch; `inject`: one outside thread submits every task. Million tasks/s "
             "(higher is better)." % sc["reps"], ""]
    rows = sc["rows"]
    def runs(x, k):
        return (x.get("runs") or {}).get(k)

    def mtasks(v):
        return num(v / 1e6, 2)

    r.md += table(["shape", "workers", "threadloom", "mutex+condvar pool", "tl / baseline"],
                  [[x["shape"], x["workers"], best_cell(x["threadloom"], runs(x, "threadloom"), mtasks),
                    best_cell(x["baseline"], runs(x, "baseline"), mtasks),
                    flagged_ratio(ratio(x["threadloom"], x["baseline"]), runs(x, "threadloom"),
                                  runs(x, "baseline"))]
                   for x in rows])
    spread_note(r, sc.get("reps"))
    shapes = [s for s in ("tree", "batch", "inject") if any(x["shape"] == s for x in rows)]
    ws = sorted({x["workers"] for x in rows})
    by = {(x["shape"], x["workers"]): x for x in rows}
    series = []
    for i, s in enumerate(shapes):
        for k, name, dash in (("threadloom", "threadloom %s" % s, ""),
                              ("baseline", "baseline %s" % s, "7,4")):
            at = [w for w in ws if (s, w) in by]
            series.append(Series(name, [(w, by[s, w][k]) for w in at], PALETTE[i], dash,
                                 errors=[error_bar(runs(by[s, w], k)) for w in at]))
    w = at_cores(ws, cores)
    parts = ["%s %s" % (s, ratio(by[s, w]["threadloom"], by[s, w]["baseline"]))
             for s in shapes if (s, w) in by]
    slower = []
    for s in shapes:
        ns = [str(x["workers"]) for x in rows if x["shape"] == s and x["threadloom"] < x["baseline"]]
        if ns:
            slower.append("%s at %s worker%s" % (s, ", ".join(ns), "s" if ns != ["1"] else ""))
    r.md += ["", "At %d workers threadloom over the baseline: %s.%s" % (
        w, ", ".join(parts),
        " The baseline is faster for %s. Its single lock is never contended with one worker and "
        "by at most %d running threads here (both sides run the same 32-byte tasks, bound "
        "outside submits to 1024 queued, and count the tasks they ran)."
        % ("; ".join(slower), cores) if slower else "")]
    r.svg("scheduler.svg", line_chart(
        "C scheduler: empty tasks/s vs threads", "workers", "tasks/s", series, log_x=True,
        log_y=True, x_ticks=ws, mark_x=(cores, "%d cores" % cores),
        note="solid: threadloom pool; dashed: mutex+condvar FIFO pool"),
        "scheduler tasks/s vs threads")
    if ("tree", w) in by:
        x = by["tree", w]
        return ("Scheduler (C, tree)", "%s Mtasks/s" % num(x["threadloom"] / 1e6, 1),
                "mutex+condvar pool %s" % num(x["baseline"] / 1e6, 1),
                flagged_ratio(ratio(x["threadloom"], x["baseline"]), runs(x, "threadloom"),
                              runs(x, "baseline")), "%d workers" % w)
    return None


def section_checkpoint(r, cores):
    ck = r.section("Checkpoint: training stall vs state size", "checkpoint")
    if ck is None:
        return None
    summary = None
    sizes = ck.get("sizes") or []
    if sizes:
        summary = checkpoint_sizes(r, ck, sizes)
    else:
        r.md += ["No stall-vs-size sweep in checkpoint.json (an older bench_checkpoint.py)."]
    st = ck.get("stall")
    if st and "save_alone_s" in st:
        r.md += ["", "The stall against its goal (<= 1.2x the copy of the same bytes; on a GPU "
                 "machine the D2H copy, here a memcpy into faulted host memory), medians of %d "
                 "interleaved rounds, %d MiB: save() copies into staging on the calling thread "
                 "helped by %d idle I/O thread(s) (copy_threads; 0 = the calling thread alone):"
                 % (len(st["saves_s"]), ck["size_mib"], st["copy_threads"]), ""]
        r.md += table(["", "stall", "/ memcpy"],
                      [["save()", "%.3f s" % st["save_s"], ratio(st["save_s"], st["memcpy_s"])],
                       ["save(), copy_threads=0", "%.3f s" % st["save_alone_s"],
                        ratio(st["save_alone_s"], st["memcpy_s"])],
                       ["memcpy", "%.3f s" % st["memcpy_s"], "1.00x"]])
    if ck.get("bandwidth"):
        r.md += ["", "Save bandwidth of %d MiB, call to committed, vs a raw sequential write + "
                 "fsync of the same bytes (goal >= 90%%):" % ck["size_mib"], ""]
        def mbps(secs):  # each repeat's seconds -> MB/s
            return [ck["size_mib"] * 2**20 / t / 1e6 for t in secs or []]

        r.md += table(["staging", "Checkpointer MB/s", "raw write+fsync MB/s", "ratio"],
                      [[b["staging"], best_cell(b["ckpt_MBps"], mbps(b.get("ckpt_s")), num),
                        best_cell(b["raw_MBps"], mbps(b.get("raw_s")), num),
                        flagged_ratio("%.0f%%" % (100 * b["ratio"]), mbps(b.get("ckpt_s")),
                                      mbps(b.get("raw_s")))] for b in ck["bandwidth"]])
        spread_note(r, max(len(b.get("ckpt_s") or []) for b in ck["bandwidth"]))
    if ck.get("training"):
        t = ck["training"]
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        r.md += ["", "Throughput of %d Python training-loop threads while a save runs vs without "
                 "(goal >= 97%%): %s it/s vs %s it/s, %.0f%%. The writer needs CPU (copy, hash, "
                 "the kernel's page-cache copy): with as many loop threads as cores it takes "
                 "cycles from the loop%s."
                 % (t["threads"], num(med(t["with_save"])), num(med(t["without"])),
                    100 * t["ratio"], ", so this %d-core machine measures below the goal" % cores
                    if t["ratio"] < 0.97 and t["threads"] >= cores else "")]
    if ck.get("training_shapes"):
        r.md += ["", "The training loop in three shapes (saturated: a loop thread per core; "
                 "1 thread; gpu-like: one thread whose steps are half CPU work, half waiting, "
                 "calling save() itself), over the save's window and after save() returned, "
                 "with the CPU a save costs:", ""]
        r.md += table(["shape", "whole save", "after save() returned", "window s",
                       "saving thread CPU-s", "writers CPU-s"],
                      [[x["shape"], "%.0f%%" % (100 * x["ratio"]),
                        "%.0f%%" % (100 * x["background_ratio"]),
                        "%.2f" % sorted(x["window_s"])[len(x["window_s"]) // 2],
                        "%.3f" % sorted(x["caller_cpu_s"])[len(x["caller_cpu_s"]) // 2],
                        "%.3f" % sorted(x["writer_cpu_s"])[len(x["writer_cpu_s"]) // 2]]
                       for x in ck["training_shapes"]])
    return summary


def checkpoint_sizes(r, ck, sizes):
    """The stall-vs-size table and plot: save() against torch's async_save (the asynchronous
    anchor) and torch.save (or the torch.save-like stand-in of a run without torch), with the
    spread of the repeats. Returns the summary line."""
    sync = ck.get("sync_baseline") or "torch.save-like"
    sync_name = "torch.save" if sync.startswith("torch.save ") else sync
    anchor = all("async_save_stall_s" in x for x in sizes)
    if anchor:
        theirs = ("torch.distributed.checkpoint.async_save (torch's asynchronous checkpoint: it "
                  "stages the state and returns a future; a background thread writes and fsyncs; "
                  "on a one-rank gloo process group) and, synchronous on the training thread, %s "
                  "(which does not fsync) and the same + fsync" % sync)
    else:
        theirs = ("**no async_save** (%s), only a synchronous write on the training thread: %s"
                  % (ck.get("async_save_skipped") or "not measured by this bench_checkpoint.py",
                     sync))
        if sync == "torch.save-like":
            theirs += (" (a pickled header, then every tensor's bytes into one file, as "
                       "torch.save writes them; torch.save does not fsync)")
        theirs += " and the same + fsync"
    r.md += ["How long the training thread is blocked by a checkpoint of host tensors: "
             "threadloom's Checkpointer.save() (it copies into staging and returns; the write, "
             "hashing and fsync run in the background) against torch's own: %s, in the same run, "
             "interleaved in every repeat. Seconds (lower is better); memcpy of the same bytes is "
             "the floor; \"committed after\" is the time from the call to the checkpoint written "
             "and fsynced." % theirs, ""]

    def cell(x, k):
        return best_cell(x[k], (x.get("runs") or {}).get(k), lambda v: "%.3f s" % v, higher=False)

    def runs(x, k):
        return (x.get("runs") or {}).get(k)

    hdr = ["state", "save() stall"] + (["async_save stall"] if anchor else []) + [
        sync_name, "+ fsync", "memcpy"] + (["async_save / save()"] if anchor else []) + [
        "%s / save()" % sync_name, "save() committed after"] + (
        ["async_save committed after"] if anchor else [])
    body = []
    for x in sizes:
        row = ["%d MiB" % x["size_mib"], cell(x, "save_stall_s")]
        row += [cell(x, "async_save_stall_s")] if anchor else []
        row += [cell(x, "sync_write_s"), cell(x, "sync_write_fsync_s"), cell(x, "memcpy_s")]
        row += [flagged_ratio(ratio(x["async_save_stall_s"], x["save_stall_s"]),
                              runs(x, "async_save_stall_s"), runs(x, "save_stall_s"))] if anchor else []
        row += [flagged_ratio(ratio(x["sync_write_s"], x["save_stall_s"]),
                              runs(x, "sync_write_s"), runs(x, "save_stall_s")),
                cell(x, "save_commit_s")]
        row += [cell(x, "async_save_commit_s")] if anchor else []
        body.append(row)
    r.md += table(hdr, body)
    spread_note(r, max(len(runs(x, "save_stall_s") or []) for x in sizes))
    mibs = [x["size_mib"] for x in sizes]
    big = sizes[-1]
    r.md += ["", "At %d MiB save() blocks the training thread for %.3f s%s, %s less than %s "
             "(%.3f s, %.3f s with fsync) and %s a memcpy of the same bytes; the checkpoint is "
             "durable %.3f s after the call%s, while training runs."
             % (big["size_mib"], big["save_stall_s"],
                ", %s less than async_save (%.3f s)" % (
                    ratio(big["async_save_stall_s"], big["save_stall_s"]),
                    big["async_save_stall_s"]) if anchor else "",
                ratio(big["sync_write_s"], big["save_stall_s"]), sync_name, big["sync_write_s"],
                big["sync_write_fsync_s"], ratio(big["save_stall_s"], big["memcpy_s"]),
                big["save_commit_s"], " (async_save's: %.3f s)" % big["async_save_commit_s"]
                if anchor else "")]

    def msec(k, name, color, dash):
        return Series(name, [(m, x[k] * 1e3) for m, x in zip(mibs, sizes)], color, dash,
                      errors=[error_bar(runs(x, k), 1e3) for x in sizes])

    series = [msec("save_stall_s", "threadloom save() stall", PALETTE[0], "")]
    if anchor:
        series.append(msec("async_save_stall_s", "torch async_save stall", PALETTE[2], "7,4"))
    series += [msec("sync_write_s", "%s (no fsync)" % sync_name, PALETTE[1], "7,4"),
               msec("sync_write_fsync_s", "%s + fsync" % sync_name, PALETTE[3], "7,4"),
               msec("memcpy_s", "memcpy (floor)", PALETTE[7], "2,3")]
    r.svg("checkpoint_stall.svg", line_chart(
        "Checkpoint: training-thread stall vs state size", "state size (MiB)",
        "milliseconds blocked", series, log_x=True, log_y=True, x_ticks=mibs),
        "checkpoint stall vs state size")
    if anchor:
        return ("Checkpoint stall (%d MiB)" % big["size_mib"], "%.3f s" % big["save_stall_s"],
                "torch async_save %.3f s" % big["async_save_stall_s"],
                flagged_ratio(ratio(big["save_stall_s"], big["async_save_stall_s"]),
                              runs(big, "save_stall_s"), runs(big, "async_save_stall_s")),
                "lower is better")
    return ("Checkpoint stall (%d MiB)" % big["size_mib"], "%.3f s" % big["save_stall_s"],
            "%s %.3f s (no async_save in this run)" % (sync_name, big["sync_write_s"]),
            flagged_ratio(ratio(big["save_stall_s"], big["sync_write_s"]),
                          runs(big, "save_stall_s"), runs(big, "sync_write_s")), "lower is better")


def section_arena(r, cores):
    ar = r.section("Arena: allocation rate vs glibc malloc", "arena")
    if ar is None:
        return None
    rows = ar["rows"]
    cuda = any("cudaHostAlloc" in x for x in rows)
    rounds = all(x.get("arena_vs_glibc_rounds") for x in rows)
    r.md += ["tl-bench-arena: one operation allocates a block, writes one byte per 4 KiB page and "
             "frees a block; with `live` K each thread keeps its K newest blocks (K batches in "
             "flight). Operations/s over %.2f s per cell (higher is better), the arena vs glibc "
             "malloc%s%s. Arena: %s." % (
                 ar["duration_s"], " and cudaHostAlloc" if cuda else "",
                 "; each cell in %d rounds whose allocator order alternates: the medians of the "
                 "rounds, and the range of the rounds' arena / glibc ratios (a shared machine's "
                 "noise; %s marks a ratio whose rounds differ by more than %.1fx: not a result)"
                 % (len(rows[0]["arena_vs_glibc_rounds"]), FLAG, NOISY) if rounds else "",
                 ar.get("pin_detail") or "pinned"), ""]
    hdr = ["size", "live", "threads", "arena", "glibc", "arena / glibc"]
    if rounds:
        hdr += ["range"]
    if cuda:
        hdr += ["cudaHostAlloc", "arena / cuda"]
    body = []
    for x in rows:
        row = [size_label(x["size"]), x["live"], x["threads"], num(x["arena"]), num(x["glibc"]),
               vs_glibc(x)]
        if rounds:
            row += ["%.2f-%.2f" % (min(x["arena_vs_glibc_rounds"]),
                                   max(x["arena_vs_glibc_rounds"]))]
        if cuda:
            row += [num(x.get("cudaHostAlloc")), ratio(x["arena"], x.get("cudaHostAlloc"))]
        body.append(row)
    r.md += table(hdr, body)
    lives = sorted({x["live"] for x in rows})
    sizes = sorted({x["size"] for x in rows})
    ws = sorted({x["threads"] for x in rows})
    by = {(x["size"], x["live"], x["threads"]): x for x in rows}
    w = at_cores(ws, cores)
    summary = None
    for lv in lives:
        series = []
        for i, s in enumerate(sizes):
            pts = lambda k: [(t, by[s, lv, t].get(k)) for t in ws if (s, lv, t) in by]  # noqa: E731
            series.append(Series("arena %s" % size_label(s), pts("arena"), PALETTE[i]))
            series.append(Series("glibc %s" % size_label(s), pts("glibc"), PALETTE[i], "7,4"))
            if cuda:
                series.append(Series("cudaHostAlloc %s" % size_label(s), pts("cudaHostAlloc"),
                                     PALETTE[i], "2,3"))
        parts = ["%s %s" % (size_label(s), vs_glibc(by[s, lv, w]))
                 for s in sizes if (s, lv, w) in by]
        r.md += ["", "live %d, %d threads, arena over glibc: %s." % (lv, w, ", ".join(parts))]
        r.svg("arena_live%d.svg" % lv, line_chart(
            "Arena vs glibc: alloc+touch+free per second (live %d)" % lv, "threads",
            "operations/s", series, log_x=True, log_y=True, x_ticks=ws,
            mark_x=(cores, "%d cores" % cores),
            note="solid: threadloom arena; dashed: glibc malloc"), "arena rate vs threads, live %d" % lv)
        mid = sizes[len(sizes) // 2]
        if (mid, lv, w) in by and (summary is None or lv > 0):
            x = by[mid, lv, w]
            summary = ("Arena (%s, live %d)" % (size_label(mid), lv), "%s ops/s" % num(x["arena"]),
                       "glibc %s" % num(x["glibc"]), vs_glibc(x), "%d threads" % w)
    return summary


def vs_glibc(x):
    """arena / glibc of a row: the median of its rounds' ratios when it has rounds, flagged when
    the rounds disagree by more than NOISY (e.g. a 149.65x median of rounds from 20.93x to
    301.13x is noise, not a result)."""
    if x.get("arena_vs_glibc") is not None:
        return flagged_ratio("%.2fx" % x["arena_vs_glibc"], x.get("arena_vs_glibc_rounds"))
    return ratio(x["arena"], x["glibc"])


def section_startup(r, cores):
    st = r.section("Start-up: `threadloom run` vs `python3.13t`", "startup")
    if st is None:
        return None
    m = st["median_s"]
    r.md += ["Median wall time of running an empty script, %d runs each, alternating (goal: "
             "ratio <= 1.2)." % st["n"], ""]
    r.md += table(["threadloom run", "python3.13t", "ratio"],
                  [[ms(m["threadloom run"]), ms(m["python3.13t"]), "%.2fx" % st["ratio"]]])
    extra = (m["threadloom run"] - m["python3.13t"]) * 1e3
    r.md += ["", "%s: the goal is %s." % (
        "The launcher adds %.1f ms to the interpreter's start-up" % extra if extra >= 0 else
        "The launcher measured %.1f ms faster than the bare interpreter (run-to-run noise)"
        % -extra, "met" if st["ratio"] <= 1.2 else "NOT met")]
    return ("Start-up", ms(m["threadloom run"]), "python3.13t %s" % ms(m["python3.13t"]),
            "%.2fx" % st["ratio"], "lower is better")

def section_devices(r, name_py, name_c, title):
    """bench_devices.py (Python: submission rate, launch rate, feeder) and tl-bench-device (C:
    launch rate, caching allocator, the sim's timing) of one backend. Returns its summary lines."""
    py = r.section(title, name_py)
    c = load(r.d, name_c)
    if py is not None and py.get("skipped"):
        r.md += ["Not run: %s." % py["skipped"]]
        return []
    summary = None
    if py is not None and py.get("submit"):
        sub = {x["threads"]: x for x in py["submit"]}
        craw = {x["threads"]: x["per_thread"] for x in (c or {}).get("launch", {}).get("rows", [])}
        r.md += ["### Submission rate from Python threads", "",
                 "Stream.launch(0) calls per second per Python thread, each thread on its own "
                 "stream of %s%s. The raw C column is tl-bench-device's loop over the same C call "
                 "(device.json); per CPU second divides by each thread's own CPU time, which a "
                 "busy machine cannot take away (goals: >= 2M/s per thread, >= 1.8x at 2 threads)."
                 % (py["submit"][0]["device"], " with cost=0 (operations are free: this is "
                    "threadloom's own cost)" if py["backend"] == "sim" else ""), ""]
        r.md += table(["threads", "Python, per thread", "per CPU second", "raw C, per thread",
                       "Python / C", "load average"],
                      [[t, num(x["per_thread"]), num(x.get("per_thread_cpu")),
                        num(craw.get(t)), ratio(x["per_thread"], craw.get(t)),
                        "%.1f" % x.get("loadavg", 0)] for t, x in sorted(sub.items())])
        r.md += ["", "2 threads over 1: %.2fx wall clock, %.2fx per CPU second."
                 % (py["scaling_2"], py.get("scaling_2_cpu", 0))]
        series = [Series("Python threads", [(t, x["per_thread"]) for t, x in sorted(sub.items())],
                         PALETTE[0])]
        if craw:
            series.append(Series("raw C", sorted(craw.items()), PALETTE[1], "7,4"))
        r.svg(name_py + "_submit.svg", line_chart(
            "Submissions per second per thread (%s)" % py["backend"], "threads",
            "launches/s per thread", series, log_x=False, log_y=True, x_ticks=sorted(sub)),
            "launch rate vs threads")
        summary = ("Device submission (Python, %s)" % py["backend"],
                   "%s/s per thread" % num(sub[1]["per_thread"]),
                   "raw C %s" % num(craw.get(1)), ratio(sub[1]["per_thread"], craw.get(1)),
                   "1 thread")
    launch = section_launch_rate(r, name_py, py)
    if py is not None and py.get("feeder"):
        sim = py["backend"] == "sim"
        r.md += ["", "### The GPU feeder against the H2D engine", "",
                 "2 producer threads write batches straight into pinned staging slots "
                 "(feeder.stage/submit), a consumer's stream waits for each. %s Goal: >= 90%%."
                 % ("Utilization is the sim H2D engine's busy time over the run's wall time, with "
                    "the bandwidth modelled at half this host's measured memcpy speed (the engine "
                    "moves real bytes). Raw: back-to-back copies from one pinned slot."
                    if sim else "Against raw back-to-back pinned cudaMemcpyAsync from one slot."),
                 ""]
        hdr = ["batch", "feeder GB/s", "raw GB/s", "feeder / raw"]
        if sim:
            hdr += ["engine busy", "model GB/s", "host memcpy GB/s"]
        rows = []
        for x in py["feeder"]:
            row = ["%d MiB" % x["mib"], num(x["feeder_gbs"], 2), num(x["raw_gbs"], 2),
                   "%.1f%%" % (100 * x["vs_raw"])]
            if sim:
                row += ["%.1f%%" % (100 * x["utilization"]), num(x["model_gbs"], 2),
                        num(x["host_memcpy_gbs"], 1)]
            rows.append(row)
        r.md += table(hdr, rows)
    if c is not None and c.get("alloc"):
        r.md += ["", "### Caching device allocator (C)", "",
                 "tl_dbuf_alloc + tl_dbuf_free pairs per second per thread on %s, each thread on "
                 "its own stream, against the same pair with the cache emptied after each free "
                 "(every block from the device), one thread. Goal: >= 10M/s per thread." %
                 c["alloc"]["device"], ""]
        r.md += table(["size", "threads", "cached pairs/s per thread", "from the device",
                       "cached / device"],
                      [[size_label(x["size"]), x["threads"], num(x["cached_per_thread"]),
                        num(x["uncached"]) if x["uncached"] else "-",
                        ratio(x["cached_per_thread"], x["uncached"]) if x["uncached"] else "-"]
                       for x in c["alloc"]["rows"]])
    if c is not None and c.get("timing"):
        r.md += ["", "### The sim's timing precision", "",
                 "200 back-to-back 1 MiB pinned copies at the modelled bandwidth (wall time vs "
                 "the model, the engine's busy time, how late completions were observed), and "
                 "host round trips of a 100 us kernel; spin=0 sleeps to each deadline, spin=50us "
                 "busy-waits its last 50 us.", ""]
        r.md += table(["spin", "model GB/s", "wall", "modelled", "error", "busy",
                       "late (mean / max)", "100 us kernel round trip"],
                      [[x["spin"], num(x["model_h2d_gbs"], 2), "%.2f ms" % x["wall_ms"],
                        "%.2f ms" % x["model_ms"], "%+.2f%%" % (100 * (x["wall_ms"] / x["model_ms"] - 1)),
                        "%.2f ms" % x["busy_ms"], "%.1f / %.1f us" % (x["late_mean_us"], x["late_max_us"]),
                        "%.1f us" % x["roundtrip_us"]] for x in c["timing"]])
    return [summary] + launch


def section_launch_rate(r, name_py, py):
    """bench_devices.py's launch section: Python threads on separate devices against the raw C
    loop, without and with loader threads. Returns the summary lines."""
    if py is None or not py.get("launch"):
        return []
    cases = py["launch"]
    sim = py["backend"] == "sim"
    r.md += ["", "### Launch rate from Python threads on separate devices", "",
             "Kernels launched per second by 1..8 threads, thread k on %s, each pinned to its "
             "launch core of the placement plan; threadloom is `Stream.launch()` from Python "
             "threads, the baseline the raw C loop (bench/launch-loop.c: `tl_kernel_async` back "
             "to back) from threads pinned the same way in the same process. \"with loaders\": "
             "%d loader threads (2 per device) tokenize text in Python meanwhile, pinned to the "
             "plan's loader slots (on a machine with too few cores they share the launch cores: "
             "the table says how many did). Totals over all threads, best of alternating rounds; "
             "per CPU second divides by each thread's own CPU time. Goal: Python >= 50%% of raw "
             "C at 8 threads, with and without loaders."
             % ("device k mod 8 of sim:8" if sim else "a stream of %s" % cases[0]["device"]
                if cases[0]["devices"] == 1 else "GPU k mod %d" % cases[0]["devices"],
                cases[0]["loader_threads"] or 16), ""]
    if sim:
        r.md += ["On sim two device models: **overhead** (cost=0: a launch costs nothing but "
                 "threadloom's own path, so Python against C shows that path's cost per launch), "
                 "and **%s** (each launch also spends that much of its thread's CPU time, as a "
                 "driver's launch path does: the rate against a GPU that keeps up with its "
                 "launches). The goal is the modelled launch's." % next(
                     (c["model"] for c in cases if c["model"] != "overhead"), "launch"), ""]
    rows = []
    for c in cases:
        for x in c["rows"]:
            rows.append([c["model"], "%d (%d on launch cores)" % (c["loader_threads"],
                                                                   c["loader_slots_on_launch_cores"])
                         if c["loaders_per_device"] else "none", x["threads"],
                         best_cell(x["python"]["total"], (x.get("runs") or {}).get("python"), num),
                         best_cell(x["c"]["total"], (x.get("runs") or {}).get("c"), num),
                         "%.1f%%" % (100 * x["ratio"]), "%.1f%%" % (100 * x["ratio_cpu"])])
    r.md += table(["device", "loader threads", "threads", "Python launches/s", "raw C launches/s",
                   "Python / C", "per CPU second"], rows)
    spread_note(r, max((len((x.get("runs") or {}).get("python") or []) for c in cases
                        for x in c["rows"]), default=0))
    busiest = max(x["threads"] for x in cases[0]["rows"]) + max(c["loader_threads"] for c in cases)
    if cases[0].get("cores", busiest) < busiest:
        r.md += ["", "This machine has %d cores for up to %d busy threads: the wall-clock ratios "
                 "swing with how the scheduler shares them between rounds; the per-CPU-second "
                 "column is the steadier measure of threadloom's cost." % (cases[0]["cores"], busiest)]
    over = next((c for c in cases if c["model"] == "overhead" and not c["loaders_per_device"]), None)
    if over:
        x = over["rows"][0]
        r.md += ["", "threadloom's own cost per launch from one Python thread: %.0f ns of CPU "
                 "(raw C: %.0f ns)." % (1e9 / x["python"]["per_thread_cpu"],
                                         1e9 / x["c"]["per_thread_cpu"])]
    goal = [c for c in cases if c["model"] != "overhead"]
    series = []
    for i, c in enumerate(goal):
        tag = " (loaders busy)" if c["loaders_per_device"] else ""
        for k, name, color, dash in (("python", "Python threads", 2 * i, ""),
                                     ("c", "raw C", 2 * i + 1, "7,4")):
            series.append(Series(name + tag, [(x["threads"], x[k]["total"]) for x in c["rows"]],
                                 PALETTE[color % len(PALETTE)], dash,
                                 errors=[error_bar((x.get("runs") or {}).get(k))
                                         for x in c["rows"]]))
    if series:
        r.svg(name_py + "_launch.svg", line_chart(
            "Launches per second, all threads (%s)" % (goal[0]["model"] if sim else "cuda"),
            "threads", "launches/s", series, log_x=False, log_y=False,
            x_ticks=[x["threads"] for x in goal[0]["rows"]]), "launch rate vs threads")
    out = []
    for c in goal:
        top = c["rows"][-1]
        met = "met" if top["ratio"] >= 0.5 else "NOT met"
        r.md += ["", "At %d threads%s: Python %.1f%% of raw C (goal >= 50%%: %s)."
                 % (top["threads"], " with loader threads busy" if c["loaders_per_device"] else "",
                    100 * top["ratio"], met)]
        out.append(("Launch rate%s (%s)" % (", loaders busy" if c["loaders_per_device"] else "",
                                            c["model"]),
                    "%s/s" % num(top["python"]["total"]), "raw C %s/s" % num(top["c"]["total"]),
                    "%.2fx" % top["ratio"], "%d threads" % top["threads"]))
    return out


def met(ok):
    return "met" if ok else "NOT met"


def section_device_state(r, name, title):
    """bench_device_state.py: DataLoader(device=) against the H2D engine, and checkpoints of
    device state (the save() stall, a training loop during saves). Returns summary rows."""
    ds = r.section(title, name)
    if ds is None:
        return []
    if ds.get("skipped"):
        r.md += ["Not run: %s." % ds["skipped"]]
        return []
    sim = ds.get("backend") == "sim"
    rows = []
    lo = ds.get("loader")
    if lo:
        r.md += ["### DataLoader to the device", "",
                 "DataLoader(device=%s), 2 workers collating 2 MiB batches straight into the "
                 "feeder's pinned slots, a consumer taking each on its stream. %s" % (
                     lo["device"], "The H2D engine is modelled at %.0f%% of the slower of the "
                     "host path's rate and this host's memcpy, so the producer is faster than the "
                     "link; goal: the engine busy >= 90%% of the time."
                     % (100 * lo.get("link", 0.5))
                     if sim else "On a GPU the rate is against the link's."), ""]
        hdr = ["device GB/s", "host path GB/s"]
        row = [num(lo["device_gbs"], 2), num(lo["host_gbs"], 2)]
        if sim:
            hdr += ["model GB/s", "of the model", "H2D engine busy", "goal >= 90%"]
            row += [num(lo["model_gbs"], 2), "%.1f%%" % (100 * lo["vs_model"]),
                    "%.1f%%" % (100 * lo["utilization"]), met(lo["utilization"] >= 0.9)]
        hdr += ["next() per batch", "staging waits", "collated in place"]
        row += [us(lo["wait_per_batch_us"] / 1e6), num(lo["staging_waits"]),
                "%.0f%%" % (100 * lo["in_place_fraction"])]
        r.md += table(hdr, [row])
        if sim:
            rows.append(("DataLoader to the device (sim)",
                         "H2D busy %.1f%%" % (100 * lo["utilization"]), "goal 90%",
                         "%.2fx" % (lo["utilization"] / 0.9), "2 MiB batches"))
    st = ds.get("stall")
    if st:
        r.md += ["", "### Checkpoint of device state: the save() stall", "",
                 "save() of %d MiB of device state (4 DeviceBuffers) returns once its D2H copies "
                 "into pinned staging are queued; against the D2H copy of the same bytes on one "
                 "stream, waited for (medians of %d interleaved rounds%s). Goal: <= 1.2x." % (
                     st["state_mib"], len(st["stalls"]), ", D2H modelled at %.2f GB/s" %
                     st["model_gbs"] if sim else ""), ""]
        r.md += table(["save() stall", "D2H copy", "stall / copy", "goal <= 1.2x",
                       "save to committed"],
                      [[ms(st["stall_s"]), ms(st["copy_s"]), "%.2fx" % st["stall_vs_copy"],
                        met(st["stall_vs_copy"] <= 1.2), ms(st["save_s"])]])
        rows.append(("Device checkpoint stall (%s)" % ds["backend"], ms(st["stall_s"]),
                     "D2H copy %s" % ms(st["copy_s"]), "%.2fx" % st["stall_vs_copy"],
                     "%d MiB" % st["state_mib"]))
    tr = ds.get("training")
    if tr:
        r.md += ["", "### A training loop during device saves", "",
                 "Each step: a %.0f ms kernel and an in-place update of the state on the caller's "
                 "stream, at most %d steps queued; the %d MiB state saved every %.1f s (%d saves), "
                 "against windows without saves, interleaved (medians of %d rounds). The caller's "
                 "stream waits for each save's D2H copies (later updates must not reach the "
                 "snapshot): a save costs the loop about the D2H time of the state. Goal: >= 97%%."
                 % (tr["kernel_ms"], tr["depth"], tr["state_mib"], tr["save_every_s"], tr["saves"],
                    tr["rounds"]), ""]
        hdr = ["steps/s without saves", "with saves", "ratio"]
        row = [num(tr["plain_steps_per_s"], 1), num(tr["saving_steps_per_s"], 1),
               "%.1f%%" % (100 * tr["step_ratio"])]
        if sim:
            hdr += ["compute busy without", "with", "ratio"]
            row += ["%.1f%%" % (100 * tr["plain_busy"]), "%.1f%%" % (100 * tr["saving_busy"]),
                    "%.1f%%" % (100 * tr["busy_ratio"])]
        key = tr["busy_ratio"] if sim else tr["step_ratio"]
        hdr.append("goal >= 97%")
        row.append(met(key >= 0.97))
        r.md += table(hdr, [row])
        rows.append(("Training during device saves (%s)" % ds["backend"],
                     "%s steps/s" % num(tr["saving_steps_per_s"], 1),
                     "%s without saves" % num(tr["plain_steps_per_s"], 1),
                     "%.1f%%" % (100 * tr["step_ratio"]), "save every %.1f s" % tr["save_every_s"]))
    return rows


SHARE_TEXT = {
    ("loader", "plain"): "nothing shared, import hook off",
    ("loader", "imports"): "import hook only (code constants)",
    ("loader", "share"): "import hook + threadloom.share(dataset)",
    ("globals", "plain"): "nothing shared, import hook off",
    ("globals", "imports"): "import hook only",
    ("globals", "share"): "import hook + threadloom.share(module)",
    ("code", "script"): "run as the script",
    ("code", "source"): "imported, compiled from source (no .pyc), hook off",
    ("code", "pyc"): "imported from .pyc, hook off",
    ("code", "source+hook"): "imported, compiled from source, import hook on",
}
SHARE_WORKLOADS = {"loader": "the loader's `python` workload (Tokens: the dataset's own vocabulary)",
                   "globals": "a tokenizer reading module globals (VOCAB dict, WORDS list)",
                   "code": "a function whose only shared objects are its constants"}


def section_share(r, cores):
    sh = r.section("Shared data: threads with and without threadloom.share()", "share")
    if sh is None:
        return None
    ts = sh["threads"]
    r.md += ["%s items per thread on 1 thread and on T threads (the same per thread, so "
             "linear is T), each case in a new "
             "interpreter (share() is for good), %d interleaved runs of %d alternating "
             "1-thread/T-thread rounds; speed-up = T-thread items/s of the best T-thread round "
             "/ items/s of the best 1-thread round over all runs (in parentheses: the median "
             "and range of each run's own ratio). "
             "Goal: >= 1.8x at 2 threads with share; >= 85%% of linear at 16 threads on a "
             "16-core machine." % (sh.get("per_thread", "N"), sh["reps"], sh["rounds"]), ""]
    hdr = ["workload", "variant", "1 thread items/s"]
    for t in ts:
        hdr += ["%d threads items/s" % t, "speed-up at %d" % t]
    rows = []
    for x in sh["rows"]:
        row = [x["workload"], SHARE_TEXT.get((x["workload"], x["variant"]), x["variant"]),
               num(x["items_per_s_1"])]
        for t in ts:
            v = x["threads"][str(t)]
            row += [num(v["items_per_s"]), flagged_ratio("%.2fx (%.2f, %.2f-%.2f)" % (
                v["speedup"], v.get("speedup_median", v["speedup"]), v["speedup_min"],
                v["speedup_max"]), [v["speedup_min"], v["speedup_max"]])]
        rows.append(row)
    r.md += table(hdr, rows)
    r.md += ["", "Workloads: " + "; ".join("**%s**: %s" % kv for kv in SHARE_WORKLOADS.items())
             + "."]
    by = {(x["workload"], x["variant"]): x for x in sh["rows"]}
    out = None
    if 2 in ts and ("loader", "share") in by:
        got = [by[(w, "share")]["threads"]["2"]["speedup"] for w in ("loader", "globals")
               if (w, "share") in by]
        r.md += ["", "At 2 threads with share: %s (goal >= 1.8x: %s)." % (
            ", ".join("%.2fx" % g for g in got), "met" if min(got) >= 1.8 else "NOT met")]
        plain = by[("loader", "plain")]["threads"]["2"]["speedup"]
        out = ("Shared data (loader workload, 2 threads)",
               "%.2fx" % by[("loader", "share")]["threads"]["2"]["speedup"],
               "unshared %.2fx" % plain,
               "%.2fx" % (by[("loader", "share")]["threads"]["2"]["speedup"] / plain),
               "speed-up over 1 thread")
    big = [t for t in ts if t >= 16]
    if big and ("loader", "share") in by:
        t = big[0]
        eff = by[("loader", "share")]["threads"][str(t)]["speedup"] / t
        r.md += ["", "At %d threads with share: %.0f%% of linear (goal >= 85%%: %s)." % (
            t, eff * 100, "met" if eff >= 0.85 else "NOT met")]
    return out


GPU_PLOTS = [("launch", "GPU: kernel launch rate vs threads", "launch rate vs threads",
              "threads", "launches/s"),
             ("h2d", "GPU: H2D bandwidth vs batch size", "H2D bandwidth vs batch size",
              "batch size (bytes)", "GB/s")]


def plot_json(r, name, title, x_label, y_label, data):
    """A GPU benchmark's JSON in the generic format: {"x_label", "y_label", "log_x", "log_y",
    "threadloom": series name, "baseline": series name, "series": {name: [[x, y], ...]}}."""
    series = [Series(n, pts, PALETTE[i], "" if n == data.get("threadloom") else "7,4")
              for i, (n, pts) in enumerate(data["series"].items())]
    xs = sorted({p[0] for s in series for p in s.points})
    names = list(data["series"])
    tl, base = data.get("threadloom"), data.get("baseline")
    val = {(n, x): y for n, pts in data["series"].items() for x, y in pts}
    hdr = [data.get("x_label", x_label)] + names + (["tl / baseline"] if tl and base else [])
    r.md += table(hdr, [[num(x)] + [num(val.get((n, x)), 2) for n in names]
                        + ([ratio(val.get((tl, x)), val.get((base, x)))] if tl and base else [])
                        for x in xs])
    r.svg(name + ".svg", line_chart(title, data.get("x_label", x_label), data.get("y_label", y_label),
                                    series, log_x=data.get("log_x", True),
                                    log_y=data.get("log_y", False), x_ticks=xs), title)


def section_gpu(r, meta):
    r.md += ["", "## GPU: launch rate and host-to-device bandwidth"]
    for name, title, alt, x_label, y_label in GPU_PLOTS:
        data = load(r.d, name)
        r.md += ["", "### " + title[5:], ""]
        if data is not None:
            plot_json(r, name, title, x_label, y_label, data)
            continue
        if meta.get("gpu", "nogpu") == "nogpu":
            why = ["needs a GPU: not run on this machine"]
        else:
            why = ["no %s.json: the GPU benchmark for this is not in bench/ yet" % name]
        r.md += [why[0] + "."]
        r.svg(name + ".svg", placeholder(title, why), alt + " (placeholder)")


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def build(d):
    """Writes d/README.md and the SVGs from d/*.json; returns the list of SVG file names."""
    meta = load(d, "meta")
    if meta is None:
        raise ReportError("%s: no meta.json: this is not a results directory written by "
                          "bench/run.sh (run `make bench`, or bench/run.sh --out %s PYTHON)" % (d, d))
    r = Report(d)
    cores = meta.get("cores", 1)
    gpu = meta.get("gpu", "nogpu")
    r.md += ["# Benchmark report: %s" % meta.get("machine", os.path.basename(d)), ""]
    if meta.get("quick"):
        r.md += ["**Quick run (`--quick`): tiny sizes to check the pipeline; these numbers mean "
                 "nothing.**", ""]
    r.md += ["- **machine**: %d CPU(s), %s, %s GiB memory, Linux %s; GPU: %s"
             % (cores, meta.get("cpu_model", "?"), meta.get("memory_gib", "?"),
                meta.get("kernel", "?"), "none" if gpu == "nogpu" else gpu),
             "- **date**: %s" % meta.get("date", "?"),
             "- **commit**: `%s`" % meta.get("commit", "?"),
             "- **command**: `%s`" % meta.get("command", "?"),
             "- **interpreter**: Python %s, GIL %s" % (meta.get("python", "?"),
                                                      "on" if meta.get("gil") else "off")]
    if "loadavg_start" in meta:
        r.md += ["- **load average** (1 min) when the run started: %.2f%s"
                 % (meta["loadavg_start"], " (other work was running on the machine: the numbers "
                    "are noisier than an idle machine's)" if meta["loadavg_start"] > 0.5 else "")]
    r.md += ["", "Written by bench/report.py from the JSON files in this directory; each "
             "benchmark's full text output is beside it (`<name>.txt`). Every baseline ran in the "
             "same run on the same machine, interleaved with threadloom where the benchmark "
             "allows. Ratios are threadloom over the baseline at the sweep point named (the "
             "largest worker count that fits the cores)."]
    summary_at = len(r.md)
    summaries, best = section_dataloader(r, cores)
    fp = load(d, "footprint")
    first, goals_first = section_first_batch(r, cores, fp)
    mem, goals_mem = section_memory(r, cores, fp)  # (a list of summary lines)
    section_goals(r, cores, meta, best, goals_first + goals_mem)
    vision = section_vision(r, cores)
    summaries += [first] + mem + vision + [section_executor(r, cores), section_scheduler(r, cores),
                  section_checkpoint(r, cores), section_arena(r, cores), section_startup(r, cores),
                  section_share(r, cores)]
    summaries += section_devices(r, "devices", "device", "Devices (sim): submission, launch "
                                 "rate, feeder, allocator")
    if load(d, "devices_cuda") is not None or load(d, "device_cuda") is not None:
        summaries += section_devices(r, "devices_cuda", "device_cuda",
                                     "Devices (cuda): submission, launch rate, feeder, allocator")
    summaries += section_device_state(r, "device_state", "Device state (sim): DataLoader to the "
                                      "device, device checkpoints")
    if load(d, "device_state_cuda") is not None:
        summaries += section_device_state(r, "device_state_cuda", "Device state (cuda): "
                                          "DataLoader to the device, device checkpoints")
    section_gpu(r, meta)
    summary = ["", "## Summary", ""] + table(
        ["benchmark", "threadloom", "baseline", "ratio", "at"],
        [list(s) for s in summaries if s]) + ["", "Each line is detailed in its section below."]
    r.md[summary_at:summary_at] = summary
    others = sorted(f for f in os.listdir(d) if f.endswith(".json") and f[:-5] not in KNOWN)
    if others:
        r.md += ["", "## Other results", "", "Not drawn by this report: %s." % ", ".join(others)]
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("\n".join(r.md) + "\n")
    return r.plots


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: python3 bench/report.py bench/results/<machine>", file=sys.stderr)
        return 2
    d = argv[1]
    if not os.path.isdir(d):
        print("report: %s is not a directory: give the results directory bench/run.sh wrote"
              % d, file=sys.stderr)
        return 2
    try:
        plots = build(d)
    except ReportError as e:
        print("report: %s" % e, file=sys.stderr)
        return 1
    print("report: wrote %s and %d plots" % (os.path.join(d, "README.md"), len(plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
