"""threadloom.DataLoader: torch.utils.data.DataLoader's signature and semantics, with threads.

    loader = threadloom.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=8,
                                   generator=random.Random(0))
    for batch in loader:
        ...

Workers are threads of one threadloom scheduler pool (pinned by default), not processes.
Map-style datasets run on a threadloom.Pipeline: the consumer's thread walks the batch sampler
(as torch's main process does) and hands each batch of indices to the workers, which fetch and
collate batches (work-stealing from one queue); the consumer gets them in sampler order
(in_order=True) whatever the thread count. At most prefetch_factor * num_workers batches are in
flight: the consumer hands over the next indices each time it takes a batch, so no thread sits
between the sampler and the workers. The first batch of each epoch (num_workers >= 2) goes out
in contiguous parts that all the workers, idle at the start, fetch at once; the one that
finishes last collates the batch (data/fetch.py: SplitFirst), so it comes after about
1/num_workers of a batch's time instead of a whole batch on one worker. Iterable datasets run
one iterator per worker replica, each into its own bounded queue, taken round-robin as torch
does.
Thread-safety: one DataLoader is iterated by one thread at a time (as torch's).

Device batches (device=, or pin_memory=True with pin_memory_device=): data/device.py; the
worker threads collate into the Feeder's pinned slots and enqueue the copies, the consumer's
thread hands each batch over on the device.

Lifetime: an iterator reads what it needs of its DataLoader when it starts (a _Config, as
torch's iterator copies the loader's attributes) and never holds the loader; its worker threads
hold the _Config, the engine and the queues, never the iterator. So dropping the iterator (an
abandoned `next(iter(loader))`, a `break`, an exception) collects it, and its __del__ stops the
threads and drops the batches still queued, giving their arena memory back. The loader keeps
only the progress of the iteration started last (_Progress, for state_dict()) and a weak
reference to that iterator.
"""

import collections.abc
import itertools
import sys
import threading
import time
import weakref

from threadloom import gilguard, memory, sysinfo
from threadloom._queue import CLOSED, END, Queue, Workers
from threadloom.data import device as todevice
from threadloom.data.collate import default_collate, default_convert
from threadloom.data.fetch import PART_DONE, Part, SplitFirst, iterable_batches, map_fetcher
from threadloom.data.sampler import (BatchSampler, DistributedSampler, RandomSampler,
                                     SequentialSampler, distributed_env, draw_seed,
                                     load_replay_state, replay_state)
from threadloom.data.worker import DatasetShare, WorkerState, log, note_worker
from threadloom.pipeline import Pipeline

__all__ = ["DataLoader", "Dataset", "IterableDataset", "Subset", "DataLoaderTimeoutError"]


class Dataset:
    """Map-style dataset: __getitem__(index) and __len__ (duck typing works too)."""

    def __getitem__(self, index):
        raise NotImplementedError("Subclasses of Dataset should implement __getitem__.")


class IterableDataset(Dataset):
    """Iterable-style dataset: __iter__; shard with get_worker_info() in worker threads."""

    def __iter__(self):
        raise NotImplementedError("Subclasses of IterableDataset should implement __iter__.")


