"""The device layer from Python threads: the submission rate and the GPU feeder.

    python bench/bench_devices.py [--cuda] [--quick] [--seconds S] [--json FILE] [--gpu-json DIR]

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

Each section runs in a child process (the backend is chosen once per process, by
THREADLOOM_DEVICES). --gpu-json DIR also writes launch.json and h2d.json in bench/report.py's
generic GPU format (with --cuda).
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

MiB = 1 << 20


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
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind = a.child[0]
        if kind == "submit":
            print(json.dumps(child_submit(int(a.child[1]), float(a.child[2]))))
        else:
            print(json.dumps(child_feeder(int(a.child[1]), int(a.child[2]), float(a.child[3]),
                                          a.child[4] == "1")))
        return 0
    secs = a.seconds or (0.2 if a.quick else 1.5)
    if a.cuda:
        import threadloom
        try:
            threadloom._core.cuda_device_count()
        except threadloom.Error as e:
            print("bench_devices: --cuda: no usable GPU: %s" % e)
            if a.json:
                json.dump({"skipped": "no usable GPU: %s" % e}, open(a.json, "w"))
            return 0
    spec_submit = "cuda" if a.cuda else "sim:1,cost=0"
    spec_feed = "cuda" if a.cuda else "sim:1"
    res = {"backend": "cuda" if a.cuda else "sim", "seconds": secs, "submit": [], "feeder": []}
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.gpu_json and a.cuda:
        with open(os.path.join(a.gpu_json, "launch.json"), "w") as f:
            json.dump({"x_label": "Python threads", "y_label": "launches/s per thread",
                       "threadloom": "threadloom Stream.launch", "log_x": False,
                       "series": {"threadloom Stream.launch":
                                  [[r["threads"], r["per_thread"]] for r in res["submit"]]}}, f)
        with open(os.path.join(a.gpu_json, "h2d.json"), "w") as f:
            json.dump({"x_label": "batch size (bytes)", "y_label": "GB/s", "threadloom": "feeder",
                       "baseline": "raw pinned cudaMemcpyAsync",
                       "series": {"feeder": [[r["mib"] * MiB, r["feeder_gbs"]] for r in res["feeder"]],
                                  "raw pinned cudaMemcpyAsync":
                                  [[r["mib"] * MiB, r["raw_gbs"]] for r in res["feeder"]]}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
