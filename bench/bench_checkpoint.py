"""threadloom.Checkpointer against its baselines, all measured in this run on this disk.

  bandwidth  Checkpointer.save of SIZE MiB in 64 MiB tensors, from the call to the committed
             future, vs a raw sequential write (+ fsync) of the same bytes with os.write into one
             file (the `dd conv=fsync` baseline). Goal: >= 90%. Run with the default staging
             budget (256 MiB: the checkpoint streams through it) and one that holds it all.
  stall      the time save() blocks the training thread vs a plain memcpy of the same bytes into
             already-faulted host memory (the host stand-in for the D2H copy). Goal: <= 1.2x.
  sizes      the stall against state size: for each size of --sizes, the time save() blocks the
             training thread vs a synchronous torch.save-like write on the training thread (a
             pickled header, then every tensor's bytes into one file; torch.save does not fsync)
             and the same write + fsync (what a durable synchronous checkpoint costs).
  training   a CPU "training loop" (threads running Python work) while a save writes in the
             background, vs the same loop without a save. Goal: >= 97%. The writer needs CPU
             (copy, hash, the kernel's page-cache copy); with as many loop threads as cores it
             takes cycles from the loop, so small machines measure below the goal.

    python bench/bench_checkpoint.py [--size MiB] [--sizes 64,128,...] [--dir DIR] [--repeat N]
                                     [--json FILE]
"""

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import threadloom  # noqa: E402

MiB = 1 << 20
TENSOR = 64 * MiB


