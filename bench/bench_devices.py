"""The device layer from Python threads: the submission rate and the GPU feeder.

    python bench/bench_devices.py [--cuda] [--quick] [--seconds S] [--json FILE] [--gpu-json DIR]
                                  [--only submit,feeder,launch] [--launch-cost 1us]

submit  Stream.launch(0) calls per second per Python thread, 1 and 2 threads, each on its own
        stream of one device. On sim ("sim:1,cost=0": operations run at once and cost nothing)
        this is threadloom's own cost per submission from Python; goals: >= 2M/s per thread and
        >= 1.8x at 2 threads (no shared lock). The raw C rate of the same path is
        tl-bench-device's launch section (device.json). With --cuda: real launches on cuda:0.
feeder  Feeder throughput into the device's H2D engine, 1, 4 and 16 MiB batches, 2 producer
        threads writing straight into pinned staging slots (feeder.stage/submit: a producer
        faster than the link) and a consumer thread whose stream waits for each batch. On sim
        the H2D bandwidth is modelled below this host's memcpy speed (the engine moves real
        bytes: the model must be slower than the host) and the measure is the engine's busy
        fraction (engine_stats busy/wall over the run); goal >= 90%. In the same run, the raw
        rate: back-to-back copies from one pinned slot on one stream, and the feeder's rate
        against it. With --cuda: the same against cuda:0's copy engine (goal >= 90% of raw
        pinned cudaMemcpyAsync).

launch  The launch rate of issue 21: kernels launched per second from 1..8 Python threads,
        thread k on device k mod N (sim:8; with --cuda every GPU, or streams of cuda:0 alone on
        a one-GPU machine), each pinned to its launch core of the placement plan, against the
        raw C loop on the same backend, pinned to the same cores; then the same with loader
        threads busy: 2 per device, Python threads doing a
        tokenizer's work, pinned to the plan's loader slots (the launch cores are kept free of
        them where the machine has the cores). The raw C loop is tl-bench-device's
        (bench/launch-loop.c), called through ctypes from tl-bench-launch.so by Python threads
        pinned the same way, in the same process: the same sim, cores and loader threads. Best
        of 2 alternating rounds each. On sim two
        device models: cost=0 (a launch costs nothing but threadloom's own path: the overhead
        per launch) and cost=0,launch=1us (each launch spends 1 us of its thread's CPU, as a
        driver's launch path does: the rate a GPU that keeps up would see). Goal: Python >= 50%
        of raw C at 8 threads, with and without loader threads.

Each section runs in a child process (the backend is chosen once per process, by
THREADLOOM_DEVICES). --gpu-json DIR also writes launch.json and h2d.json in bench/report.py's
generic GPU format (with --cuda).
"""

import argparse
import ctypes
import json
import os
import queue
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _workload import cuda_unusable  # noqa: E402

MiB = 1 << 20
C_LAUNCH_LIB = os.path.join(HERE, "..", "build", "bench", "tl-bench-launch.so")
LAUNCH_THREADS = (1, 2, 4, 8)
LOADERS_PER_DEVICE = 2


# -- children ----------------------------------------------------------------------------------

def child_submit(threads, seconds):
    import threadloom
    from threadloom import devices
    dev = threadloom.devices()[0]
    barrier = threading.Barrier(threads)
    rates = [0.0] * threads
    cpu_rates = [0.0] * threads  # per second of the thread's own CPU time

    def run(k):
        s = devices.Stream(dev)
        launch = s.launch
        for _ in range(10000):
            launch()
        s.synchronize()
        barrier.wait()
        n, t0, c0 = 0, time.perf_counter(), time.thread_time()
        while True:
            for _ in range(20000):
                launch()
            n += 20000
            t = time.perf_counter()
            if t - t0 >= seconds:
                break
        c1 = time.thread_time()
        s.synchronize()
        rates[k] = n / (time.perf_counter() - t0)
        cpu_rates[k] = n / max(c1 - c0, 1e-9)

    ths = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return {"threads": threads, "per_thread": sum(rates) / threads, "slowest": min(rates),
            "total": sum(rates), "per_thread_cpu": sum(cpu_rates) / threads,
            "loadavg": os.getloadavg()[0], "device": str(dev)}


def host_memcpy_rate():
    """Single-thread memcpy speed of this host for 1 MiB pieces of 64 MiB buffers, bytes/s."""
    a, b = bytearray(64 * MiB), bytearray(64 * MiB)
    ma, mb = memoryview(a), memoryview(b)
    t0, n = time.perf_counter(), 0
    for i in range(256):
        o = (i * 37 % 64) * MiB
        mb[o:o + MiB] = ma[o:o + MiB]
        n += MiB
    return n / (time.perf_counter() - t0)