class Subset(Dataset):
    """The items of `dataset` at `indices`."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = indices

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def __len__(self):
        return len(self.indices)


class DataLoaderTimeoutError(RuntimeError, TimeoutError):
    """No batch within `timeout` seconds: a RuntimeError as torch raises, and a TimeoutError."""


def _is_iterable_dataset(ds):
    if isinstance(ds, IterableDataset):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ds, torch.utils.data.IterableDataset):
        return True
    return not hasattr(ds, "__getitem__") and hasattr(ds, "__iter__")


_FROZEN = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")


class DataLoader:
    """torch.utils.data.DataLoader with worker threads. torch's arguments keep their meaning,
    except: multiprocessing_context (there are no processes) is refused; pin_memory=True alone
    is accepted and free, since batches are collated into NUMA-local arena memory (page-locked
    when a GPU is present); pin_memory=True with pin_memory_device="cuda:N" (or "sim:N")
    delivers each batch on that device, as device= does.

    device: "cuda:N", "sim:N", an index into threadloom.devices(), a threadloom Device or a
    torch.device. Each batch is collated into a page-locked staging slot NUMA-local to the
    device, copied there on the building thread's copy stream (the GPU feeder) and handed over
    with an event: with torch loaded, as torch tensors (cuda: on the device, torch's current
    stream waits for the copy, the consumer's thread does not; sim: CPU tensors over the sim
    device's memory), without torch as DeviceBuffers in the batch's structure, the consumer's
    current stream of the device made to wait. Only tensors move (torch's pin_memory rule);
    strings and numbers stay as they are. stats()["device"] has the copies' numbers.

    threadloom's own keyword arguments: replicate ("copy": each worker deep-copies the dataset
    once, on its thread; a factory: factory() per worker; None: share it; "share": share it
    after making it immortal once, here, with threadloom.share(), for good: the report is
    `share_report`), rank / world_size /
    distributed (shard the sampler as DistributedSampler, taken from RANK / WORLD_SIZE when not
    given), pin (pin the worker threads, default True: to the CPU-wide loader plan, or with
    device= to the loader slots beside that device's launch core in its device plan, the one
    spmd(devices=) made when the loader is made in a rank), progress (a one-line progress display on
    stderr, at most once a second).
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False, pin_memory_device="",
                 in_order=True, device=None, replicate="copy", rank=None, world_size=None,
                 distributed=False, pin=True, progress=False):
        num_workers = sysinfo.thread_count(num_workers, "num_workers")
        if num_workers < 0:
            raise ValueError("num_workers option should be non-negative; use num_workers=0 to "
                             "disable multiprocessing.")
        if timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if timeout > 0 and num_workers == 0:  # torch: an AssertionError at the first iter()
            raise ValueError("timeout applies to worker threads; with num_workers=0 the batches "
                             "are loaded in the calling thread, which cannot time out: set "
                             "num_workers > 0 or leave timeout=0")
        # torch 1.13's default prefetch_factor is 2, torch 2's None: both mean unset here
        if num_workers == 0 and prefetch_factor not in (None, 2):
            raise ValueError("prefetch_factor option could only be specified in multiprocessing."
                             "let num_workers > 0 to enable multiprocessing, otherwise set "
                             "prefetch_factor to None.")
        if num_workers == 0:
            prefetch_factor = None
        if num_workers > 0 and prefetch_factor is None:
            prefetch_factor = 2
        if prefetch_factor is not None and prefetch_factor < 0:
            raise ValueError("prefetch_factor option should be non-negative")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")
        if multiprocessing_context is not None and num_workers == 0:
            raise ValueError("multiprocessing_context can only be used with multi-process "
                             "loading (num_workers > 0), but got num_workers=0")
        if multiprocessing_context is not None:
            raise ValueError("threadloom.DataLoader runs its workers as threads of one process; "
                             "multiprocessing_context=%r cannot apply: leave it None"
                             % (multiprocessing_context,))
        target = todevice.resolve(device, pin_memory, pin_memory_device)
        if not (replicate is None or replicate in ("copy", "share") or callable(replicate)):
            raise ValueError("replicate must be 'copy', 'share', a factory (callable) or None, "
                             "not %r" % (replicate,))
        _note_oversubscription(num_workers)

        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
        self.device = target       # the Device batches are delivered on, or None (host)
        # its Feeder (made on the first iteration, kept: its pinned slots serve every epoch)
        self._feeder = None
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.generator = generator
        self.persistent_workers = persistent_workers
        self.in_order = in_order
        self.replicate = replicate
        self.pin = pin
        self.progress = progress
        self._iterable = _is_iterable_dataset(dataset)

        if self._iterable:
            if shuffle not in (False, None):
                raise ValueError("DataLoader with IterableDataset: expected unspecified shuffle "
                                 "option, but got shuffle=%s" % (shuffle,))
            if sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified sampler "
                                 "option, but got sampler=%s" % (sampler,))
            if batch_sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified "
                                 "batch_sampler option, but got batch_sampler=%s" % (batch_sampler,))
        shuffle = bool(shuffle)
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError("batch_sampler option is mutually exclusive with batch_size, "
                                 "shuffle, sampler, and drop_last")
            batch_size = None
            drop_last = False
        elif batch_size is None and drop_last:
            raise ValueError("batch_size=None option disables auto-batching and is mutually "
                             "exclusive with drop_last")

        self.world_size = self.rank = None
        if distributed or rank is not None or world_size is not None:
            if self._iterable:
                raise ValueError("rank / world_size / distributed shard a sampler; an iterable "
                                 "dataset shards itself (see get_worker_info())")
            if sampler is not None or batch_sampler is not None:
                raise ValueError("rank / world_size / distributed replace the sampler; pass a "
                                 "DistributedSampler yourself instead to combine them")
            self.world_size, self.rank = distributed_env(world_size, rank)
            seed = 0 if generator is None else draw_seed(generator)
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=shuffle,
                                         seed=seed, drop_last=drop_last)
        if sampler is None and not self._iterable:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        if batch_size is not None and batch_sampler is None and not self._iterable:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)

        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        self._auto_collation = batch_sampler is not None or (self._iterable and batch_size is not None)
        if collate_fn is None:
            collate_fn = default_collate if self._auto_collation else default_convert
        self.collate_fn = collate_fn

        # replicate="share": the workers read one dataset, made immortal once: a first slice
        # here, the rest while the consumer waits (worker.DatasetShare)
        self._sharing = DatasetShare(dataset) if replicate == "share" and num_workers else None
        self._epoch = 0            # epochs started
        self._latest = None        # weakref to the _LoaderIter started last, or None
        self._live = weakref.WeakSet()  # the iterators that may be running, for close()
        self._iterator = None      # persistent_workers: the one iterator, as torch's
        self._progress = None      # that iteration's _Progress (outlives the iterator)
        self._resume = None        # a state loaded by load_state_dict(), for the next __iter__
        self._states = {}          # persistent_workers: worker id -> WorkerState
        self._base_seed = None     # persistent_workers: drawn by the first epoch, as torch does
        self._initialized = True

    def __setattr__(self, attr, val):
        # torch's rule: what the sampler and the batches were built from cannot change after
        if attr in _FROZEN and self.__dict__.get("_initialized"):
            raise ValueError("%s attribute should not be set after %s is initialized"
                             % (attr, type(self).__name__))
        object.__setattr__(self, attr, val)

    @property
    def share_report(self):
        """replicate="share": the ShareReport once the dataset is shared (threadloom.share's;
        None before: a large dataset is walked while the first epoch's consumer waits), else
        None."""
        return self._sharing.report if self._sharing is not None else None

    # -- torch's surface ---------------------------------------------------------------------

    @property
    def _index_sampler(self):
        return self.batch_sampler if self._auto_collation else self.sampler

    def __len__(self):
        return _batches(self.dataset, self._iterable, self.batch_size, self.drop_last,
                        self._index_sampler)

    def __iter__(self):
        """A new iterator, independent of any other of this loader (zip(loader, loader) and
        nested loops work as in torch). With persistent_workers (and num_workers > 0) torch
        keeps one iterator and each iter() resets it to a new epoch: so does threadloom."""
        if self.num_workers > 0:
            gilguard.warn_if_gil_on("threadloom.DataLoader", self.num_workers, stacklevel=2)
        resume, self._resume = self._resume, None
        epoch = self._epoch
        if resume is not None:
            epoch = resume["epoch"]
        if isinstance(self.sampler, DistributedSampler) and self.world_size is not None:
            self.sampler.set_epoch(epoch)
        self._epoch = epoch + 1
        if self.persistent_workers and self.num_workers > 0:
            it = self._iterator
            if it is None:
                it = self._iterator = _LoaderIter(self, epoch, resume)
            else:
                it._reset(self, epoch, resume)
        else:
            it = _LoaderIter(self, epoch, resume)
        self._progress = it.progress
        self._latest = weakref.ref(it)
        self._live.add(it)
        return it

    def _current(self):
        """The iterator started last, while it lives; else None."""
        return self._latest() if self._latest is not None else None

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self):
        """Where the loader is: the epoch in progress, batches already yielded, the worker base
        seed and the sampler's state. load_state_dict() of it, on this or a fresh DataLoader
        built the same way, makes the next iteration yield exactly the remaining batches."""
        p = self._progress
        if p is None or p.finished:
            return {"version": 1, "epoch": self._epoch, "batches_yielded": 0, "base_seed": None,
                    "sampler": None, "finished": True, "dataset_len": self._dataset_len()}
        return {"version": 1, "epoch": p.epoch, "batches_yielded": p.yielded,
                "base_seed": p.base_seed, "sampler": p.sampler_state, "finished": False,
                "dataset_len": self._dataset_len()}

    def _dataset_len(self):
        try:
            return len(self.dataset)
        except TypeError:
            return None

    def load_state_dict(self, state):
        """Makes the next iteration resume where `state` (what state_dict() returned, here or
        on a DataLoader built the same way) was. A state this loader cannot resume (another
        dataset length, more batches than an epoch has, a field of the wrong type) raises
        ValueError, a state that is no dict TypeError; nothing is changed then."""
        self._check_state(state)
        prev = self._current()
        if prev is not None:
            prev.close()
        self._latest = self._progress = None
        if state.get("finished"):
            self._epoch = state["epoch"]
            self._resume = None
        else:
            self._resume = dict(state)

    def _check_state(self, state):
        if not isinstance(state, collections.abc.Mapping):
            raise TypeError("load_state_dict() takes the dict that DataLoader.state_dict() "
                            "returned, not %r" % (state,))
        if state.get("version") != 1:
            raise ValueError("not a threadloom.DataLoader state (version %r)" % (state.get("version"),))
        checks = {"epoch": lambda v: _is_int(v) and v >= 0,
                  "batches_yielded": lambda v: _is_int(v) and v >= 0,
                  "finished": lambda v: isinstance(v, bool)}
        if not state.get("finished"):
            checks["base_seed"] = _is_int
            checks["sampler"] = lambda v: v is None or isinstance(v, collections.abc.Mapping)
        for key, ok in checks.items():
            if key not in state:
                raise ValueError("this DataLoader state has no %r: pass what state_dict() "
                                 "returned" % key)
            if not ok(state[key]):
                raise ValueError("this DataLoader state has %s=%r, which state_dict() never "
                                 "returns: pass what it returned" % (key, state[key]))
        saved, now = state.get("dataset_len"), self._dataset_len()
        if saved is not None and now is not None and saved != now:
            raise ValueError("this DataLoader state was saved for a dataset of %d samples; this "
                             "DataLoader's has %d: resume with the dataset it was saved with"
                             % (saved, now))
        try:
            per_epoch = len(self)
        except TypeError:  # an iterable without len(): checked when the epoch ends
            return
        if state["batches_yielded"] > per_epoch:
            raise ValueError("this DataLoader state has batches_yielded=%d, but an epoch of "
                             "this DataLoader has %d batches: the state is from a DataLoader "
                             "built another way (dataset, batch_size, sampler, drop_last)"
                             % (state["batches_yielded"], per_epoch))

    # -- inspection and shutdown -------------------------------------------------------------

    def stats(self):
        """The current (or last) epoch: batches, samples, rates, time to first batch, the
        consumer's wait, queue depth and each worker stage's items (the first batch's parts
        count one each) and busy / wait seconds; with device=, "device": batches and bytes
        handed over, the copies' device time (copy_s, copy_gbs), the consumer's hand-over
        time, bytes collated straight into staging, slot size and staging waits (None without
        device=)."""
        it = self._current()
        if it is not None:
            return it.stats()
        return self._progress.stats if self._progress is not None else None

    def close(self):
        """Stops every iteration in progress and lets the persistent workers go (the next
        iter() starts new ones)."""
        for it in list(self._live):
            it.close()
        self._iterator = None
        self._states = {}


