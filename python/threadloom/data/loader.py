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
between the sampler and the workers. Iterable datasets run one iterator per
worker replica, each into its own bounded queue, taken round-robin as torch does.
Thread-safety: one DataLoader is iterated by one thread at a time (as torch's).
"""

import itertools
import sys
import threading
import time

from threadloom import _core, errors
from threadloom import pipeline as _pipeline
from threadloom.data.collate import default_collate, default_convert
from threadloom.data.sampler import (BatchSampler, DistributedSampler, RandomSampler,
                                     SequentialSampler, distributed_env, draw_seed,
                                     load_replay_state, replay_state)
from threadloom.data.worker import WorkerState, share_dataset

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


def _not_built(what):
    """NotBuiltError with the attributes every threadloom error has (name, code, hint, detail);
    the hint is this feature's, not TL_ENOSYS's generic "rebuild with the option"."""
    hint = "leave it unset and move each batch to the device in the training loop"
    detail = ("threadloom.DataLoader(%s): delivering batches onto a GPU through the cudactx "
              "feeder is not built yet" % what)
    exc = _core.NotBuiltError("TL_ENOSYS: %s. What to do: %s." % (detail, hint))
    exc.name, exc.code, exc.hint, exc.detail = "TL_ENOSYS", errors.CODES["TL_ENOSYS"], hint, detail
    return exc


_FROZEN = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")


class DataLoader:
    """torch.utils.data.DataLoader with worker threads. torch's arguments keep their meaning,
    except: multiprocessing_context (there are no processes) is refused; device= and
    pin_memory_device= are not built yet; pin_memory=True is accepted and free, since batches
    are collated into NUMA-local arena memory (page-locked when a GPU is present).

    threadloom's own keyword arguments: replicate ("copy": each worker deep-copies the dataset
    once, on its thread; a factory: factory() per worker; None: share it; "share": share it
    after making it immortal once, here, with threadloom.share(), for good: the report is
    `share_report`), rank / world_size /
    distributed (shard the sampler as DistributedSampler, taken from RANK / WORLD_SIZE when not
    given), pin (pin the worker threads, default True), progress (a one-line progress display on
    stderr, at most once a second).
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False, pin_memory_device="",
                 in_order=True, device=None, replicate="copy", rank=None, world_size=None,
                 distributed=False, pin=True, progress=False):
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
        if device is not None:
            raise _not_built("device=%r" % (device,))
        if pin_memory_device:
            raise _not_built("pin_memory_device=%r" % (pin_memory_device,))
        if not (replicate is None or replicate in ("copy", "share") or callable(replicate)):
            raise ValueError("replicate must be 'copy', 'share', a factory (callable) or None, "
                             "not %r" % (replicate,))

        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
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

        # replicate="share": the workers read one dataset, made immortal once, before any starts
        self.share_report = share_dataset(dataset) if replicate == "share" and num_workers else None
        self._epoch = 0            # epochs started
        self._iter = None          # the current (or last) _LoaderIter
        self._resume = None        # a state loaded by load_state_dict(), for the next __iter__
        self._states = {}          # persistent_workers: worker id -> WorkerState
        self._base_seed = None     # persistent_workers: drawn by the first epoch, as torch does
        self._last_stats = None
        self._initialized = True

    def __setattr__(self, attr, val):
        # torch's rule: what the sampler and the batches were built from cannot change after
        if attr in _FROZEN and self.__dict__.get("_initialized"):
            raise ValueError("%s attribute should not be set after %s is initialized"
                             % (attr, type(self).__name__))
        object.__setattr__(self, attr, val)

    # -- torch's surface ---------------------------------------------------------------------

    @property
    def _index_sampler(self):
        return self.batch_sampler if self._auto_collation else self.sampler

    def __len__(self):
        if self._iterable:
            n = len(self.dataset)
            if self.batch_size is not None:
                n = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
            return n
        return len(self._index_sampler)

    def __iter__(self):
        if self._iter is not None:
            self._iter.close()
        resume, self._resume = self._resume, None
        epoch = self._epoch
        if resume is not None:
            epoch = resume["epoch"]
        if isinstance(self.sampler, DistributedSampler) and self.world_size is not None:
            self.sampler.set_epoch(epoch)
        self._epoch = epoch + 1
        self._iter = _LoaderIter(self, epoch, resume)
        return self._iter

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self):
        """Where the loader is: the epoch in progress, batches already yielded, the worker base
        seed and the sampler's state. load_state_dict() of it, on this or a fresh DataLoader
        built the same way, makes the next iteration yield exactly the remaining batches."""
        it = self._iter
        if it is None or it.finished:
            return {"version": 1, "epoch": self._epoch, "batches_yielded": 0, "base_seed": None,
                    "sampler": None, "finished": True}
        return {"version": 1, "epoch": it.epoch, "batches_yielded": it.yielded,
                "base_seed": it.base_seed, "sampler": it.sampler_state, "finished": False}

    def load_state_dict(self, state):
        if state.get("version") != 1:
            raise ValueError("not a threadloom.DataLoader state (version %r)" % (state.get("version"),))
        if self._iter is not None:
            self._iter.close()
            self._iter = None
        if state.get("finished"):
            self._epoch = state["epoch"]
            self._resume = None
        else:
            self._resume = dict(state)

    # -- inspection and shutdown -------------------------------------------------------------

    def stats(self):
        """The current (or last) epoch: batches, samples, rates, time to first batch, the
        consumer's wait, queue depth and each worker stage's busy / wait seconds."""
        it = self._iter
        return it.stats() if it is not None else None

    def close(self):
        """Stops the iteration in progress and lets the persistent workers go."""
        if self._iter is not None:
            self._iter.close()
        self._states = {}

    def __del__(self):
        it = getattr(self, "_iter", None)
        if it is not None:
            it.close()

    def _worker_state(self, worker_id, base_seed):
        """Worker `worker_id`'s state, built on the calling worker thread (reused across epochs
        with persistent_workers)."""
        st = self._states.get(worker_id) if self.persistent_workers else None
        if st is None:
            st = WorkerState(self.dataset, self.replicate, worker_id, self.num_workers,
                             base_seed + worker_id, self.worker_init_fn)
            if self.persistent_workers:
                self._states[worker_id] = st
        st.enter()
        return st


