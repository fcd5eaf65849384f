"""threadloom.Checkpointer against its baselines, all measured in this run on this disk.

  bandwidth  Checkpointer.save of SIZE MiB in 64 MiB tensors, from the call to the committed
             future, vs a raw sequential write (+ fsync) of the same bytes with os.write into one
             file (the `dd conv=fsync` baseline). Goal: >= 90%. Run with the default staging
             budget (256 MiB: the checkpoint streams through it) and one that holds it all.
  stall      the time save() blocks the training thread vs a plain memcpy of the same bytes into
             already-faulted host memory (the host stand-in for the D2H copy). Goal: <= 1.2x.
             Also save() with copy_threads=0 (no I/O thread helps the staging copy), interleaved
             with the others: what the helpers save.
  sizes      the stall against state size: for each size of --sizes, the time save() blocks the
             training thread vs torch's own checkpointing of the same bytes (torch.Tensor views
             of the same memory), interleaved in every repeat: the asynchronous anchor,
             torch.distributed.checkpoint.async_save (it stages the state and returns a future;
             a background thread writes and fsyncs the files), on a one-rank gloo process group
             (CPU, this process), and the synchronous torch.save on the training thread (it does
             not fsync) and the same + fsync (what a durable synchronous checkpoint costs).
             Without torch, a torch.save-like write stands in for torch.save (a pickled header,
             then every tensor's bytes into one file) and async_save is left out, saying why.
  training   a CPU "training loop" while a save runs, vs the same loop without a save, over
             the save's window (call to commit). Goal: >= 97%. Three shapes: "saturated"
             (--threads loop threads, default one per core, running Python work; another thread
             calls save()), "1 thread" (one such loop thread: a core is left over) and
             "gpu-like" (one training thread whose step is CPU work, the launches, then a wait
             as long, the GPU; it calls save() itself, so its stall is in the window). Each
             reports the ratio over the whole window and over the background part (save()
             returned to commit), and the CPU a save costs: the saving thread's (the staging
             copy) and the writer threads' (hash, write system calls), from /proc/self/task.
             With loop threads on every core, the loop loses what the save spends: the ratio is
             about 1 - save CPU / (cores x save duration), whatever the priorities.
  io paths   each write path (io="buffered", "direct" = O_DIRECT, "uring" = O_DIRECT through
             io_uring) vs the raw baselines of the same size on the same disk, all interleaved in
             one run: os.write + fsync (buffered), O_DIRECT os.pwrite from an aligned block + fsync,
             and dd (conv=fsync, with and without oflag=direct, from /dev/zero). Reports MB/s, the
             ratio to the best raw write, and the CPU seconds the writer threads and the caller
             spend per GiB (from /proc/self/task: robust on a busy machine, where rates are not).
             Then the training-loop ratio per write path and writer priority (io_priority).

    python bench/bench_checkpoint.py [--size MiB] [--sizes 64,128,...] [--dir DIR] [--repeat N]
                                     [--sections bandwidth,training,...] [--json FILE]
"""

import argparse
import glob
import json
import mmap
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import threadloom  # the installed package (make bench: build/venv)

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


