"""threadloom.DataLoader against torch.utils.data.DataLoader, both running here (issue #6).

Every test builds the same dataset, runs torch's DataLoader and threadloom's with the same
arguments (and the same seeds), and compares batch for batch: values, and the type and dtype of
every leaf (`assert_same`). Where torch's meaning cannot hold with threads, the test says so
and checks what threadloom does instead (docs/migration.md lists those differences).
"""
import collections
import math
import random
import threading
import time
import traceback

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import threadloom
import threadloom.data as tld

SEEDS = [0, 7, 12345]


# -- comparing batches -------------------------------------------------------------------------

def assert_same(got, want, where="batch"):
    """`got` equals `want` in value, and every leaf has the same type (and dtype, shape)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), "%s: %s, torch gives a Tensor" % (where, type(got))
        assert got.dtype == want.dtype, "%s: dtype %s, torch gives %s" % (where, got.dtype, want.dtype)
        assert got.shape == want.shape, "%s: shape %s, torch gives %s" % (where, got.shape, want.shape)
        assert torch.equal(got, want), "%s: %s, torch gives %s" % (where, got, want)
        return
    assert type(got) is type(want), "%s: %s, torch gives %s" % (where, type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), (where, got, want)
    elif isinstance(want, collections.abc.Mapping):
        assert list(got) == list(want), "%s: keys %s, torch gives %s" % (where, list(got), list(want))
        for k in want:
            assert_same(got[k], want[k], "%s[%r]" % (where, k))
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), "%s: %d items, torch gives %d" % (where, len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, "%s[%d]" % (where, i))
    else:
        assert got == want, "%s: %r, torch gives %r" % (where, got, want)


def assert_same_batches(got, want):
    assert len(got) == len(want), "%d batches, torch gives %d" % (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, "batch %d" % i)


def both(dataset, epochs=1, seed=None, global_seed=None, **kw):
    """(threadloom's batches, torch's batches): `epochs` epochs of each loader, built with the
    same arguments. seed: each gets its own torch.Generator seeded with it; global_seed:
    torch.manual_seed(global_seed) before each loader (generator=None)."""
    out = []
    for cls in (tld.DataLoader, tud.DataLoader):
        args = dict(kw)
        if seed is not None:
            args["generator"] = torch.Generator().manual_seed(seed)
        if global_seed is not None:
            torch.manual_seed(global_seed)
        loader = cls(dataset, **args)
        out.append([list(loader) for _ in range(epochs)])
    return out


# -- datasets ----------------------------------------------------------------------------------

class Pairs(tud.Dataset):
    """torch's own Dataset class: a tensor and an int per sample."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, i * i], dtype=torch.int64), i % 3


class Duck:
    """Map-style by duck typing (no base class): a dict of mixed leaves per sample."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((2,), i, dtype=np.float32), "y": float(i) / 4, "name": "s%d" % i}


class TorchShards(tud.IterableDataset):
    """torch's IterableDataset, sharded by worker info as torch's docs show."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        info = tud.get_worker_info() or tld.get_worker_info()
        first, step = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(range(first, self.n, step))


class TlShards(tld.IterableDataset):
    """threadloom's IterableDataset, sharded unevenly: worker k yields k + 1 fewer items."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = tud.get_worker_info() or tld.get_worker_info()
        if info is None:
            return iter(range(self.n))
        return iter(range(info.id, self.n - info.id, info.num_workers))


class TlShardsForTorch(tud.IterableDataset):
    """TlShards for torch's DataLoader (which takes only its own IterableDataset subclasses)."""

    __init__ = TlShards.__init__
    __iter__ = TlShards.__iter__


class Unsharded(tud.IterableDataset):
    """Every worker yields the whole range: torch's documented duplicates."""

    def __iter__(self):
        return iter(range(5))


# -- ordering, batch_size, drop_last -----------------------------------------------------------

@pytest.mark.parametrize("nw", [0, 1, 3])
@pytest.mark.parametrize("batch_size,drop_last", [(1, False), (4, False), (4, True), (None, False)])
@pytest.mark.parametrize("make", [Pairs, Duck, lambda n: list(range(n))], ids=["torch", "duck", "list"])
def test_sequential_batches(make, batch_size, drop_last, nw):
    got, want = both(make(23), batch_size=batch_size, drop_last=drop_last, num_workers=nw)
    assert_same_batches(got[0], want[0])


