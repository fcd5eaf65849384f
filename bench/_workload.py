"""bench/_workload.py: the loader benchmarks' datasets, thread sweep and command line, with no
threadloom import.

bench_dataloader.py (free-threaded interpreter, threadloom), bench_dataloader_torch.py (any
interpreter that has torch: Debian's GIL python3.11 here, python3.12 on the GPU machine) and
bench_dataloader_footprint.py (both) load this module, so every loader in the report runs the
same per-sample work on the same data, and the throughput benchmarks take the same options.

The datasets (WORKLOADS names them): `python`, Tokens, pure-Python dict lookups (holds the
interpreter lock of a GIL build the whole time); `native`, Blobs, zlib.decompress + sha256 of
64 KiB (C code that releases the lock); `records`, Records, a large in-memory list of small
Python objects read all over by every sample (the case where forked workers unshare the pages
they only read: a read changes an object's reference count). Every sample is one int, so every
loader collates a batch into the same B int64 values.

The vision workload (bench_vision.py, and the footprint's `vision` children) is the class of
examples/vision_pipeline.py, loaded from the checkout by vision_dataset(): JPEG decode with Pillow,
a random crop and flip seeded per sample, normalize with numpy; a sample is (float32 array
(3, 224, 224), int label), a batch [images, labels]. So the report measures what the example
shows, and numpy and Pillow are imported only by the scripts that use it.
"""

import argparse
import gc
import hashlib
import json
import os
import sys
import time
import zlib

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class Tokens:
    """A map-style dataset with a shared vocabulary table and a Python-heavy transform: each
    sample is `work` dict lookups (about 30 us per sample for work=300 on a current core)."""

    def __init__(self, n, work=300):
        self.n = n
        self.work = work
        self.vocab = {("w%d" % i): i for i in range(5000)}
        self.words = list(self.vocab)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        words, vocab = self.words, self.vocab
        acc = 0
        for k in range(self.work):
            acc = (acc * 31 + vocab[words[(i * 7 + k) % 5000]]) & 0xFFFFFFFF
        return acc