_oversubscription_logged = False  # the warning below is given once per process


def _note_oversubscription(num_workers):
    """Logs once when num_workers exceeds the CPUs this process may use, and what that costs."""
    global _oversubscription_logged
    cpus = sysinfo.usable_cpus()
    if num_workers <= cpus or _oversubscription_logged:
        return
    _oversubscription_logged = True
    log.warning("threadloom.DataLoader: num_workers=%d threads on the %d CPUs this process may "
                "use: beyond %d they take turns instead of running at once, and each still "
                "costs a dataset replica (replicate='copy') and ~64 MiB of arena; that pays "
                "only while workers wait on I/O, else use num_workers <= %d (`threadloom topo "
                "--plan` shows the cores; logging.getLogger(\"threadloom.data\") silences this)",
                num_workers, cpus, cpus, cpus)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _batches(dataset, iterable, batch_size, drop_last, index_sampler):
    """len() of a loader: batches per epoch (TypeError when the dataset has no length)."""
    if iterable:
        n = len(dataset)
        if batch_size is not None:
            n = n // batch_size if drop_last else -(-n // batch_size)
        return n
    return len(index_sampler)


class _Config:
    """What an iteration reads of its DataLoader when it starts; torch's iterator copies the
    loader's attributes the same way. The iterator and its worker threads hold this, never the
    loader (see the module docstring). fetch.py reads collate_fn, auto_collation, batch_size
    and drop_last."""

    def __init__(self, loader):
        self.dataset = loader.dataset
        self.iterable = loader._iterable
        self.index_sampler = loader._index_sampler
        self.num_workers = loader.num_workers
        self.prefetch_factor = loader.prefetch_factor
        self.timeout = loader.timeout
        self.worker_init_fn = loader.worker_init_fn
        self.persistent_workers = loader.persistent_workers
        self.in_order = loader.in_order
        self.replicate = loader.replicate
        self.pin = loader.pin
        self.progress = loader.progress
        self.collate_fn = loader.collate_fn
        self.auto_collation = loader._auto_collation
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        self.states = loader._states  # persistent_workers: the loader's {worker id: WorkerState}
        self.sharing = loader._sharing  # replicate="share": worker.DatasetShare, or None
        self.feeder = None
        # where pinned workers go: a device loader's to its device's loader slots of a device
        # plan (data/device.py: worker_plan), others to the CPU-wide loader plan (plan None)
        self.plan, self.gpu = None, None
        if loader.device is not None and loader.pin and loader.num_workers > 0:
            self.plan, self.gpu = todevice.worker_plan(loader.device)
        if loader.device is not None:
            # the threads that build batches build them on the device (data/device.py); the
            # batch counts are taken on the host batch, with the user's collate_fn's rule
            if loader._feeder is None:
                loader._feeder = todevice.make_feeder(loader.device, loader.num_workers,
                                                      loader.prefetch_factor)
            self.feeder = loader._feeder
            host = _HostRule(self)
            self.collate_fn = todevice.DeviceCollate(loader.collate_fn, self.feeder,
                                                     lambda b: _batch_len(b, host))

    def __len__(self):
        return _batches(self.dataset, self.iterable, self.batch_size, self.drop_last,
                        self.index_sampler)


