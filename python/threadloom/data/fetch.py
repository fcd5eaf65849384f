"""From indices or an iterator to batches: the one fetch code of every loader path (the
consumer's thread with num_workers=0, the worker threads of both engines), as torch's
_MapDatasetFetcher and _IterableDatasetFetcher.

Map-style: with auto-collation (a batch sampler) the indices of one batch are fetched with the
dataset's ``__getitems__`` when it has one, else one ``dataset[i]`` each, then collated; without
it (batch_size=None) each index is one sample, converted. Iterable-style: the iterator's items
are collated batch_size at a time (the last, short batch dropped with drop_last), or each
converted without auto-collation.
"""

import itertools


def map_fetcher(cfg):
    """fetch(dataset, idx) -> one batch of `dataset` (a worker's replica) for `idx`, with the
    collation of `cfg` (what an iteration read of its DataLoader: collate_fn, auto_collation,
    batch_size, drop_last)."""
    collate = cfg.collate_fn
    if not cfg.auto_collation:
        return lambda dataset, idx: collate(dataset[idx])

    def fetch(dataset, idx):
        getitems = getattr(dataset, "__getitems__", None)
        return collate(getitems(idx) if getitems is not None else [dataset[i] for i in idx])

    return fetch


def iterable_batches(cfg, it):
    """The batches of the iterator `it` (a worker's replica's, or the dataset's own)."""
    collate = cfg.collate_fn
    if not cfg.auto_collation:
        for x in it:
            yield collate(x)
        return
    bs = cfg.batch_size
    while True:
        chunk = list(itertools.islice(it, bs))
        if not chunk or (cfg.drop_last and len(chunk) < bs):
            return
        yield collate(chunk)
