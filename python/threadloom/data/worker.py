"""Loader worker threads: WorkerInfo, get_worker_info(), and each worker's own dataset replica.

torch gives each worker process its own copy of the dataset (fork or pickle). A threadloom
worker is a thread, so the copy is made on purpose: with replicate="copy" (the default) each
worker thread deep-copies the dataset on its own thread when it starts (each epoch, or once
with persistent_workers=True), with replica_copy(): copy.deepcopy's result, 6x faster on large
lists of records. The copy's containers and objects are then owned by that thread, so on
free-threaded CPython their reference counts stay thread-local (no contended atomic increments
on shared lists, dicts and instances), and a dataset that mutates itself (caches, file offsets,
counters) needs no lock. Immutable atoms and tuples of them stay shared, as deepcopy leaves
them: every reader still writes their reference counts, which costs little for records each
read now and then. A copy that takes over a second is logged once, with what to do instead. replicate=factory calls
factory() on each worker thread instead (get_worker_info() already answers inside it);
replicate=None shares the one dataset object between all workers; replicate="share" shares it
too, made immortal once by DatasetShare (threadloom.share, in slices: the loader's constructor
and then the consumer's idle time), so no worker writes its reference counts (and it is never
freed).
"""

import copy
import logging
import operator
import random
import threading
import time
import weakref

__all__ = ["WorkerInfo", "get_worker_info", "numpy_seed", "replica_copy", "DatasetShare"]

_local = threading.local()
log = logging.getLogger("threadloom.data")
SLOW_COPY_S = 1.0  # a replica that takes longer to copy is reported, once per dataset object
_slow_reported = set()  # id()s of the datasets reported (set operations are thread-safe)


class WorkerInfo:
    """What get_worker_info() returns in a loader worker thread: id, num_workers, seed and
    dataset (this worker's replica), as torch's. A torch worker process reseeds the global
    generators of `random`, numpy and torch with its seed; threads share those, so threadloom
    leaves them alone and gives each worker its own generators instead, seeded so they draw
    what the reseeded globals of torch's worker `id` draw for the same base seed:

        rng              random.Random(seed)          torch's worker: random.seed(seed)
        numpy_rng        numpy.random.RandomState     torch's worker: numpy.random.seed(...)
        torch_generator  torch.Generator              torch's worker: torch.manual_seed(seed)

    numpy_rng and torch_generator are made on first use (numpy and torch stay optional). Only
    this worker's thread should draw from them."""

    __slots__ = ("id", "num_workers", "seed", "dataset", "rng", "_numpy_rng", "_torch_generator")

    def __init__(self, id, num_workers, seed, dataset=None):
        self.id = id
        self.num_workers = num_workers
        self.seed = seed
        self.dataset = dataset
        self.rng = random.Random(seed)
        self._numpy_rng = None
        self._torch_generator = None

    @property
    def numpy_rng(self):
        """A numpy.random.RandomState seeded as torch seeds numpy's global generator in its
        worker `id` (from the base seed and the worker id, not from `seed`)."""
        if self._numpy_rng is None:
            import numpy
            self._numpy_rng = numpy.random.RandomState(
                numpy_seed(self.seed - self.id, self.id))
        return self._numpy_rng

    @property
    def torch_generator(self):
        """A torch.Generator seeded with `seed`, as torch.manual_seed(seed) in torch's worker."""
        if self._torch_generator is None:
            import torch
            self._torch_generator = torch.Generator().manual_seed(self.seed)
        return self._torch_generator

    def __repr__(self):
        return "WorkerInfo(id=%d, num_workers=%d, seed=%d, dataset=%s)" % (
            self.id, self.num_workers, self.seed, type(self.dataset).__name__)


def numpy_seed(base_seed, worker_id):
    """The four 32-bit words torch's worker seeds numpy with (torch.utils.data._utils.worker.
    _generate_state, itself adapted from numpy's SeedSequence; MIT licensed, Copyright (c) 2015
    Melissa E. O'Neill, (c) 2019 NumPy Developers): `random` and numpy then do not share a seed."""
    mask = 0xFFFFFFFF
    mult_a, mult_b = 0x931e8875, 0x58f38ded
    const_a = [0x43b0d7e5]

    def hash32(value):
        value = (value ^ const_a[0]) & mask
        const_a[0] = (const_a[0] * mult_a) & mask
        value = (value * const_a[0]) & mask
        return (value ^ (value >> 16)) & mask

    def mix(x, y):
        r = ((0xca01f9dd * x) & mask) - ((0x4973f715 * y) & mask)
        r &= mask
        return (r ^ (r >> 16)) & mask

    pool = [hash32(v) for v in (worker_id, base_seed & mask, base_seed >> 32, 0)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hash32(pool[src]))
    const_b = 0x8b51f9dd
    state = []
    for v in pool:
        v = (v ^ const_b) & mask
        const_b = (const_b * mult_b) & mask
        v = (v * const_b) & mask
        state.append((v ^ (v >> 16)) & mask)
    return state