def make_state(size):
    """`size` bytes of host tensors of 64 MiB (one tensor of `size` when smaller)."""
    block = os.urandom(MiB)
    tensor = min(TENSOR, size)
    return {"layer%02d" % i: memoryview(bytearray(block * (tensor // MiB)))
            for i in range(size // tensor)}


def drop_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def raw_write(state, path):
    """Sequential os.write of every tensor into one file, then fsync."""
    drop_file(path)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for v in state.values():
        view = v
        while len(view):
            n = os.write(fd, view)
            view = view[n:]
    os.fsync(fd)
    os.close(fd)
    t = time.perf_counter() - t0
    drop_file(path)
    return t


def torch_save_like(state, path, fsync):
    """What torch.save does with host tensors, on the calling thread: a small pickled header, then
    every tensor's bytes in order into one file; torch.save stops there (no fsync). Returns the
    seconds the caller is blocked. The file's dirty pages are synced (untimed) before it is
    removed, so the next measurement starts on a quiet disk."""
    drop_file(path)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        pickle.dump({k: len(v) for k, v in state.items()}, f)
        for v in state.values():
            f.write(v)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    t = time.perf_counter() - t0
    os.sync()
    drop_file(path)
    return t


def stall_sweep(sizes, work_dir, repeat):
    """Per size: save() stall and commit time (staging holds the state) vs torch_save_like."""
    rows = []
    path = os.path.join(work_dir, "sync.bin")
    for mib in sizes:
        state = make_state(mib * MiB)
        with threadloom.Checkpointer(os.path.join(work_dir, "sweep"), keep=1,
                                     staging_bytes=(mib + 64) * MiB) as ck:
            ckpt_write(ck, state, 0)  # warm: staging slots allocated and faulted in
            stalls, totals, plain, synced = [], [], [], []
            for r in range(repeat):
                t, stall, _ = ckpt_write(ck, state, r + 1)
                totals.append(t)
                stalls.append(stall)
                plain.append(torch_save_like(state, path, fsync=False))
                synced.append(torch_save_like(state, path, fsync=True))
        row = {"size_mib": mib, "save_stall_s": min(stalls), "save_commit_s": min(totals),
               "sync_write_s": min(plain), "sync_write_fsync_s": min(synced),
               "memcpy_s": min(memcpy_time(state) for _ in range(repeat))}
        rows.append(row)
        print("stall at %5d MiB: save() %.3f s (committed after %.3f s), torch.save-like %.3f s, "
              "+ fsync %.3f s, memcpy %.3f s: save() blocks %.1fx less than the synchronous "
              "write" % (mib, row["save_stall_s"], row["save_commit_s"], row["sync_write_s"],
                         row["sync_write_fsync_s"], row["memcpy_s"],
                         row["sync_write_s"] / row["save_stall_s"]), flush=True)
        del state
    return rows


def ckpt_write(ck, state, step):
    t0 = time.perf_counter()
    fut = ck.save(state, step)
    stall = time.perf_counter() - t0
    fut.result()
    return time.perf_counter() - t0, stall, fut.progress


def memcpy_time(state):
    dst = {k: memoryview(bytearray(len(v))) for k, v in state.items()}
    for k, v in state.items():  # fault the pages in first, as warm staging slots are
        dst[k][:] = v
    t0 = time.perf_counter()
    for k, v in state.items():
        dst[k][:] = v
    return time.perf_counter() - t0


SPIN = 2000


def work():
    s = 0
    for i in range(SPIN):
        s += i & 7
    return s


def loop_rate(threads, seconds, during=None):
    """Iterations/s of `threads` Python threads over `seconds`; `during()` runs meanwhile on the
    calling thread and its window is what is measured when given."""
    stop = threading.Event()
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def run(i):
        barrier.wait()
        n = 0
        while not stop.is_set():
            work()
            n += 1
            counts[i] = n

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    time.sleep(0.2)
    c0, t0 = sum(counts), time.perf_counter()
    if during is None:
        time.sleep(seconds)
    else:
        during()
    c1, t1 = sum(counts), time.perf_counter()
    stop.set()
    for t in ts:
        t.join()
    return (c1 - c0) / (t1 - t0), t1 - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512,
                    help="checkpoint MiB (a multiple of 64, or a power of two below 64)")
    ap.add_argument("--sizes", help="state sizes in MiB for the stall sweep (default: 64, 128, "
                    "... up to --size)")
    ap.add_argument("--dir", help="directory on the disk to measure (default: a temp dir in "
                    "bench/results, i.e. on the repository's disk)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="training-loop threads")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    a = ap.parse_args()
    base = a.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(base, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="ckpt-bench-", dir=base)
    size = (a.size // 64) * 64 * MiB if a.size >= 64 else a.size * MiB
    if size <= 0 or (size < TENSOR and size & (size - 1)):
        ap.error("--size: a multiple of 64 MiB, or a power of two below 64, not %d" % a.size)
    if a.sizes:
        try:
            sizes = sorted({int(x) for x in a.sizes.split(",")})
        except ValueError:
            ap.error("--sizes: MiB counts separated by commas, e.g. 64,128,256")
        if any(m <= 0 or (m < 64 and m & (m - 1)) or (m >= 64 and m % 64) for m in sizes):
            ap.error("--sizes: each a multiple of 64, or a power of two below 64")
    else:
        sizes, m = [], 64
        while m <= size // MiB:
            sizes.append(m)
            m *= 2
        sizes = sizes or [size // MiB]
    state = make_state(size)
    res = {"size_mib": size // MiB, "cores": os.cpu_count(), "dir": work_dir}
    print("checkpoint of %d MiB in %d tensors of %d MiB, in %s, %d CPU(s)"
          % (size // MiB, len(state), len(next(iter(state.values()))) // MiB, work_dir,
             os.cpu_count()))
    try:
        # -- bandwidth ---------------------------------------------------------------------------
        raw_path = os.path.join(work_dir, "raw.bin")
        for label, staging in (("staging 256 MiB (streams)", 256 * MiB),
                               ("staging >= checkpoint", size + 64 * MiB)):
            with threadloom.Checkpointer(os.path.join(work_dir, "ck"), keep=1,
                                         staging_bytes=staging) as ck:
                ckpt_write(ck, state, 0)  # warm: staging slots allocated and faulted in
                raws, cks, stalls = [], [], []
                for r in range(a.repeat):
                    raws.append(raw_write(state, raw_path))
                    t, stall, _ = ckpt_write(ck, state, r + 1)
                    cks.append(t)
                    stalls.append(stall)
            raw_bw, ck_bw = size / min(raws) / 1e6, size / min(cks) / 1e6
            print("bandwidth [%s]: raw write+fsync %.0f MB/s, Checkpointer %.0f MB/s: %.0f%% "
                  "(goal >= 90%%)" % (label, raw_bw, ck_bw, 100 * ck_bw / raw_bw))
            res.setdefault("bandwidth", []).append(
                {"staging": label, "raw_MBps": raw_bw, "ckpt_MBps": ck_bw,
                 "ratio": ck_bw / raw_bw, "raw_s": raws, "ckpt_s": cks, "stall_s": stalls})
        # -- stall -------------------------------------------------------------------------------
        mc = min(memcpy_time(state) for _ in range(a.repeat))
        stall = min(res["bandwidth"][1]["stall_s"])
        print("stall: save() returned in %.3f s, memcpy of the same bytes %.3f s: %.2fx "
              "(goal <= 1.2x; staging holds the checkpoint)" % (stall, mc, stall / mc))
        stream_stall = min(res["bandwidth"][0]["stall_s"])
        print("       with the 256 MiB budget save() returns in %.3f s (it waits for the disk "
              "for what does not fit: %.2fx memcpy)" % (stream_stall, stream_stall / mc))
        res["stall"] = {"save_s": stall, "memcpy_s": mc, "ratio": stall / mc,
                        "streaming_save_s": stream_stall}
        # -- training-loop throughput ------------------------------------------------------------
        with threadloom.Checkpointer(os.path.join(work_dir, "ck"), keep=1,
                                     staging_bytes=size + 64 * MiB) as ck:
            ckpt_write(ck, state, 100)
            base_rates, save_rates, step = [], [], [200]

            def one_save():
                step[0] += 1
                ck.save(state, step[0]).result()

            for _ in range(a.repeat):
                rate_with, window = loop_rate(a.threads, 0, during=one_save)
                rate_without, _ = loop_rate(a.threads, window)
                save_rates.append(rate_with)
                base_rates.append(rate_without)
        ratio = sorted(save_rates)[len(save_rates) // 2] / sorted(base_rates)[len(base_rates) // 2]
        print("training loop (%d threads): %.0f it/s during a save, %.0f it/s without: %.1f%% "
              "(goal >= 97%%)" % (a.threads, sorted(save_rates)[len(save_rates) // 2],
                                  sorted(base_rates)[len(base_rates) // 2], 100 * ratio))
        res["training"] = {"threads": a.threads, "with_save": save_rates,
                           "without": base_rates, "ratio": ratio}
        # -- stall vs state size -----------------------------------------------------------------
        del state
        res["sizes"] = stall_sweep(sizes, work_dir, a.repeat)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
