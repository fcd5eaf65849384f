"""Loader worker threads: WorkerInfo, get_worker_info(), and each worker's own dataset replica.

torch gives each worker process its own copy of the dataset (fork or pickle). A threadloom
worker is a thread, so the copy is made on purpose: with replicate="copy" (the default) each
worker thread deep-copies the dataset once, on its own thread, when it starts. The copy's
objects are then owned by that thread, so on free-threaded CPython their reference counts stay
thread-local (no contended atomic increments on shared lists, dicts and items), and a dataset
that mutates itself (caches, file offsets, counters) needs no lock. replicate=factory calls
factory() on each worker thread instead (get_worker_info() already answers inside it);
replicate=None shares the one dataset object between all workers.
"""

import copy
import random
import threading

__all__ = ["WorkerInfo", "get_worker_info", "numpy_seed"]

_local = threading.local()


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


def make_replica(dataset, replicate, worker_id):
    """The dataset object worker `worker_id` uses, built on the calling (worker) thread."""
    if replicate is None:
        return dataset
    if replicate == "copy":
        try:
            return copy.deepcopy(dataset)
        except Exception as exc:
            raise TypeError(
                "threadloom.DataLoader: could not copy the dataset for worker %d (%s: %s); pass "
                "replicate=None to share one dataset object between the worker threads, or "
                "replicate=factory to build each worker's own" % (worker_id, type(exc).__name__, exc)
            ) from exc
    return replicate()


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