class _HostRule:
    """What _batch_len reads of a _Config, with the user's collate_fn (a device loader's
    _Config has the DeviceCollate around it)."""

    def __init__(self, cfg):
        self.auto_collation = cfg.auto_collation
        self.collate_fn = cfg.collate_fn
        self.batch_size = cfg.batch_size


class _Progress:
    """Where one iteration is: what DataLoader.state_dict() reports. The iterator writes it;
    the loader keeps the one of the iteration started last, also after that iterator is gone
    (with its final stats)."""

    __slots__ = ("epoch", "yielded", "base_seed", "sampler_state", "finished", "stats")

    def __init__(self, epoch, base_seed):
        self.epoch = epoch
        self.yielded = 0
        self.base_seed = base_seed
        self.sampler_state = None
        self.finished = False
        self.stats = None


def _worker_state(cfg, worker_id, base_seed):
    """Worker `worker_id`'s state, built on the calling worker thread (reused across epochs
    with persistent_workers)."""
    states = cfg.states if cfg.persistent_workers else None
    st = states.get(worker_id) if states is not None else None
    if st is None:
        st = WorkerState(cfg.dataset, cfg.replicate, worker_id, cfg.num_workers,
                         base_seed + worker_id, cfg.worker_init_fn)
        if states is not None:
            states[worker_id] = st
    st.enter()
    return st