def timed_write(path, write, fsync):
    """Seconds the calling thread is blocked by write(f) into a new file at path, flushed (and
    fsynced with fsync). The file's dirty pages are synced (untimed) before it is removed, so the
    next measurement starts on a quiet disk."""
    drop_file(path)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        write(f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    t = time.perf_counter() - t0
    os.sync()
    drop_file(path)
    return t


def torch_save_like(state, path, fsync):
    """What torch.save does with host tensors, on the calling thread: a small pickled header, then
    every tensor's bytes in order into one file; torch.save stops there (no fsync). Returns the
    seconds the caller is blocked (timed_write)."""
    def write(f):
        pickle.dump({k: len(v) for k, v in state.items()}, f)
        for v in state.values():
            f.write(v)
    return timed_write(path, write, fsync)


class TorchAnchors:
    """torch's own checkpointing of a state, where torch imports: torch.save (synchronous, on the
    calling thread) and torch.distributed.checkpoint.async_save (asynchronous: it stages the
    state and returns a future; a background thread writes the files and fsyncs them) on a
    one-rank gloo process group over a HashStore (CPU only, no network). `skipped` is None, or
    why async_save (and then the real torch.save) cannot run here."""

    def __init__(self):
        self.skipped, self.version, self._own_group = None, None, False
        try:
            import torch
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
        except ImportError as e:
            self.skipped = "torch is not importable by %s (%s)" % (sys.executable, e)
            return
        self.torch, self.dist, self.dcp, self.version = torch, dist, dcp, torch.__version__
        if not dist.is_available() or not dist.is_gloo_available():
            self.skipped = "torch %s was built without torch.distributed's gloo backend" % (
                torch.__version__)
            return
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
            self._own_group = True

    def tensors(self, state):
        """The state as uint8 torch tensors over the same memory (no copy)."""
        return {k: self.torch.frombuffer(v, dtype=self.torch.uint8) for k, v in state.items()}

    def save(self, tstate, path, fsync):
        """torch.save of tstate into path (+ fsync): the seconds the caller is blocked
        (timed_write)."""
        return timed_write(path, lambda f: self.torch.save(tstate, f), fsync)

    def async_save(self, tstate, path):
        """async_save of tstate into the directory path: (seconds the call blocks, seconds to
        the future's result: written and fsynced). The directory is removed afterwards."""
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        fut = self.dcp.async_save(tstate, checkpoint_id=path)
        stall = time.perf_counter() - t0
        fut.result()
        total = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return stall, total

    def close(self):
        if self._own_group:
            self.dist.destroy_process_group()
            self._own_group = False


def stall_sweep(sizes, work_dir, repeat):
    """Per size: save() stall and commit time (staging holds the state) vs torch's
    async_save (stall and commit) and torch.save (+ fsync), interleaved in every repeat; without
    torch, vs torch_save_like. Returns (rows, what the synchronous baseline is, why async_save is
    left out or None)."""
    rows = []
    path = os.path.join(work_dir, "sync.bin")
    anchors = TorchAnchors()
    try:
        for mib in sizes:
            state = make_state(mib * MiB)
            tstate = None if anchors.skipped else anchors.tensors(state)
            with threadloom.Checkpointer(os.path.join(work_dir, "sweep"), keep=1,
                                         staging_bytes=(mib + 64) * MiB) as ck:
                ckpt_write(ck, state, 0)  # warm: staging slots allocated and faulted in
                if tstate is not None:    # warm: async_save's first call starts its machinery
                    anchors.async_save(tstate, os.path.join(work_dir, "dcp"))
                stalls, totals, plain, synced, a_stalls, a_totals = [], [], [], [], [], []
                for r in range(repeat):
                    t, stall, _ = ckpt_write(ck, state, r + 1)
                    totals.append(t)
                    stalls.append(stall)
                    if tstate is None:
                        plain.append(torch_save_like(state, path, fsync=False))
                        synced.append(torch_save_like(state, path, fsync=True))
                        continue
                    a_stall, a_total = anchors.async_save(tstate, os.path.join(work_dir, "dcp"))
                    a_stalls.append(a_stall)
                    a_totals.append(a_total)
                    plain.append(anchors.save(tstate, path, fsync=False))
                    synced.append(anchors.save(tstate, path, fsync=True))
            copies = [memcpy_time(state) for _ in range(repeat)]
            row = {"size_mib": mib, "save_stall_s": min(stalls), "save_commit_s": min(totals),
                   "sync_write_s": min(plain), "sync_write_fsync_s": min(synced),
                   "memcpy_s": min(copies),
                   "runs": {"save_stall_s": stalls, "save_commit_s": totals,
                            "sync_write_s": plain, "sync_write_fsync_s": synced,
                            "memcpy_s": copies}}
            if a_stalls:
                row.update(async_save_stall_s=min(a_stalls), async_save_commit_s=min(a_totals))
                row["runs"].update(async_save_stall_s=a_stalls, async_save_commit_s=a_totals)
            rows.append(row)
            print("stall at %5d MiB: save() %.3f s (committed after %.3f s)%s, %s %.3f s, "
                  "+ fsync %.3f s, memcpy %.3f s" % (
                      mib, row["save_stall_s"], row["save_commit_s"],
                      ", async_save %.3f s (committed after %.3f s)" % (
                          row["async_save_stall_s"], row["async_save_commit_s"])
                      if a_stalls else "", "torch.save-like" if tstate is None else "torch.save",
                      row["sync_write_s"], row["sync_write_fsync_s"], row["memcpy_s"]), flush=True)
            del state, tstate
    finally:
        anchors.close()
    if anchors.skipped:
        print("async_save left out: %s" % anchors.skipped)
    return (rows, "torch.save-like" if anchors.skipped else "torch.save %s" % anchors.version,
            anchors.skipped)


def stall_vs_memcpy(state, work_dir, repeat):
    """save() stall (staging holds the state) with the default copy helpers and with
    copy_threads=0, and a memcpy of the same bytes into faulted memory, interleaved: medians and
    bests of `repeat` rounds."""
    dst = {k: memoryview(bytearray(len(v))) for k, v in state.items()}
    for k, v in state.items():  # fault the pages in first, as warm staging slots are
        dst[k][:] = v
    staging = sum(len(v) for v in state.values()) + 64 * MiB
    with threadloom.Checkpointer(os.path.join(work_dir, "stall"), keep=1,
                                 staging_bytes=staging) as ck, \
            threadloom.Checkpointer(os.path.join(work_dir, "stall-alone"), keep=1,
                                    staging_bytes=staging, copy_threads=0) as alone:
        ckpt_write(ck, state, 0)
        ckpt_write(alone, state, 0)
        saves, alones, copies = [], [], []
        for r in range(repeat):
            saves.append(ckpt_write(ck, state, r + 1)[1])
            alones.append(ckpt_write(alone, state, r + 1)[1])
            t0 = time.perf_counter()
            for k, v in state.items():
                dst[k][:] = v
            copies.append(time.perf_counter() - t0)
        helpers = ck._copy_helpers
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"save_s": med(saves), "save_best_s": min(saves), "memcpy_s": med(copies),
            "memcpy_best_s": min(copies), "ratio": med(saves) / med(copies),
            "save_alone_s": med(alones), "copy_threads": helpers, "saves_s": saves,
            "alone_s": alones, "memcpy_all_s": copies}


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


