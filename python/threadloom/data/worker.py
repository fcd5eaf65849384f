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

__all__ = ["WorkerInfo", "get_worker_info"]

_local = threading.local()


class WorkerInfo:
    """What get_worker_info() returns in a loader worker thread: id, num_workers, seed and
    dataset (this worker's replica), as torch's; plus rng, a random.Random seeded with seed that
    only this thread uses (threads share the `random` module, so it cannot be reseeded per
    worker as torch reseeds it per process)."""

    __slots__ = ("id", "num_workers", "seed", "dataset", "rng")

    def __init__(self, id, num_workers, seed, dataset=None):
        self.id = id
        self.num_workers = num_workers
        self.seed = seed
        self.dataset = dataset
        self.rng = random.Random(seed)

    def __repr__(self):
        return "WorkerInfo(id=%d, num_workers=%d, seed=%d, dataset=%s)" % (
            self.id, self.num_workers, self.seed, type(self.dataset).__name__)


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
