"""From indices or an iterator to batches: the one fetch code of every loader path (the
consumer's thread with num_workers=0, the worker threads of both engines), as torch's
_MapDatasetFetcher and _IterableDatasetFetcher.

Map-style: with auto-collation (a batch sampler) the indices of one batch are fetched with the
dataset's ``__getitems__`` when it has one, else one ``dataset[i]`` each, then collated; without
it (batch_size=None) each index is one sample, converted. Iterable-style: the iterator's items
are collated batch_size at a time (the last, short batch dropped with drop_last), or each
converted without auto-collation.

StopIteration raised by the dataset's ``__getitem__`` / ``__getitems__``, by ``__iter__``
itself (not by the iterator it returns, whose StopIteration is the end) or by collate_fn is a
RuntimeError naming the sample, as PEP 479 makes it inside generators: it would otherwise end
the epoch early without a word (torch's loader does that).
"""

import itertools


def _stopped(what):
    return RuntimeError("%s raised StopIteration: inside a DataLoader that is an error, not the "
                        "end of the data (PEP 479 makes it one inside generators too); raise "
                        "IndexError or another exception instead" % what)


def map_fetcher(cfg):
    """fetch(dataset, idx) -> one batch of `dataset` (a worker's replica) for `idx`, with the
    collation of `cfg` (what an iteration read of its DataLoader: collate_fn, auto_collation,
    batch_size, drop_last)."""
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
        getitems = getattr(dataset, "__getitems__", None)
        try:
            if getitems is not None:
                samples = getitems(idx)
            else:
                samples = []
                append = samples.append
                for i in idx:  # a loop, not a comprehension: the error can name `i`
                    append(dataset[i])
        except StopIteration as exc:
            what = ("dataset.__getitems__(%r)" % (idx,) if getitems is not None
                    else "dataset[%r] (in the batch of sample indices %r)" % (i, idx))
            raise _stopped(what) from exc
        try:
            return collate(samples)
        except StopIteration as exc:
            raise _stopped("collate_fn, on the batch of sample indices %r," % (idx,)) from exc

    return fetch


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