class _LoaderIter:
    """One epoch of a DataLoader. Dropping it, breaking out of the loop, an error or Ctrl-C
    stops its threads (a batch being built is finished first, since threads cannot be killed).
    It reads the loader only here, in __init__ (see the module docstring)."""

    def __init__(self, loader, epoch, resume):
        memory.tune_malloc()  # once per process: samples' arrays off freshly faulted pages
        self.cfg = _Config(loader)
        self._engine = None
        self._start(loader, epoch, resume)

    def _reset(self, loader, epoch, resume):
        """persistent_workers: the next epoch on this iterator (torch's _reset); the previous
        one stops. The _Config stays the first epoch's, as torch's iterator keeps its own."""
        self.close()
        self._start(loader, epoch, resume)

    def _start(self, loader, epoch, resume):
        cfg = self.cfg
        self.epoch = epoch
        self.samples = 0
        self._engine = None
        self._split = None  # the map pipeline's SplitFirst (fetch.py), if it splits
        self._t0 = time.perf_counter()
        self._first = None
        self._wait = 0.0
        self._last_print = 0.0
        self._handover = todevice.Handover(cfg.feeder) if cfg.feeder is not None else None
        # torch draws the workers' base seed from the generator first, then the sampler draws;
        # persistent workers keep the base seed of their first epoch (torch draws it once)
        if resume:
            self.base_seed = resume["base_seed"]
        elif loader.persistent_workers and loader._base_seed is not None:
            self.base_seed = loader._base_seed
        else:
            self.base_seed = draw_seed(loader.generator)
        if loader.persistent_workers and loader.num_workers > 0:
            loader._base_seed = self.base_seed
        self.progress = p = _Progress(epoch, self.base_seed)
        skip = resume["batches_yielded"] if resume else 0
        index_sampler = cfg.index_sampler
        if resume and resume.get("sampler") is not None:
            load_replay_state(index_sampler, resume["sampler"])
        # replicate="share": the map-style pipeline walks the rest of the dataset while this
        # iterator waits, from the epoch's first batch on (__next__); other paths finish it now
        self._share_idle = False
        if cfg.sharing is not None and not cfg.sharing.done:
            if cfg.iterable or cfg.num_workers == 0:
                cfg.sharing.finish()
            else:
                self._share_idle = True
        if cfg.iterable:
            self._engine = _IterableEngine(cfg, self.base_seed)
            self._source = self._engine
            self._discard = skip  # an iterable cannot skip without producing
        else:
            p.sampler_state = replay_state(index_sampler, before=True)
            indices = iter(index_sampler)
            sampler_state = replay_state(index_sampler, before=False)
            if sampler_state is not None:
                p.sampler_state = sampler_state
            for _ in itertools.islice(indices, skip):
                pass
            self._discard = 0
            if cfg.num_workers == 0:
                fetch, ds = map_fetcher(cfg), cfg.dataset
                self._source = (fetch(ds, idx) for idx in indices)
            else:
                self._engine, self._split = _map_pipeline(cfg, indices, self.base_seed)
                self._source = iter(self._engine)
        p.yielded = skip

    @property
    def yielded(self):
        return self.progress.yielded

    @property
    def finished(self):
        return self.progress.finished

    def __iter__(self):
        return self

    def __next__(self):
        p = self.progress
        if p.finished:
            raise StopIteration
        t = time.perf_counter()
        try:
            split = self._split
            while True:
                batch = next(self._source)
                if batch is PART_DONE:  # a part of the split first batch: another part's
                    split.left -= 1     # item brings the batch (fetch.py)
                    continue
                if split is not None and split.left and self.cfg.in_order:
                    # ordered, parts outstanding: this is the split batch (its parts are the
                    # first items); the parts after it are done (it came from the last to
                    # finish) and are taken now, so that the sampler was pulled as often as
                    # torch's when this returns (fetch.SplitFirst)
                    split.left -= 1
                    while split.left:
                        done = next(self._source)
                        split.left -= 1
                        assert done is PART_DONE, done
                if self._discard:
                    self._discard -= 1
                    continue
                break
        except StopIteration:
            p.finished = True
            self.close()
            self._show(True)
            if self._discard:  # a resumed iterable ended before the batches to skip
                raise ValueError("this DataLoader state has batches_yielded=%d, but this epoch "
                                 "of the DataLoader has %d batches: the state is from another "
                                 "dataset, or one that yields other data now"
                                 % (p.yielded, p.yielded - self._discard)) from None
            raise
        except TimeoutError as exc:
            self.close(wait=False)  # the stuck worker is named in the error, and left behind
            if isinstance(exc, DataLoaderTimeoutError):
                raise
            raise DataLoaderTimeoutError("DataLoader timed out after %s seconds (%s)"
                                         % (self.cfg.timeout, exc)) from None
        except KeyboardInterrupt:
            self.close(wait=False)
            raise
        except BaseException:
            self.close()
            raise
        if self._handover is not None:
            try:
                n = batch.samples
                batch = self._handover(batch)
            except BaseException:
                self.close()
                raise
        else:
            n = _batch_len(batch, self.cfg)
        now = time.perf_counter()
        self._wait += now - t
        if self._first is None:
            self._first = now - self._t0
        if self._share_idle:  # the first batch is out: walk the dataset while waiting from now
            self._share_idle = False
            self._source.idle = self.cfg.sharing.step
        p.yielded += 1
        self.samples += n
        if self.cfg.progress:
            self._show(False)
        return batch

    def __len__(self):
        return len(self.cfg)

    def _show(self, last):
        if not self.cfg.progress:
            return
        now = time.perf_counter()
        if not last and now - self._last_print < 1.0:
            return
        self._last_print = now
        s = self.stats()
        try:
            total = "/%d" % len(self.cfg)
        except TypeError:
            total = ""
        sys.stderr.write("\rthreadloom.DataLoader epoch %d: %d%s batches, %.0f samples/s, "
                         "queue %d%s" % (self.epoch, s["batches"], total, s["samples_per_s"],
                                         s["queue_depth"], "\n" if last else ""))
        sys.stderr.flush()

    def stats(self):
        elapsed = time.perf_counter() - self._t0
        eng = self._engine
        stages = eng.stats() if eng is not None else []
        return {
            "epoch": self.epoch, "batches": self.yielded, "samples": self.samples,
            "elapsed_s": elapsed,
            "batches_per_s": self.yielded / elapsed if elapsed > 0 else 0.0,
            "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
            "time_to_first_batch_s": self._first,
            "consumer_wait_s": self._wait,
            "queue_depth": sum(st["queue_depth"] for st in stages),
            "stages": stages,
            "device": self._handover.stats() if self._handover is not None else None,
        }

    def close(self, wait=True):
        """Stops the worker threads; wait: for the batches being built, at most `timeout`
        seconds (else _queue.CLOSE_GRACE_S), after which a worker stuck in the dataset is left
        behind and reported with its stack (logging)."""
        if self.progress.stats is None:
            self.progress.stats = self.stats()
        if self._engine is not None:
            self._engine.close(wait)

    def __del__(self, _finalizing=sys.is_finalizing):
        # __init__ may have failed; at interpreter teardown the exit hook (_runtime.close_all)
        # has stopped the threads already, and module globals (time, ...) may be None
        if hasattr(self, "progress") and not _finalizing():
            self.close()


