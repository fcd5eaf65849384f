"""Samplers with torch.utils.data's names, arguments and semantics, in pure Python.

A sampler yields dataset indices (a batch sampler yields lists of them). Randomness comes from
the sampler alone, drawn in the thread that iterates it, so the order of samples never depends
on how many loader threads run. The random samplers draw one seed per iteration from
`generator` (a ``random.Random``, a ``torch.Generator``, or None for the ``random`` module) and
shuffle with their own ``random.Random(seed)``; ``state_dict()`` holds that seed, so a
DataLoader can replay the same order when it resumes mid-epoch. The permutations are not
bit-identical to torch's (torch.randperm); their distribution and structure are the same.
"""

import math
import os
import random

__all__ = ["Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler",
           "WeightedRandomSampler", "BatchSampler", "DistributedSampler", "draw_seed"]


def draw_seed(generator=None):
    """A 63-bit seed drawn from `generator`: a random.Random-like object (getrandbits), a
    torch.Generator, or None for the ``random`` module's shared generator."""
    if generator is None:
        return random.getrandbits(63)
    if hasattr(generator, "getrandbits"):
        return generator.getrandbits(63)
    if type(generator).__module__.startswith("torch"):
        import torch
        return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item()) & ((1 << 63) - 1)
    raise TypeError("generator must be a random.Random (or anything with getrandbits), a "
                    "torch.Generator or None, not %r" % (generator,))


class Sampler:
    """Base class: subclasses define __iter__ (indices) and usually __len__."""

    def __init__(self, data_source=None):
        pass

    def __iter__(self):
        raise NotImplementedError


