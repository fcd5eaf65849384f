"""The main job: a threaded, preemption-safe training run in one free-threaded process.

Everything threadloom does, in one program:

  - threadloom.DataLoader feeds every rank its shard (worker threads, each with its own replica
    of the dataset; batches collated into NUMA-local arena memory);
  - threadloom.spmd runs one driver thread per GPU; with no GPU (or while the GPU path is not
    built) a CPU world of --ranks ranks, and the first line says which;
  - the ranks average dense gradients with allreduce_buckets and exchange sparse embedding
    gradients with allgather, so every replica keeps bit-identical weights;
  - rank 0 saves an asynchronous checkpoint every --ckpt-every steps with threadloom.Checkpointer
    (model, step and every rank's DataLoader position): training goes on while it is written;
  - on start the job resumes from the newest complete checkpoint in --ckpt-dir; SIGUSR2, SIGTERM
    or Ctrl-C make every rank stop at the same step, save a checkpoint and exit with status 75
    (run the same command again to resume; a second Ctrl-C exits at once, and the newest
    complete checkpoint still loads);
  - a live status line on a terminal (steps/s, samples/s, feed rate, checkpoint progress), plain
    lines every --log-every seconds otherwise, and a summary at the end.

The model: logistic regression on hashed tokens, a sparse embedding table (the bulk of the
checkpoint) averaged over the words of a line, then a linear layer. The data: synthetic text
lines, generated and tokenized in the loader threads (the Python-heavy part of a real input
pipeline); the label comes from hidden per-word scores the model has to learn.

    make demo      # runs it three times: uninterrupted, preempted by SIGUSR2, resumed + checked
    python examples/main_job.py --ckpt-dir /tmp/job                      # run or resume
    python examples/main_job.py --ckpt-dir /tmp/job2 --preempt-at 500    # SIGUSR2 to itself
    python examples/main_job.py --ckpt-dir /tmp/job2 --check-against /tmp/job
"""

import argparse
import array
import hashlib
import math
import os
import random
import signal
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import threadloom  # noqa: E402
from threadloom.data import Dataset  # noqa: E402

EXIT_PREEMPTED = 75        # EX_TEMPFAIL: stopped early with a checkpoint; run again to resume
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "do", "gi")


# ---------------------------------------------------------------------------------------------
# data: synthetic text lines, tokenized in the loader threads
# ---------------------------------------------------------------------------------------------

