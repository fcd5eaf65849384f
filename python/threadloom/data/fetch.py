"""From indices or an iterator to batches: the one fetch code of every loader path (the
consumer's thread with num_workers=0, the worker threads of both engines), as torch's
_MapDatasetFetcher and _IterableDatasetFetcher.

Map-style: with auto-collation (a batch sampler) the indices of one batch are fetched with the
dataset's ``__getitems__`` when it has one, else one ``dataset[i]`` each, then collated; without
it (batch_size=None) each index is one sample, converted. Iterable-style: the iterator's items
are collated batch_size at a time (the last, short batch dropped with drop_last), or each
converted without auto-collation.

The first batch of a map-style epoch with 2 or more workers is split (SplitFirst): its indices
become contiguous parts, one pipeline item each, so that all idle workers fetch its samples at
once instead of one worker alone (time to first batch ~1/N of a batch plus the collation); the
worker that finishes the last part joins the samples in index order and collates them on its
thread (SplitBatch), so collate_fn sees the batch it would have seen unsplit.

StopIteration raised by the dataset's ``__getitem__`` / ``__getitems__``, by ``__iter__``
itself (not by the iterator it returns, whose StopIteration is the end) or by collate_fn is a
RuntimeError naming the sample, as PEP 479 makes it inside generators: it would otherwise end
the epoch early without a word (torch's loader does that).
"""

import collections.abc
import itertools
import threading


def _stopped(what):
    return RuntimeError("%s raised StopIteration: inside a DataLoader that is an error, not the "
                        "end of the data (PEP 479 makes it one inside generators too); raise "
                        "IndexError or another exception instead" % what)


def map_fetcher(cfg):
    """fetch(dataset, idx) -> one batch of `dataset` (a worker's replica) for `idx`, with the
    collation of `cfg` (what an iteration read of its DataLoader: collate_fn, auto_collation,
    batch_size, drop_last). With auto-collation `idx` may also be a part of a split batch
    (SplitFirst): then fetch gives the whole batch or PART_DONE."""
    collate = cfg.collate_fn
    if not cfg.auto_collation:
        def fetch_one(dataset, idx):
            try:
                sample = dataset[idx]
            except StopIteration as exc:
                raise _stopped("dataset[%r]" % (idx,)) from exc
            try:
                return collate(sample)
            except StopIteration as exc:
                raise _stopped("collate_fn, on sample index %r," % (idx,)) from exc

        return fetch_one

    def fetch(dataset, idx):
        if idx.__class__ is Part:
            return _fetch_part(dataset, idx, collate)
        return _collated(collate, fetch_samples(dataset, idx), idx)

    return fetch


def fetch_samples(dataset, idx, batch=None):
    """The samples of `dataset` at the indices `idx`, uncollated: ``dataset.__getitems__(idx)``
    when it has one, else one ``dataset[i]`` each. `batch`: the whole batch's indices when `idx`
    is a part of it (an error names the batch, as it does for an unsplit one)."""
    getitems = getattr(dataset, "__getitems__", None)
    try:
        if getitems is not None:
            return getitems(idx)
        samples = []
        append = samples.append
        for i in idx:  # a loop, not a comprehension: the error can name `i`
            append(dataset[i])
        return samples
    except StopIteration as exc:
        what = ("dataset.__getitems__(%r)" % (idx,) if getitems is not None
                else "dataset[%r] (in the batch of sample indices %r)"
                % (i, idx if batch is None else batch))
        raise _stopped(what) from exc


def _collated(collate, samples, idx):
    try:
        return collate(samples)
    except StopIteration as exc:
        raise _stopped("collate_fn, on the batch of sample indices %r," % (idx,)) from exc


# -- the first batch of an epoch, split between the workers ----------------------------------

class _PartDone:
    __slots__ = ()

    def __repr__(self):
        return "<threadloom: a part of a split batch, fetched>"


# What a part's pipeline item yields when another part's worker collates the batch: the
# consumer skips it (loader.py), it is never a batch.
PART_DONE = _PartDone()