def _batch_len(batch, cfg):
    """Samples in a batch. default_collate turns dict samples into a dict of batched fields and
    tuple/list samples into a list of batched fields: their length is a field's, not the
    number of fields (a list of str or bytes is itself the batch)."""
    if not cfg.auto_collation:
        return 1
    if cfg.collate_fn is default_collate:
        while True:
            if isinstance(batch, dict) and batch:
                batch = next(iter(batch.values()))
            elif (isinstance(batch, (list, tuple)) and batch
                  and not isinstance(batch[0], (str, bytes, bytearray))):
                batch = batch[0]
            else:
                break
    try:
        return len(batch)
    except TypeError:
        return cfg.batch_size or 1


# -- map-style: a Pipeline ---------------------------------------------------------------------

def _map_pipeline(cfg, indices, base_seed):
    ids = itertools.count()
    lock = threading.Lock()

    def make_state():
        with lock:
            wid = next(ids)
        return _worker_state(cfg, wid, base_seed)

    fetch_batch = map_fetcher(cfg)

    def fetch(state, idx):
        try:
            return fetch_batch(state.dataset, idx)
        except BaseException as exc:
            note_worker(exc, state.info.id)
            raise

    nw = cfg.num_workers
    split = None
    if cfg.auto_collation and nw >= 2:
        # the first batch in parts: at the start every worker is idle, and the first batch
        # would otherwise wait for one worker to fetch all its samples alone (fetch.py)
        indices = split = SplitFirst(indices, nw)
    pipe = Pipeline(indices, ordered=cfg.in_order, capacity=max(1, cfg.prefetch_factor * nw),
                    timeout=cfg.timeout or None, pin=cfg.pin, plan=cfg.plan, gpu=cfg.gpu,
                    name="dataloader", feed="consumer")
    pipe.map(fetch, workers=nw, state=make_state, name="fetch+collate", queue_size=max(1, nw),
             describe=_sample_indices)
    return pipe, split