# ---------------------------------------------------------------------------------------------
# Training-loop shapes during a save
# ---------------------------------------------------------------------------------------------

GPU_STEP_WORK = 20       # work() calls per gpu-like step (the launches, ~2 ms of Python here)


def gpu_like_rate(seconds, save=None):
    """Steps/s of one "gpu-like" training thread: each step runs GPU_STEP_WORK work() calls
    (launching), then waits as long as they took (the GPU computing; a sleep, so the core is
    free meanwhile). With `save` (a callable returning a Future), the training thread calls it
    after a warm-up and the window is from the call to the commit. Returns a dict: rate
    (steps/s over the window), window (s); with `save` also bg_rate (steps/s after save()
    returned), stall (s) and cpu (CPU s of the writer threads, of the training thread inside
    save())."""
    out = {}

    def run():
        def step():
            t0 = time.perf_counter()
            for _ in range(GPU_STEP_WORK):
                work()
            time.sleep(time.perf_counter() - t0)

        t_end = time.perf_counter() + 0.2
        while time.perf_counter() < t_end:
            step()
        n, t0 = 0, time.perf_counter()
        if save is None:
            while time.perf_counter() - t0 < seconds:
                step()
                n += 1
            out.update(rate=n / (time.perf_counter() - t0), window=time.perf_counter() - t0)
            return
        before, c0 = thread_cpu(), time.thread_time()
        fut = save()
        t1, c1 = time.perf_counter(), time.thread_time()
        while not fut.done():
            step()
            n += 1
        t2 = time.perf_counter()
        fut.result()
        out.update(rate=n / (t2 - t0), window=t2 - t0, bg_rate=n / (t2 - t1), stall=t1 - t0,
                   cpu=(cpu_delta(before, thread_cpu())[0], c1 - c0))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def training_shapes(ck, state, threads, repeat, step):
    """The training section: [row per shape]. Saves and no-save windows alternate, the shapes
    take turns in every repeat."""
    shapes = [("saturated", threads), ("1 thread", 1), ("gpu-like", 1)]
    rows = {name: {"shape": name, "threads": n, "with_save": [], "without": [],
                   "background": [], "bg_without": [], "window_s": [], "stall_s": [],
                   "caller_cpu_s": [], "writer_cpu_s": []} for name, n in shapes}

    def save():
        step[0] += 1
        return ck.save(state, step[0])

    for _ in range(repeat):
        for name, n in shapes:
            row = rows[name]
            if name == "gpu-like":
                w = gpu_like_rate(0, save)
                wo = gpu_like_rate(w["window"])
                row["with_save"].append(w["rate"])
                row["without"].append(wo["rate"])
                row["background"].append(w["bg_rate"])
                row["bg_without"].append(wo["rate"])
                row["window_s"].append(w["window"])
                row["stall_s"].append(w["stall"])
                row["writer_cpu_s"].append(w["cpu"][0])
                row["caller_cpu_s"].append(w["cpu"][1])
                continue
            info = {}

            def one_save():
                before, c0, t0 = thread_cpu(), time.thread_time(), time.perf_counter()
                fut = save()
                info["stall"], info["copy"] = time.perf_counter() - t0, time.thread_time() - c0
                info["returned"] = loop_rate.counts()
                fut.result()
                info["cpu"] = (cpu_delta(before, thread_cpu())[0], info["copy"])

            rate_with, window = loop_rate(n, 0, during=one_save)
            c_ret, t_ret = info["returned"]
            c_end, t_end = loop_rate.last_end
            rate_without, _ = loop_rate(n, window)
            row["with_save"].append(rate_with)
            row["without"].append(rate_without)
            row["background"].append((c_end - c_ret) / (t_end - t_ret))
            row["bg_without"].append(rate_without)
            row["window_s"].append(window)
            row["stall_s"].append(info["stall"])
            row["writer_cpu_s"].append(info["cpu"][0])
            row["caller_cpu_s"].append(info["cpu"][1])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out = []
    for name, _ in shapes:
        row = rows[name]
        ratios = [w / wo for w, wo in zip(row["with_save"], row["without"])]
        bg = [w / wo for w, wo in zip(row["background"], row["bg_without"])]
        row.update(ratio=med(ratios), ratios=ratios, background_ratio=med(bg),
                   background_ratios=bg, loadavg=os.getloadavg())
        out.append(row)
        print("training loop, %-9s (%d thread%s): %5.1f%% of its rate without saves over the "
              "save's window (median of %s; goal >= 97%%), %5.1f%% after save() returned; "
              "window %.2f s, stall %.3f s; a save costs the saving thread %.3f CPU-s, the "
              "writers %.3f CPU-s"
              % (name, row["threads"], "" if row["threads"] == 1 else "s", 100 * row["ratio"],
                 "/".join("%.0f" % (100 * x) for x in ratios), 100 * row["background_ratio"],
                 med(row["window_s"]), med(row["stall_s"]), med(row["caller_cpu_s"]),
                 med(row["writer_cpu_s"])), flush=True)
    return out


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
    loop_rate.counts = lambda: (sum(counts), time.perf_counter())  # for `during` to sample
    c0, t0 = sum(counts), time.perf_counter()
    if during is None:
        time.sleep(seconds)
    else:
        during()
    c1, t1 = sum(counts), time.perf_counter()
    loop_rate.last_end = (c1, t1)
    stop.set()
    for t in ts:
        t.join()
    return (c1 - c0) / (t1 - t0), t1 - t0