class SplitFirst:
    """An iterator over the batches of `batches` (a batch sampler's iterator), the first one
    handed out as min(n, len(batch)) contiguous parts (Part items) when that is 2 or more: n
    workers fetch its samples at once, and the one that finishes last collates it
    (SplitBatch). Every later batch is one item, as before. A batch that cannot be sliced (not
    a sequence or 1-D array) is not split.

    `left`: the part items of the first batch the consumer has not taken yet (0 until it is
    split). A pipeline with feed="consumer" iterates this on the consumer's thread, which also
    counts `left` down (loader.py), so it needs no lock. The ordered consumer takes every part
    item before it returns the batch, so that the sampler has been pulled as often as torch's
    when next() returns (torch hands out prefetch_factor * num_workers batches, then one per
    batch yielded; parts in flight would otherwise count in their place)."""

    def __init__(self, batches, n):
        self._batches = batches
        self._n = n
        self._first = True
        self._parts = []  # the first batch's parts not handed out yet
        self.left = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._parts:
            return self._parts.pop(0)
        if not self._first:
            return next(self._batches)
        self._first = False
        idx = next(self._batches)
        try:
            size = len(idx) if (isinstance(idx, collections.abc.Sequence)
                                or getattr(idx, "ndim", None) == 1) else 0
        except TypeError:
            size = 0
        n = min(self._n, size)
        if n < 2:
            return idx
        self._parts = SplitBatch(idx, n).items
        self.left = n
        return self._parts.pop(0)


class Part:
    """Part k of a SplitBatch: the indices idx, one pipeline item."""

    __slots__ = ("batch", "k", "idx")

    def __init__(self, batch, k, idx):
        self.batch = batch
        self.k = k
        self.idx = idx

    def describe(self):
        return "sample indices %s (part %d of %d of the first batch)" % (
            self.idx, self.k + 1, self.batch.n)


class SplitBatch:
    """A batch whose contiguous parts are fetched by several workers at once; the worker that
    finishes the last part concatenates the parts' samples in index order and collates them on
    its thread, the others' items give PART_DONE.

    Invariant (under `lock`): `parts[k]` is written only by the worker fetching part k, before
    it takes `remaining` down by one; the worker that takes `remaining` to 0 is the last, and
    only it reads `parts`, after every part's write (each made before its decrement under the
    same lock). A part that raises sets `failed` when it counts itself done: the last worker
    then collates nothing, and the part's error is the batch's (ordered: at its item's turn,
    which comes before the next batch's)."""

    def __init__(self, idx, n):
        self.idx = idx
        self.n = n
        self.lock = threading.Lock()
        self.parts = [None] * n   # part k's samples, once fetched
        self.remaining = n        # parts not yet done (fetched or failed)
        self.failed = False       # a part raised
        cut = [len(idx) * k // n for k in range(n + 1)]
        self.items = [Part(self, k, idx[cut[k]:cut[k + 1]]) for k in range(n)]

    def done(self, k, samples, failed=False):
        """Part k is done; True for the last part of a batch whose parts all succeeded."""
        with self.lock:
            self.parts[k] = samples
            self.failed = self.failed or failed
            self.remaining -= 1
            return self.remaining == 0 and not self.failed

    def samples(self):
        """The parts' samples in index order, one sequence as one fetch would have given; None
        when a part's __getitems__ gave something else than a list (or tuple) of one sample per
        index, which cannot be joined."""
        parts, self.parts = self.parts, None
        kind = type(parts[0])
        if kind not in (list, tuple) or any(
                type(p) is not kind or len(p) != len(item.idx)
                for p, item in zip(parts, self.items)):
            return None
        return kind(itertools.chain.from_iterable(parts))


def _fetch_part(dataset, part, collate):
    whole = part.batch
    try:
        samples = fetch_samples(dataset, part.idx, whole.idx)
    except BaseException:
        whole.done(part.k, None, failed=True)
        raise
    if not whole.done(part.k, samples):
        return PART_DONE
    samples = whole.samples()
    if samples is None:  # __getitems__ returned a batch of its own shape: ask for the whole one
        samples = fetch_samples(dataset, whole.idx)
    return _collated(collate, samples, whole.idx)


def iterable_batches(cfg, dataset):
    """The batches of iter(dataset) (a worker's replica, or the dataset itself)."""
    try:
        it = iter(dataset)
    except StopIteration as exc:
        raise _stopped("the dataset's __iter__ (it must return an iterator, an empty one when "
                       "there is no data)") from exc
    return _batches(cfg, it)


def _batches(cfg, it):
    collate = cfg.collate_fn
    if not cfg.auto_collation:
        for n, x in enumerate(it):
            try:
                yield collate(x)
            except StopIteration as exc:
                raise _stopped("collate_fn, on sample %d of the stream," % n) from exc
        return
    bs = cfg.batch_size
    for n in itertools.count():
        chunk = list(itertools.islice(it, bs))
        if not chunk or (cfg.drop_last and len(chunk) < bs):
            return
        try:
            yield collate(chunk)
        except StopIteration as exc:
            raise _stopped("collate_fn, on batch %d of the stream," % n) from exc