class _LoaderIter:
    """One epoch of a DataLoader. Dropping it, breaking out of the loop, an error or Ctrl-C
    stops its threads (a batch being built is finished first, since threads cannot be killed)."""

    def __init__(self, loader, epoch, resume):
        self.loader = loader
        self.epoch = epoch
        self.yielded = 0
        self.samples = 0
        self.finished = False
        self._engine = None
        self._t0 = time.perf_counter()
        self._first = None
        self._wait = 0.0
        self._last_print = 0.0
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
        skip = resume["batches_yielded"] if resume else 0
        index_sampler = loader._index_sampler
        if resume and resume.get("sampler") is not None:
            load_replay_state(index_sampler, resume["sampler"])
        if loader._iterable:
            self.sampler_state = None
            self._engine = _IterableEngine(loader, self.base_seed)
            self._source = self._engine
            self._discard = skip  # an iterable cannot skip without producing
        else:
            self.sampler_state = replay_state(index_sampler, before=True)
            indices = iter(index_sampler)
            sampler_state = replay_state(index_sampler, before=False)
            if sampler_state is not None:
                self.sampler_state = sampler_state
            for _ in itertools.islice(indices, skip):
                pass
            self._discard = 0
            if loader.num_workers == 0:
                self._source = self._serial(indices)
            else:
                self._engine = _map_pipeline(loader, indices, self.base_seed)
                self._source = iter(self._engine)
        self.yielded = skip

    def _serial(self, indices):
        ld = self.loader
        ds = ld.dataset
        getitems = getattr(ds, "__getitems__", None)
        for idx in indices:
            if ld._auto_collation:
                data = getitems(idx) if getitems is not None else [ds[i] for i in idx]
            else:
                data = ds[idx]
            yield ld.collate_fn(data)

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        t = time.perf_counter()
        try:
            while True:
                batch = next(self._source)
                if self._discard:
                    self._discard -= 1
                    continue
                break
        except StopIteration:
            self.finished = True
            self.close()
            self._progress(True)
            raise
        except TimeoutError as exc:
            self.close()
            if isinstance(exc, DataLoaderTimeoutError):
                raise
            raise DataLoaderTimeoutError("DataLoader timed out after %s seconds (%s)"
                                         % (self.loader.timeout, exc)) from None
        except BaseException:
            self.close()
            raise
        now = time.perf_counter()
        self._wait += now - t
        if self._first is None:
            self._first = now - self._t0
        self.yielded += 1
        self.samples += _batch_len(batch, self.loader)
        if self.loader.progress:
            self._progress(False)
        return batch

    def __len__(self):
        return len(self.loader)

    def _progress(self, last):
        if not self.loader.progress:
            return
        now = time.perf_counter()
        if not last and now - self._last_print < 1.0:
            return
        self._last_print = now
        s = self.stats()
        try:
            total = "/%d" % len(self.loader)
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
        }

    def close(self):
        if self._engine is not None:
            self._engine.close()

    def __del__(self):
        self.close()


def _batch_len(batch, loader):
    """Samples in a batch. default_collate turns dict samples into a dict of batched fields and
    tuple/list samples into a list of batched fields: their length is a field's, not the
    number of fields (a list of str or bytes is itself the batch)."""
    if not loader._auto_collation:
        return 1
    if loader.collate_fn is default_collate:
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
        return loader.batch_size or 1


