"""threadloom.DataLoader against torch DataLoader's documented behaviours, with pure-Python
datasets (no torch or numpy here)."""

import collections
import copy
import gc
import os
import random
import re
import threading
import traceback

import pytest

import threadloom
from conftest import run_python
from threadloom.data import collate
from threadloom.data import sampler as sampler_mod
from threadloom.data import (BatchSampler, DataLoader, DataLoaderTimeoutError, DistributedSampler,
                             IterableDataset, RandomSampler, Sampler, SequentialSampler,
                             SubsetRandomSampler, WeightedRandomSampler, default_collate,
                             get_worker_info)


def rows(loader):
    return [b.tolist() if isinstance(b, memoryview) else b for b in loader]


class Squares:
    """Map-style by duck typing: __getitem__ and __len__."""

    def __init__(self, n):
        self.n = n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i * i

    def __len__(self):
        return self.n


class Shards(IterableDataset):
    """An iterable that shards itself with get_worker_info(), as torch's docs show."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        return iter(range(info.id, self.n, info.num_workers))


@pytest.mark.parametrize("nw", [0, 1, 4])
def test_order_is_the_same_for_any_worker_count(nw):
    got = rows(DataLoader(Squares(23), batch_size=4, num_workers=nw))
    want = [[i * i for i in range(k, min(k + 4, 23))] for k in range(0, 23, 4)]
    assert got == want


def test_drop_last_and_len():
    loader = DataLoader(Squares(10), batch_size=4, drop_last=True, num_workers=2)
    assert len(loader) == 2
    assert [len(b) for b in loader] == [4, 4]
    assert len(DataLoader(Squares(10), batch_size=4)) == 3


def test_batch_size_none_yields_samples():
    assert list(DataLoader(Squares(5), batch_size=None, num_workers=2)) == [0, 1, 4, 9, 16]


def test_custom_sampler_and_batch_sampler():
    class Evens(Sampler):
        def __iter__(self):
            return iter(range(0, 10, 2))

        def __len__(self):
            return 5

    assert rows(DataLoader(Squares(10), batch_size=2, sampler=Evens(), num_workers=2)) == \
        [[0, 4], [16, 36], [64]]
    bs = [[3, 1], [0], [2, 2, 2]]
    assert rows(DataLoader(Squares(4), batch_sampler=bs, num_workers=3)) == [[9, 1], [0], [4, 4, 4]]
    assert list(BatchSampler(SequentialSampler(range(5)), 2, False)) == [[0, 1], [2, 3], [4]]


def test_mutually_exclusive_arguments_say_what_torch_says():
    ds = Squares(4)
    with pytest.raises(ValueError, match="sampler option is mutually exclusive with shuffle"):
        DataLoader(ds, sampler=SequentialSampler(ds), shuffle=True)
    with pytest.raises(ValueError, match="batch_sampler option is mutually exclusive with batch_size"):
        DataLoader(ds, batch_sampler=[[0]], batch_size=2)
    with pytest.raises(ValueError, match="batch_size=None option disables auto-batching"):
        DataLoader(ds, batch_size=None, drop_last=True)
    with pytest.raises(ValueError, match="num_workers option should be non-negative"):
        DataLoader(ds, num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor option could only be specified"):
        DataLoader(ds, prefetch_factor=4)
    DataLoader(ds, prefetch_factor=2)  # torch 1.13's default, accepted without workers as there
    with pytest.raises(ValueError, match="timeout applies to worker threads"):
        DataLoader(ds, timeout=1)
    with pytest.raises(ValueError, match="persistent_workers option needs num_workers > 0"):
        DataLoader(ds, persistent_workers=True)
    with pytest.raises(ValueError, match="expected unspecified shuffle option"):
        DataLoader(Shards(3), shuffle=True)
    with pytest.raises(ValueError, match="expected unspecified sampler option"):
        DataLoader(Shards(3), sampler=[0])
    with pytest.raises(ValueError, match="threads of one process; multiprocessing_context"):
        DataLoader(ds, num_workers=2, multiprocessing_context="spawn")
    with pytest.raises(ValueError, match="multiprocessing_context can only be used with multi-"):
        DataLoader(ds, multiprocessing_context="spawn")
    with pytest.raises(ValueError, match="batch_size should be a positive integer value"):
        BatchSampler(range(3), 0, False)
    with pytest.raises(ValueError, match="Invalid rank 2, rank should be in the interval"):
        DistributedSampler(ds, num_replicas=2, rank=2)


@pytest.mark.parametrize("bad,error", [("2", TypeError), (2.0, TypeError), (None, TypeError),
                                       (10 ** 12, ValueError)])
def test_num_workers_of_the_wrong_kind_says_so(bad, error):
    # issue 22: '2' raised "'<' not supported between instances of 'str' and 'int'" (torch
    # does too: the same type, now with a message)
    with pytest.raises(error, match="num_workers"):
        DataLoader(Squares(4), num_workers=bad)


def test_more_workers_than_cpus_is_logged_once(monkeypatch, caplog):
    from threadloom import sysinfo
    from threadloom.data import loader as loader_mod
    cpus = sysinfo.usable_cpus()
    monkeypatch.setattr(loader_mod, "_oversubscription_logged", False)
    with caplog.at_level("WARNING", logger="threadloom.data"):
        DataLoader(Squares(4), num_workers=cpus)
        assert not caplog.records
        DataLoader(Squares(4), num_workers=cpus + 2)
        DataLoader(Squares(4), num_workers=cpus + 3)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    msg = caplog.records[0].getMessage()
    assert "num_workers=%d" % (cpus + 2) in msg and "%d CPUs" % cpus in msg
    assert 'logging.getLogger("threadloom.data")' in msg


def test_worker_info_in_workers_and_none_outside():
    seen = {}

    class Probe(Squares):
        def __getitem__(self, i):
            info = get_worker_info()
            seen[i] = (info.id, info.num_workers, info.seed, info.dataset is self)
            return i

    base = get_worker_info()
    assert base is None
    list(DataLoader(Probe(12), batch_size=2, num_workers=3, generator=random.Random(5)))
    assert get_worker_info() is None
    base_seed = random.Random(5).getrandbits(63)
    for wid, n, seed, is_replica in seen.values():
        assert 0 <= wid < 3 and n == 3 and seed == base_seed + wid and is_replica
    seen.clear()

    class Probe0(Squares):
        def __getitem__(self, i):
            seen[i] = get_worker_info()
            return i
    list(DataLoader(Probe0(3), num_workers=0))
    assert set(seen.values()) == {None}


def test_iterable_dataset_sharded_by_worker_info_has_no_duplicates():
    got = rows(DataLoader(Shards(10), batch_size=2, num_workers=3))
    # torch's order: the workers' batches round-robin
    assert got == [[0, 3], [1, 4], [2, 5], [6, 9], [7], [8]]
    flat = sorted(x for b in got for x in b)
    assert flat == list(range(10))
    assert rows(DataLoader(Shards(5), batch_size=2, drop_last=True, num_workers=2)) == [[0, 2], [1, 3]]
    assert rows(DataLoader(Shards(3), batch_size=2)) == [[0, 1], [2]]


def test_worker_init_fn_runs_once_per_worker_thread():
    calls = []
    lock = threading.Lock()
    # Every worker waits here until all four ran init: a worker thread that finished early and
    # exited could otherwise hand its thread id to the next one, and the ids would not be distinct.
    # Four workers sharing fewer threads would break the barrier (60 s) instead of passing.
    all_in = threading.Barrier(4, timeout=60)

    def init(wid):
        assert get_worker_info().id == wid
        with lock:
            calls.append((wid, threading.get_ident()))
        all_in.wait()

    list(DataLoader(Squares(40), batch_size=2, num_workers=4, worker_init_fn=init))
    assert sorted(w for w, _ in calls) == [0, 1, 2, 3]
    assert len({t for _, t in calls}) == 4


def test_replicas_are_distinct_objects_per_worker_thread():
    owners = {}
    lock = threading.Lock()
    start = threading.Barrier(3)

    class Table(Squares):
        def __init__(self):
            super().__init__(30)
            self.cache = {}

        def __getitem__(self, i):
            if not self.cache:
                start.wait(timeout=10)  # all three workers are up, each with a replica
            self.cache[i] = True        # mutating its own replica needs no lock
            with lock:
                owners.setdefault(id(self), set()).add(threading.get_ident())
            return i

    ds = Table()
    assert len(rows(DataLoader(ds, batch_size=1, num_workers=3))) == 30
    assert len(owners) == 3 and all(len(t) == 1 for t in owners.values())
    assert id(ds) not in owners and ds.cache == {}
    # a factory builds each replica; None shares the one object
    made = []
    list(DataLoader(Squares(6), num_workers=2, replicate=lambda: made.append(1) or Squares(6)))
    assert len(made) == 2
    shared = Table()
    start = threading.Barrier(1)
    owners.clear()
    list(DataLoader(shared, num_workers=2, replicate=None))
    assert list(owners) == [id(shared)]


def test_worker_exception_reraised_with_its_traceback():
    class Bad(Squares):
        def __getitem__(self, i):
            if i == 7:
                raise KeyError("sample 7 is broken")
            return i

    before = threading.active_count()
    with pytest.raises(KeyError, match="sample 7 is broken") as ei:
        list(DataLoader(Bad(20), batch_size=2, num_workers=3))
    frames = [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    assert "__getitem__" in frames
    assert any("threadloom.DataLoader worker" in n for n in ei.value.__notes__)
    assert threading.active_count() == before

    class BadIter(IterableDataset):
        def __iter__(self):
            yield 1
            raise ValueError("stream broke")
    with pytest.raises(ValueError, match="stream broke") as ei:
        list(DataLoader(BadIter(), num_workers=2))
    assert "__iter__" in [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    assert threading.active_count() == before


def test_timeout_raises_like_torch():
    release = threading.Event()

    class Slow(Squares):
        def __getitem__(self, i):
            if i == 1:
                release.wait(10)
            return i

    before = threading.active_count()
    loader = DataLoader(Slow(4), batch_size=1, num_workers=1, timeout=0.2)
    it = iter(loader)
    assert next(it).tolist() == [0]
    with pytest.raises(RuntimeError, match="DataLoader timed out after 0.2 seconds") as ei:
        next(it)
    assert isinstance(ei.value, (TimeoutError, DataLoaderTimeoutError))
    release.set()
    del it
    loader.close()
    assert threading.active_count() == before


def test_timeout_fires_while_a_worker_is_stuck_and_names_it():
    # issue 22: timeout=1 with a worker blocked 20 s raised only at 20 s (the consumer joined
    # the stuck worker first). The timeout must fire while the worker is still blocked, and
    # say which sample it is stuck on and where.
    release, returned = threading.Event(), threading.Event()
    for ds, what in ((StuckMap(8, 5, release, returned), "sample indices [4, 5]"),
                     (StuckStream(release, returned), "worker 0 for")):
        release.clear()
        returned.clear()
        it = iter(DataLoader(ds, batch_size=2, num_workers=1, timeout=0.3))
        assert next(it).tolist() == [0, 1]
        next(it)  # [2, 3]
        with pytest.raises(DataLoaderTimeoutError) as ei:
            next(it)
        assert not returned.is_set(), "the timeout waited for the stuck worker"
        msg = str(ei.value)
        assert msg.startswith("DataLoader timed out after 0.3 seconds")
        assert what in msg and "release.wait(60)" in msg, msg
        if isinstance(ds, StuckStream):
            assert "its batch 2" in msg
        release.set()
        returned.wait(30)
        del it


class StuckMap(Squares):
    """Sample i is i; sample `at` first blocks until `release` is set (at most 60 s), then sets
    `returned`."""

    def __init__(self, n, at, release, returned):
        super().__init__(n)
        self.at, self.release, self.returned = at, release, returned

    def __deepcopy__(self, memo):
        return self  # the replica shares the events

    def __getitem__(self, i):
        if i == self.at:
            self.release.wait(60)
            self.returned.set()
        return i


class StuckStream(IterableDataset):
    def __init__(self, release, returned):
        self.release, self.returned = release, returned

    def __deepcopy__(self, memo):
        return self  # the replica shares the events

    def __iter__(self):
        yield from range(4)
        self.release.wait(60)
        self.returned.set()
        yield from range(4, 8)


STUCK_AT_EXIT = """
import sys, threading, time
import threadloom
from threadloom import _queue
from threadloom.data import DataLoader
_queue.CLOSE_GRACE_S = 0.5