def get_worker_info():
    """This loader worker thread's WorkerInfo, or None outside loader workers (the main thread,
    and num_workers=0 loaders, as in torch)."""
    return getattr(_local, "info", None)


class DatasetShare:
    """replicate="share": threadloom.share(dataset), a slice at a time (share.ShareInSteps).

    The loader's constructor takes the first slice (FIRST units: one per item or object looked
    at and per object reached, ~1.5 ms; a dataset of ~10,000 entries is done there, and
    `share_report` is ready at once); the rest is walked by the thread that iterates the loader
    while it waits for a batch, after the epoch's first batch (the map-style path, loader.py:
    the pipeline's idle hook), STEP units at a time, so the first batch comes as fast as with
    replicate=None and the walk costs the consumer no time it would not have spent waiting
    (each slice ends within ~1.5 ms of a batch arriving). Until the walk ends the workers read a
    partly immortal dataset (safe: share()'s walk allows readers meanwhile; the rest is still
    contended). An iteration that cannot walk while waiting (an iterable dataset) finishes the
    walk when it starts. A report that left data out (objects of other threads, C-extension
    objects; not the dataset's class and methods) is logged as a warning once the walk ends; a
    walk that fails (MemoryError) is logged and stops, the objects done so far staying
    immortal."""

    FIRST = 50000  # units of ShareWalk.step: ~1.5 ms on the 2-core VM
    STEP = 50000

    def __init__(self, dataset):
        from threadloom.share import ShareInSteps
        self._failed = None
        self._walk = ShareInSteps(dataset, name="dataset")
        self.step(self.FIRST)

    @property
    def done(self):
        return self._walk is None or self._walk.done

    @property
    def report(self):
        return self._walk.report if self._walk is not None else self._failed

    def step(self, budget=None):
        """Walks on (budget: ShareWalk units, default STEP; <= 0: to the end); True once it
        ended (or failed, which is logged)."""
        walk = self._walk
        if walk is None or walk.done:
            return True
        try:
            if not walk.step(self.STEP if budget is None else budget):
                return False
        except Exception as exc:  # noqa: BLE001  (reported, and the loader goes on without it)
            from threadloom.share import ShareReport
            walk.close()
            self._walk = None
            self._failed = ShareReport(root_name="dataset", note="the walk failed: %r" % (exc,))
            log.warning("threadloom.DataLoader(replicate='share'): sharing the dataset failed "
                        "(%r); the objects made immortal so far stay so, the rest is read as "
                        "with replicate=None", exc)
            return True
        report = walk.report
        if set(report.skipped) - {"module", "class", "function", "code"}:
            log.warning("threadloom.DataLoader(replicate='share'): %s", report)
        return True

    def finish(self):
        return self.step(0)


def make_replica(dataset, replicate, worker_id):
    """The dataset object worker `worker_id` uses, built on the calling (worker) thread."""
    if replicate is None or replicate == "share":
        return dataset
    if replicate == "copy":
        try:
            t0 = time.perf_counter()
            replica = replica_copy(dataset)
            took = time.perf_counter() - t0
            if took > SLOW_COPY_S and id(dataset) not in _slow_reported:
                _slow_reported.add(id(dataset))
                log.warning("threadloom.DataLoader: worker %d took %.1f s to copy the dataset "
                            "(replicate='copy': once per worker, and per epoch unless "
                            "persistent_workers=True); persistent_workers=True copies once, "
                            "replicate='share' shares a dataset that is only read (made "
                            "immortal: never freed), "
                            "replicate=factory builds each worker's own", worker_id, took)
            return replica
        except Exception as exc:
            raise TypeError(
                "threadloom.DataLoader: could not copy the dataset for worker %d (%s: %s); pass "
                "replicate=None to share one dataset object between the worker threads, or "
                "replicate=factory to build each worker's own" % (worker_id, type(exc).__name__, exc)
            ) from exc
    return replicate()


def note_worker(exc, worker_id):
    """Adds "(raised in threadloom.DataLoader worker N)" to an exception a worker raised, once
    (the consumer re-raises the same object, with the worker's traceback)."""
    if hasattr(exc, "add_note") and not getattr(exc, "_threadloom_noted", False):
        try:
            exc.add_note("(raised in threadloom.DataLoader worker %d)" % worker_id)
            exc._threadloom_noted = True
        except Exception:
            pass