class Blobs:
    """A map-style dataset with native per-sample work: each sample decompresses a 64 KiB zlib
    blob (one of 16, stored compressed) and hashes the result with sha256, both C code that
    releases the interpreter lock on a GIL build (about 150-250 us per sample on a current core).
    Returns the digest's first 8 bytes as an int, so a batch collates like Tokens'."""

    def __init__(self, n, kib=64):
        self.n = n
        self.blobs = []
        for b in range(16):
            # text-like data (compresses about 4x): words from a fixed pseudo-random sequence
            words = [b"w%d" % ((b * 7919 + k * 104729) % 5000) for k in range(kib * 1024 // 5)]
            raw = b" ".join(words)[:kib * 1024]
            self.blobs.append(zlib.compress(raw, 6))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        data = zlib.decompress(self.blobs[i % len(self.blobs)])
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


class Records:
    """A map-style dataset over a large in-memory Python structure: `n * per_sample` records,
    each a tuple (int, str, float), about 170 bytes of Python objects each (3.11; more on 3.13t).
    Sample i reads records i, i + n, i + 2n, ...: consecutive samples, and so every worker,
    touch pages all over the list, as a shuffled epoch does. Reading is all it does; in a forked
    worker each read still writes the object's reference count, copying its page."""

    def __init__(self, n, per_sample=100):
        self.n = n
        self.per_sample = per_sample
        # without the collector while building: on 3.13t each of its passes walks every object
        # (no generations), which made building 500k records 4x slower than the records' reads
        was = gc.isenabled()
        gc.disable()
        try:
            self.records = [(k, "record-%d" % k, k * 0.5) for k in range(n * per_sample)]
        finally:
            if was:
                gc.enable()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        recs, n = self.records, self.n
        acc = 0
        for j in range(self.per_sample):
            k, name, x = recs[i + j * n]
            acc = (acc * 31 + k + len(name) + int(x)) & 0xFFFFFFFF
        return acc


WORKLOADS = {
    "python": "dict lookups in a shared vocabulary (pure Python: holds a GIL build's lock)",
    "native": "zlib.decompress + sha256 of 64 KiB (C code that releases a GIL build's lock)",
}


def make_dataset(workload, n, work):
    """The dataset of a throughput workload ('python' or 'native'); `work` is Tokens' lookups."""
    if workload == "python":
        return Tokens(n, work)
    if workload == "native":
        return Blobs(n)
    raise ValueError("unknown workload %r: one of %s" % (workload, ", ".join(WORKLOADS)))


def vision_example():
    """examples/vision_pipeline.py as the module `vision_pipeline` (examples/ goes on sys.path,
    so worker processes started with spawn import it too)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import vision_pipeline
    return vision_pipeline


def vision_dataset(folder, n, seed):
    """The vision workload over the JPEGs in `folder` (written by write_jpegs), n samples."""
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    return vision_example().JpegImages(paths, n=n, seed=seed)


def per_sample_cost(ds, count=200):
    """Seconds of this thread's CPU time per sample of ds, in the calling thread, best of 3 passes
    over `count` samples: the interpreter's single-thread speed on the workload, without any
    loader."""
    best = None
    for _ in range(3):
        t = time.thread_time()
        for i in range(count):
            ds[i % len(ds)]
        dt = (time.thread_time() - t) / count
        best = dt if best is None else min(best, dt)
    return best


def describe_batch(b):
    """A batch -> {"type", "nbytes"}: what a loader hands the training loop, to check that every
    loader collates the same bytes (a torch tensor, a threadloom memoryview, an array.array; a
    list of those, e.g. [images, labels], as "list[...]" with the bytes of all)."""
    if isinstance(b, (list, tuple)):
        parts = [describe_batch(x) for x in b]
        return {"type": "%s[%s]" % (type(b).__name__, ", ".join(p["type"] for p in parts)),
                "nbytes": sum(p["nbytes"] for p in parts)}
    if hasattr(b, "element_size") and hasattr(b, "numel"):  # torch.Tensor
        n = b.element_size() * b.numel()
    else:
        n = memoryview(b).nbytes
    t = type(b)
    mod = t.__module__
    return {"type": t.__qualname__ if mod == "builtins" else "%s.%s" % (mod, t.__qualname__),
            "nbytes": n}


def batch_len(b):
    """Samples in a batch: its length, or its first field's for a list of fields."""
    return len(b[0]) if isinstance(b, (list, tuple)) else len(b)


def batch_digest(batches):
    """sha256 over every batch's bytes, in order (each field of a list batch in turn), and the
    number of batches: equal digests mean the same batches."""
    h, n = hashlib.sha256(), 0
    for b in batches:
        for x in (b if isinstance(b, (list, tuple)) else [b]):
            h.update(memoryview(x.numpy() if hasattr(x, "numpy") else x).cast("B"))
        n += 1
    return h.hexdigest(), n


def consume(batches, t0):
    """Iterates `batches` (a loader) to the end: (samples, seconds, seconds to the first batch,
    the first batch described), the seconds counted from `t0` (taken before the loader was
    built, so its start-up is included)."""
    first = desc = None
    count = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - t0
            desc = describe_batch(batch)
        count += batch_len(batch)
    return count, time.perf_counter() - t0, first, desc


def thread_sweep(cores, cap=16):
    """Worker counts to measure: 1, 2, 4, ... up to max(8, cores), never above `cap`, plus the
    core count itself. On a small machine the points past its cores show the curve flattening."""
    top = min(cap, max(8, cores))
    ws = set()
    w = 1
    while w <= top:
        ws.add(w)
        w *= 2
    if cores <= cap:
        ws.add(cores)
    return sorted(ws)


def cuda_unusable(prog, json_path):
    """For a benchmark's --cuda: None when a CUDA device is usable; else prints why, writes
    {"skipped": why} to json_path (the report leaves the section out saying so) and returns
    the reason, and the benchmark exits 0 (no GPU is not a failure of the benchmark)."""
    import threadloom
    try:
        threadloom._core.cuda_device_count()
        return None
    except threadloom.Error as e:
        why = "no usable GPU: %s" % e
    print("%s: --cuda: %s" % (prog, why))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"skipped": why}, f)
    return why


def parse_threads(text):
    """'1,2,4' -> [1, 2, 4]; raises ValueError naming the bad item."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok.isdigit() or int(tok) < 1:
            raise ValueError("thread counts are positive integers separated by commas, got %r" % tok)
        out.append(int(tok))
    return sorted(set(out))


def parse_args(description=None):
    """The loader benchmarks' command line -> (args, allowed cores, worker counts to sweep)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=int, default=300)
    ap.add_argument("--threads", help="worker counts, e.g. 1,2,4 (default: 1, 2, 4, 8 and the "
                    "core count, up to 16)")
    ap.add_argument("--workloads", default="python,native",
                    help="comma-separated, of: %s" % ", ".join(WORKLOADS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    try:
        ws = parse_threads(a.threads) if a.threads else thread_sweep(cores)
    except ValueError as e:
        ap.error("--threads: %s" % e)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad or not a.workloads:
        ap.error("--workloads: %r is not one of %s" % (",".join(bad), ", ".join(WORKLOADS)))
    return a, cores, ws