def _sample_indices(idx):
    if idx.__class__ is Part:  # a part of a split first batch (fetch.py)
        return idx.describe()
    return "sample indices %s" % (idx,)


# -- iterable-style: one iterator per worker ---------------------------------------------------

class _IterableEngine:
    """Each worker thread iterates its own replica into its own bounded queue; the consumer
    takes batches round-robin over the workers still running (torch's order). The threads,
    queues, first error and shutdown are a _queue.Workers, as a Pipeline's."""

    def __init__(self, cfg, base_seed):
        self.cfg = cfg
        self.base_seed = base_seed
        self.nw = nw = cfg.num_workers
        self._workers = None
        if nw == 0:
            self._gen = iterable_batches(cfg, cfg.dataset)
            return
        depth = max(1, cfg.prefetch_factor)
        self._queues = [Queue(depth) for _ in range(nw)]
        self.counters = [[0, 0.0, 0.0] for _ in range(nw)]  # per worker: batches, busy, wait
        self._workers = Workers(nw, self._queues, pin=cfg.pin, plan=cfg.plan, gpu=cfg.gpu,
                                name="dataloader", grace=cfg.timeout or None)
        for w in range(nw):
            self._workers.submit(lambda w=w: self._work(w))
        self._gen = self._consume()

    def _work(self, w):
        q = self._queues[w]
        c = self.counters[w]
        workers = self._workers
        workers.started(w)
        label = "worker %d" % w
        clock = time.perf_counter
        try:
            workers.busy_with(w, label, None, _making_replica)
            state = _worker_state(self.cfg, w, self.base_seed)
            t = clock()
            workers.busy_with(w, label, 0, _its_batch)
            for batch in iterable_batches(self.cfg, state.dataset):
                workers.idle(w)
                t1 = clock()
                c[1] += t1 - t
                ok = q.put(batch)
                t = clock()
                c[2] += t - t1
                if not ok:
                    return
                c[0] += 1
                workers.busy_with(w, label, c[0], _its_batch)
            workers.idle(w)
            q.put(END)
        except BaseException as exc:
            note_worker(exc, w)
            workers.fail(exc)
        finally:
            workers.idle(w)
            WorkerState.leave()

    def _consume(self):
        live = list(range(self.nw))
        timeout = self.cfg.timeout or None
        k = 0
        while live:
            k %= len(live)
            w = live[k]
            got = self._queues[w].get(timeout=timeout)
            if got is None:
                raise DataLoaderTimeoutError("DataLoader timed out after %s seconds (worker %d "
                                             "produced no batch; %s)" % (
                                                 self.cfg.timeout, w, self._workers.report("busy")))
            if got is CLOSED:
                if self._workers.error is not None:
                    raise self._workers.error
                return
            if got is END:
                live.pop(k)
                continue
            k += 1
            yield got

    def __next__(self):
        return next(self._gen)

    def stats(self):
        if self._workers is None:
            return []
        rows = [list(c) for c in self.counters]
        return [{"name": "iterate+collate", "workers": self.nw, "items": sum(r[0] for r in rows),
                 "errors": int(self._workers.error is not None),
                 "busy_s": sum(r[1] for r in rows), "wait_s": sum(r[2] for r in rows),
                 "queue_depth": sum(len(q) for q in self._queues),
                 "queue_size": self.nw * max(1, self.cfg.prefetch_factor)}]

    def close(self, wait=True):
        if self._workers is not None:
            self._workers.close(wait)


def _making_replica(_):
    return "its replica of the dataset (replicate=, worker_init_fn)"


def _its_batch(n):
    return "its batch %d" % n
