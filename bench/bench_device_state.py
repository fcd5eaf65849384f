"""Device state: DataLoader(device=) into a device, and checkpoints of device state (issue 21).

    python bench/bench_device_state.py [--cuda] [--quick] [--dir DIR] [--json FILE]

loader    DataLoader(device=) with a producer faster than the link: 2 workers collate 2 MiB
          batches (8 samples of 256 KiB) straight into the feeder's pinned slots; on sim the H2D
          engine's bandwidth is modelled at half (--link) of the slower of what the same loader
          produces on the host (measured first, in the same run) and this host's memcpy (the
          engine moves real bytes), so the copy engine is the bottleneck. Measured over the
          steady state: the H2D engine's busy fraction (goal >= 90%), the loader's GB/s against
          the model, the consumer's time in next() per batch and the workers' waits for a slot.
stall     Checkpointer.save() of 256 MiB of device state (4 DeviceBuffers of 64 MiB): the time
          save() blocks the caller (it returns once the D2H copies are queued) against the D2H
          copy time of the same bytes (copied into pinned staging on one stream, waited for),
          medians of interleaved rounds (goal <= 1.2x). The D2H engine is modelled as above.
training  a training loop of device kernels on the caller's stream (each step: a 2 ms kernel
          and an in-place update of the 64 MiB state's first MiB, at most 3 steps queued ahead):
          steps per second and the compute engine's busy fraction (sim) over windows in which the
          state is saved every --save-every seconds, against windows without saves, interleaved
          (goal >= 97%; the step time is the kernel's, so the compute engine's fraction is the
          rate's). Each save makes the caller's stream wait for its D2H copies (later in-place
          updates must not reach the snapshot), so a save costs the loop about the D2H time of
          the state: the ratio is about 1 - that time / the save interval.

Each section runs in a child process on THREADLOOM_DEVICES=sim:1 (or cuda with --cuda, where
the engine fractions are not measurable and the step rates are what counts).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _workload import cuda_unusable  # noqa: E402

MiB = 1 << 20


def host_memcpy_rate():
    from bench_devices import host_memcpy_rate as rate
    return rate()


# -- loader --------------------------------------------------------------------------------------

class Samples:
    """256 KiB samples from a few preallocated bytes objects (bytes, not memoryviews: threads
    may share them, docs/design.md "The staging copy in parallel"): fetching costs nothing,
    collating is a memcpy of each into the batch."""

    def __init__(self, n, size=256 << 10):
        self.n = n
        self.bufs = [bytes([k]) * size for k in range(4)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return memoryview(self.bufs[i % 4])  # a view of this thread's own


def loader_rate(dev, seconds, workers):
    """(GB/s, batches) a DataLoader delivers over `seconds` (after 4 warm-up batches)."""
    import threadloom
    dl = threadloom.DataLoader(Samples(1 << 30), batch_size=8, num_workers=workers, device=dev,
                               replicate=None)
    it = iter(dl)
    for _ in range(4):
        next(it)
    n, t0 = 0, time.perf_counter()
    nbytes = 0
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        nbytes += b.nbytes
        n += 1
    el = time.perf_counter() - t0
    it.close()
    return nbytes / el / 1e9, n


def child_loader(seconds, link, cuda):
    import threadloom
    from threadloom import devices
    dev = threadloom.devices()[0]
    out = {"device": str(dev), "workers": 2, "batch_bytes": 8 * (256 << 10), "link": link}
    host_gbs, _ = loader_rate(None, seconds, 2)
    out["host_gbs"] = host_gbs
    if not cuda:
        memcpy = host_memcpy_rate()
        model = min(host_gbs * 1e9, memcpy) * link
        dev.sim_set("h2d=%dMB/s" % int(model / 1e6))
        out.update(host_memcpy_gbs=memcpy / 1e9, model_gbs=int(model / 1e6) / 1e3)
    dl = threadloom.DataLoader(Samples(1 << 30), batch_size=8, num_workers=2, device=dev,
                               replicate=None)
    it = iter(dl)
    for _ in range(6):  # warm up: the slots are sized, every worker has its stream
        next(it)
    e0 = None if cuda else dev.engine_stats()["h2d"]
    s0 = dl.stats()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    t1 = time.perf_counter()
    e1 = None if cuda else dev.engine_stats()["h2d"]  # copies still queued: the engine is busy
    s1 = dl.stats()
    it.close()
    out["batches"] = n
    out["device_gbs"] = n * out["batch_bytes"] / (t1 - t0) / 1e9
    out["wait_per_batch_us"] = (s1["consumer_wait_s"] - s0["consumer_wait_s"]) / n * 1e6
    d0, d1 = s0["device"], s1["device"]
    out["staging_waits"] = d1["staging_waits"] - d0["staging_waits"]
    out["in_place_fraction"] = d1["in_place_bytes"] / max(1, d1["fed_bytes"])
    out["copy_gbs"] = d1["copy_gbs"]
    if e0 is not None:
        out["utilization"] = (e1["busy_s"] - e0["busy_s"]) / (e1["wall_s"] - e0["wall_s"])
        out["vs_model"] = out["device_gbs"] / out["model_gbs"]
    return out


# -- checkpoints ---------------------------------------------------------------------------------

def model_d2h(dev, cuda, out):
    if cuda:
        return
    memcpy = host_memcpy_rate()
    model = min(55e9, memcpy / 2)
    dev.sim_set("d2h=%dMB/s" % int(model / 1e6))
    out.update(host_memcpy_gbs=memcpy / 1e9, model_gbs=int(model / 1e6) / 1e3)


def device_state(dev, nbuf, mib):
    from threadloom import devices
    s = devices.current_stream(dev)
    bufs = []
    for k in range(nbuf):
        b = s.alloc(mib * MiB)
        s.memset(b, k + 1)
        bufs.append(b)
    s.synchronize()
    return bufs


def child_stall(rounds, directory, cuda):
    import threadloom
    from threadloom import devices
    dev = threadloom.devices()[0]
    out = {"device": str(dev), "state_mib": 256}
    model_d2h(dev, cuda, out)
    state = device_state(dev, 4, 64)
    # the D2H copy time of the state: the same bytes into pinned staging on one stream
    pool = devices.StagingPool(dev, 64 * MiB, 4)
    side = devices.Stream(dev)
    copies, stalls, totals = [], [], []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with threadloom.Checkpointer(tmp, keep=1, staging_bytes=512 * MiB,
                                     chunk_bytes=32 * MiB) as ck:
            ck.save({"w": state}, 0).result()  # warm-up: pinned pool, files, caches
            for r in range(rounds):
                slots = [pool.acquire() for _ in state]
                t0 = time.perf_counter()
                for sl, b in zip(slots, state):
                    sl.copy_from_device(b, side)
                side.synchronize()
                copies.append(time.perf_counter() - t0)
                for sl in slots:
                    sl.release()
                t0 = time.perf_counter()
                fut = ck.save({"w": state}, r + 1)
                stalls.append(time.perf_counter() - t0)
                fut.result()
                totals.append(time.perf_counter() - t0)
    out.update(copy_s=statistics.median(copies), stall_s=statistics.median(stalls),
               save_s=statistics.median(totals), copies=copies, stalls=stalls)
    out["stall_vs_copy"] = out["stall_s"] / out["copy_s"]
    return out


def child_training(seconds, rounds, every, directory, cuda):
    import threadloom
    from threadloom import devices
    dev = threadloom.devices()[0]
    out = {"device": str(dev), "state_mib": 64, "kernel_ms": 2.0, "save_every_s": every,
           "depth": 3}
    model_d2h(dev, cuda, out)
    s = devices.current_stream(dev)
    (w,) = device_state(dev, 1, 64)
    part = w.view(0, MiB)

    def window(ck):
        """Steps per second and the compute engine's busy fraction over `seconds`, saving every
        `every` seconds when ck is given."""
        events, n = [], 0
        e0 = None if cuda else dev.engine_stats()["compute"]
        t0 = time.perf_counter()
        next_save, saves, futs = t0 + every / 2, 0, []
        while True:
            s.launch(2_000_000)
            s.memset(part, n % 256)  # the in-place update of a training step
            events.append(s.record_event())
            n += 1
            if len(events) > out["depth"]:
                events.pop(0).synchronize()
            now = time.perf_counter()
            if ck is not None and now >= next_save:
                futs.append(ck.save({"w": w}, n))
                saves += 1
                next_save += every
            if now - t0 >= seconds:
                break
        for e in events:
            e.synchronize()
        t1 = time.perf_counter()
        e1 = None if cuda else dev.engine_stats()["compute"]
        for f in futs:
            f.result()
        busy = None if e0 is None else (e1["busy_s"] - e0["busy_s"]) / (e1["wall_s"] - e0["wall_s"])
        return n / (t1 - t0), busy, saves

    plain, saving = [], []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with threadloom.Checkpointer(tmp, keep=2, staging_bytes=128 * MiB) as ck:
            ck.save({"w": w}, 0).result()  # warm-up
            window(None)
            for _ in range(rounds):
                plain.append(window(None))
                saving.append(window(ck))
    out["plain_steps_per_s"] = statistics.median(x[0] for x in plain)
    out["saving_steps_per_s"] = statistics.median(x[0] for x in saving)
    out["saves"] = sum(x[2] for x in saving)
    out["step_ratio"] = out["saving_steps_per_s"] / out["plain_steps_per_s"]
    if not cuda:
        out["plain_busy"] = statistics.median(x[1] for x in plain)
        out["saving_busy"] = statistics.median(x[1] for x in saving)
        out["busy_ratio"] = out["saving_busy"] / out["plain_busy"]
    out["rounds"] = rounds
    return out


# -- the parent ----------------------------------------------------------------------------------

def run_child(args, spec):
    from bench_devices import run_child as run
    return run(args, spec, __file__, timeout=900)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true", help="run on cuda:0 instead of sim")
    p.add_argument("--quick", action="store_true", help="short runs (numbers mean little)")
    p.add_argument("--dir", default=os.path.join(HERE, "..", "build"),
                   help="where the checkpoints are written (default: build/, the repo's disk)")
    p.add_argument("--save-every", type=float, default=2.0, help="seconds between saves "
                   "in the training section (default 2)")
    p.add_argument("--link", type=float, default=0.5, help="sim: the H2D model as a fraction "
                   "of the slower of the host loader's rate and memcpy (default 0.5)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, rest = a.child[0], a.child[1:]
        cuda = rest[-1] == "1"
        if kind == "loader":
            r = child_loader(float(rest[0]), float(rest[1]), cuda)
        elif kind == "stall":
            r = child_stall(int(rest[0]), rest[1], cuda)
        else:
            r = child_training(float(rest[0]), int(rest[1]), float(rest[2]), rest[3], cuda)
        print(json.dumps(r))
        return 0
    if a.cuda and cuda_unusable("bench_device_state", a.json):
        return 0
    spec = "cuda" if a.cuda else "sim:1"
    c = "1" if a.cuda else "0"
    os.makedirs(a.dir, exist_ok=True)
    secs = 0.3 if a.quick else 2.0
    res = {"backend": "cuda" if a.cuda else "sim", "quick": a.quick,
           "loadavg_start": os.getloadavg()[0]}
    r = res["loader"] = run_child(["loader", str(secs), str(a.link), c], spec)
    print("loader    %s, 2 workers, 2 MiB batches: %.2f GB/s on the device%s; host path %.2f GB/s; "
          "consumer %.0f us per batch in next(); %d staging waits; %.0f%% of the bytes collated "
          "in place" % (r["device"], r["device_gbs"],
                        "" if a.cuda else " (model %.2f GB/s: %.1f%%), H2D engine busy %.1f%% "
                        "(goal >= 90%%)" % (r["model_gbs"], 100 * r["vs_model"],
                                            100 * r["utilization"]),
                        r["host_gbs"], r["wait_per_batch_us"], r["staging_waits"],
                        100 * r["in_place_fraction"]))
    r = res["stall"] = run_child(["stall", "3" if a.quick else "7", a.dir, c], spec)
    print("stall     save() of 256 MiB of device state: %.1f ms (median), the D2H copy of the "
          "same bytes %.1f ms: %.2fx (goal <= 1.2x); save to committed %.0f ms%s"
          % (1e3 * r["stall_s"], 1e3 * r["copy_s"], r["stall_vs_copy"], 1e3 * r["save_s"],
             "" if a.cuda else "; D2H modelled at %.2f GB/s" % r["model_gbs"]))
    r = res["training"] = run_child(["training", "1.0" if a.quick else "4.0",
                                     "1" if a.quick else "3", str(a.save_every), a.dir, c], spec)
    print("training  2 ms kernels + in-place updates, 64 MiB state saved every %.1f s: %.1f vs "
          "%.1f steps/s without saves: %.1f%%%s (goal >= 97%%; %d saves)"
          % (a.save_every, r["saving_steps_per_s"], r["plain_steps_per_s"],
             100 * r["step_ratio"],
             "" if a.cuda else "; compute engine busy %.1f%% vs %.1f%%: %.1f%%"
             % (100 * r["saving_busy"], 100 * r["plain_busy"], 100 * r["busy_ratio"]),
             r["saves"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