class Stuck:
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i == 2:
            %s
        return i

loader = DataLoader(Stuck(), batch_size=1, num_workers=2, timeout=%s)
it = iter(loader)
print(next(it).tolist(), flush=True)
%s
print("leaving", flush=True)
"""


@pytest.mark.parametrize("stuck", ["threading.Event().wait()", "while True: pass"])
@pytest.mark.parametrize("how", ["exit", "timeout", "break"])
def test_the_process_exits_with_a_stuck_worker(stuck, how):
    # issue 22: a worker that never returns kept the interpreter from exiting (the exit hook
    # joined it). It is left behind, reported with its stack, and the process exits.
    timeout, then = {"exit": ("0", "time.sleep(0.3)"),
                     "timeout": ("0.5", "try:\n    next(it); next(it)\n"
                                        "except RuntimeError as e:\n    print(e, flush=True)"),
                     "break": ("0", "time.sleep(0.3)\ndel it")}[how]
    r = run_python("-c", STUCK_AT_EXIT % (stuck, timeout, then), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[0]\n") and r.stdout.endswith("leaving\n"), r.stdout
    if how == "timeout":
        assert "DataLoader timed out after 0.5 seconds" in r.stdout
        assert "sample indices [2]" in r.stdout, r.stdout
    assert "left running" in r.stderr and "__getitem__" in r.stderr, r.stderr


def test_ctrl_c_interrupts_a_loader_waiting_for_a_stuck_worker():
    code = ("import os, signal, threading, threadloom\n"
            "from threadloom import _queue\n"
            "from threadloom.data import DataLoader\n"
            "_queue.CLOSE_GRACE_S = 0.5\n"
            "class Stuck:\n"
            "    def __len__(self): return 4\n"
            "    def __getitem__(self, i): threading.Event().wait(); return i\n"
            "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "try:\n"
            "    next(iter(DataLoader(Stuck(), num_workers=1)))\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n")
    r = run_python("-c", code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "interrupted\n"


class StopsAt5(Squares):
    def __getitem__(self, i):
        if i == 5:
            raise StopIteration
        return i


class IterRaisesStop(IterableDataset):
    def __iter__(self):
        raise StopIteration


def _stop_collate(batch):
    raise StopIteration


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("case,where", [
    (lambda nw: DataLoader(StopsAt5(10), batch_size=2, num_workers=nw),
     "dataset[5] (in the batch of sample indices [4, 5]) raised StopIteration"),
    (lambda nw: DataLoader(StopsAt5(10), batch_size=None, num_workers=nw),
     "dataset[5] raised StopIteration"),
    (lambda nw: DataLoader(IterRaisesStop(), batch_size=2, num_workers=nw),
     "the dataset's __iter__ (it must return an iterator"),
    (lambda nw: DataLoader(Squares(4), batch_size=2, num_workers=nw, collate_fn=_stop_collate),
     "collate_fn, on the batch of sample indices [0, 1], raised StopIteration"),
    (lambda nw: DataLoader(Shards(4), batch_size=2, num_workers=nw, collate_fn=_stop_collate),
     "collate_fn, on batch 0 of the stream, raised StopIteration"),
], ids=["getitem", "getitem-unbatched", "iter", "collate", "collate-iterable"])
def test_stop_iteration_inside_the_loader_is_an_error(case, where, nw):
    # issue 22: a StopIteration from the dataset or collate_fn ended the epoch without a word
    # (with workers; torch's loader does the same): an error, as PEP 479 makes it in generators
    with pytest.raises(RuntimeError, match="not the end of the data") as ei:
        list(case(nw))
    assert where in str(ei.value)
    assert isinstance(ei.value.__cause__, StopIteration)


def test_break_and_gc_stop_the_workers():
    before = threading.active_count()
    loader = DataLoader(Squares(1000), batch_size=2, num_workers=4)
    for k, _ in enumerate(loader):
        if k == 3:
            break
    loader.close()
    assert threading.active_count() == before
    it = iter(DataLoader(Shards(1000), batch_size=2, num_workers=3))
    next(it)
    del it
    gc.collect()
    assert threading.active_count() == before


def _threads():
    """Threads of this process, C pool workers included (threading.active_count() misses them)."""
    return len(os.listdir("/proc/self/task"))


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("kind", ["map", "map-persistent", "iterable", "iterable-persistent"])
def test_abandoned_loaders_leave_no_threads_memory_or_batches(kind):
    # issue 22: next(iter(DataLoader(...))) in a loop left every worker thread running (201
    # threads after 100 loaders, RSS 30 -> 192 MB after 500, batches out of the arena): the
    # threads held the loader. Dropping the iterator must stop them, as torch's __del__ does.
    def make():
        ds = list(range(100)) if kind.startswith("map") else Shards(100)
        return DataLoader(ds, batch_size=4, num_workers=2,
                          persistent_workers=kind.endswith("persistent"))

    for _ in range(5):  # warm up: the arena, the plan cache, imports
        next(iter(make()))
    gc.collect()
    threads, rss, fallbacks = _threads(), _rss_mb(), collate.arena_fallbacks()
    blocks = threadloom.arena().stats()["blocks_in_use"]
    for _ in range(200):
        next(iter(make()))
    loader = make()  # a loader kept alive whose iterator is dropped mid-epoch
    it = iter(loader)
    next(it)
    del it
    if kind.endswith("persistent"):
        loader.close()  # persistent workers live as long as their loader, as torch's
    gc.collect()
    assert _threads() == threads
    assert collate.arena_fallbacks() == fallbacks
    assert threadloom.arena().stats()["blocks_in_use"] <= blocks
    assert _rss_mb() - rss < 40, "RSS grew from %.0f to %.0f MB" % (rss, _rss_mb())
    assert rows(loader)[:2] == rows(make())[:2]  # the loader still works


@pytest.mark.parametrize("make", [Squares, Shards], ids=["map", "iterable"])
def test_each_iter_is_an_independent_iterator_as_torch(make):
    # issue 22: zip(loader, loader) gave 0 pairs with workers (torch: 10) and nested loops 3 of
    # 9 pairs: iter() closed the iteration in progress
    loader = DataLoader(make(10), batch_size=1, num_workers=2)
    want = rows(loader)
    assert [(a.tolist(), b.tolist()) for a, b in zip(loader, loader)] == list(zip(want, want))
    small = DataLoader(make(3), batch_size=1, num_workers=2)
    assert [(a.tolist(), b.tolist()) for a in small for b in small] == \
        [(a, b) for a in rows(small) for b in rows(small)]
    one = iter(loader)
    next(one)
    two = iter(loader)
    assert rows(two) == want and rows(one) == want[1:]


@pytest.mark.parametrize("make", [Squares, Shards], ids=["map", "iterable"])
def test_persistent_workers_reset_one_iterator_as_torch(make):
    # torch's DataLoader keeps one iterator with persistent workers and iter() resets it: zip
    # then takes alternate batches, a nested loop ends the outer one (tests/torch compares)
    loader = DataLoader(make(10), batch_size=1, num_workers=2, persistent_workers=True)
    want = rows(loader)
    assert iter(loader) is iter(loader)
    assert [(a.tolist(), b.tolist()) for a, b in zip(loader, loader)] == \
        list(zip(want[0::2], want[1::2]))
    small = DataLoader(make(3), batch_size=1, num_workers=2, persistent_workers=True)
    first = rows(small)[0]
    assert [(a.tolist(), b.tolist()) for a in small for b in small] == \
        [(first, b) for b in rows(small)]
    assert rows(small) == rows(small)
    small.close()


@pytest.mark.parametrize("nw", [0, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(nw):
    def make():
        return DataLoader(Squares(50), batch_size=4, shuffle=True, num_workers=nw,
                          generator=random.Random(11))

    full = rows(make())
    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(5)]
    state = loader.state_dict()
    assert state["batches_yielded"] == 5
    fresh = make()
    fresh.load_state_dict(state)
    rest = rows(fresh)
    assert head + rest == full
    loader.close()


def test_load_state_dict_refuses_what_it_cannot_resume():
    # issue 22: None raised a bare AttributeError; batches_yielded=10**18 and a state from a
    # dataset of another length were taken silently (10**18: the loader skipped "forever")
    def make(n=50, **kw):
        return DataLoader(Squares(n), batch_size=4, shuffle=True, num_workers=2,
                          generator=random.Random(1), **kw)

    loader = make()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    with pytest.raises(TypeError, match="takes the dict that DataLoader.state_dict.. returned, "
                                        "not None"):
        make().load_state_dict(None)
    with pytest.raises(ValueError, match="batches_yielded=1000000000000000000, but an epoch of "
                                         "this DataLoader has 13 batches"):
        make().load_state_dict(dict(state, batches_yielded=10 ** 18))
    with pytest.raises(ValueError, match="saved for a dataset of 50 samples; this DataLoader's "
                                         "has 40"):
        make(40).load_state_dict(state)
    for key, bad in (("epoch", -1), ("batches_yielded", "3"), ("finished", None),
                     ("base_seed", 1.5), ("sampler", 7)):
        with pytest.raises(ValueError, match="%s=" % key):
            make().load_state_dict(dict(state, **{key: bad}))
    missing = dict(state)
    del missing["epoch"]
    with pytest.raises(ValueError, match="has no 'epoch'"):
        make().load_state_dict(missing)
    fresh = make()
    fresh.load_state_dict(state)  # what state_dict() gave still loads
    assert len(rows(fresh)) == 12

    # an iterable dataset without len(): found out when the epoch ends before the skip does
    again = DataLoader(Shards(20), batch_size=3, num_workers=2)
    again.load_state_dict(dict(state, dataset_len=None, sampler=None, batches_yielded=9))
    with pytest.raises(ValueError, match="batches_yielded=9, but this epoch of the DataLoader "
                                         "has 8 batches"):
        rows(again)


def test_resume_iterable_skips_yielded_batches():
    loader = DataLoader(Shards(20), batch_size=3, num_workers=2)
    full = rows(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    again = DataLoader(Shards(20), batch_size=3, num_workers=2)
    again.load_state_dict(state)
    assert rows(again) == full[2:]
    loader.close()


def test_shuffle_is_deterministic_across_worker_counts():
    results = [rows(DataLoader(Squares(40), batch_size=3, shuffle=True, num_workers=nw,
                               generator=random.Random(3)))
               for nw in (0, 1, 2, 4)]
    assert all(r == results[0] for r in results)
    assert sorted(x for b in results[0] for x in b) == sorted(i * i for i in range(40))
    assert results[0] != rows(DataLoader(Squares(40), batch_size=3))
    # a second epoch shuffles differently, the same way again for the same seed
    a = DataLoader(Squares(40), batch_size=3, shuffle=True, num_workers=2, generator=random.Random(3))
    b = DataLoader(Squares(40), batch_size=3, shuffle=True, num_workers=1, generator=random.Random(3))
    ea, eb = [rows(a), rows(a)], [rows(b), rows(b)]
    assert ea == eb and ea[0] != ea[1]


def test_per_worker_rng_is_seeded_and_worker_local():
    draws = {}

    class Aug(Squares):
        def __getitem__(self, i):
            info = get_worker_info()
            draws.setdefault(info.id, []).append(info.rng.random())
            return i

    list(DataLoader(Aug(4), batch_size=4, num_workers=1, generator=random.Random(9)))
    seed = random.Random(9).getrandbits(63)
    r = random.Random(seed)
    assert draws[0] == [r.random() for _ in range(4)]


def test_in_order_false_yields_everything():
    got = rows(DataLoader(Squares(30), batch_size=2, num_workers=3, in_order=False))
    assert sorted(x for b in got for x in b) == [i * i for i in range(30)]


def test_persistent_workers_keep_their_replicas():
    inits = []
    loader = DataLoader(Squares(8), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=inits.append)
    assert rows(loader) == rows(loader)
    assert sorted(inits) == [0, 1]
    loader.close()


def test_default_collate_shapes_and_formats():
    b = default_collate([1, 2, 3])
    assert (b.format, b.shape, b.tolist()) == ("q", (3,), [1, 2, 3])
    f = default_collate([1.5, 2])
    assert (f.format, f.tolist()) == ("d", [1.5, 2.0])
    t = default_collate([True, False])
    assert (t.format, t.tolist()) == ("?", [True, False])
    assert default_collate([b"ab", b"cd"]) == [b"ab", b"cd"]  # bytes stay a list, as in torch
    assert default_collate([b"a", b"bcd"]) == [b"a", b"bcd"]
    s = default_collate([bytearray(b"ab"), bytearray(b"cd")])  # other buffers are stacked
    assert (s.format, s.shape, s.tobytes()) == ("B", (2, 2), b"abcd")
    m = default_collate([1, 2.5])  # mixed numbers: float64 (torch, when loaded: its rule)
    assert (m.format, m.tolist()) == ("d", [1.0, 2.5])
    assert default_collate([("a", 1), ("b", 2)])[0] == ("a", "b")  # fields are tuples, as torch's zip
    assert default_collate([[1, "a"], [2, "b"]])[1] == ("a", "b")
    # batch_size=None: torch's default_convert, recursive, tuples become lists
    assert collate.default_convert((1, ("a", {"k": (2,)}))) == [1, ["a", {"k": [2]}]]
    assert default_collate(["x", "y"]) == ["x", "y"]
    v = default_collate([memoryview(bytes(6)).cast("B", (2, 3))] * 4)
    assert v.shape == (4, 2, 3)
    d = default_collate([{"x": 1, "y": "a"}, {"x": 2, "y": "b"}])
    assert d["x"].tolist() == [1, 2] and d["y"] == ["a", "b"]
    tup = default_collate([(1, 2.0), (3, 4.0)])
    assert [c.tolist() for c in tup] == [[1, 3], [2.0, 4.0]]
    with pytest.raises(RuntimeError, match="each element in list of batch should be of equal size"):
        default_collate([(1, 2), (3,)])
    with pytest.raises(TypeError, match="default_collate: batch must contain"):
        default_collate([object()])
    # the batch lives in arena memory (its exporter is a threadloom Buffer) unless it was full
    assert isinstance(b.obj, threadloom.Buffer) or collate.arena_fallbacks() > 0


def test_distributed_sharding_pads_and_splits():
    ds = Squares(10)
    shards = [list(DistributedSampler(ds, num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    shards = [list(DistributedSampler(ds, num_replicas=3, rank=r, shuffle=False, drop_last=True))
              for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    parts = [rows(DataLoader(ds, batch_size=2, rank=r, world_size=2, shuffle=True,
                             generator=random.Random(1))) for r in range(2)]
    flat = sorted(x for p in parts for b in p for x in b)
    assert flat == sorted(i * i for i in range(10))


def test_distributed_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    loader = DataLoader(Squares(6), batch_size=2, distributed=True)
    assert (loader.rank, loader.world_size) == (1, 2)
    assert rows(loader) == [[1, 9], [25]]
    assert list(DistributedSampler(Squares(4), shuffle=False)) == [1, 3]


def test_random_samplers():
    ds = range(10)
    s = RandomSampler(ds, generator=random.Random(0))
    a = list(s)
    assert sorted(a) == list(range(10)) and list(s) != a
    r = list(RandomSampler(ds, replacement=True, num_samples=25, generator=random.Random(0)))
    assert len(r) == 25 and all(0 <= x < 10 for x in r)
    assert len(list(RandomSampler(ds, num_samples=15, generator=random.Random(0)))) == 15
    assert sorted(SubsetRandomSampler([5, 7, 9], generator=random.Random(0))) == [5, 7, 9]
    w = list(WeightedRandomSampler([0, 0, 1], 5, generator=random.Random(0)))
    assert w == [2] * 5


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 1000, 4097])
def test_lazy_permutation_is_a_seeded_bijection(n):
    p = sampler_mod.Permutation(n, random.Random(n))
    order = list(p)
    assert sorted(order) == list(range(n)) and len(p) == n
    assert [p[i] for i in range(n)] == order
    assert list(sampler_mod.Permutation(n, random.Random(n))) == order
    if n >= 8:
        assert list(sampler_mod.Permutation(n, random.Random(n + 1))) != order
    with pytest.raises(IndexError):
        p[n]


def test_samplers_switch_to_the_lazy_permutation_above_the_threshold(monkeypatch):
    small = list(RandomSampler(range(50), generator=random.Random(3)))
    monkeypatch.setattr(sampler_mod, "PYTHON_PERMUTATION_MAX", 16)
    assert list(RandomSampler(range(16), generator=random.Random(3))) == \
        list(RandomSampler(range(16), generator=random.Random(3)))  # still a list: same draws
    lazy = list(RandomSampler(range(50), generator=random.Random(3)))
    assert sorted(lazy) == list(range(50)) and lazy != small
    more = list(RandomSampler(range(50), num_samples=120, generator=random.Random(3)))
    assert len(more) == 120 and sorted(more[:50]) == sorted(more[50:100]) == list(range(50))
    for drop_last in (False, True):
        ranks = [list(DistributedSampler(range(50), 4, r, seed=2, drop_last=drop_last))
                 for r in range(4)]
        assert len({len(r) for r in ranks}) == 1
        flat = sum(ranks, [])
        if drop_last:
            assert len(set(flat)) == len(flat) == 48
        else:
            assert set(flat) == set(range(50)) and len(flat) == 52


HUGE = """
import random, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a list of 10**12 ints: MemoryError
from threadloom.data import DataLoader
class Huge:
    def __len__(self):
        return 10 ** 12
    def __getitem__(self, i):
        return i