class Lines(Dataset):
    """`n` labelled lines of `tokens` words. Sample i is a pure function of (seed, i), so the
    same index gives the same sample whichever worker thread builds it (that is what makes the
    resumed run bit-identical to the uninterrupted one)."""

    def __init__(self, n, tokens, buckets, seed, vocab=3000):
        rng = random.Random(seed)
        self.n, self.tokens, self.buckets, self.seed = n, tokens, buckets, seed
        self.words = []
        for _ in range(vocab):
            self.words.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
        self.score = {w: rng.gauss(0.0, 1.0) for w in self.words}   # hidden: what is learnt

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = random.Random(self.seed * 1_000_003 + i)
        words = self.words
        raw = " ".join(words[rng.randrange(len(words))] for _ in range(self.tokens))
        line = raw.capitalize() + "."                      # what would come from a file
        toks = line.rstrip(".").lower().split()            # ... and its preprocessing
        ids = array.array("q", [zlib.crc32(t.encode()) % self.buckets for t in toks])
        s = sum(self.score[t] for t in toks) / math.sqrt(len(toks)) + rng.gauss(0.0, 0.3)
        return ids, (1.0 if s > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# the model: an embedding table (float32), a linear layer and a bias (float64)
# ---------------------------------------------------------------------------------------------

class Model:
    """One replica. Each rank owns its own (no Python object is shared between rank threads)."""

    def __init__(self, buckets, dim, seed):
        self.dim = dim
        self.emb = array.array("f", bytes(4 * buckets * dim))
        rng = random.Random(seed)
        self.w = array.array("d", [rng.gauss(0.0, 0.5) for _ in range(dim)])
        self.b = array.array("d", [0.0])

    def state(self):
        return {"emb": self.emb, "w": self.w, "b": self.b}

    def load(self, state):
        """Copies a loaded checkpoint's tensors (memoryviews) into this replica's arrays."""
        for name in ("emb", "w", "b"):
            mine, saved = getattr(self, name), memoryview(state[name]).cast("B")
            if len(saved) != len(mine) * mine.itemsize:
                raise SystemExit("main_job: the checkpoint's %r has %d bytes, this model %d: "
                                 "use the settings it was written with, or another --ckpt-dir"
                                 % (name, len(saved), len(mine) * mine.itemsize))
            mine[:] = array.array(mine.typecode, bytes(saved))

    def gradients(self, ids_batch, labels):
        """Loss sum, correct predictions, dense grads (w, b) and sparse embedding grads (rows,
        flat values) of one batch, summed over its samples."""
        dim, emb, w, b = self.dim, self.emb, self.w, self.b[0]
        gw = [0.0] * dim
        gb = 0.0
        loss = 0.0
        correct = 0
        sparse = {}
        for ids, y in zip(ids_batch, labels):
            inv = 1.0 / len(ids)
            h = [0.0] * dim
            for r in ids:
                h = [a + e for a, e in zip(h, emb[r * dim:(r + 1) * dim])]
            h = [a * inv for a in h]
            z = b + sum(a * c for a, c in zip(w, h))
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            loss += math.log1p(math.exp(-abs(z))) + max(z, 0.0) - y * z    # log-loss, stable
            correct += (p > 0.5) == (y > 0.5)
            g = p - y
            gw = [a + g * c for a, c in zip(gw, h)]
            gb += g
            ge = [g * inv * c for c in w]
            for r in ids:
                acc = sparse.get(r)
                sparse[r] = ge if acc is None else [a + c for a, c in zip(acc, ge)]
        rows = array.array("q", sorted(sparse))
        flat = array.array("d")
        for r in rows:
            flat.extend(sparse[r])
        return loss, correct, array.array("d", gw), array.array("d", [gb]), rows, flat

    def apply(self, gw, gb, parts, scale):
        """SGD step with the summed dense grads and every rank's sparse grads, in rank order
        (the same order in every rank: bit-identical replicas)."""
        dim, emb = self.dim, self.emb
        for rows, flat in parts:
            for i, r in enumerate(rows):
                g = flat[i * dim:(i + 1) * dim]
                lo = r * dim
                emb[lo:lo + dim] = array.array("f", [e - scale * c for e, c in
                                                     zip(emb[lo:lo + dim], g)])
        self.w[:] = array.array("d", [a - scale * c for a, c in zip(self.w, gw)])
        self.b[0] -= scale * gb[0]


def digest(state):
    """sha256 over the model's tensors: equal digests, equal weights, bit for bit."""
    h = hashlib.sha256()
    for name in ("emb", "w", "b"):
        h.update(memoryview(state[name]).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# one rank: a driver thread of threadloom.spmd
# ---------------------------------------------------------------------------------------------

WINDOW = 50


class RankStats:
    """Counters one rank writes and the status line reads (one object per rank, written only
    by its own thread)."""

    def __init__(self):
        self.step = 0
        self.samples = 0
        self.nbytes = 0          # bytes of collated batches this rank consumed
        self.wait_s = 0.0        # time spent waiting for the loader
        self.loss = None         # mean loss and accuracy of the global batches of the last
        self.acc = None          # (up to) WINDOW steps
        self.first_loss = None   # the first step's
        self.window = []
        self.stall_s = []        # rank 0: seconds each Checkpointer.save() held this thread


def nbytes(batch):
    return sum(memoryview(x).nbytes for x in batch)


def train(ctx, job):
    a = job.args
    st = job.stats[ctx.rank]
    model = Model(a.buckets, a.dim, a.seed)
    loader = threadloom.DataLoader(job.dataset, batch_size=a.batch_size, shuffle=True,
                                   drop_last=True, num_workers=a.workers, persistent_workers=True,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   generator=random.Random(a.seed))
    step = job.start_step
    if job.resume is not None:
        model.load(job.resume["model"])
        loader.load_state_dict(job.resume["loaders"][ctx.rank])
    st.step = step
    batches = iter(loader)
    try:
        while step < a.steps:
            t0 = time.perf_counter()
            try:
                ids, labels = next(batches)
            except StopIteration:                         # next epoch (a new shuffle)
                batches = iter(loader)
                ids, labels = next(batches)
            st.wait_s += time.perf_counter() - t0
            st.nbytes += nbytes((ids, labels))
            ids, labels = ids.tolist(), labels.tolist()
            loss, correct, gw, gb, rows, flat = model.gradients(ids, labels)
            # Collectives, the same ones in the same order in every rank:
            ctx.comm.allreduce_buckets([gw, gb], op="sum")            # dense: summed in place
            parts = ctx.comm.allgather((rows, flat))                   # sparse: every rank's
            stop = 1.0 if job.stop.is_set() else 0.0                   # a signal arrived?
            tot_loss, tot_correct, tot_stop = ctx.comm.allreduce([loss, correct, stop], op="sum")
            n = len(labels) * ctx.world_size
            model.apply(gw, gb, parts, a.lr / n)
            step += 1
            st.samples += len(labels)
            st.window = (st.window + [(tot_loss / n, tot_correct / n)])[-WINDOW:]
            st.loss = sum(x for x, _ in st.window) / len(st.window)
            st.acc = sum(y for _, y in st.window) / len(st.window)
            if st.first_loss is None:
                st.first_loss = st.loss
            st.step = step
            stopping = tot_stop > 0 and step < a.steps
            if step % a.ckpt_every == 0 or step == a.steps or stopping:
                positions = ctx.comm.allgather(loader.state_dict())   # every rank's loader
                if ctx.rank == 0:
                    fut = job.ckpt.save({"model": model.state(), "step": step,
                                         "loaders": positions}, step=step,
                                        metadata={"config": job.config})
                    st.stall_s.append(fut.progress.stall_s)
                    job.saves.append(fut)
            if ctx.rank == 0 and step == a.preempt_at:
                job.say("main_job: simulating preemption: SIGUSR2 to this process after step %d"
                        % step)
                os.kill(os.getpid(), signal.SIGUSR2)
                # A real signal lands whenever it lands; this one is waited for, so the demo
                # stops at the same step every time (the next one).
                job.stop.wait(30)
            if ctx.rank == 0 and step == a.kill_at:
                job.say("main_job: simulating a crash: SIGKILL to this process after step %d"
                        % step)
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                break
    finally:
        loader.close()
    return {"stopped_at": step if step < a.steps else None, "digest": digest(model.state())}


# ---------------------------------------------------------------------------------------------
# the status line
# ---------------------------------------------------------------------------------------------

def si(x):
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= k:
            return "%.1f%s" % (x / k, unit)
    return "%.0f" % x


class Status:
    """Live status: rewritten in place on a terminal, a plain line every `every` s otherwise."""

    def __init__(self, job, tty, every):
        self.job, self.tty, self.every = job, tty, every
        self.t0 = time.monotonic()
        self.last = (self.t0, job.start_step, 0, 0)  # (time, step, samples, bytes) for rates
        self.last_print = self.t0
        self.lock = threading.Lock()
        self.shown = False

    def totals(self):
        sts = self.job.stats
        return (sts[0].step, sum(s.samples for s in sts), sum(s.nbytes for s in sts),
                sum(s.wait_s for s in sts))

    def line(self, now):
        step, samples, nb, wait = self.totals()
        t, s0, n0, b0 = self.last
        dt = max(now - t, 1e-9)
        self.last = (now, step, samples, nb)
        st0 = self.job.stats[0]
        ranks = len(self.job.stats)
        busy = max(now - self.t0, 1e-9) * ranks
        if step == self.job.start_step:
            return "step %d/%d: starting (the loader threads copy their dataset replicas)" % (
                step, self.job.args.steps)
        text = ("step %d/%d  %.1f steps/s  %s samples/s  feed %sB/s (ranks waited %.0f%%)"
                % (step, self.job.args.steps, (step - s0) / dt, si((samples - n0) / dt),
                   si((nb - b0) / dt), 100.0 * wait / busy))
        if st0.loss is not None:
            text += "  loss %.3f acc %.0f%%" % (st0.loss, 100.0 * st0.acc)
        p = self.job.ckpt.progress
        if p is not None:
            if p.error is not None:
                text += "  ckpt step-%d FAILED" % p.step
            elif p.done:
                text += "  ckpt step-%d saved" % p.step
            else:
                text += "  ckpt step-%d %.0f%% %sB/s" % (p.step, 100 * p.fraction, si(p.rate))
        return text

    def tick(self, final=False):
        now = time.monotonic()
        with self.lock:
            if self.tty:
                sys.stdout.write("\r\x1b[2K" + self.line(now) + ("\n" if final else ""))
                sys.stdout.flush()
                self.shown = not final
            elif final or now - self.last_print >= self.every:
                self.last_print = now
                print(self.line(now), flush=True)

    def say(self, text):
        """Prints a line of its own without garbling the status line."""
        with self.lock:
            if self.tty and self.shown:
                sys.stdout.write("\r\x1b[2K")
            print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def describe_path(ranks, gpu_count=None):
    """(ranks, the one line that says which path runs). This example's GPU code is not written
    yet (the feeder, DataLoader device=, and the NCCL communicator are built; neither has run on
    a GPU); until it is, the job runs on CPUs and says so. `gpu_count` (a function) is for
    tests."""
    if gpu_count is None:
        gpu_count = threadloom._core.cuda_device_count
    try:
        n = gpu_count()
    except threadloom.Error as e:
        return ranks, ("path: CPU, no GPU (%s: %s); a CPU world of %d rank threads"
                       % (e.name, e.detail, ranks))
    if n == 0:
        return ranks, "path: CPU (CUDA sees no GPU); a CPU world of %d rank threads" % ranks
    missing = []
    if not hasattr(getattr(threadloom._core, "NcclComm", None), "allreduce"):
        missing.append("the NCCL communicator")
    why = " and ".join(missing) if missing else "this example's GPU code"
    return n, ("path: CPU: %d GPU(s) found, but the GPU path is not built yet (%s); running the "
               "CPU path with %d rank threads" % (n, why, n))


class Job:
    """What the ranks share: read-only settings, the Checkpointer, the stop event, one stats
    object per rank."""

    def __init__(self, args, ranks, status_every):
        self.args = args
        self.config = {"ranks": ranks, "workers": args.workers, "batch_size": args.batch_size,
                       "samples": args.samples, "tokens": args.tokens, "buckets": args.buckets,
                       "dim": args.dim, "lr": args.lr, "seed": args.seed}
        self.dataset = Lines(args.samples, args.tokens, args.buckets, args.seed)
        self.stop = threading.Event()
        self.stats = [RankStats() for _ in range(ranks)]
        self.saves = []
        self.ckpt = None
        self.resume = None
        self.start_step = 0
        self.say = print


def check_against(ref_dir, steps, mine):
    """Compares this run's final weights with the newest checkpoint in ref_dir. Returns True
    when they are identical."""
    ref, info = threadloom.load(ref_dir, with_info=True)
    if info["step"] != steps:
        print("check: %s ends at step %d, this run at %d: not comparable"
              % (ref_dir, info["step"], steps))
        return False
    a, b = digest(mine), digest(ref["model"])
    same = a == b
    print("check: final weights %s the uninterrupted run's in %s (sha256 %s%s)"
          % ("IDENTICAL to" if same else "DIFFER from", ref_dir, a[:16],
             "" if same else " vs %s" % b[:16]))
    return same


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True, help="checkpoints; resumed from when present")
    ap.add_argument("--steps", type=int, default=1600, help="train up to this step (1600)")
    ap.add_argument("--ranks", type=int, default=2, help="CPU world size without GPUs (2)")
    ap.add_argument("--workers", type=int, default=2, help="loader threads per rank (2)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per rank per step (32)")
    ap.add_argument("--samples", type=int, default=200_000, help="data set size (200000)")
    ap.add_argument("--tokens", type=int, default=12, help="words per line (12)")
    ap.add_argument("--buckets", type=int, default=1 << 18, help="embedding rows (262144)")
    ap.add_argument("--dim", type=int, default=16, help="embedding width (16)")
    ap.add_argument("--lr", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint period in steps")
    ap.add_argument("--keep", type=int, default=3, help="complete checkpoints kept (3)")
    ap.add_argument("--log-every", type=float, default=5.0,
                    help="seconds between status lines when stdout is not a terminal (5)")
    ap.add_argument("--preempt-at", type=int, default=0,
                    help="send SIGUSR2 to this process after this step (simulated preemption)")
    ap.add_argument("--kill-at", type=int, default=0,
                    help="send SIGKILL to this process after this step (simulated crash)")
    ap.add_argument("--check-against", metavar="DIR",
                    help="at the end, compare the final weights with the newest checkpoint in DIR")
    a = ap.parse_args(argv)
    for name in ("steps", "ranks", "workers", "batch_size", "samples", "tokens", "buckets", "dim",
                 "ckpt_every"):
        if getattr(a, name) < 1:
            ap.error("--%s must be >= 1" % name.replace("_", "-"))
    if a.samples < a.batch_size * a.ranks:
        ap.error("--samples must hold at least one batch per rank (batch-size x ranks)")

    ranks, path = describe_path(a.ranks)
    print("main_job: %s" % path, flush=True)
    job = Job(a, ranks, a.log_every)
    tty = sys.stdout.isatty()

    job.ckpt = threadloom.Checkpointer(a.ckpt_dir, keep=a.keep, staging_bytes=64 << 20,
                                       chunk_bytes=8 << 20, io_threads=1)
    try:
        if job.ckpt.steps():
            state, info = job.ckpt.load(fallback=True, with_info=True)
            saved = (info["metadata"] or {}).get("config")
            if saved != job.config:
                diff = sorted(k for k in job.config if (saved or {}).get(k) != job.config[k])
                raise SystemExit("main_job: the checkpoints in %s were written with other "
                                 "settings (%s); use the same settings or another --ckpt-dir"
                                 % (a.ckpt_dir, ", ".join("%s=%r" % (k, (saved or {}).get(k))
                                                          for k in diff)))
            job.resume, job.start_step = state, state["step"]
            print("main_job: resuming from step-%d in %s (newest complete checkpoint%s)"
                  % (job.start_step, a.ckpt_dir, ", after skipping a damaged one"
                     if info["skipped"] else ""), flush=True)
        else:
            print("main_job: no checkpoint in %s: starting at step 0" % a.ckpt_dir, flush=True)
        print("main_job: %d ranks x %d loader threads, batch %d per rank, steps %d -> %d, "
              "checkpoint every %d steps (%.1f MB each, keep %d)"
              % (ranks, a.workers, a.batch_size, job.start_step, a.steps, a.ckpt_every,
                 (4 * a.buckets * a.dim + 8 * a.dim + 8) / 1e6, a.keep), flush=True)
        status = Status(job, tty, a.log_every)
        job.say = status.say
        rc = run(job, status, ranks)
    finally:
        job.ckpt.close()                       # waits for the saves in flight

    if rc != 0:
        return rc
    final = threadloom.load(a.ckpt_dir)
    if a.check_against and not check_against(a.check_against, a.steps, final["model"]):
        return 1
    return 0


def run(job, status, ranks):
    """Runs the ranks (in a thread, so this main thread keeps the status line and the signal
    handlers), then prints the summary. Returns the exit status."""
    a = job.args
    if job.start_step >= a.steps:
        print("main_job: step-%d is already at --steps %d: nothing to train"
              % (job.start_step, a.steps))
        return 0
    hits = []

    def on_signal(signum, frame):
        if hits:                               # the second one: out now
            status.say("main_job: second %s: exiting without a checkpoint (the newest complete "
                       "one in %s still loads)" % (signal.Signals(signum).name, a.ckpt_dir))
            os._exit(130)
        hits.append(signum)
        job.stop.set()
        status.say("main_job: %s: every rank stops at the next step and saves a checkpoint"
                   % signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    out = {}

    def runner():
        try:
            out["results"] = threadloom.spmd(train, devices="cpu", cpu_world=ranks, args=(job,),
                                             timeout=300)
        except BaseException as e:  # noqa: BLE001 (re-raised by the main thread)
            out["error"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=runner, name="main_job-spmd")
    th.start()
    try:
        while th.is_alive():
            th.join(0.25 if status.tty else min(0.5, a.log_every))
            status.tick()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    status.tick(final=True)
    if "error" in out:
        raise out["error"]
    dt = time.monotonic() - t0
    for f in job.saves:
        f.result()                             # a failed save fails the job here
    results = out["results"]
    stopped = results[0]["stopped_at"]
    identical = len({r["digest"] for r in results}) == 1
    summary(job, dt, results[0]["digest"], identical)
    if not identical:
        return 1
    if stopped is not None:
        print("main_job: preempted: stopped at step %d with checkpoint step-%d complete; run the "
              "same command again to resume (exit status %d)"
              % (stopped, stopped, EXIT_PREEMPTED), flush=True)
        return EXIT_PREEMPTED
    return 0


def summary(job, dt, sha, identical):
    a, sts = job.args, job.stats
    step = sts[0].step
    done = step - job.start_step
    samples = sum(s.samples for s in sts)
    nb = sum(s.nbytes for s in sts)
    wait = sum(s.wait_s for s in sts)
    stalls = sts[0].stall_s
    writes = [f.progress for f in job.saves]
    print("summary: %d ranks, steps %d -> %d in %.1f s: %.1f steps/s, %s samples/s, fed %sB/s "
          "to the ranks (they waited %.0f%% of the time for data)"
          % (len(sts), job.start_step, step, dt, done / dt, si(samples / dt), si(nb / dt),
             100.0 * wait / (dt * len(sts))))
    if sts[0].first_loss is not None:
        print("summary: loss %.4f at the first step -> %.4f over the last %d, accuracy %.1f%%"
              % (sts[0].first_loss, sts[0].loss, len(sts[0].window), 100.0 * sts[0].acc))
    if writes:
        mb = writes[-1].total_bytes / 1e6
        wr = [p.finished - p.started for p in writes if p.finished is not None]
        print("summary: %d checkpoint(s) of %.1f MB: training stalled %.1f ms per save on "
              "average (max %.1f ms) while each took %.0f ms to write in the background; "
              "kept: %s"
              % (len(writes), mb, 1e3 * sum(stalls) / len(stalls), 1e3 * max(stalls),
                 1e3 * sum(wr) / max(len(wr), 1),
                 ", ".join("step-%d" % s for s in job.ckpt.steps())))
    print("summary: weights at step %d: sha256 %s; the %d replicas are %s"
          % (step, sha[:16], len(sts), "identical" if identical else "NOT identical (a bug)"),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