class SequentialSampler(Sampler):
    """0, 1, ..., len(data_source) - 1."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __iter__(self):
        return iter(range(len(self.data_source)))

    def __len__(self):
        return len(self.data_source)


class _Seeded(Sampler):
    """A sampler that draws one seed per iteration; state_dict() replays that iteration."""

    _seed = None      # the seed of the iteration in progress (or last started)
    _pending = None   # a seed loaded by load_state_dict(), used by the next __iter__

    def _next_rng(self):
        if self._pending is not None:
            seed, self._pending = self._pending, None
        else:
            seed = draw_seed(self.generator)
        self._seed = seed
        return random.Random(seed)

    def state_dict(self):
        return {"seed": self._seed}

    def load_state_dict(self, state):
        self._pending = state.get("seed")


class RandomSampler(_Seeded):
    """Random order; with replacement=True, `num_samples` independent draws."""

    def __init__(self, data_source, replacement=False, num_samples=None, generator=None):
        self.data_source = data_source
        self.replacement = replacement
        self._num_samples = num_samples
        self.generator = generator
        if not isinstance(self.replacement, bool):
            raise TypeError("replacement should be a boolean value, but got replacement=%s"
                            % (self.replacement,))
        if not isinstance(self.num_samples, int) or self.num_samples <= 0:
            raise ValueError("num_samples should be a positive integer value, but got "
                             "num_samples=%s" % (self.num_samples,))

    @property
    def num_samples(self):
        return len(self.data_source) if self._num_samples is None else self._num_samples

    def __iter__(self):
        rng = self._next_rng()  # drawn now, not at the first next(): state_dict() sees it
        return self._gen(rng, len(self.data_source), self.num_samples)

    def _gen(self, rng, n, count):
        if self.replacement:
            for _ in range(count):
                yield rng.randrange(n)
            return
        for _ in range(count // n):
            perm = list(range(n))
            rng.shuffle(perm)
            yield from perm
        perm = list(range(n))
        rng.shuffle(perm)
        yield from perm[:count % n]

    def __len__(self):
        return self.num_samples


class SubsetRandomSampler(_Seeded):
    """The given indices in random order, without replacement."""

    def __init__(self, indices, generator=None):
        self.indices = indices
        self.generator = generator

    def __iter__(self):
        rng = self._next_rng()
        perm = list(range(len(self.indices)))
        rng.shuffle(perm)
        return (self.indices[i] for i in perm)

    def __len__(self):
        return len(self.indices)


class WeightedRandomSampler(_Seeded):
    """`num_samples` indices in [0, len(weights)) drawn with probability proportional to weights."""

    def __init__(self, weights, num_samples, replacement=True, generator=None):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ValueError("num_samples should be a positive integer value, but got "
                             "num_samples=%s" % (num_samples,))
        if not isinstance(replacement, bool):
            raise ValueError("replacement should be a boolean value, but got replacement=%s"
                             % (replacement,))
        self.weights = [float(w) for w in weights]
        self.num_samples = num_samples
        self.replacement = replacement
        self.generator = generator
        if not replacement and num_samples > len(self.weights):
            raise ValueError("cannot draw %d samples without replacement from %d weights"
                             % (num_samples, len(self.weights)))

    def __iter__(self):
        rng = self._next_rng()
        if self.replacement:
            return iter(rng.choices(range(len(self.weights)), weights=self.weights, k=self.num_samples))
        # without replacement: Efraimidis-Spirakis keys, the largest num_samples win
        keys = sorted(((rng.random() ** (1.0 / w) if w > 0 else -1.0), i)
                      for i, w in enumerate(self.weights))
        return iter([i for _, i in reversed(keys[-self.num_samples:])])

    def __len__(self):
        return self.num_samples


class BatchSampler(Sampler):
    """Groups another sampler's indices into lists of batch_size (the last one shorter unless
    drop_last)."""

    def __init__(self, sampler, batch_size, drop_last):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError("batch_size should be a positive integer value, but got "
                             "batch_size=%s" % (batch_size,))
        if not isinstance(drop_last, bool):
            raise ValueError("drop_last should be a boolean value, but got drop_last=%s"
                             % (drop_last,))
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self):
        return self._gen(iter(self.sampler))

    def _gen(self, it):
        batch = []
        size = self.batch_size
        for idx in it:
            batch.append(idx)
            if len(batch) == size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self):
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def state_dict(self):
        sd = getattr(self.sampler, "state_dict", None)
        return sd() if sd is not None else None

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def _env_int(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError("%s must be an integer, not %r" % (name, raw)) from None


def distributed_env(num_replicas=None, rank=None):
    """(world_size, rank): the arguments, else WORLD_SIZE / RANK from the environment (as
    torchrun and threadloom's launcher set them), else (1, 0)."""
    if num_replicas is None:
        num_replicas = _env_int("WORLD_SIZE", 1)
    if rank is None:
        rank = _env_int("RANK", 0)
    return num_replicas, rank


class DistributedSampler(_Seeded):
    """This rank's share of the dataset, torch's DistributedSampler way: every rank shuffles
    with seed + epoch (call set_epoch each epoch), pads to a multiple of num_replicas by
    repeating indices (or drops the tail with drop_last), then takes every num_replicas-th
    index from `rank`. num_replicas / rank default to WORLD_SIZE / RANK from the environment."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=False):
        num_replicas, rank = distributed_env(num_replicas, rank)
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1, not %d" % num_replicas)
        if rank >= num_replicas or rank < 0:
            raise ValueError("Invalid rank %d, rank should be in the interval [0, %d]"
                             % (rank, num_replicas - 1))
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.drop_last = drop_last
        n = len(dataset)
        if drop_last and n % num_replicas != 0:
            self.num_samples = math.ceil((n - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle = shuffle
        self.seed = seed

    def __iter__(self):
        n = len(self.dataset)
        indices = list(range(n))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices += indices[:pad]
            else:
                indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[:self.total_size]
        return iter(indices[self.rank:self.total_size:self.num_replicas])

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch = state.get("epoch", self.epoch)
        self.seed = state.get("seed", self.seed)