for kw in (dict(shuffle=True, generator=random.Random(0)), dict(shuffle=True, num_workers=2,
           generator=random.Random(0)), dict(shuffle=True, distributed=True, world_size=8, rank=3)):
    batch = next(iter(DataLoader(Huge(), batch_size=4, **kw))).tolist()
    assert len(set(batch)) == 4 and all(0 <= i < 10 ** 12 for i in batch), batch
    print("ok", flush=True)
"""


def test_shuffling_a_dataset_of_10_to_the_12_samples_starts_at_once():
    # issue 22: shuffle=True built a list of len(dataset) indices first (10**12: until the OOM
    # killer came; 10**7: 7.8 s and 563 MB before the first batch); the address space limit
    # turns that into a MemoryError here instead
    r = run_python("-c", HUGE, env_extra={"THREADLOOM_ARENA_MB": "64"}, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "ok\n" * 3


def test_stats_and_progress(capsys):
    loader = DataLoader(Squares(40), batch_size=4, num_workers=2, progress=True)
    n = len(rows(loader))
    st = loader.stats()
    assert st["batches"] == n == 10 and st["samples"] == 40
    assert st["time_to_first_batch_s"] is not None and st["samples_per_s"] > 0
    # the stage's items: 9 batches and the first batch's 2 parts (fetched by both workers)
    assert st["stages"][0]["items"] == 11
    assert "threadloom.DataLoader epoch 0: 10/10 batches" in capsys.readouterr().err


@pytest.mark.parametrize("sample", [
    lambda i: {"x": i, "y": {"z": float(i)}},            # dict of fields (nested)
    lambda i: (i, b"ab", "text %d" % i),                  # list of fields, one of them strings
    lambda i: ("text %d" % i, i),                         # strings first: still 3 samples/batch
])
def test_stats_count_samples_not_fields(sample):
    class Fields:
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return sample(i)

    loader = DataLoader(Fields(), batch_size=3, num_workers=2)
    assert len(list(loader)) == 3
    assert loader.stats()["samples"] == 9


def test_sampler_runs_on_the_consumer_thread():
    # as torch's main process walks the sampler: not in a worker, so get_worker_info() is None
    seen = []

    class Recording(Sampler):
        def __iter__(self):
            for i in range(12):
                seen.append((threading.get_ident(), get_worker_info()))
                yield i

        def __len__(self):
            return 12

    out = rows(DataLoader(Squares(12), batch_size=3, sampler=Recording(), num_workers=3))
    assert out == [[0, 1, 4], [9, 16, 25], [36, 49, 64], [81, 100, 121]]
    assert seen == [(threading.get_ident(), None)] * 12


# -- the first batch, split between the idle workers (fetch.py's SplitFirst) -------------------

class _Shared(list):
    """A list every replica of a dataset shares (its deep copy is itself)."""

    def __deepcopy__(self, memo):
        return self


class Calls:
    """What a loader's workers fetched, shared by every replica (a replica's deep copy keeps
    this object): (index, worker id, id of the replica) per sample. With `workers`, each
    worker's first call of an epoch waits until every worker made its first one, so the first
    `workers` items (the first batch's parts, then whole batches) go to distinct workers
    whatever the timing; reset() between epochs."""

    def __init__(self, workers=0):
        self.log = []
        self.lock = threading.Lock()
        self.all_in = threading.Barrier(workers, timeout=60) if workers else None
        self.started = set()

    def __deepcopy__(self, memo):
        return self

    def reset(self):
        self.log, self.started = [], set()

    def record(self, indices, replica):
        info = get_worker_info()
        if info is None:
            return
        with self.lock:
            first = info.id not in self.started
            self.started.add(info.id)
        if first and self.all_in is not None:
            self.all_in.wait()
        with self.lock:
            self.log.extend((i, info.id, id(replica)) for i in indices)

    def workers_of(self, indices):
        indices = set(indices)
        return {w for i, w, _ in self.log if i in indices}


class Recorded(Squares):
    """Sample i is i (a batch is its indices); every fetch is recorded in `calls`."""

    def __init__(self, n, calls):
        super().__init__(n)
        self.calls = calls

    def __getitem__(self, i):
        super().__getitem__(i)
        self.calls.record([i], self)
        return i


@pytest.mark.parametrize("nw", [2, 4])
@pytest.mark.parametrize("n,bs,shuffle,drop_last", [
    (37, 5, False, False),   # a last, short batch of 2
    (37, 5, True, True),
    (40, 8, True, False),
    (37, 3, True, False),    # batch_size 3: with 4 workers, 3 parts of one sample
], ids=["short-last", "shuffle-drop-last", "shuffle", "batch-under-workers"])
def test_the_first_batch_is_fetched_by_all_idle_workers(nw, n, bs, shuffle, drop_last):
    def make(workers, calls):
        return DataLoader(Recorded(n, calls), batch_size=bs, shuffle=shuffle,
                          drop_last=drop_last, num_workers=workers, generator=random.Random(7))

    inline = make(0, Calls())
    want = [rows(inline) for _ in range(3)]
    calls = Calls(nw)
    loader = make(nw, calls)
    for epoch in range(3):
        calls.reset()
        got = rows(loader)
        assert got == want[epoch]
        # the first batch: one contiguous part per worker (as many as it has samples), all at
        # once; every later batch whole, on one worker
        assert len(calls.workers_of(got[0])) == min(nw, len(got[0])), calls.log
        assert all(len(calls.workers_of(b)) == 1 for b in got[1:])
        # each worker fetched from its own replica
        replicas = collections.defaultdict(set)
        for _, w, r in calls.log:
            replicas[w].add(r)
        assert all(len(r) == 1 for r in replicas.values())
        assert len(set().union(*replicas.values())) == len(replicas)
        st = loader.stats()
        assert st["batches"] == len(got) and st["samples"] == sum(map(len, got))
    assert shuffle == (want[0] != want[1])


def test_a_dataset_with_getitems_gets_the_parts():
    class Batched(Squares):
        def __init__(self, n, calls, batched=False):
            super().__init__(n)
            self.calls, self.batched = calls, batched
            self.got = _Shared()  # the indices of each __getitems__ call

        def __getitems__(self, idx):
            self.calls.record(idx, self)
            self.got.append(list(idx))
            if self.batched:  # one structure for the batch, not a list of samples
                return {"x": [i * i for i in idx]}
            return [i * i for i in idx]

    want = [[i * i for i in range(k, min(k + 6, 20))] for k in range(0, 20, 6)]
    for nw, parts in ((2, [[0, 1, 2], [3, 4, 5]]), (4, [[0], [1, 2], [3], [4, 5]])):
        calls = Calls(nw)
        ds = Batched(20, calls)
        assert rows(DataLoader(ds, batch_size=6, num_workers=nw)) == want
        assert sorted(ds.got) == sorted(parts + want_idx(20, 6)[1:])
        assert len(calls.workers_of(range(6))) == nw
    # a __getitems__ giving something else than a list of samples: the parts' results cannot
    # be joined, so the whole batch is asked for again (collate_fn sees what it saw unsplit)
    ds = Batched(20, Calls(2), batched=True)
    assert list(DataLoader(ds, batch_size=6, num_workers=2, collate_fn=lambda d: d["x"])) == want
    assert sorted(ds.got) == sorted([[0, 1, 2], [3, 4, 5]] + want_idx(20, 6))


def want_idx(n, bs):
    return [list(range(k, min(k + bs, n))) for k in range(0, n, bs)]


class FailsIn(Squares):
    """Sample `bad` raises `error`; the first batch's other part waits for it (fails first) or
    it for the other part's last sample (fails last). The events are shared by the replicas."""

    def __init__(self, n, bad, error, fails, events):
        super().__init__(n)
        self.bad, self.error, self.fails = bad, error, fails
        self.events = events

    def __getitem__(self, i):
        gate = self.events[0]
        if i == self.bad:
            if self.fails == "first":
                gate.set()
            else:
                gate.wait(30)
            if self.error is StopIteration:
                raise StopIteration
            raise KeyError("sample %d is broken" % i)
        other = range(3, 6) if self.bad < 3 else range(0, 3)
        if self.fails == "first" and i == other[0]:
            gate.wait(30)
        if self.fails == "last" and i == other[-1]:
            gate.set()
        return i


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("fails", ["first", "last"])
@pytest.mark.parametrize("bad", [1, 4], ids=["part1of2", "part2of2"])
@pytest.mark.parametrize("error", [KeyError, StopIteration])
def test_an_error_in_the_first_batch_is_the_error_of_the_unsplit_batch(error, bad, fails,
                                                                        in_order):
    # today's error: one worker fetching the whole batch (num_workers=1, never split)
    seen = {}
    for nw in (1, 2):
        events = _Shared([threading.Event()])
        if nw == 1:
            events[0].set()  # one worker fetches both "parts": nothing to wait for
        loader = DataLoader(FailsIn(20, bad, error, fails, events), batch_size=6,
                            num_workers=nw, in_order=in_order)
        it = iter(loader)
        got = []
        with pytest.raises(Exception) as ei:
            for batch in it:
                got.append(batch.tolist())
        # ordered: at batch 0's turn, the first next(); unordered: as soon as it is raised, so a
        # later batch that the other worker finished first may come before it, never batch 0
        if in_order:
            assert got == []
        else:
            assert list(range(6)) not in got, got
        exc = ei.value
        seen[nw] = (type(exc), str(exc), type(exc.__cause__))
        assert any(re.fullmatch(r"\(raised in threadloom.DataLoader worker \d\)", n)
                   for n in exc.__notes__), exc.__notes__
        assert loader.stats()["batches"] == len(got)
        assert loader.state_dict()["batches_yielded"] == len(got)
        del it
    assert seen[2] == seen[1]
    if error is KeyError:
        assert seen[2][:2] == (KeyError, "'sample %d is broken'" % bad)
    else:
        assert seen[2][0] is RuntimeError and seen[2][2] is StopIteration
        assert ("dataset[%d] (in the batch of sample indices [0, 1, 2, 3, 4, 5]) raised "
                "StopIteration" % bad) in seen[2][1]


def test_a_timeout_names_the_stuck_part_of_the_first_batch():
    release, returned = threading.Event(), threading.Event()
    it = iter(DataLoader(StuckMap(8, 1, release, returned), batch_size=4, num_workers=2,
                         timeout=0.3))
    with pytest.raises(DataLoaderTimeoutError) as ei:
        next(it)
    msg = str(ei.value)
    assert "sample indices [0, 1] (part 1 of 2 of the first batch)" in msg, msg
    assert "release.wait(60)" in msg, msg
    release.set()
    returned.wait(30)
    del it


@pytest.mark.parametrize("nw", [2, 4])
@pytest.mark.parametrize("head", [0, 1, 5])
def test_resume_splits_the_first_batch_and_yields_exactly_the_rest(nw, head):
    def make(workers, calls):
        return DataLoader(Recorded(50, calls), batch_size=4, shuffle=True, num_workers=workers,
                          generator=random.Random(11))

    full = rows(make(0, Calls()))
    loader = make(nw, Calls())
    it = iter(loader)
    assert [next(it).tolist() for _ in range(head)] == full[:head]
    state = loader.state_dict()
    assert state["batches_yielded"] == head
    del it
    loader.close()
    calls = Calls(nw)
    fresh = make(nw, calls)
    fresh.load_state_dict(state)
    rest = rows(fresh)
    assert rest == full[head:]
    # the resumed epoch's first batch is split too
    assert len(calls.workers_of(rest[0])) == nw
    assert fresh.stats()["batches"] == len(full)  # the epoch's, the resumed ones included
    assert fresh.stats()["samples"] == sum(map(len, rest))


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("nw", [2, 4])
def test_the_parts_of_the_first_batch_never_reach_the_user(nw, in_order, capsys):
    calls = Calls(nw)
    loader = DataLoader(Recorded(30, calls), batch_size=7, num_workers=nw, in_order=in_order,
                        progress=True)
    it = iter(loader)
    first = next(it).tolist()
    st = loader.stats()
    assert st["batches"] == 1 and st["samples"] == len(first)
    assert loader.state_dict()["batches_yielded"] == 1
    got = [first] + rows(it)
    assert sorted(got) == want_idx(30, 7)
    if in_order:
        assert got == want_idx(30, 7)
    st = loader.stats()
    assert st["batches"] == len(loader) == 5 and st["samples"] == 30
    assert len(calls.workers_of(range(7))) == nw
    assert "5/5 batches" in capsys.readouterr().err


@pytest.mark.parametrize("last", [0, 1], ids=["part-0-last", "part-1-last"])
@pytest.mark.parametrize("nw", [2, 4])
def test_the_sampler_is_pulled_as_torch_pulls_it_with_a_split_first_batch(nw, last):
    """torch hands prefetch_factor * num_workers batches of indices to its workers at the start
    and one more per batch it yields, so a sampler (and a generator it draws from, e.g. the
    remainder permutation torch's RandomSampler draws at its end) has been pulled
    prefetch_factor * num_workers + k times when the k-th next() returns. With the first batch
    in parts the same holds whichever part finishes last (here the parts' first samples are
    held back in turn): the other parts' items are taken before the batch is returned."""
    bs, total = 4, 6

    class Pulls:
        def __init__(self):
            self.n = 0

        def __iter__(self):
            for b in range(total):
                self.n += 1
                yield list(range(b * bs, (b + 1) * bs))

        def __len__(self):
            return total

    class Slow(Squares):
        def __getitem__(self, i):
            if i == last * (bs // nw) and bs // nw and i < bs:  # a part's first sample
                threading.Event().wait(0.2)  # that part finishes last
            return i

    pulls = Pulls()
    loader = DataLoader(Slow(bs * total), batch_sampler=pulls, num_workers=nw, prefetch_factor=1)
    it = iter(loader)
    for k in range(1, total + 1):
        assert next(it).tolist() == list(range((k - 1) * bs, k * bs))
        assert pulls.n == min(total, nw + k), (k, pulls.n)


# -- replica_copy: copy.deepcopy's result, faster ----------------------------------------------

def _shape(x, seen=None):
    """A structural fingerprint: values plus which positions share one object (by first visit)."""
    seen = {} if seen is None else seen
    if id(x) in seen:
        return ("ref", seen[id(x)])
    if isinstance(x, (list, tuple, dict, set)) or hasattr(x, "__dict__") or hasattr(x, "__slots__"):
        seen[id(x)] = len(seen)
    if isinstance(x, dict):
        return ("dict", type(x).__name__, [(_shape(k, seen), _shape(v, seen)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_shape(e, seen) for e in x])
    if isinstance(x, set):
        return ("set", sorted(map(repr, x)))
    if hasattr(x, "__slots__"):
        return ("slots", type(x).__name__, [_shape(getattr(x, s), seen) for s in x.__slots__])
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return ("obj", type(x).__name__, _shape(vars(x), seen))
    return ("atom", repr(x))


class _Plain:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Slots:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


class _Custom:
    copies = 0

    def __init__(self, v):
        self.v = v

    def __deepcopy__(self, memo):
        _Custom.copies += 1
        return _Custom(["custom", self.v])


class _State:
    def __init__(self, v):
        self.v = v

    def __getstate__(self):
        return {"v": self.v, "extra": 1}

    def __setstate__(self, st):
        self.__dict__.update(st)
        self.restored = True


class _MyList(list):
    pass


def _structures():
    shared = [1, 2, 3]
    loop = [0]
    loop.append(loop)
    t_cycle_list = []
    t_cycle = (t_cycle_list, "x")
    t_cycle_list.append(t_cycle)
    inst = _Plain(a=shared, b=(shared, 4), c={"k": [5]})
    inst.me = inst
    return [
        {"records": [(k, "r%d" % k, k * 0.5) for k in range(50)], "vocab": {"a": 1, (1, 2): [3]}},
        [shared, shared, (shared,), {"s": shared}],
        loop,
        t_cycle,
        inst,
        [_Slots([1], shared), _Slots(2, (3,))],
        [_State([7]), _MyList([1, [2]]), {1, 2, 3}, frozenset({4}), bytearray(b"ab")],
        collections.namedtuple("P", "x y")([1], 2),
        (1, "a", None, 2.5, b"b", len, range(3)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_replica_copy_equals_deepcopy(i):
    from threadloom.data.worker import replica_copy
    x = _structures()[i]
    want, got = copy.deepcopy(x), replica_copy(x)
    assert _shape(got) == _shape(want)
    # what deepcopy copies is copied (a fresh object), what it keeps is kept
    def pairs(a, b, c, seen):
        if id(a) in seen:
            return
        seen.add(id(a))
        assert (b is a) == (c is a), (type(a), a)
        if isinstance(a, dict):
            for (ka, va), (kb, vb), (kc, vc) in zip(a.items(), b.items(), c.items()):
                pairs(va, vb, vc, seen)
        elif isinstance(a, (list, tuple)):
            for ea, eb, ec in zip(a, b, c):
                pairs(ea, eb, ec, seen)
        elif hasattr(a, "__dict__") and not isinstance(a, type) and not callable(a):
            pairs(vars(a), vars(b), vars(c), seen)
    pairs(x, want, got, set())


def test_replica_copy_keeps_custom_copy_protocols():
    from threadloom.data.worker import replica_copy
    _Custom.copies = 0
    got = replica_copy({"c": _Custom(1), "s": _State([2])})
    assert got["c"].v == ["custom", 1] and _Custom.copies == 1
    assert got["s"].restored and got["s"].extra == 1


def test_replica_is_a_replica_copy_per_worker():
    seen = []
    # Each replica's first sample waits for the other worker's: both workers load (without it
    # one worker could take every batch while the other was still copying its replica).
    both = threading.Barrier(2, timeout=30)

    class DS:
        def __init__(self):
            self.rows = [(i, str(i)) for i in range(40)]
            self.cache = {}

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            if not self.cache:
                both.wait()
            self.cache[i] = True                       # each replica mutates its own
            seen.append((threadloom.get_worker_info().id, id(self)))
            return self.rows[i][0]

    ds = DS()
    out = [int(b) for batch in threadloom.DataLoader(ds, batch_size=4, num_workers=2) for b in batch]
    assert out == list(range(40)) and ds.cache == {}
    by_worker = {}
    for w, ident in seen:
        by_worker.setdefault(w, set()).add(ident)
    assert len(by_worker) == 2 and all(len(v) == 1 for v in by_worker.values())
    assert by_worker[0] != by_worker[1] and id(ds) not in by_worker[0] | by_worker[1]


def test_slow_dataset_copy_is_reported(monkeypatch, caplog):
    from threadloom.data import worker
    monkeypatch.setattr(worker, "SLOW_COPY_S", 0.0)
    with caplog.at_level("WARNING", logger="threadloom.data"):
        list(threadloom.DataLoader(list(range(8)), batch_size=4, num_workers=1))
    assert any("to copy the dataset" in r.getMessage() and "persistent_workers=True" in r.getMessage()
               for r in caplog.records)