# -- map-style: a Pipeline ---------------------------------------------------------------------

def _map_pipeline(loader, indices, base_seed):
    ids = itertools.count()
    lock = threading.Lock()

    def make_state():
        with lock:
            wid = next(ids)
        return loader._worker_state(wid, base_seed)

    auto = loader._auto_collation
    collate = loader.collate_fn

    def fetch(state, idx):
        ds = state.dataset
        try:
            if auto:
                getitems = getattr(ds, "__getitems__", None)
                data = getitems(idx) if getitems is not None else [ds[i] for i in idx]
            else:
                data = ds[idx]
            return collate(data)
        except BaseException as exc:
            _note(exc, state.info.id)
            raise

    nw = loader.num_workers
    pipe = _pipeline.Pipeline(indices, ordered=loader.in_order,
                              capacity=max(1, loader.prefetch_factor * nw),
                              timeout=loader.timeout or None, pin=loader.pin, name="dataloader",
                              feed="consumer")
    pipe.map(fetch, workers=nw, state=make_state, name="fetch+collate", queue_size=max(1, nw))
    return pipe


def _note(exc, wid):
    if hasattr(exc, "add_note") and not getattr(exc, "_threadloom_noted", False):
        try:
            exc.add_note("(raised in threadloom.DataLoader worker %d)" % wid)
            exc._threadloom_noted = True
        except Exception:
            pass


# -- iterable-style: one iterator per worker ---------------------------------------------------

class _IterableEngine:
    """Each worker thread iterates its own replica into its own bounded queue; the consumer
    takes batches round-robin over the workers still running (torch's order)."""

    def __init__(self, loader, base_seed):
        self.loader = loader
        self.base_seed = base_seed
        self.nw = nw = loader.num_workers
        self._error = None
        self._closed = False
        self._lock = threading.Lock()
        self._pool = None
        if nw == 0:
            self._gen = self._batches(iter(loader.dataset), None)
            return
        depth = max(1, loader.prefetch_factor)
        self._queues = [_pipeline._Queue(depth) for _ in range(nw)]
        self.counters = [[0, 0.0, 0.0] for _ in range(nw)]  # per worker: batches, busy, wait
        plan = _pipeline._loader_plan(nw) if loader.pin else None
        self._pool = _core.Pool(nw, plan=plan, role="loader", capacity=nw, name="dataloader")
        _pipeline._live.add(self)
        for w in range(nw):
            self._pool.submit(lambda w=w: self._work(w))
        self._gen = self._consume()

    def _batches(self, it, counters):
        ld = self.loader
        if not ld._auto_collation:
            for x in it:
                yield ld.collate_fn(x)
            return
        bs = ld.batch_size
        while True:
            chunk = list(itertools.islice(it, bs))
            if not chunk or (ld.drop_last and len(chunk) < bs):
                return
            yield ld.collate_fn(chunk)

    def _work(self, w):
        q = self._queues[w]
        c = self.counters[w]
        clock = time.perf_counter
        state = None
        try:
            state = self.loader._worker_state(w, self.base_seed)
            t = clock()
            for batch in self._batches(iter(state.dataset), c):
                t1 = clock()
                c[1] += t1 - t
                ok = q.put(batch)
                t = clock()
                c[2] += t - t1
                if not ok:
                    return
                c[0] += 1
            q.put(_pipeline._END)
        except BaseException as exc:
            _note(exc, w)
            with self._lock:
                if self._error is None:
                    self._error = exc
            for q2 in self._queues:
                q2.close()
        finally:
            WorkerState.leave()

    def _consume(self):
        live = list(range(self.nw))
        timeout = self.loader.timeout or None
        k = 0
        while live:
            k %= len(live)
            w = live[k]
            got = self._queues[w].get(timeout=timeout)
            if got is None:
                raise DataLoaderTimeoutError("DataLoader timed out after %s seconds (worker %d "
                                             "produced no batch)" % (self.loader.timeout, w))
            if got is _pipeline._CLOSED:
                if self._error is not None:
                    raise self._error
                return
            if got is _pipeline._END:
                live.pop(k)
                continue
            k += 1
            yield got

    def __next__(self):
        return next(self._gen)

    def stats(self):
        if self._pool is None:
            return []
        rows = [list(c) for c in self.counters]
        return [{"name": "iterate+collate", "workers": self.nw, "items": sum(r[0] for r in rows),
                 "errors": int(self._error is not None), "busy_s": sum(r[1] for r in rows),
                 "wait_s": sum(r[2] for r in rows),
                 "queue_depth": sum(len(q) for q in self._queues),
                 "queue_size": self.nw * max(1, self.loader.prefetch_factor)}]

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pool is None:
            return
        for q in self._queues:
            q.close()
        if self._pool.worker_index() < 0:
            self._pool.close(cancel=True)
        _pipeline._live.discard(self)
