"""threadloom.contention(): which shared objects do other threads' reference counts hit?

    report = threadloom.contention(work, threads=2, args=(dataset,))
    print(report)

    python -m threadloom contention [--threads N] [--function main] [--top K] script.py [args]

runs ``fn(*args, **kwargs)`` on ``threads`` threads at once and names the objects whose shared
reference-count field moved most while they ran, with their type, a path from where they were
found (``workload.VOCAB``, ``dataset.records[12]``) and what to do about each.

The signal: on free-threaded CPython an object's owner thread counts its references in one
field (ob_ref_local) and every other thread in another (ob_ref_shared), with atomic operations
that make the threads contend; so a change of ob_ref_shared is another thread taking or
dropping a reference. Before the run the objects reachable from the roots are collected (the
globals of the modules of the program, that is modules outside the standard library,
site-packages and threadloom, with their classes, functions and code constants; fn's closure,
defaults and bound ``self``; the arguments, by parameter name; ``roots``). During the run a
sampler thread reads every one of those fields, detached from the interpreter, then sleeps long
enough to stay at ``overhead`` (default 5%) of one core, and counts per object the samples in
which the field had changed since the previous one (``moves``) and in which it differed from
its value before the run (``held``: another thread held a reference then). These are samples:
a reference taken and dropped between two samples is not seen, so the counts rank the objects,
they do not count their reference operations. Objects created during the run (per-thread data,
results) are not watched, and neither are the locals of fn: pass data as arguments or keep it
in a global to have it watched. The threads run fn once each; fn should run for at least a
few tenths of a second.
"""

import argparse
import inspect
import os
import sys
import sysconfig
import threading
import time

from threadloom import _core
from threadloom.share import path_of

__all__ = ["ContentionReport", "contention", "main"]

IMMUTABLE = (str, bytes, int, float, complex, tuple, frozenset, type(None), bool, range)


class Hot:
    """One contended object, or the items of one container seen contended (path ends with
    "[...]", type "str x312"): path, type, moves, held (summed over the items), advice, and
    `obj` (the object, or one of the items)."""

    def __init__(self, obj, path, moves, held, advice):
        self.obj = obj
        self.path = path
        self.type = type(obj).__qualname__
        self.moves = moves
        self.held = held
        self.advice = advice

    def __repr__(self):
        return "Hot(%s, %s, moves=%d, held=%d)" % (self.path, self.type, self.moves, self.held)


class ContentionReport:
    """contention()'s result: `hot` (a list of Hot, most contended first), `threads`,
    `seconds` (the threaded run's wall time), `watched` (objects watched), `samples` (passes
    of the sampler), `sampler_seconds` (its own time reading), `overhead` (its share of one
    core asked for)."""

    def __init__(self, hot, threads, seconds, watched, samples, sampler_seconds, overhead):
        self.hot = hot
        self.threads = threads
        self.seconds = seconds
        self.watched = watched
        self.samples = samples
        self.sampler_seconds = sampler_seconds
        self.overhead = overhead

    def __str__(self):
        lines = ["threadloom.contention: %d thread(s), %.2f s; %s object(s) watched, %d "
                 "sample(s) (the sampler read for %.3f s, %.1f%% of the run)" % (
                     self.threads, self.seconds, format(self.watched, ","), self.samples,
                     self.sampler_seconds,
                     100.0 * self.sampler_seconds / self.seconds if self.seconds else 0.0)]
        if self.samples < 20:
            lines.append("  few samples: give fn more work (a few tenths of a second or more) "
                         "for a ranking that means something")
        if not self.hot:
            lines.append("  no watched object had its shared reference count change: nothing "
                         "to share among the objects found (see threadloom.contention's "
                         "documentation for what is watched)")
        for i, h in enumerate(self.hot, 1):
            lines.append("  %2d. %-44s %-18s moves %5d  held %5d" % (
                i, h.path, h.type, h.moves, h.held))
            lines.append("      %s" % h.advice)
        return "\n".join(lines)

    __repr__ = __str__


def _program_modules():
    """Modules of the program: those with a file outside the standard library, site-packages
    and threadloom, plus __main__ when it has a file."""
    paths = sysconfig.get_paths()
    skip = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")
            if paths.get(k)}
    skip.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) +
             os.sep + "threadloom")
    out = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f or name.startswith("threadloom") or type(mod).__name__ != "module":
            continue
        real = os.path.realpath(f)
        if any(real == s or real.startswith(s + os.sep) for s in skip):
            continue
        out.append((name, mod))
    return out


def _advice(obj, chain, path):
    if any(type(o).__name__ == "code" for o in chain[:-1]):
        fn = next((o for o in chain if type(o).__name__ == "function"), None)
        mod = getattr(fn, "__module__", None) or path.split(".", 1)[0]
        return ("a constant of code compiled without threadloom's import hook: run under "
                "`threadloom run`, or import threadloom before %s, or threadloom.share(%s, "
                "functions=True, code=True)" % (mod, path.split(".", 1)[0]))
    if isinstance(obj, IMMUTABLE):
        return "immutable: threadloom.share(%s) before the threads start" % path
    if isinstance(obj, (dict, list, set)) or hasattr(obj, "__dict__"):
        return ("if the threads only read it: threadloom.share(%s) before they start; if they "
                "write it: one per thread (threading.local, DataLoader replicate='copy')" % path)
    return ("a C-extension object: threadloom.share(%s, extensions=True) if its type is safe "
            "to read from several threads, else one per thread" % path)