# ---------------------------------------------------------------------------------------------
# I/O paths: raw baselines, per-path bandwidth and CPU, training-loop ratio per path/priority
# ---------------------------------------------------------------------------------------------

RAW_BLOCK = 32 * MiB
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu():
    """{tid: (name, CPU seconds)} of this process's threads, from /proc: schedstat (ns) where
    the kernel has it, else stat (clock ticks, 10 ms)."""
    out = {}
    for task in glob.glob("/proc/self/task/*"):
        try:
            with open(task + "/comm") as f:
                name = f.read().strip()
            try:
                with open(task + "/schedstat") as f:
                    cpu = int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                with open(task + "/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / TICK
        except OSError:  # the thread exited meanwhile
            continue
        out[int(task.rsplit("/", 1)[1])] = (name, cpu)
    return out


def cpu_delta(before, after):
    """(writer threads' CPU s, other threads' CPU s) between two thread_cpu() samples."""
    writer = other = 0.0
    for tid, (name, cpu) in after.items():
        d = cpu - before.get(tid, (name, 0.0))[1]
        if name.startswith(("tl-ckpt", "iou-wrk")):  # io_uring's workers write for them
            writer += d
        else:
            other += d
    return writer, other


def raw_direct_write(state, path):
    """O_DIRECT sequential os.pwrite of every tensor's bytes through one page-aligned 32 MiB block
    (the sources are not aligned, so each block is copied first, as dd does), then fsync.
    Returns seconds, or None where the file system refuses O_DIRECT."""
    drop_file(path)
    block = mmap.mmap(-1, RAW_BLOCK)
    view = memoryview(block)
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return None
    off = 0
    for v in state.values():
        for pos in range(0, len(v), RAW_BLOCK):
            k = min(RAW_BLOCK, len(v) - pos)  # 64 MiB tensors: whole blocks
            view[:k] = v[pos:pos + k]
            done = 0
            while done < k:
                done += os.pwrite(fd, view[done:k], off + done)
            off += k
    os.fsync(fd)
    os.close(fd)
    t = time.perf_counter() - t0
    view.release()
    block.close()
    drop_file(path)
    return t


def dd_write(path, nbytes, direct):
    """`dd if=/dev/zero of=path bs=32M count=N conv=fsync [oflag=direct]`: seconds, None
    without dd."""
    drop_file(path)
    cmd = ["dd", "if=/dev/zero", "of=" + path, "bs=%d" % RAW_BLOCK,
           "count=%d" % (nbytes // RAW_BLOCK), "conv=fsync"] + (["oflag=direct"] if direct else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True)
    except FileNotFoundError:
        return None
    t = time.perf_counter() - t0
    drop_file(path)
    return t if r.returncode == 0 else None


IO_MODES = ("buffered", "direct", "uring")
TRAINING_CONFIGS = (("buffered", "normal"), ("direct", "normal"), ("direct", "low"),
                    ("direct", "idle"))


def io_paths(state, size, work_dir, repeat, threads, window):
    """The 'io paths' section: returns (bandwidth dict, training list) for the JSON."""
    raw_path = os.path.join(work_dir, "raw.bin")
    times = {k: [] for k in ("raw_buffered", "raw_direct", "dd_buffered", "dd_direct")}
    cks = {io: threadloom.Checkpointer(os.path.join(work_dir, "io-" + io), keep=1, io=io,
                                       io_priority="normal", staging_bytes=size + 64 * MiB)
           for io in IO_MODES}
    per = {io: {"s": [], "writer_cpu_s": [], "caller_cpu_s": []} for io in IO_MODES}
    try:
        for io, ck in cks.items():
            ckpt_write(ck, state, 0)  # warm: staging slots allocated and faulted in
        for r in range(repeat):  # interleaved, so drift of a shared disk hits every path alike
            times["raw_buffered"].append(raw_write(state, raw_path))
            times["raw_direct"].append(raw_direct_write(state, raw_path))
            times["dd_buffered"].append(dd_write(raw_path, size, False))
            times["dd_direct"].append(dd_write(raw_path, size, True))
            for io, ck in cks.items():
                before = thread_cpu()
                t, _, prog = ckpt_write(ck, state, r + 1)
                w, c = cpu_delta(before, thread_cpu())
                per[io]["s"].append(t)
                per[io]["writer_cpu_s"].append(w)
                per[io]["caller_cpu_s"].append(c)
                per[io]["mode"], per[io]["why"] = prog.io, prog.io_why
                per[io]["direct_bytes"] = prog.direct_bytes
    finally:
        for ck in cks.values():
            ck.close()
    raw = {}
    for k, ts in times.items():
        ts = [t for t in ts if t is not None]
        raw[k + "_MBps"] = size / min(ts) / 1e6 if ts else None
    best_name = max((k for k in raw if raw[k]), key=lambda k: raw[k])
    best = raw[best_name]
    print("raw writes of the same %d MiB on this disk: %s" % (size // MiB, ", ".join(
        "%s %s" % (k[:-5], "%.0f MB/s" % v if v else "n/a") for k, v in raw.items())))
    out = {"raw": raw, "best_raw": best_name[:-5], "best_raw_MBps": best, "modes": {},
           "loadavg": os.getloadavg()}
    gib = size / (1 << 30)
    for io in IO_MODES:
        d = per[io]
        bw = size / min(d["s"]) / 1e6
        row = {"MBps": bw, "ratio_vs_best_raw": bw / best,
               "ratio_vs_raw_buffered": bw / raw["raw_buffered_MBps"],
               "writer_cpu_s_per_GiB": sorted(d["writer_cpu_s"])[len(d["s"]) // 2] / gib,
               "caller_cpu_s_per_GiB": sorted(d["caller_cpu_s"])[len(d["s"]) // 2] / gib,
               "mode": d["mode"], "why": d["why"], "direct_bytes": d["direct_bytes"],
               "s": d["s"]}
        out["modes"][io] = row
        print("io=%-8s %5.0f MB/s: %3.0f%% of the best raw write (%s), %3.0f%% of raw buffered; "
              "writer threads %.2f CPU-s/GiB, caller %.2f CPU-s/GiB%s"
              % (io, bw, 100 * row["ratio_vs_best_raw"], best_name[:-5],
                 100 * row["ratio_vs_raw_buffered"], row["writer_cpu_s_per_GiB"],
                 row["caller_cpu_s_per_GiB"],
                 "" if d["mode"] == io else " (used %s: %s)" % (d["mode"], d["why"])))
    # Training loop per (path, priority): saves back to back for >= `window` seconds while the
    # loop runs, then the loop alone for as long; the configurations take turns in every repeat.
    cks = {cfg: threadloom.Checkpointer(os.path.join(work_dir, "tr-%s-%s" % cfg), keep=1,
                                        io=cfg[0], io_priority=cfg[1],
                                        staging_bytes=size + 64 * MiB)
           for cfg in TRAINING_CONFIGS}
    rows = {cfg: {"with_save": [], "without": [], "writer_cpu_s": [], "saves": []}
            for cfg in TRAINING_CONFIGS}
    step = [0]
    try:
        for ck in cks.values():
            ckpt_write(ck, state, 0)
        for _ in range(repeat):
            for cfg, ck in cks.items():
                count = [0]

                def saves():
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < window:
                        step[0] += 1
                        ck.save(state, step[0]).result()
                        count[0] += 1

                before = thread_cpu()
                rate_with, secs = loop_rate(threads, 0, during=saves)
                row = rows[cfg]
                row["writer_cpu_s"].append(cpu_delta(before, thread_cpu())[0] / count[0])
                row["saves"].append(count[0])
                row["with_save"].append(rate_with)
                row["without"].append(loop_rate(threads, secs)[0])
    finally:
        for ck in cks.values():
            ck.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    training = []
    for (io, prio), row in rows.items():
        ratios = [w / wo for w, wo in zip(row["with_save"], row["without"])]
        # A lower writer priority stretches each save over more of the window (fewer saves in
        # it), so the loop time lost per save compares the paths fairly as well as the ratio.
        lost = [(1 - r) * window / n for r, n in zip(ratios, row["saves"])]
        row.update(io=io, io_priority=prio, threads=threads, ratio=med(ratios), ratios=ratios,
                   window_s=window, loop_s_lost_per_save=med(lost))
        training.append(row)
        print("training loop (%d threads), io=%-8s io_priority=%-6s: %5.1f%% of its rate without "
              "saves (median of %s; goal >= 97%%); %s saves per %g s window, loop time lost "
              "%.3f s per save; writer threads %.3f CPU-s per save"
              % (threads, io, prio, 100 * row["ratio"],
                 "/".join("%.0f" % (100 * x) for x in ratios), "/".join(map(str, row["saves"])),
                 window, med(lost), med(row["writer_cpu_s"])))
    return out, training


SECTIONS = ("bandwidth", "stall", "training", "io_paths", "sizes")


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
    ap.add_argument("--window", type=float, default=2.0,
                    help="seconds of back-to-back saves per training-loop measurement in the "
                    "io paths section")
    ap.add_argument("--no-io-paths", action="store_true",
                    help="skip the per-write-path section (buffered, O_DIRECT, io_uring)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="the sections to run, separated by commas (default: all of %s)"
                    % ", ".join(SECTIONS))
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error("--sections: from %s, not %s" % (", ".join(SECTIONS),
                                                   ", ".join(sorted(sections - set(SECTIONS)))))
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
        if "bandwidth" in sections:
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
        if "stall" in sections:
            res["stall"] = stall_vs_memcpy(state, work_dir, max(a.repeat, 5))
            st = res["stall"]
            print("stall: save() returned in %.3f s (median; best %.3f s), memcpy of the same "
                  "bytes %.3f s (best %.3f s): %.2fx (goal <= 1.2x; staging holds the "
                  "checkpoint); copy_threads=0 (the saving thread copies alone) %.3f s: the %d "
                  "helper(s) make the stall %.2fx shorter"
                  % (st["save_s"], st["save_best_s"], st["memcpy_s"], st["memcpy_best_s"],
                     st["ratio"], st["save_alone_s"], st["copy_threads"],
                     st["save_alone_s"] / st["save_s"]))
            if res.get("bandwidth"):
                stream_stall = min(res["bandwidth"][0]["stall_s"])
                print("       with the 256 MiB budget save() returns in %.3f s (it waits for the "
                      "disk for what does not fit: %.2fx memcpy)"
                      % (stream_stall, stream_stall / st["memcpy_s"]))
                st["streaming_save_s"] = stream_stall
        # -- training-loop throughput ------------------------------------------------------------
        if "training" in sections:
            with threadloom.Checkpointer(os.path.join(work_dir, "ck"), keep=1,
                                         staging_bytes=size + 64 * MiB) as ck:
                ckpt_write(ck, state, 100)
                shapes = training_shapes(ck, state, a.threads, a.repeat, [200])
            sat = shapes[0]
            res["training"] = {"threads": a.threads, "with_save": sat["with_save"],
                               "without": sat["without"], "ratio": sat["ratio"]}
            res["training_shapes"] = shapes
        # -- I/O paths (buffered / O_DIRECT / io_uring) vs raw writes; training per path ---------
        if not a.no_io_paths and "io_paths" in sections:
            res["io_paths"], res["training_by_io"] = io_paths(state, size, work_dir, a.repeat,
                                                               a.threads, a.window)
        # -- stall vs state size -----------------------------------------------------------------
        del state
        if "sizes" in sections:
            res["sizes"], res["sync_baseline"], why = stall_sweep(sizes, work_dir, a.repeat)
            if why:
                res["async_save_skipped"] = why
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