@pytest.mark.parametrize("nw", [0, 2, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_shuffle_with_a_torch_generator(seed, nw):
    # two epochs of one loader: the generator moves on between them as torch's does
    got, want = both(Pairs(37), epochs=2, seed=seed, batch_size=5, shuffle=True, num_workers=nw)
    assert_same_batches(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize("nw", [0, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_shuffle_with_torch_manual_seed(seed, nw):
    # generator=None: both draw the sampler's seed from torch's global RNG
    got, want = both(Pairs(37), epochs=2, global_seed=seed, batch_size=5, shuffle=True,
                     num_workers=nw, drop_last=True)
    assert_same_batches(got[0] + got[1], want[0] + want[1])


def test_shuffle_is_the_same_whatever_the_thread_count():
    runs = [both(Pairs(50), seed=3, batch_size=4, shuffle=True, num_workers=nw)[0][0]
            for nw in (0, 1, 2, 5)]
    want = both(Pairs(50), seed=3, batch_size=4, shuffle=True)[1][0]
    for got in runs:
        assert_same_batches(got, want)


@pytest.mark.parametrize("nw", [0, 2])
def test_persistent_workers_epochs(nw):
    # torch draws the workers' base seed once for persistent workers, so epoch 2's permutation
    # comes from the generator one draw earlier than without them
    kw = dict(batch_size=4, shuffle=True, num_workers=nw or 2, persistent_workers=True)
    got, want = both(Pairs(21), epochs=3, seed=5, **kw)
    assert_same_batches(sum(got, []), sum(want, []))


@pytest.mark.parametrize("nw,persistent", [(0, False), (2, False), (2, True)])
@pytest.mark.parametrize("iterable", [False, True], ids=["map", "iterable"])
def test_several_iterators_of_one_loader_as_torch(nw, persistent, iterable):
    # independent iterators, as torch's (zip(loader, loader): every batch twice; a nested loop:
    # every pair), and with persistent workers torch's one iterator that iter() resets (zip:
    # alternate batches; a nested loop ends the outer one)
    def make(cls, n):
        ds = TorchShards(n) if iterable else Pairs(n)
        args = {} if iterable else dict(shuffle=True, generator=torch.Generator().manual_seed(4))
        return cls(ds, batch_size=2, num_workers=nw, persistent_workers=persistent, **args)

    got, want = ([(a, b) for a, b in zip(loader, loader)]
                 for loader in (make(tld.DataLoader, 20), make(tud.DataLoader, 20)))
    assert_same_batches(got, want)
    got, want = ([(a, b) for a in loader for b in loader]
                 for loader in (make(tld.DataLoader, 6), make(tud.DataLoader, 6)))
    assert_same_batches(got, want)
    for cls in (tld.DataLoader, tud.DataLoader):
        loader = make(cls, 8)
        one = iter(loader)
        head = next(one)
        two = iter(loader)
        if cls is tld.DataLoader:
            mine = (head, list(one), list(two), list(loader))
        else:
            theirs = (head, list(one), list(two), list(loader))
    for m, t in zip(mine, theirs):
        assert_same(m, t)


@pytest.mark.parametrize("n", [100, 300])
def test_torchs_permutation_up_to_the_threshold_lazy_beyond(monkeypatch, n):
    # torch.randperm (torch's order) up to TORCH_PERMUTATION_MAX samples; beyond it a lazy
    # permutation drawn from the same generator (a dataset of 10**12 samples cannot hold
    # torch's): a permutation, the same for the same seed, resumable mid-epoch
    import threadloom.data.sampler as sampler_mod
    monkeypatch.setattr(sampler_mod, "TORCH_PERMUTATION_MAX", 200)
    kw = dict(batch_size=7, shuffle=True, num_workers=2)
    got, want = both(Pairs(n), seed=1, **kw)
    if n <= 200:
        assert_same_batches(got[0], want[0])
        return
    firsts = sorted(int(b[0][k][0]) for b in got[0] for k in range(len(b[0])))
    assert firsts == list(range(n))
    again = both(Pairs(n), seed=1, **kw)[0]
    assert_same_batches(again[0], got[0])
    _resume_against_torch(
        lambda: tld.DataLoader(Pairs(n), generator=torch.Generator().manual_seed(1), **kw),
        lambda: _Replay([got[0], list(tld.DataLoader(
            Pairs(n), generator=_after_one_epoch(n, kw), **kw))]), 0, 5)
    ranks = [list(tld.DistributedSampler(Pairs(n), 3, r, seed=5)) for r in range(3)]
    assert set(sum(ranks, [])) == set(range(n)) and {len(r) for r in ranks} == {(n + 2) // 3}


def _after_one_epoch(n, kw):
    """A generator seeded 1 that has drawn one epoch of a loader of Pairs(n) (base seed and
    permutation), as the uninterrupted run's generator is at its second epoch."""
    g = torch.Generator().manual_seed(1)
    list(tld.DataLoader(Pairs(n), generator=g, **kw))
    return g


def test_pin_memory_is_accepted_and_changes_nothing():
    got, want = both(Pairs(10), batch_size=3, pin_memory=True, num_workers=2)
    assert_same_batches(got[0], want[0])


# -- samplers ----------------------------------------------------------------------------------

def _sampler_pairs(seed):
    """(threadloom sampler, torch sampler) pairs built the same way, each with its own
    torch.Generator seeded `seed` (None: both draw from torch's global RNG)."""
    def g():
        return None if seed is None else torch.Generator().manual_seed(seed)
    ds = range(29)
    w = [0.1 * (i % 7) + 0.05 for i in range(29)]
    return {
        "random": (tld.RandomSampler(ds, generator=g()), tud.RandomSampler(ds, generator=g())),
        "random-n": (tld.RandomSampler(ds, num_samples=70, generator=g()),
                     tud.RandomSampler(ds, num_samples=70, generator=g())),
        "replacement": (tld.RandomSampler(ds, replacement=True, num_samples=75, generator=g()),
                        tud.RandomSampler(ds, replacement=True, num_samples=75, generator=g())),
        "subset": (tld.SubsetRandomSampler([3, 9, 4, 17, 28, 1], generator=g()),
                   tud.SubsetRandomSampler([3, 9, 4, 17, 28, 1], generator=g())),
        "weighted": (tld.WeightedRandomSampler(w, 40, generator=g()),
                     tud.WeightedRandomSampler(w, 40, generator=g())),
        "weighted-norepl": (tld.WeightedRandomSampler(w, 20, replacement=False, generator=g()),
                            tud.WeightedRandomSampler(w, 20, replacement=False, generator=g())),
    }


@pytest.mark.parametrize("kind", list(_sampler_pairs(0)))
@pytest.mark.parametrize("seed", [0, 99, None])
def test_samplers_draw_what_torchs_draw(kind, seed):
    if seed is None:
        torch.manual_seed(4)
    mine = _sampler_pairs(seed)[kind][0]
    if seed is None:
        torch.manual_seed(4)
    theirs = _sampler_pairs(seed)[kind][1]
    for epoch in range(2):
        if seed is None:
            torch.manual_seed(10 + epoch)
        got = list(mine)
        if seed is None:
            torch.manual_seed(10 + epoch)
        want = list(theirs)
        assert got == want and all(type(i) is int for i in got), (epoch, got, want)
    assert len(mine) == len(theirs)


@pytest.mark.parametrize("kind", list(_sampler_pairs(0)))
@pytest.mark.parametrize("nw", [0, 2])
def test_samplers_in_the_loader(kind, nw):
    mine, theirs = _sampler_pairs(21)[kind]
    got = list(tld.DataLoader(Pairs(29), batch_size=4, sampler=mine, num_workers=nw))
    want = list(tud.DataLoader(Pairs(29), batch_size=4, sampler=theirs, num_workers=nw))
    assert_same_batches(got, want)


@pytest.mark.parametrize("nw", [0, 2])
def test_torch_sampler_objects_in_threadloom(nw):
    # torch's own samplers and BatchSampler, given to threadloom.DataLoader
    for make in (lambda g: tud.RandomSampler(range(29), generator=g),
                 lambda g: tud.SubsetRandomSampler(list(range(0, 29, 2)), generator=g),
                 lambda g: tud.WeightedRandomSampler([1.0] * 29, 15, generator=g)):
        got = list(tld.DataLoader(Pairs(29), batch_size=3, num_workers=nw,
                                  sampler=make(torch.Generator().manual_seed(8))))
        want = list(tud.DataLoader(Pairs(29), batch_size=3,
                                   sampler=make(torch.Generator().manual_seed(8))))
        assert_same_batches(got, want)
    bs = tud.BatchSampler(tud.RandomSampler(range(29), generator=torch.Generator().manual_seed(1)),
                          batch_size=6, drop_last=True)
    got = list(tld.DataLoader(Pairs(29), batch_sampler=bs, num_workers=nw))
    bs = tud.BatchSampler(tud.RandomSampler(range(29), generator=torch.Generator().manual_seed(1)),
                          batch_size=6, drop_last=True)
    want = list(tud.DataLoader(Pairs(29), batch_sampler=bs))
    assert_same_batches(got, want)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_sampler_same_as_torch(drop_last):
    for n, size in [(10, 3), (12, 4), (5, 7)]:
        got = list(tld.BatchSampler(range(n), size, drop_last))
        want = list(tud.BatchSampler(range(n), size, drop_last))
        assert got == want
        assert len(tld.BatchSampler(range(n), size, drop_last)) == len(want)


@pytest.mark.parametrize("nw", [0, 3])
def test_custom_sampler_and_batch_sampler(nw):
    class Evens:
        def __iter__(self):
            return iter(range(0, 20, 2))

        def __len__(self):
            return 10

    got, want = both(Pairs(20), batch_size=3, sampler=Evens(), num_workers=nw)
    assert_same_batches(got[0], want[0])
    batches = [[3, 1], [0], [2, 2, 2], [19, 18, 17, 16]]
    got, want = both(Pairs(20), batch_sampler=batches, num_workers=nw)
    assert_same_batches(got[0], want[0])
    # a generator function as the sampler: any iterable of indices, as torch takes
    got, want = both(Pairs(20), batch_size=4, sampler=range(19, -1, -3), num_workers=nw)
    assert_same_batches(got[0], want[0])


# -- distributed sharding ----------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,world", [(23, 3), (24, 4), (5, 8)])
def test_distributed_sampler_same_indices_per_rank(n, world, drop_last, shuffle):
    for rank in range(world):
        mine = tld.DistributedSampler(range(n), world, rank, shuffle=shuffle, seed=17,
                                      drop_last=drop_last)
        theirs = tud.DistributedSampler(range(n), world, rank, shuffle=shuffle, seed=17,
                                        drop_last=drop_last)
        for epoch in (0, 1, 5):
            mine.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(mine) == list(theirs), (rank, epoch)
        assert len(mine) == len(theirs)


@pytest.mark.parametrize("nw", [0, 2])
def test_loader_rank_world_size_is_torchs_distributed_sampler(nw):
    # threadloom's rank= / world_size= build the DistributedSampler (seed 0 without a
    # generator) and set its epoch each epoch, which torch code does by hand
    for rank in range(3):
        loader = tld.DataLoader(Pairs(31), batch_size=4, shuffle=True, rank=rank, world_size=3,
                                num_workers=nw)
        got = [list(loader) for _ in range(2)]
        sampler = tud.DistributedSampler(Pairs(31), 3, rank, shuffle=True, seed=0)
        theirs = tud.DataLoader(Pairs(31), batch_size=4, sampler=sampler)
        want = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            want.append(list(theirs))
        assert_same_batches(got[0] + got[1], want[0] + want[1])


# -- iterable datasets -------------------------------------------------------------------------

@pytest.mark.parametrize("nw", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size,drop_last", [(4, False), (4, True), (None, False), (1, False)])
@pytest.mark.parametrize("make", [TorchShards, TlShards])
def test_iterable_batches(make, batch_size, drop_last, nw):
    # threadloom's IterableDataset is not torch's: torch treats it as map-style and fails, so
    # torch runs the same shards from its own subclass
    ds = make(22)
    want_ds = ds if make is TorchShards else TlShardsForTorch(22)
    got = list(tld.DataLoader(ds, batch_size=batch_size, drop_last=drop_last, num_workers=nw))
    want = list(tud.DataLoader(want_ds, batch_size=batch_size, drop_last=drop_last, num_workers=nw))
    assert_same_batches(got, want)


def test_unsharded_iterable_repeats_per_worker_as_torch():
    got, want = both(Unsharded(), batch_size=2, num_workers=3)
    assert_same_batches(got[0], want[0])


def test_len_of_iterable_loaders():
    for kw in (dict(), dict(batch_size=4), dict(batch_size=4, drop_last=True), dict(batch_size=None)):
        assert len(tld.DataLoader(TorchShards(10), **kw)) == len(tud.DataLoader(TorchShards(10), **kw))
    with pytest.raises(TypeError):
        len(tud.DataLoader(Unsharded()))
    with pytest.raises(TypeError):
        len(tld.DataLoader(Unsharded()))


# -- default collate ---------------------------------------------------------------------------

Point = collections.namedtuple("Point", "x y")

COLLATE_CASES = {
    "tensor-f32": lambda i: torch.full((2, 3), float(i)),
    "tensor-u8": lambda i: torch.tensor([i, 255 - i], dtype=torch.uint8),
    "tensor-0d": lambda i: torch.tensor(i),
    "ndarray-f32": lambda i: np.arange(4, dtype=np.float32) + i,
    "ndarray-i16": lambda i: np.full((2, 2), i, dtype=np.int16),
    "np-float32": lambda i: np.float32(i) / 2,
    "np-float64": lambda i: np.float64(i) / 3,
    "np-int64": lambda i: np.int64(i),
    "np-uint8": lambda i: np.uint8(i),
    "np-bool": lambda i: np.bool_(i % 2),
    "int": lambda i: i,
    "float": lambda i: i / 7,
    "bool": lambda i: i % 2 == 0,
    "int-then-float": lambda i: i if i == 0 else i / 2,
    "float-then-int": lambda i: i / 2 if i == 0 else i,
    "bool-then-int": lambda i: True if i == 0 else i,
    "str": lambda i: "s%d" % i,
    "bytes-equal": lambda i: bytes([i, i + 1]),
    "bytes-unequal": lambda i: b"x" * (i + 1),
    "dict": lambda i: {"a": i, "b": [i, float(i)], "c": "t"},
    "ordereddict": lambda i: collections.OrderedDict(z=i, a=torch.tensor([i])),
    "tuple": lambda i: (i, float(i), torch.ones(2) * i),
    "list": lambda i: [i, str(i)],
    "namedtuple": lambda i: Point(i, np.float32(i)),
    "nested": lambda i: {"p": Point([i, i], {"q": (i, "z")}), "t": (torch.zeros(1), [b"ab"])},
}


@pytest.mark.parametrize("case", list(COLLATE_CASES))
def test_default_collate_same_types_as_torch(case):
    batch = [COLLATE_CASES[case](i) for i in range(4)]
    assert_same(tld.default_collate(batch), tud.default_collate(batch))


@pytest.mark.parametrize("case", ["tensor-f32", "ndarray-i16", "np-float32", "int", "bool",
                                  "int-then-float", "dict", "namedtuple", "nested"])
def test_collate_through_the_loaders(case):
    # the worker path (torch collates into shared memory there, threadloom into its arena)
    ds = [COLLATE_CASES[case](i) for i in range(9)]
    got, want = both(ds, batch_size=4, num_workers=2)
    assert_same_batches(got[0], want[0])


def test_collate_errors_same_types_as_torch():
    for batch in ([object(), object()], [(1, 2), (3,)], [torch.ones(2), torch.ones(3)],
                  [np.array(["a"]), np.array(["b"])]):
        with pytest.raises(Exception) as theirs:
            tud.default_collate(batch)
        with pytest.raises(type(theirs.value)):
            tld.default_collate(batch)


def test_threadloom_buffers_are_collated_where_torch_does_not():
    # bytearray, memoryview and array.array: torch treats them as sequences (per position;
    # for these floats torch 2.x fails); threadloom stacks them into one buffer (docs/migration.md)
    import array
    batch = [array.array("f", [i, i + 0.5]) for i in range(3)]
    got = tld.default_collate(batch)
    assert got.dtype == torch.float32 and got.tolist() == [[0, 0.5], [1, 1.5], [2, 2.5]]
    with pytest.raises(ValueError):   # torch 2.x; 1.13 returned one tensor per position
        tud.default_collate(batch)


CONVERT_CASES = {
    "ndarray": lambda i: np.arange(3) + i,
    "tuple": lambda i: (np.float32(i), i, "s"),
    "namedtuple": lambda i: Point(np.zeros(2), i),
    "dict": lambda i: {"a": np.ones(1) * i, "b": [np.int64(i)]},
    "str": lambda i: "abc",
    "tensor": lambda i: torch.ones(2) * i,
    "ndarray-str": lambda i: np.array(["x", "y"]),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_batch_size_none_converts_as_torch(case):
    ds = [CONVERT_CASES[case](i) for i in range(3)]
    for i in range(3):
        assert_same(tld.default_convert(ds[i]), tud.default_convert(ds[i]))
    got, want = both(ds, batch_size=None, num_workers=2)
    assert_same_batches(got[0], want[0])


# -- workers: get_worker_info, seeds, worker_init_fn -------------------------------------------

class WorkerProbe(tud.IterableDataset):
    """Each worker yields one row about itself: what get_worker_info() says, and the first draws
    of its random sources."""

    def __init__(self):
        self.tag = None

    def __iter__(self):
        info = tud.get_worker_info()
        if info is not None:  # a torch worker process: its reseeded global generators
            draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        else:
            info = tld.get_worker_info()
            draws = (info.rng.random(), float(info.numpy_rng.rand()),
                     float(torch.rand(1, generator=info.torch_generator)))
        yield {"id": info.id, "num_workers": info.num_workers, "seed": info.seed,
               "dataset": type(info.dataset).__name__, "tag": self.tag, "draws": draws}


def _tag_worker(worker_id):
    info = tud.get_worker_info() or tld.get_worker_info()
    assert info.id == worker_id
    info.dataset.tag = "init %d of %d" % (worker_id, info.num_workers)


@pytest.mark.parametrize("seed", SEEDS)
def test_worker_info_seeds_and_init_fn_as_torch(seed):
    got, want = both(WorkerProbe(), seed=seed, batch_size=None, num_workers=3,
                     worker_init_fn=_tag_worker)
    # the same base seed from the same generator, so the same worker seeds; info.rng,
    # info.numpy_rng and info.torch_generator draw what torch's reseeded globals draw
    assert_same_batches(got[0], want[0])
    assert [r["seed"] for r in got[0]] == [got[0][0]["seed"] + k for k in range(3)]


def test_persistent_workers_keep_seeds_generators_and_replicas_as_torch():
    # one base seed for the loader's life, worker_init_fn once per worker, and the workers'
    # generators go on drawing from where the last epoch left them
    got, want = both(WorkerProbe(), epochs=3, seed=2, batch_size=None, num_workers=2,
                     persistent_workers=True, worker_init_fn=_tag_worker)
    assert_same_batches(sum(got, []), sum(want, []))
    assert got[0][0]["seed"] == got[2][0]["seed"] and got[0][0]["draws"] != got[2][0]["draws"]


def test_worker_seed_with_torch_manual_seed():
    got, want = both(WorkerProbe(), global_seed=31, batch_size=None, num_workers=2)
    assert_same_batches(got[0], want[0])


def test_threadloom_leaves_the_global_generators_alone():
    # torch reseeds random / numpy / torch in each worker process; threads share those
    # generators, so threadloom does not touch them (info.rng and friends instead)
    random.seed(5)
    np.random.seed(5)
    before = (random.getstate(), np.random.get_state()[1].tolist())
    list(tld.DataLoader(WorkerProbe(), batch_size=None, num_workers=2,
                        generator=torch.Generator().manual_seed(1)))
    assert (random.getstate(), np.random.get_state()[1].tolist()) == before


def test_worker_info_is_none_outside_workers():
    seen = []

    class Probe(tud.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            seen.append(tld.get_worker_info())
            return i

    list(tld.DataLoader(Probe(), batch_size=1, num_workers=0))
    assert seen == [None, None] and tld.get_worker_info() is None and tud.get_worker_info() is None


# -- errors ------------------------------------------------------------------------------------

class Faulty(tud.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == 6:
            raise ValueError("sample %d is corrupt" % i)
        return i


class FaultyIter(tud.IterableDataset):
    def __iter__(self):
        yield 1
        raise KeyError("shard missing")


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("make", [Faulty, FaultyIter])
def test_worker_exception_type_message_and_traceback(make, nw):
    with pytest.raises(Exception) as theirs:
        list(tud.DataLoader(make(), batch_size=2, num_workers=nw))
    with pytest.raises(type(theirs.value)) as mine:
        list(tld.DataLoader(make(), batch_size=2, num_workers=nw))
    # torch (with workers) raises a new exception whose message embeds the worker's traceback
    # text; threadloom re-raises the worker's exception itself, with its traceback and a note
    # naming the worker. Both show the raising line of the dataset.
    text = "".join(traceback.format_exception(mine.value))
    line = 'raise ValueError("sample %d is corrupt" % i)' if make is Faulty else \
        'raise KeyError("shard missing")'
    assert line in text
    assert line in str(theirs.value) or line in "".join(traceback.format_exception(theirs.value))
    orig = "sample 6 is corrupt" if make is Faulty else "shard missing"
    assert orig in str(mine.value) and orig in str(theirs.value)
    if nw:
        assert "Caught %s in DataLoader worker process" % type(theirs.value).__name__ in str(theirs.value)
        assert "(raised in threadloom.DataLoader worker " in text


class Stalls(tud.Dataset):
    """Sample 0 takes `seconds` (torch's worker process sleeps; threadloom's thread waits on an
    event the test sets, since a thread cannot be killed)."""

    def __init__(self, release=None, seconds=3.0):
        self.release = release
        self.seconds = seconds

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 0:
            if self.release is not None:
                self.release.wait(30)
            else:
                time.sleep(self.seconds)
        return i

    def __deepcopy__(self, memo):
        return self  # threadloom's replica shares the event


def test_timeout_raises_runtime_error_as_torch():
    with pytest.raises(RuntimeError) as theirs:
        list(tud.DataLoader(Stalls(), num_workers=1, timeout=0.3))
    release = threading.Event()
    try:
        with pytest.raises(RuntimeError) as mine:
            list(tld.DataLoader(Stalls(release), num_workers=1, timeout=0.3))
    finally:
        release.set()
    assert str(theirs.value) == "DataLoader timed out after 0.3 seconds"
    assert str(mine.value).startswith(str(theirs.value))
    assert isinstance(mine.value, TimeoutError)


def test_timeout_with_no_workers():
    # torch asserts timeout == 0 when the first iteration starts without workers; threadloom
    # says so when the loader is built
    loader = tud.DataLoader(Pairs(3), timeout=1)
    with pytest.raises(AssertionError):
        iter(loader)
    with pytest.raises(ValueError, match="timeout applies to worker threads"):
        tld.DataLoader(Pairs(3), timeout=1)


def _ds():
    return Pairs(8)


BAD_ARGS = {
    "batch_sampler+batch_size": lambda: dict(dataset=_ds(), batch_sampler=[[0]], batch_size=2),
    "batch_sampler+shuffle": lambda: dict(dataset=_ds(), batch_sampler=[[0]], shuffle=True),
    "batch_sampler+sampler": lambda: dict(dataset=_ds(), batch_sampler=[[0]], sampler=[0]),
    "batch_sampler+drop_last": lambda: dict(dataset=_ds(), batch_sampler=[[0]], drop_last=True),
    "sampler+shuffle": lambda: dict(dataset=_ds(), sampler=[0, 1], shuffle=True),
    "batch_size=None+drop_last": lambda: dict(dataset=_ds(), batch_size=None, drop_last=True),
    "iterable+shuffle": lambda: dict(dataset=TorchShards(4), shuffle=True),
    "iterable+sampler": lambda: dict(dataset=TorchShards(4), sampler=[0]),
    "iterable+batch_sampler": lambda: dict(dataset=TorchShards(4), batch_sampler=[[0]]),
    "num_workers<0": lambda: dict(dataset=_ds(), num_workers=-1),
    "timeout<0": lambda: dict(dataset=_ds(), timeout=-1),
    "persistent_workers+0 workers": lambda: dict(dataset=_ds(), persistent_workers=True),
    "prefetch_factor+0 workers": lambda: dict(dataset=_ds(), prefetch_factor=4),
    "multiprocessing_context+0 workers": lambda: dict(dataset=_ds(), multiprocessing_context="fork"),
    "batch_size=0": lambda: dict(dataset=_ds(), batch_size=0),
    "batch_size=-2": lambda: dict(dataset=_ds(), batch_size=-2),
    "drop_last not bool": lambda: dict(dataset=_ds(), batch_size=2, drop_last="yes"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_invalid_arguments_raise_what_torch_raises(case):
    with pytest.raises(Exception) as theirs:
        tud.DataLoader(**BAD_ARGS[case]())
    with pytest.raises(type(theirs.value)) as mine:
        tld.DataLoader(**BAD_ARGS[case]())
    # same first words as torch's message
    assert str(mine.value).split()[:3] == str(theirs.value).split()[:3], (mine.value, theirs.value)


def test_num_workers_of_another_type_is_a_type_error_as_torch():
    # torch raises the comparison's bare TypeError; threadloom the same type, saying what to pass
    with pytest.raises(TypeError):
        tud.DataLoader(_ds(), num_workers="2")
    with pytest.raises(TypeError, match="num_workers must be an int"):
        tld.DataLoader(_ds(), num_workers="2")


BAD_SAMPLERS = {
    "replacement not bool": lambda m: m.RandomSampler(range(3), replacement=1),
    "num_samples=0": lambda m: m.RandomSampler(range(3), num_samples=0),
    "weights 2-d": lambda m: m.WeightedRandomSampler([[1.0, 2.0]], 2),
    "weighted num_samples": lambda m: m.WeightedRandomSampler([1.0], 0),
    "weighted replacement": lambda m: m.WeightedRandomSampler([1.0], 1, replacement=None),
    "batch size": lambda m: m.BatchSampler(range(3), 0, False),
    "rank out of range": lambda m: m.DistributedSampler(range(3), 2, 2),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLERS))
def test_invalid_sampler_arguments_raise_what_torch_raises(case):
    with pytest.raises(Exception) as theirs:
        BAD_SAMPLERS[case](tud)
    with pytest.raises(type(theirs.value)):
        BAD_SAMPLERS[case](tld)


def test_prefetch_factor_two_without_workers_is_torch_113s_default():
    # torch 1.13's default prefetch_factor was 2, and 2.x's is None, refusing 2 without workers:
    # threadloom accepts both, so code written for either runs
    with pytest.raises(ValueError, match="prefetch_factor"):
        tud.DataLoader(Pairs(5), batch_size=2, prefetch_factor=2)
    got = list(tld.DataLoader(Pairs(5), batch_size=2, prefetch_factor=2))
    assert_same_batches(got, list(tud.DataLoader(Pairs(5), batch_size=2)))
    assert tld.DataLoader(Pairs(5), prefetch_factor=None).prefetch_factor is None


def test_multiprocessing_context_with_workers_is_refused():
    # torch starts processes with it; threadloom has none to start and says so
    with pytest.raises(ValueError, match="multiprocessing_context"):
        tld.DataLoader(Pairs(4), num_workers=2, multiprocessing_context="fork")


def test_attributes_are_frozen_after_init_as_torch():
    for loader in (tld.DataLoader(Pairs(4)), tud.DataLoader(Pairs(4))):
        for attr in ("batch_size", "sampler", "batch_sampler", "drop_last", "dataset",
                     "persistent_workers"):
            with pytest.raises(ValueError, match="should not be set after"):
                setattr(loader, attr, None)
        loader.num_workers = 0  # the others stay settable


# -- resume ------------------------------------------------------------------------------------

def _resume_against_torch(make_tl, make_torch, epoch, stop, before_load=None):
    """threadloom stopped after `stop` batches of epoch `epoch`, its state loaded into a fresh
    loader (as after a restart): the rest of that epoch, then the next epoch, are an
    uninterrupted torch run's."""
    theirs = make_torch()
    want = [list(theirs) for _ in range(epoch + 2)]
    first = make_tl()
    for _ in range(epoch):
        list(first)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    extra = before_load() if before_load is not None else None
    first.close()
    again = make_tl()
    again.load_state_dict(state)
    if extra is not None:
        extra()
    assert_same_batches(head + list(again), want[epoch])
    assert_same_batches(list(again), want[epoch + 1])


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("epoch,stop", [(0, 0), (0, 3), (1, 7), (2, 2)])
def test_resume_yields_the_tail_of_an_uninterrupted_torch_run(epoch, stop, nw):
    kw = dict(batch_size=5, shuffle=True, num_workers=nw)
    _resume_against_torch(
        lambda: tld.DataLoader(Pairs(38), generator=torch.Generator().manual_seed(9), **kw),
        lambda: tud.DataLoader(Pairs(38), generator=torch.Generator().manual_seed(9), **kw),
        epoch, stop)


def test_resume_with_torchs_global_rng():
    # generator=None: the draws come from torch's global RNG, which the training script saves
    # and restores with the loader's state (threadloom does not set it)
    def save():
        rng = torch.get_rng_state()
        torch.manual_seed(123)  # a restarted process
        return lambda: torch.set_rng_state(rng)

    torch.manual_seed(2)
    theirs = tud.DataLoader(Pairs(30), batch_size=4, shuffle=True)
    want = [list(theirs) for _ in range(3)]
    torch.manual_seed(2)
    _resume_against_torch(
        lambda: tld.DataLoader(Pairs(30), batch_size=4, shuffle=True, num_workers=2),
        lambda: _Replay(want), 1, 4, before_load=save)


class _Replay:
    """A 'loader' that yields epochs already computed (torch's, under a seed set earlier)."""

    def __init__(self, epochs):
        self.epochs = iter(epochs)

    def __iter__(self):
        return iter(next(self.epochs))


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_with_torch_sampler_objects(nw):
    # torch's samplers have no state_dict; threadloom keeps their generator's state instead
    def sampler():
        return tud.RandomSampler(range(25), generator=torch.Generator().manual_seed(4))

    def batch_sampler():
        return tud.BatchSampler(sampler(), 3, drop_last=False)

    _resume_against_torch(
        lambda: tld.DataLoader(Pairs(25), batch_size=4, num_workers=nw, sampler=sampler()),
        lambda: tud.DataLoader(Pairs(25), batch_size=4, sampler=sampler()), 1, 3)
    _resume_against_torch(
        lambda: tld.DataLoader(Pairs(25), num_workers=nw, batch_sampler=batch_sampler()),
        lambda: tud.DataLoader(Pairs(25), batch_sampler=batch_sampler()), 2, 5)


def test_resume_iterable():
    want = list(tud.DataLoader(TorchShards(30), batch_size=4, num_workers=3))
    first = tld.DataLoader(TorchShards(30), batch_size=4, num_workers=3)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    again = tld.DataLoader(TorchShards(30), batch_size=4, num_workers=3)
    again.load_state_dict(first.state_dict())
    first.close()
    assert_same_batches(head + list(again), want)


def test_generator_draws_match_torch_after_an_epoch():
    # after an epoch, the generator has moved by as many draws as torch's did
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    list(tld.DataLoader(Pairs(9), batch_size=2, shuffle=True, num_workers=2, generator=g1))
    list(tud.DataLoader(Pairs(9), batch_size=2, shuffle=True, num_workers=2, generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    assert math.isfinite(float(torch.rand(1, generator=g1)))


def test_numpy_seed_is_torchs():
    from torch.utils.data._utils.worker import _generate_state
    from threadloom.data.worker import numpy_seed
    rng = random.Random(0)
    for _ in range(500):
        base, wid = rng.getrandbits(63), rng.randrange(256)
        assert numpy_seed(base, wid) == _generate_state(base, wid)


def test_sampler_state_from_torch_draws_is_refused_by_a_pure_python_sampler():
    mine = tld.RandomSampler(range(10), generator=torch.Generator().manual_seed(1))
    iter(mine)
    other = tld.RandomSampler(range(10), generator=random.Random(1))
    other.load_state_dict(mine.state_dict())
    with pytest.raises(ValueError, match="replays torch's draws"):
        iter(other)