def contention(fn, threads=2, args=(), kwargs=None, *, roots=None, top=10, overhead=0.05):
    """Runs fn(*args, **kwargs) on `threads` threads at once while sampling the shared
    reference-count field of the objects reachable from the program's module globals, fn and
    its arguments (and `roots`, {name: object}); returns a ContentionReport naming the `top`
    objects other threads' counts moved most (see the module's documentation for how it
    samples). An exception in fn is re-raised after the threads finish. Raises
    NotImplementedError on an interpreter with the GIL."""
    if threads < 1:
        raise ValueError("threads must be >= 1, not %r" % (threads,))
    if not 0 < overhead <= 0.5:
        raise ValueError("overhead is a share of one core, in (0, 0.5], not %r" % (overhead,))
    kwargs = dict(kwargs or {})
    probe = _core.RefProbe()
    labels = {}  # id(root) -> name

    def add(name, obj, **flags):
        if id(obj) in labels or probe.contains(obj):
            return
        labels[id(obj)] = name
        probe.add(obj, **flags)

    for name, obj in (roots or {}).items():
        add(name, obj, classes=True, functions=True, code=True)
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {}
    for i, a in enumerate(args):
        name = next((k for k, v in bound.items() if v is a), "args[%d]" % i)
        add(name, a, classes=True, functions=True, code=True)
    for k, v in kwargs.items():
        add(k, v, classes=True, functions=True, code=True)
    target = getattr(fn, "__func__", fn)
    if getattr(fn, "__self__", None) is not None and type(fn.__self__).__name__ != "module":
        add("self", fn.__self__, classes=True, functions=True, code=True)
    add(getattr(target, "__qualname__", "fn"), target, functions=True, code=True)
    for name, mod in _program_modules():
        add(name, mod, classes=True, functions=True, code=True)

    stop = threading.Event()
    reading = [0.0]

    def sampler():
        while True:
            dt = probe.sample()
            reading[0] += dt
            if stop.wait(max(0.001, dt * (1.0 - overhead) / overhead)):
                return

    errors = []
    barrier = threading.Barrier(threads + 1)

    def worker():
        try:
            barrier.wait()
            fn(*args, **kwargs)
        except BaseException as e:  # re-raised below, on the calling thread
            errors.append(e)

    pool = [threading.Thread(target=worker, name="contention-%d" % k) for k in range(threads)]
    for t in pool:
        t.start()
    sam = threading.Thread(target=sampler, name="contention-sampler", daemon=True)
    sam.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    stop.set()
    sam.join()
    if errors:
        raise errors[0]

    # Items of one container are reported together, under the container's path: sharing the
    # container shares them, and a vocabulary of 50,000 strings is one finding, not 50,000.
    groups = {}  # key -> [score, moves, held, count, chain, is_group]
    for idx, moves, held in probe.results():
        chain = probe.chain(idx)
        obj = chain[-1]
        parent = chain[-2] if len(chain) > 1 else None
        if isinstance(parent, (list, tuple, set, frozenset, dict)) and \
                type(obj).__name__ not in ("dict", "list"):
            key = (id(parent), type(obj))
            g = groups.setdefault(key, [0, 0, 0, 0, chain, True])
        else:
            g = groups.setdefault((id(obj), None), [0, 0, 0, 0, chain, False])
        g[0] += moves + held
        g[1] += moves
        g[2] += held
        g[3] += 1
    hot = []
    for score, moves, held, count, chain, is_group in sorted(groups.values(),
                                                              key=lambda g: -g[0])[:top]:
        root = labels.get(id(chain[0]), "obj")
        if is_group:
            base = path_of(chain[:-1], root)
            path = "%s[...]" % base if not isinstance(chain[-2], (set, frozenset)) else \
                "%s{...}" % base
            h = Hot(chain[-1], path, moves, held, _advice(chain[-2], chain[:-1], base))
            h.type = "%s x%d" % (type(chain[-1]).__qualname__, count)
        else:
            path = path_of(chain, root)
            h = Hot(chain[-1], path, moves, held, _advice(chain[-1], chain, path))
        hot.append(h)
    return ContentionReport(hot, threads, seconds, probe.objects, probe.samples, reading[0],
                            overhead)


def main(argv=None):
    """python -m threadloom contention: see the module's documentation."""
    p = argparse.ArgumentParser(
        prog="python -m threadloom contention",
        description="Run a script's function on N threads and name the shared objects whose "
                    "reference counts other threads write most.")
    p.add_argument("--threads", type=int, default=2, help="threads running the function (2)")
    p.add_argument("--function", default="main",
                   help="the script's function to run on each thread (main); it takes no "
                        "arguments, and sys.argv is the script's")
    p.add_argument("--top", type=int, default=10, help="objects to name (10)")
    p.add_argument("script", help="a Python file; it is loaded as a module (its "
                                  "`if __name__ == '__main__'` block does not run)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    a = p.parse_args(argv)
    if a.threads < 1 or a.top < 1:
        p.error("--threads and --top must be >= 1")
    import importlib.util
    path = os.path.abspath(a.script)
    if not os.path.isfile(path):
        p.error("no such script: %s" % a.script)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.argv = [path] + a.args
    sys.path.insert(0, os.path.dirname(path))
    spec.loader.exec_module(mod)
    fn = getattr(mod, a.function, None)
    if not callable(fn):
        print("threadloom contention: %s has no function %r (--function NAME picks one)"
              % (a.script, a.function), file=sys.stderr)
        return 2
    print(contention(fn, threads=a.threads, top=a.top))
    return 0