def child_feeder(mib, producers, seconds, cuda):
    import threadloom
    from threadloom import devices
    dev = threadloom.devices()[0]
    nbytes = mib * MiB
    out = {"mib": mib, "producers": producers, "device": str(dev)}
    if not cuda:
        host = host_memcpy_rate()
        model = min(55e9, host / 2)
        dev.sim_set("h2d=%dMB/s" % int(model / 1e6))
        out.update(host_memcpy_gbs=host / 1e9, model_gbs=int(model / 1e6) / 1e3)
    f = devices.Feeder(dev, slot_bytes=nbytes, slots=4)
    # raw: back-to-back copies from one pinned slot on one stream
    s = devices.Stream(dev)
    slot = f.stage()
    buf = s.alloc(nbytes)
    reps = max(8, int(2e9 // nbytes)) if cuda else max(4, int(out["model_gbs"] * 1e9 * 0.3 // nbytes))
    s.copy(buf, slot)
    s.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        s.copy(buf, slot)
    s.synchronize()
    out["raw_gbs"] = reps * nbytes / (time.perf_counter() - t0) / 1e9
    slot.release()
    del buf
    # the feeder: producers into staging, a consumer whose stream waits for every batch
    q = queue.Queue(maxsize=8)
    stop = threading.Event()
    counts = [0] * producers
    stamp = b"tl-batch"

    def produce(k):
        while not stop.is_set():
            sl = f.stage(timeout=10)
            with memoryview(sl) as m:
                m[:8] = stamp
            q.put(f.submit(sl, nbytes))
            counts[k] += 1

    def consume():
        cs = devices.Stream(dev)
        while True:
            b = q.get()
            if b is None:
                return
            b.wait(cs)

    cons = threading.Thread(target=consume)
    prods = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    cons.start()
    for p in prods:
        p.start()
    time.sleep(min(0.3, seconds / 4))  # warm up: every slot and cache in use
    e0 = None if cuda else dev.engine_stats()["h2d"]
    c0, t0 = sum(counts), time.perf_counter()
    time.sleep(seconds)
    e1 = None if cuda else dev.engine_stats()["h2d"]
    c1, t1 = sum(counts), time.perf_counter()
    stop.set()
    for p in prods:
        while p.is_alive():
            try:
                q.get(timeout=0.05)  # unblock a producer waiting on a full queue
            except queue.Empty:
                pass
        p.join()
    q.put(None)
    cons.join()
    dev.synchronize()
    out["feeder_gbs"] = (c1 - c0) * nbytes / (t1 - t0) / 1e9
    out["vs_raw"] = out["feeder_gbs"] / out["raw_gbs"]
    out["batches"] = c1 - c0
    if e0 is not None:
        out["utilization"] = (e1["busy_s"] - e0["busy_s"]) / (e1["wall_s"] - e0["wall_s"])
        out["late_mean_us"] = ((e1["late_s"] - e0["late_s"]) / max(1, e1["ops"] - e0["ops"])) * 1e6
    f.close()
    return out


def _loader_work(stop, counter, k):
    """A loader thread's Python work until `stop`: synthetic lines tokenized and hashed (the
    main job's dataset in miniature). counter[k] counts lines."""
    import random
    import zlib
    rng = random.Random(k)
    words = ["".join(rng.choice("kalomineruzasatovi") for _ in range(rng.randint(3, 8)))
             for _ in range(500)]
    n = 0
    while not stop.is_set():
        for _ in range(50):
            line = " ".join(rng.choice(words) for _ in range(12)).capitalize() + "."
            ids = [zlib.crc32(t.encode()) % 65536 for t in line.rstrip(".").lower().split()]
            n += len(ids) > 0
        counter[k] = n


def child_launch(threads_list, seconds, loaders, reps, spec, cuda, c_lib):
    """One device model, with or without loader threads: per thread count the best Python and
    the best raw C rate of `reps` alternating rounds. The launch threads (one per plan entry)
    and the loader threads are started once, before any load, and pinned once; a round wakes
    the first T launch threads together (a thread started under 16 busy loaders waits long
    for its first time slice)."""
    import threadloom
    from threadloom import devices, placement
    devs = threadloom.devices()
    most = max(threads_list)
    n = min(len(devs), most)
    # one plan entry per launch thread, on its device's node: with one GPU, each thread still
    # gets a launch core of its own (tl-bench-device --pin makes the same plan)
    nodes = [devs[i % n].numa_node for i in range(most)]
    plan = placement.plan(device_nodes=nodes, loaders_per_gpu=loaders)
    lib = ctypes.CDLL(c_lib)      # the raw C loop, in this process: same sim, same cores
    lib.tl_bench_launch.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_double,
                                    ctypes.POINTER(ctypes.c_double),
                                    ctypes.POINTER(ctypes.c_double)]
    lib.tl_bench_launch.restype = ctypes.c_int
    kind = b"cuda" if cuda else b"sim"

    stop, go = threading.Event(), threading.Event()
    counter = [0] * (most * loaders)

    def loader(g, r):
        with placement.pin(gpu=g, role="loader", rank=r, plan=plan):
            go.wait()
            _loader_work(stop, counter, g * loaders + r)

    start, end = threading.Barrier(most + 1), threading.Barrier(most + 1)
    job = {"T": 0, "what": None, "quit": False}
    out = [None] * most      # per thread: (wall rate, cpu rate, error)

    def launcher(k):
        with placement.pin(gpu=k, role="launch", rank=0, plan=plan):
            st = devices.Stream(devs[k % n])
            launch = st.launch
            for _ in range(2000):
                launch()
            st.synchronize()
            while True:
                start.wait()
                if job["quit"]:
                    return
                if k < job["T"]:
                    if job["what"] == "python":
                        c0, t0, m = time.thread_time(), time.perf_counter(), 0
                        while True:
                            for _ in range(1000):
                                launch()
                            m += 1000
                            if time.perf_counter() - t0 >= seconds:
                                break
                        c1 = time.thread_time()
                        out[k] = (m / (time.perf_counter() - t0), m / max(c1 - c0, 1e-9), 0)
                        st.synchronize()
                    else:
                        w, c = ctypes.c_double(), ctypes.c_double()
                        err = lib.tl_bench_launch(kind, devs[k % n].index, seconds,
                                                  ctypes.byref(w), ctypes.byref(c))
                        out[k] = (w.value, c.value, err)
                end.wait()

    ths = [threading.Thread(target=launcher, args=(k,), daemon=True) for k in range(most)]
    ths += [threading.Thread(target=loader, args=(g, r), daemon=True)
            for g in range(most) for r in range(loaders)]
    for t in ths:
        t.start()
    go.set()
    time.sleep(0.2 if loaders else 0)        # the loaders at full speed first

    def round_(T, what):
        job.update(T=T, what=what)
        start.wait()
        end.wait()
        errs = [o[2] for o in out[:T] if o[2]]
        if errs:
            raise RuntimeError("tl_bench_launch failed with TL_E* codes %s" % errs)
        total = sum(o[0] for o in out[:T])
        return {"total": total, "per_thread": total / T,
                "per_thread_cpu": sum(o[1] for o in out[:T]) / T}

    rows = []
    l0, t0 = sum(counter), time.perf_counter()
    for T in threads_list:
        best_py = best_c = None
        runs_py, runs_c = [], []
        for _ in range(reps):
            p = round_(T, "python")
            c = round_(T, "c")
            runs_py.append(p["total"])
            runs_c.append(c["total"])
            best_py = p if best_py is None or p["total"] > best_py["total"] else best_py
            best_c = c if best_c is None or c["total"] > best_c["total"] else best_c
        rows.append({"threads": T, "python": best_py, "c": best_c,
                     "ratio": best_py["total"] / best_c["total"],
                     "ratio_cpu": best_py["per_thread_cpu"] / best_c["per_thread_cpu"],
                     "runs": {"python": runs_py, "c": runs_c}})  # every round's total: the spread
    loader_rate = (sum(counter) - l0) / (time.perf_counter() - t0)
    stop.set()
    job["quit"] = True
    start.wait()
    for t in ths:
        t.join()
    launch_cpus = {s["cpus"] for s in plan.slots() if s["role"] == "launch"}
    loader_on_launch = sum(1 for s in plan.slots() if s["role"] == "loader"
                           and s["cpus"] in launch_cpus)
    return {"spec": "cuda" if cuda else spec, "devices": n, "device": str(devs[0]),
            "loaders_per_device": loaders, "loader_threads": most * loaders,
            "loader_lines_per_s": loader_rate, "loader_slots_on_launch_cores": loader_on_launch,
            "cores": len(os.sched_getaffinity(0)), "rows": rows, "loadavg": os.getloadavg()[0]}


# -- the parent --------------------------------------------------------------------------------

def run_child(args, spec, script=__file__, timeout=600):
    """`script --child args...` in a child process on THREADLOOM_DEVICES=spec; its last line
    of output, parsed as JSON."""
    env = dict(os.environ, THREADLOOM_DEVICES=spec)
    r = subprocess.run([sys.executable, os.path.abspath(script), "--child"] + args, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("child %s failed:\n%s" % (args, r.stderr[-2000:]))
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true", help="run on cuda:0 instead of sim")
    p.add_argument("--quick", action="store_true", help="short runs (numbers mean little)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--gpu-json", help="with --cuda: write launch.json and h2d.json here")
    p.add_argument("--only", default="submit,feeder,launch",
                   help="sections to run (submit,feeder,launch)")
    p.add_argument("--launch-cost", default="1us",
                   help="the modelled launch's CPU cost on sim (the launch section; 1us)")
    p.add_argument("--c-lib", default=C_LAUNCH_LIB,
                   help="tl-bench-launch.so: the raw C launch loop (built with tl-bench-device)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind = a.child[0]
        if kind == "submit":
            print(json.dumps(child_submit(int(a.child[1]), float(a.child[2]))))
        elif kind == "launch":
            ts = [int(t) for t in a.child[1].split(",")]
            print(json.dumps(child_launch(ts, float(a.child[2]), int(a.child[3]), int(a.child[4]),
                                          a.child[5], a.child[6] == "1", a.child[7])))
        else:
            print(json.dumps(child_feeder(int(a.child[1]), int(a.child[2]), float(a.child[3]),
                                          a.child[4] == "1")))
        return 0
    secs = a.seconds or (0.2 if a.quick else 1.5)
    if a.cuda and cuda_unusable("bench_devices", a.json):
        return 0
    only = set(a.only.split(","))
    unknown = only - {"submit", "feeder", "launch"}
    if unknown:
        p.error("--only: unknown section(s) %s (submit, feeder, launch)" % ", ".join(sorted(unknown)))
    spec_submit = "cuda" if a.cuda else "sim:1,cost=0"
    spec_feed = "cuda" if a.cuda else "sim:1"
    res = {"backend": "cuda" if a.cuda else "sim", "seconds": secs, "submit": [], "feeder": []}
    if "submit" in only:
        run_submit(a, res, secs, spec_submit)
    if "feeder" in only:
        run_feeder(a, res, secs, spec_feed)
    if "launch" in only:
        run_launch(a, res)
    write_results(a, res)
    return 0


def run_submit(a, res, secs, spec_submit):
    for t in (1, 2):
        r = run_child(["submit", str(t), str(secs)], spec_submit)
        res["submit"].append(r)
        print("submit  %s %d Python thread(s): %10.0f launches/s per thread (slowest %.0f), "
              "%.0f in all; %.0f per second of each thread's CPU time (load average %.1f)"
              % (r["device"], t, r["per_thread"], r["slowest"], r["total"], r["per_thread_cpu"],
                 r["loadavg"]))
    s1, s2 = res["submit"][0]["total"], res["submit"][1]["total"]
    res["scaling_2"] = s2 / s1
    res["scaling_2_cpu"] = 2 * res["submit"][1]["per_thread_cpu"] / res["submit"][0]["per_thread_cpu"]
    print("submit  2 threads / 1 thread: %.2fx wall, %.2fx per CPU second (goal >= 1.8x; the wall "
          "figure needs 2 idle cores); per thread %.2fM/s (goal >= 2M/s)"
          % (s2 / s1, res["scaling_2_cpu"], res["submit"][0]["per_thread"] / 1e6))


def run_feeder(a, res, secs, spec_feed):
    for mib in ((1, 4) if a.quick else (1, 4, 16)):
        r = run_child(["feeder", str(mib), "2", str(secs), "1" if a.cuda else "0"], spec_feed)
        res["feeder"].append(r)
        if a.cuda:
            print("feeder  %2d MiB batches, 2 producers: %.2f GB/s, raw pinned copies %.2f GB/s: "
                  "%.1f%% (goal >= 90%%)" % (mib, r["feeder_gbs"], r["raw_gbs"], 100 * r["vs_raw"]))
        else:
            print("feeder  %2d MiB batches, 2 producers: H2D engine busy %.1f%% (goal >= 90%%); "
                  "%.2f GB/s vs raw copies %.2f GB/s (%.1f%%), model %.2f GB/s (host memcpy "
                  "%.1f GB/s), completions seen %.0f us late on average"
                  % (mib, 100 * r["utilization"], r["feeder_gbs"], r["raw_gbs"],
                     100 * r["vs_raw"], r["model_gbs"], r["host_memcpy_gbs"], r["late_mean_us"]))


def run_launch(a, res):
    """The launch-rate section: per device model, without and with loader threads."""
    if not os.path.exists(a.c_lib):
        raise SystemExit("bench_devices: %s is missing (the raw C launch loop): run `make build`, "
                         "or give --c-lib" % a.c_lib)
    secs = a.seconds or (0.1 if a.quick else 0.4)
    reps = 1 if a.quick else 2
    threads = (1, 8) if a.quick else LAUNCH_THREADS
    if a.cuda:
        models = [("cuda", "cuda")]
    else:
        models = [("overhead", "sim:8,cost=0"),
                  ("launch %s" % a.launch_cost, "sim:8,cost=0,launch=%s" % a.launch_cost)]
        if a.quick:          # the goal's model only: a check in seconds
            models = models[1:]
    res["launch"] = []
    for label, spec in models:
        for loaders in (0, LOADERS_PER_DEVICE):
            r = run_child(["launch", ",".join(map(str, threads)), str(secs), str(loaders),
                           str(reps), spec, "1" if a.cuda else "0", os.path.abspath(a.c_lib)],
                          spec)
            r["model"] = label
            res["launch"].append(r)
            for x in r["rows"]:
                print("launch  %-14s %s %d thread(s): Python %11.0f/s in all (%9.0f per thread, "
                      "%9.0f per CPU s), raw C %11.0f/s (%9.0f per CPU s): %5.1f%% (per CPU s "
                      "%5.1f%%)" % (label, "with %2d loaders" % r["loader_threads"] if loaders
                                    else "no loaders     ", x["threads"], x["python"]["total"],
                                    x["python"]["per_thread"], x["python"]["per_thread_cpu"],
                                    x["c"]["total"], x["c"]["per_thread_cpu"], 100 * x["ratio"],
                                    100 * x["ratio_cpu"]))
            if loaders:
                print("launch  %-14s the %d loader threads tokenized %.0f lines/s meanwhile; "
                      "%d loader slot(s) on launch cores (%d cores)"
                      % (label, r["loader_threads"], r["loader_lines_per_s"],
                         r["loader_slots_on_launch_cores"], r["cores"]))
    goal = [r for r in res["launch"] if r["model"] != "overhead"]
    for r in goal:
        top = r["rows"][-1]
        print("launch  goal (%s, %s): Python at %d threads is %.1f%% of raw C (goal >= 50%%)"
              % (r["model"], "with loaders" if r["loaders_per_device"] else "no loaders",
                 top["threads"], 100 * top["ratio"]))
    over = [r for r in res["launch"] if r["model"] == "overhead" and not r["loaders_per_device"]]
    for r in over:
        x = r["rows"][0]
        print("launch  threadloom's own cost per launch from Python: %.0f ns (raw C %.0f ns), "
              "per CPU second of one thread" % (1e9 / x["python"]["per_thread_cpu"],
                                               1e9 / x["c"]["per_thread_cpu"]))


def write_results(a, res):
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.gpu_json and a.cuda and res.get("launch"):
        series = {}
        for r in res["launch"]:
            tag = " (loaders busy)" if r["loaders_per_device"] else ""
            series["threadloom, Python threads" + tag] = [[x["threads"], x["python"]["total"]]
                                                         for x in r["rows"]]
            series["raw C" + tag] = [[x["threads"], x["c"]["total"]] for x in r["rows"]]
        with open(os.path.join(a.gpu_json, "launch.json"), "w") as f:
            json.dump({"x_label": "threads", "y_label": "launches/s (all threads)",
                       "threadloom": "threadloom, Python threads", "baseline": "raw C",
                       "log_x": False, "series": series}, f)
    if a.gpu_json and a.cuda and res.get("feeder"):
        with open(os.path.join(a.gpu_json, "h2d.json"), "w") as f:
            json.dump({"x_label": "batch size (bytes)", "y_label": "GB/s", "threadloom": "feeder",
                       "baseline": "raw pinned cudaMemcpyAsync",
                       "series": {"feeder": [[r["mib"] * MiB, r["feeder_gbs"]] for r in res["feeder"]],
                                  "raw pinned cudaMemcpyAsync":
                                  [[r["mib"] * MiB, r["raw_gbs"]] for r in res["feeder"]]}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
