"""The main job: one free-threaded process, dozens of Python threads, feeding 8 devices.

Everything threadloom does, in one program:

  - threadloom.spmd runs one driver thread per device, pinned to that device's launch core
    (the placement plan keeps it free of loader work where the machine has the cores). With
    GPUs it drives them (cuda); without, 8 simulated devices (sim:8: device memory is host
    memory, copies and kernels take modelled time on per-device engine threads), and the first
    line says which;
  - each rank's threadloom.DataLoader(device=ctx.device) (--workers loader threads per device,
    each with its own replica of the dataset, pinned beside the device's launch core) produces
    its shard's batches on the device: each worker collates its batch straight into a pinned
    staging slot of the loader's feeder and queues the H2D copy on its own copy stream, and the
    rank gets the batch with its stream made to wait for that copy;
  - a step: the rank's stream reads the batch back for this toy model's math (a few KB, D2H),
    runs the step's kernel (modelled: --kernel-ms of device time; on a GPU the spin kernel), and
    the model's math runs on the driver thread meanwhile (this toy model has no GPU kernels: no
    tensor library is needed; a real model's kernels read the batch on the device). Dense gradients
    go to the device and are summed there by ctx.comm (NCCL on GPUs, the host collectives on sim
    devices, ordered on the rank's stream), sparse embedding gradients are exchanged with an
    allgather, and every replica applies the same update (bit-identical weights). The dense
    weights live on the device (updated from the host's optimizer step, as with a CPU
    optimizer); the embedding table stays in host memory (as large sparse tables often do);
  - rank 0 saves an asynchronous checkpoint every --ckpt-every steps with threadloom.Checkpointer
    (the dense weights as device buffers, snapshotted by D2H copies ordered on the rank's stream;
    the host's embedding table; step and every rank's DataLoader position): save() returns once
    the copies are queued and the table staged, and training goes on while it is written;
  - on start the job resumes from the newest complete checkpoint in --ckpt-dir, loaded onto the
    first device (load(device=)): rank 0 takes the dense weights from there and broadcasts them
    to the other devices, the embedding table goes back to host memory; SIGUSR2, SIGTERM
    or Ctrl-C make every rank stop at the same step, save a checkpoint and exit with status 75
    (run the same command again to resume; a second Ctrl-C exits at once, and the newest
    complete checkpoint still loads); an exception in a rank or a failing device ends the job
    with that error (status 1), every thread stopped;
  - a live status line on a terminal (steps/s, samples/s, H2D rate, how long the ranks waited
    for data, each device's busy engines, checkpoint progress), plain lines every --log-every
    seconds otherwise, and a summary at the end (per device: compute and copy engine busy
    fractions, data waits; the checkpoint stall).

The model: logistic regression on hashed tokens, a sparse embedding table (the bulk of the
checkpoint) averaged over the words of a line, then a linear layer. The data: synthetic text
lines, generated and tokenized in the loader threads (the Python-heavy part of a real input
pipeline); the label comes from hidden per-word scores the model has to learn.

    make demo      # runs it three times: uninterrupted, preempted by SIGUSR2, resumed + checked
    python examples/main_job.py --ckpt-dir /tmp/job                      # run or resume
    python examples/main_job.py --ckpt-dir /tmp/job2 --preempt-at 350    # SIGUSR2 to itself
    python examples/main_job.py --ckpt-dir /tmp/job2 --check-against /tmp/job
    python examples/main_job.py --ckpt-dir /tmp/j3 --devices sim:4       # 4 simulated devices
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

import threadloom
from threadloom import devices
from threadloom.data import Dataset

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
    """One rank's view of the model. The embedding table `emb` is one host array shared by the
    ranks (threads of one process need no replica of it): after each step's allgather every
    rank writes its shard of the rows (row r is rank r mod `shards`'s), and a barrier ends the
    step before anyone reads the table again. The dense weights w, b are the rank's own replica,
    mirrored on its device."""

    def __init__(self, emb, dim, seed, shard=0, shards=1):
        self.dim = dim
        self.emb = emb
        self.shard, self.shards = shard, shards
        rng = random.Random(seed)
        self.w = array.array("d", [rng.gauss(0.0, 0.5) for _ in range(dim)])
        self.b = array.array("d", [0.0])

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
        """SGD step with the summed dense grads and every rank's sparse grads, in rank order:
        this rank's shard of the table's rows, and its dense replica (the same order in every
        rank: bit-identical results)."""
        dim, emb, shard, shards = self.dim, self.emb, self.shard, self.shards
        for rows, flat in parts:
            for i, r in enumerate(rows):
                if r % shards != shard:
                    continue
                g = flat[i * dim:(i + 1) * dim]
                lo = r * dim
                emb[lo:lo + dim] = array.array("f", [e - scale * c for e, c in
                                                     zip(emb[lo:lo + dim], g)])
        self.w[:] = array.array("d", [a - scale * c for a, c in zip(self.w, gw)])
        self.b[0] -= scale * gb[0]


def check_size(name, saved, want):
    """A loaded checkpoint tensor (a DeviceBuffer) must have the bytes this model's has."""
    if saved.nbytes != want:
        raise SystemExit("main_job: the checkpoint's %r has %d bytes, this model %d: use the "
                         "settings it was written with, or another --ckpt-dir"
                         % (name, saved.nbytes, want))


def digest(state):
    """sha256 over the model's tensors: equal digests, equal weights, bit for bit."""
    h = hashlib.sha256()
    for name in ("emb", "w", "b"):
        h.update(memoryview(state[name]).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the device side of a rank
# ---------------------------------------------------------------------------------------------

def device_batches(loader):
    """A rank's batches, epoch after epoch (the next `for` over the loader starts the next
    epoch). DataLoader(device=) delivers each on the rank's device: (ids, labels) as
    DeviceBuffers, with the rank's current stream (ctx.stream) made to wait for their H2D copy,
    so work queued there reads them after it and the thread never blocks on it. After a batch,
    loader.state_dict() is the position a checkpoint keeps."""
    while True:
        for batch in loader:
            yield batch


class DeviceDense:
    """The dense weights on a rank's device (w then b: dim + 1 float64) and the buffer its
    gradients are summed in there, both on the rank's stream. The host runs the optimizer step
    (as a CPU optimizer does) and uploads the new weights; the device's copy is what a
    checkpoint saves, as it is (save() snapshots it with D2H copies ordered on this stream).
    Each copy from the host reads a fresh array, so the host never changes bytes a queued copy
    has yet to read."""

    def __init__(self, stream, dim):
        self.s, self.dim = stream, dim
        self.params = stream.alloc(8 * (dim + 1)).cast("d")
        self.grads = stream.alloc(8 * (dim + 1)).cast("d")

    def upload(self, model):
        self.s.copy(self.params, model.w + model.b)
        return self.params.nbytes

    def reduce(self, comm, gw, gb):
        """Sums every rank's dense gradients on the devices (ctx.comm on a device buffer:
        NCCL on GPUs, the host collectives ordered on the stream on sim) and brings the sums
        back into gw and gb."""
        g = gw + gb
        self.s.copy(self.grads, g)
        comm.allreduce(self.grads, op="sum")
        self.s.copy(g, self.grads)
        self.s.synchronize()
        gw[:], gb[0] = g[:self.dim], g[self.dim]
        return self.grads.nbytes

    def state(self):
        """(w, b): DeviceBuffer views of the device's weights, for Checkpointer.save()."""
        return self.params.view(0, 8 * self.dim), self.params.view(8 * self.dim, 8)

    def restore(self, comm, loaded):
        """Resuming: rank 0 copies the checkpoint's weights (`loaded`: its "model", loaded onto
        rank 0's device with load(device=)) into its buffer, the others pass None, and a
        broadcast on the devices gives every rank rank 0's."""
        if loaded is not None:
            w, b = self.state()
            self.s.copy(w, loaded["w"])
            self.s.copy(b, loaded["b"])
        comm.broadcast(self.params, src=0)

    def read(self):
        """(w, b) as host arrays: the device's weights, copied back (D2H on the rank's
        stream)."""
        p = array.array("d", bytes(self.params.nbytes))
        self.s.copy(p, self.params)
        self.s.synchronize()
        return p[:self.dim], p[self.dim:]


# ---------------------------------------------------------------------------------------------
# one rank: a driver thread of threadloom.spmd
# ---------------------------------------------------------------------------------------------

WINDOW = 50


class RankStats:
    """Counters one rank writes and the status line reads: one object per rank, each field
    written by the rank's thread only."""

    def __init__(self, device):
        self.device = device
        self.step = 0
        self.samples = 0
        self.batches = 0         # taken from the loader
        self.h2d_bytes = 0       # batches delivered on the device (the loader's H2D copies)
        self.own_h2d = 0         # the rank's own copies to the device (dense weights, gradients)
        self.wait_s = 0.0        # time spent waiting for the loader's next batch
        self.kernel_s = 0.0      # device time the rank's kernels declared
        self.loss = None         # mean loss and accuracy of the global batches of the last
        self.acc = None          # (up to) WINDOW steps
        self.first_loss = None   # the first step's
        self.window = []
        self.stall_s = []        # rank 0: seconds each save() held this thread
        self.loader = None       # at the end: the loader's stats()["device"]


def train(ctx, job):
    a = job.args
    st = job.stats[ctx.rank]
    s = ctx.stream
    model = Model(job.emb, a.dim, a.seed, ctx.rank, ctx.world_size)
    dense = DeviceDense(s, a.dim)
    # Made here, on the rank's pinned thread: its workers pin to the loader slots beside this
    # device's launch core in spmd's device plan, and it delivers every batch on ctx.device.
    loader = threadloom.DataLoader(job.dataset, batch_size=a.batch_size, shuffle=True,
                                   drop_last=True, num_workers=a.workers, persistent_workers=True,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   generator=random.Random(a.seed), device=ctx.device)
    step = job.start_step
    try:
        if job.resume is None:
            st.own_h2d += dense.upload(model)
        else:
            loader.load_state_dict(job.resume["loaders"][ctx.rank])
            dense.restore(ctx.comm, job.resume["model"] if ctx.rank == 0 else None)
            model.w[:], model.b[:] = dense.read()   # the host's copy, for the optimizer step
        st.step = step
        batches = device_batches(loader)
        n, t = a.batch_size, a.tokens
        ids_host, labels_host = array.array("q", bytes(8 * n * t)), array.array("d", bytes(8 * n))
        while step < a.steps:
            t0 = time.perf_counter()
            ids, labels = next(batches)            # on the device; s waits for their copy
            st.wait_s += time.perf_counter() - t0
            st.batches += 1
            st.h2d_bytes += ids.nbytes + labels.nbytes
            # This toy model's math runs on the host: the batch comes back (a few KB) on the
            # stream, before the step's kernel, which reads it on the device.
            s.copy(ids_host, ids)
            s.copy(labels_host, labels)
            back = s.record_event()
            s.launch(job.kernel_ns)
            st.kernel_s += job.kernel_ns / 1e9
            back.synchronize()
            tokens = ids_host.tolist()
            labels = labels_host.tolist()
            ids = [tokens[i * t:(i + 1) * t] for i in range(n)]
            loss, correct, gw, gb, rows, flat = model.gradients(ids, labels)   # meanwhile
            # Collectives, the same ones in the same order in every rank:
            st.own_h2d += dense.reduce(ctx.comm, gw, gb)               # dense: on the devices
            parts = ctx.comm.allgather((rows, flat))                   # sparse: every rank's
            stop = 1.0 if job.stop.is_set() else 0.0                   # a signal arrived?
            tot_loss, tot_correct, tot_stop = ctx.comm.allreduce([loss, correct, stop], op="sum")
            total = n * ctx.world_size
            model.apply(gw, gb, parts, a.lr / total)
            st.own_h2d += dense.upload(model)
            ctx.barrier()                         # every shard of the table written
            step += 1
            st.samples += n
            st.window = (st.window + [(tot_loss / total, tot_correct / total)])[-WINDOW:]
            st.loss = sum(x for x, _ in st.window) / len(st.window)
            st.acc = sum(y for _, y in st.window) / len(st.window)
            if st.first_loss is None:
                st.first_loss = st.loss
            st.step = step
            stopping = tot_stop > 0 and step < a.steps
            if step % a.ckpt_every == 0 or step == a.steps or stopping:
                positions = ctx.comm.allgather(loader.state_dict())  # every rank's loader
                if ctx.rank == 0:
                    t1 = time.perf_counter()
                    w, b = dense.state()        # device buffers: snapshotted by D2H copies
                    fut = job.ckpt.save({"model": {"emb": model.emb, "w": w, "b": b},
                                         "step": step, "loaders": positions}, step=step,
                                        metadata={"config": job.config})
                    st.stall_s.append(time.perf_counter() - t1)
                    job.saves.append(fut)
            inject_failures(ctx, job, step)
            if stopping:
                break
    finally:
        st.loader = loader.stats()["device"]
        loader.close()
    w, b = dense.read()
    if bytes(w) != bytes(model.w) or bytes(b) != bytes(model.b):
        raise RuntimeError("main_job: the dense weights on %s differ from the host's" % ctx.device)
    return {"stopped_at": step if step < a.steps else None,
            "digest": digest({"emb": model.emb, "w": w, "b": b})}


def inject_failures(ctx, job, step):
    """--preempt-at, --kill-at, --fail-at, --lose-device-at: what the demo and the tests
    simulate after `step`."""
    a = job.args
    if ctx.rank == 0 and step == a.preempt_at:
        job.say("main_job: simulating preemption: SIGUSR2 to this process after step %d" % step)
        os.kill(os.getpid(), signal.SIGUSR2)
        # A real signal lands whenever it lands; this one is waited for, so the demo stops at
        # the same step every time (the next one).
        job.stop.wait(30)
    if ctx.rank == 0 and step == a.kill_at:
        job.say("main_job: simulating a crash: SIGKILL to this process after step %d" % step)
        os.kill(os.getpid(), signal.SIGKILL)
    if ctx.rank == a.fail_rank and step == a.fail_at:
        raise RuntimeError("main_job: --fail-at: rank %d raises after step %d (a simulated bug)"
                           % (ctx.rank, step))
    if ctx.rank == a.fail_rank and step == a.lose_device_at:
        job.say("main_job: simulating a failing device: %s is lost after step %d"
                % (ctx.device, step))
        ctx.device.sim_inject("lost")


# ---------------------------------------------------------------------------------------------
# the status line
# ---------------------------------------------------------------------------------------------

def si(x):
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= k:
            return "%.1f%s" % (x / k, unit)
    return "%.0f" % x


class DeviceMeter:
    """Busy fractions of each device's engines since the last read (and since the start): on
    sim the engines' own busy time (Device.engine_stats: compute, h2d, d2h); on a GPU the
    compute time the ranks' kernels declared (the copy engines have no counter there)."""

    ENGINES = ("compute", "h2d", "d2h")

    def __init__(self, devs, stats):
        self.devs, self.stats = devs, stats
        self.sim = devs[0].kind == "sim"
        self.t0 = self.t = time.monotonic()
        self.first = self.last = self._read()

    def _read(self):
        if self.sim:
            out = []
            for d in self.devs:
                e = d.engine_stats()
                out.append([e[k]["busy_s"] for k in self.ENGINES])
            return out
        return [[st.kernel_s, None, None] for st in self.stats]

    def busy(self, since_start=False):
        """Per device: [compute, h2d, d2h] busy fractions (None: not measured)."""
        now, cur = time.monotonic(), self._read()
        base, t = (self.first, self.t0) if since_start else (self.last, self.t)
        if not since_start:
            self.last, self.t = cur, now
        dt = max(now - t, 1e-9)
        return [[None if c is None else min(1.0, (c - b) / dt) for c, b in zip(row, brow)]
                for row, brow in zip(cur, base)]


def span(values):
    """'3-5%' (or '4%') over the devices; '-' when not measured."""
    vs = [v for v in values if v is not None]
    if not vs:
        return "-"
    lo, hi = 100 * min(vs), 100 * max(vs)
    return "%.0f%%" % lo if round(lo) == round(hi) else "%.0f-%.0f%%" % (lo, hi)


class Status:
    """Live status: rewritten in place on a terminal, a plain line every `every` s otherwise."""

    def __init__(self, job, tty, every):
        self.job, self.tty, self.every = job, tty, every
        self.t0 = time.monotonic()
        self.last = (self.t0, job.start_step, 0, 0)  # (time, step, samples, H2D bytes) for rates
        self.last_print = self.t0
        self.lock = threading.Lock()
        self.shown = False

    def totals(self):
        sts = self.job.stats
        return (sts[0].step, sum(s.samples for s in sts),
                sum(s.h2d_bytes + s.own_h2d for s in sts), sum(s.wait_s for s in sts))

    def line(self, now):
        step, samples, nb, wait = self.totals()
        t, s0, n0, b0 = self.last
        dt = max(now - t, 1e-9)
        self.last = (now, step, samples, nb)
        st0 = self.job.stats[0]
        ranks = len(self.job.stats)
        busy = self.job.meter.busy()
        if step == self.job.start_step:
            return "step %d/%d: starting (the loader threads copy their dataset replicas)" % (
                step, self.job.args.steps)
        text = ("step %d/%d  %.1f steps/s  %s samples/s  H2D %sB/s  waited for data %.0f%%  "
                "devices: compute %s h2d %s d2h %s"
                % (step, self.job.args.steps, (step - s0) / dt, si((samples - n0) / dt),
                   si((nb - b0) / dt), 100.0 * wait / (max(now - self.t0, 1e-9) * ranks),
                   span([b[0] for b in busy]), span([b[1] for b in busy]),
                   span([b[2] for b in busy])))
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

def choose_devices(spec, backend=None):
    """(the devices, the line that says which path runs) for --devices `spec`: "auto" (the
    selected backend's devices: the GPUs, or THREADLOOM_DEVICES'; without any, sim:8),
    "sim:N[,options]" or "cuda". `backend` (a function) is for tests."""
    backend = backend or devices.backend
    why = None
    if spec == "auto":
        b = backend()
        if b["name"] != "none" and b["count"]:
            ds = devices()
            return ds, ("path: %d %s device(s) (%s; %s), one driver thread each"
                        % (len(ds), b["name"], ds[0].name, b["why"]))
        why, spec = b["why"], "sim:8"
    if spec.startswith("sim:"):
        try:
            n = int(spec[4:].split(",")[0])
        except ValueError:
            raise SystemExit("main_job: --devices %s: write sim:N (e.g. sim:8)" % spec) from None
        try:
            devices.configure_sim(spec)
        except devices.BusyError:
            pass                          # sim devices configured before: use theirs if enough
        ds = devices("sim")[:n]
        if len(ds) < n:
            raise SystemExit("main_job: --devices %s: only %d sim devices are configured in this "
                             "process (THREADLOOM_DEVICES); ask for at most that many"
                             % (spec, len(ds)))
        line = "path: %s, %d simulated devices (host memory; copies and kernels take " \
               "modelled time)" % (spec, n)
        if why is not None:
            line += ": no GPU here (%s); --devices or THREADLOOM_DEVICES choose others" % why
        return ds, line
    if spec == "cuda":
        try:
            ds = devices("cuda")
        except threadloom.Error as e:
            raise SystemExit("main_job: --devices cuda: no usable GPU (%s)" % e) from None
        if not ds:
            raise SystemExit("main_job: --devices cuda: CUDA lists no GPU")
        return ds, "path: %d cuda device(s) (%s), one driver thread each" % (len(ds), ds[0].name)
    raise SystemExit("main_job: --devices %r: use auto, sim:N or cuda" % spec)


class Job:
    """What the ranks share: read-only settings, the data set (each rank's loader threads copy
    it), the embedding table, the Checkpointer, the stop event, one stats object per rank, the
    device meter."""

    def __init__(self, args, devs):
        self.args = args
        self.devs = devs
        self.config = {"ranks": len(devs), "workers": args.workers,
                       "batch_size": args.batch_size, "samples": args.samples,
                       "tokens": args.tokens, "buckets": args.buckets, "dim": args.dim,
                       "lr": args.lr, "seed": args.seed}
        self.dataset = Lines(args.samples, args.tokens, args.buckets, args.seed)
        self.emb = array.array("f", bytes(4 * args.buckets * args.dim))   # shared by the ranks
        self.kernel_ns = int(args.kernel_ms * 1e6)
        self.stop = threading.Event()
        self.stats = [RankStats(str(d)) for d in devs]
        self.meter = DeviceMeter(devs, self.stats)
        self.saves = []
        self.ckpt = None
        self.resume = None
        self.start_step = 0
        self.say = print


def restore_table(job, model, dev):
    """Resuming: checks the loaded tensors' sizes (DeviceBuffers on `dev`, load(device=)) and
    copies the embedding table back into host memory, where the ranks update it; the dense
    weights stay on `dev` for rank 0 (DeviceDense.restore)."""
    a = job.args
    check_size("emb", model["emb"], 4 * a.buckets * a.dim)
    check_size("w", model["w"], 8 * a.dim)
    check_size("b", model["b"], 8)
    s = devices.current_stream(dev)        # the stream load() copied them on
    s.copy(job.emb, model["emb"])
    s.synchronize()                        # the ranks' streams need no wait for any of it
    model["emb"] = None                    # its device memory goes back


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
    ap.add_argument("--devices", default="auto",
                    help="auto (the GPUs, else sim:8), sim:N[,options] or cuda")
    ap.add_argument("--steps", type=int, default=800, help="train up to this step (800)")
    ap.add_argument("--workers", type=int, default=2, help="loader threads per device (2)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per rank per step (16)")
    ap.add_argument("--samples", type=int, default=200_000, help="data set size (200000)")
    ap.add_argument("--tokens", type=int, default=12, help="words per line (12)")
    ap.add_argument("--buckets", type=int, default=1 << 18, help="embedding rows (262144)")
    ap.add_argument("--dim", type=int, default=16, help="embedding width (16)")
    ap.add_argument("--lr", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel-ms", type=float, default=4.0,
                    help="device time of a step's kernel (modelled on sim; 4)")
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint period in steps")
    ap.add_argument("--keep", type=int, default=3, help="complete checkpoints kept (3)")
    ap.add_argument("--log-every", type=float, default=5.0,
                    help="seconds between status lines when stdout is not a terminal (5)")
    ap.add_argument("--preempt-at", type=int, default=0,
                    help="send SIGUSR2 to this process after this step (simulated preemption)")
    ap.add_argument("--kill-at", type=int, default=0,
                    help="send SIGKILL to this process after this step (simulated crash)")
    ap.add_argument("--fail-at", type=int, default=0,
                    help="rank --fail-rank raises an exception after this step (simulated bug)")
    ap.add_argument("--lose-device-at", type=int, default=0,
                    help="rank --fail-rank's sim device is lost after this step (sim only)")
    ap.add_argument("--fail-rank", type=int, default=1, help="the rank that fails (1)")
    ap.add_argument("--check-against", metavar="DIR",
                    help="at the end, compare the final weights with the newest checkpoint in DIR")
    a = ap.parse_args(argv)
    for name in ("steps", "workers", "batch_size", "samples", "tokens", "buckets", "dim",
                 "ckpt_every"):
        if getattr(a, name) < 1:
            ap.error("--%s must be >= 1" % name.replace("_", "-"))
    if a.kernel_ms < 0:
        ap.error("--kernel-ms must be >= 0")

    devs, path = choose_devices(a.devices)
    if a.samples < a.batch_size * len(devs):
        ap.error("--samples must hold at least one batch per rank (batch-size x devices)")
    if a.lose_device_at and devs[0].kind != "sim":
        ap.error("--lose-device-at injects a fault into a sim device: use --devices sim:N")
    print("main_job: %s" % path, flush=True)
    job = Job(a, devs)
    tty = sys.stdout.isatty()

    job.ckpt = threadloom.Checkpointer(a.ckpt_dir, keep=a.keep, staging_bytes=64 << 20,
                                       chunk_bytes=8 << 20, io_threads=1)
    try:
        if job.ckpt.steps():
            # every tensor onto rank 0's device (its dense weights go from there to the others)
            state, info = job.ckpt.load(fallback=True, with_info=True, device=devs[0])
            saved = (info["metadata"] or {}).get("config")
            if saved != job.config:
                diff = sorted(k for k in job.config if (saved or {}).get(k) != job.config[k])
                raise SystemExit("main_job: the checkpoints in %s were written with other "
                                 "settings (%s); use the same settings or another --ckpt-dir"
                                 % (a.ckpt_dir, ", ".join("%s=%r" % (k, (saved or {}).get(k))
                                                          for k in diff)))
            restore_table(job, state["model"], devs[0])
            job.resume, job.start_step = state, state["step"]
            print("main_job: resuming from step-%d in %s (newest complete checkpoint%s)"
                  % (job.start_step, a.ckpt_dir, ", after skipping a damaged one"
                     if info["skipped"] else ""), flush=True)
        else:
            print("main_job: no checkpoint in %s: starting at step 0" % a.ckpt_dir, flush=True)
        print("main_job: %d driver threads (one per device), %d loader threads per device "
              "(DataLoader(device=): collated into pinned staging, copied to the device), batch %d "
              "per rank, steps %d -> %d, checkpoint every %d steps (%.1f MB each, keep %d)"
              % (len(devs), a.workers, a.batch_size, job.start_step, a.steps, a.ckpt_every,
                 (4 * a.buckets * a.dim + 8 * a.dim + 8) / 1e6, a.keep), flush=True)
        status = Status(job, tty, a.log_every)
        job.say = status.say
        rc = run(job, status)
    finally:
        job.ckpt.close()                       # waits for the saves in flight

    if rc != 0:
        return rc
    final = threadloom.load(a.ckpt_dir)
    if a.check_against and not check_against(a.check_against, a.steps, final["model"]):
        return 1
    return 0


def run(job, status):
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
            out["results"] = threadloom.spmd(train, devices=job.devs, args=(job,), timeout=300)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
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
        e = out["error"]
        notes = "; ".join(getattr(e, "__notes__", []))
        print("main_job: FAILED: %s: %s%s; every rank and loader thread stopped; the newest "
              "complete checkpoint in %s still loads"
              % (type(e).__name__, e, " (%s)" % notes if notes else "", a.ckpt_dir),
              file=sys.stderr, flush=True)
        return 1
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
    sts = job.stats
    step = sts[0].step
    done = step - job.start_step
    samples = sum(s.samples for s in sts)
    h2d = sum(s.h2d_bytes + s.own_h2d for s in sts)
    wait = sum(s.wait_s for s in sts)
    stalls = sts[0].stall_s
    writes = [f.progress for f in job.saves]
    print("summary: %d devices, steps %d -> %d in %.1f s: %.1f steps/s, %s samples/s, H2D %sB/s "
          "(the ranks waited %.0f%% of the time for data)"
          % (len(sts), job.start_step, step, dt, done / dt, si(samples / dt), si(h2d / dt),
             100.0 * wait / (dt * len(sts))))
    busy = job.meter.busy(since_start=True)
    pct = lambda v: "-" if v is None else "%.1f%%" % (100 * v)  # noqa: E731
    for st, b in zip(sts, busy):
        print("summary: %-7s compute %6s  h2d %6s  d2h %6s busy; waited %.1f s for data"
              % (st.device, pct(b[0]), pct(b[1]), pct(b[2]), st.wait_s))
    if job.devs[0].kind != "sim":
        print("summary: (on GPUs the compute figure is the kernels' declared time; the copy "
              "engines have no counter)")
    batches = sum(st.batches for st in sts)
    lds = [st.loader for st in sts if st.loader]   # each loader's feeder, over every epoch
    if batches and lds:
        print("summary: DataLoader(device=): %d batches of %sB collated by the loader threads "
              "into pinned staging (%.0f%% of the bytes in place) and copied to the devices; "
              "%d waits for a free staging slot"
              % (batches, si(sum(st.h2d_bytes for st in sts) / batches),
                 100.0 * sum(x["in_place_bytes"] for x in lds) / max(sum(x["fed_bytes"]
                                                                          for x in lds), 1),
                 sum(x["staging_waits"] for x in lds)))
    if sts[0].first_loss is not None:
        print("summary: loss %.4f at the first step -> %.4f over the last %d, accuracy %.1f%%"
              % (sts[0].first_loss, sts[0].loss, len(sts[0].window), 100.0 * sts[0].acc))
    if writes:
        mb = writes[-1].total_bytes / 1e6
        wr = [p.finished - p.started for p in writes if p.finished is not None]
        print("summary: %d checkpoint(s) of %.1f MB: training stalled %.1f ms per save on "
              "average (max %.1f ms; save() queues the D2H snapshot of the device's weights and "
              "stages the host's table) "
              "while each took %.0f ms to write in the background; kept: %s"
              % (len(writes), mb, 1e3 * sum(stalls) / len(stalls), 1e3 * max(stalls),
                 1e3 * sum(wr) / max(len(wr), 1),
                 ", ".join("step-%d" % s for s in job.ckpt.steps())))
    print("summary: weights at step %d: sha256 %s; the %d replicas are %s"
          % (step, sha[:16], len(sts), "identical" if identical else "NOT identical (a bug)"),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