class WorkerState:
    """One worker's replica and WorkerInfo; lives for an epoch, or across epochs with
    persistent_workers=True."""

    def __init__(self, dataset, replicate, worker_id, num_workers, seed, worker_init_fn):
        info = WorkerInfo(worker_id, num_workers, seed)
        self.info = info
        prev = getattr(_local, "info", None)
        _local.info = info
        try:
            info.dataset = make_replica(dataset, replicate, worker_id)
            if worker_init_fn is not None:
                worker_init_fn(worker_id)
        finally:
            _local.info = prev
        self.dataset = info.dataset

    def enter(self):
        """Makes this the calling thread's worker (get_worker_info() answers it)."""
        _local.info = self.info

    @staticmethod
    def leave():
        _local.info = None


# -- copying a dataset for a worker ---------------------------------------------------------------
# copy.deepcopy walks every object in Python, ~3.6 us per element of a list of tuples on 3.13t,
# although it returns a tuple of immutable atoms unchanged: a 500k-record dataset took 1.8 s per
# worker, per epoch (and threads copying at once contend on the shared records' reference
# counts). replica_copy() gives the same result as copy.deepcopy (equal values, the same sharing
# and cycles, atoms and tuples of atoms kept as they are) with the walk of builtin containers and
# of plain instances done in comprehensions and C builtins; every other object goes to
# copy.deepcopy with the same memo, so __deepcopy__, __reduce_ex__, __getstate__/__setstate__
# and __slots__ keep their meaning.

_ATOMS = frozenset(t for t in (type(None), type(Ellipsis), type(NotImplemented), int, float,
                               bool, complex, bytes, str, type(copy.copy.__code__), type, range,
                               type(len), type(copy.copy), weakref.ref, property))
_all_atoms = _ATOMS.issuperset  # of map(type, t): the fastest test on 3.13t of those tried
_MISSING = object()


def _plain_instance(cls):
    """Whether deepcopy of an instance of `cls` is `cls.__new__(cls)` + a deep copy of its
    __dict__ (what copyreg's default reduce and copy._reconstruct do for a class that
    customises none of it)."""
    names = set()
    for c in cls.__mro__[:-1]:
        names.update(vars(c))
    return (cls.__new__ is object.__new__ and cls.__mro__[-1] is object
            and not names & {"__reduce_ex__", "__reduce__", "__getstate__", "__setstate__",
                             "__deepcopy__", "__getnewargs__", "__getnewargs_ex__", "__slots__",
                             "__copy__"}
            and type(cls) is type)


def replica_copy(x, memo=None):
    """copy.deepcopy(x), faster on builtin containers and plain instances (see above)."""
    if memo is None:
        memo = {}
    return _copy(x, memo)


def _copy(x, memo):
    cls = type(x)
    if cls in _ATOMS:
        return x
    if cls is tuple and _all_atoms(map(type, x)):
        return x
    y = memo.get(id(x), _MISSING)
    if y is not _MISSING:
        return y
    if cls is list:
        y = []
        memo[id(x)] = y
        y.extend([e if type(e) in _ATOMS or (type(e) is tuple and _all_atoms(map(type, e)))
                  else _copy(e, memo) for e in x])
    elif cls is dict:
        y = {}
        memo[id(x)] = y
        for k, v in x.items():
            y[k if type(k) in _ATOMS else _copy(k, memo)] = v if type(v) in _ATOMS else _copy(v, memo)
    elif cls is tuple:
        items = [e if type(e) in _ATOMS else _copy(e, memo) for e in x]
        y = memo.get(id(x), _MISSING)      # copied meanwhile, through a cycle
        if y is not _MISSING:
            return y
        y = x if all(map(operator.is_, items, x)) else tuple(items)
        memo[id(x)] = y
    elif _plain(cls):
        y = cls.__new__(cls)
        memo[id(x)] = y
        y.__dict__.update(_copy(x.__dict__, memo))
    else:
        return copy.deepcopy(x, memo)
    _keep_alive(x, memo)
    return y


_plain_classes = {}  # class -> _plain_instance(class); dict operations are thread-safe


def _plain(cls):
    p = _plain_classes.get(cls)
    if p is None:
        p = _plain_classes.setdefault(cls, _plain_instance(cls))
    return p


def _keep_alive(x, memo):
    """As copy's: the originals stay referenced while the copy runs, so no id() is reused."""
    try:
        memo[id(memo)].append(x)
    except KeyError:
        memo[id(memo)] = [x]
