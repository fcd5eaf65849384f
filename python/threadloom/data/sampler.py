"""Samplers with torch.utils.data's names, arguments and semantics.

A sampler yields dataset indices (a batch sampler yields lists of them). Randomness comes from
the sampler alone, drawn in the thread that iterates it, so the order of samples never depends
on how many loader threads run. Where the draws come from:

- torch: `generator` is a ``torch.Generator``, or it is None and torch is imported. The
  samplers then make torch's own calls in torch's order (torch.randperm, torch.randint in
  chunks of 32, torch.multinomial, and with generator=None a seed from torch's global RNG for
  RandomSampler), so they yield exactly what torch.utils.data's samplers yield for the same
  generator state or ``torch.manual_seed``.
- pure Python: `generator` is a ``random.Random`` (anything with getrandbits), or it is None
  and torch is not imported (the ``random`` module). One 63-bit seed per iteration, and a
  ``random.Random(seed)`` shuffles. The order is as random as torch's, not the same numbers.

Permutations (RandomSampler without replacement, DistributedSampler) are lists up to a size
and lazy beyond it, so a dataset of 10**12 samples starts at once in constant memory:

- torch: ``torch.randperm`` (torch's very order) up to TORCH_PERMUTATION_MAX = 2**24 samples
  (a 128 MiB int64 tensor at most, read out in chunks; torch's own sampler turns it into a
  Python list, ~40 bytes a sample); beyond it a `Permutation` keyed by one draw from the
  generator: not torch's order, which needs the whole tensor.
- pure Python: ``random.shuffle`` of a list up to PYTHON_PERMUTATION_MAX = 2**20 samples
  (~1.2 us and ~40 bytes a sample, before the first batch); beyond it a `Permutation`
  (~2.2 us a sample on 3.13t, as the samples are drawn; no memory).

`Permutation(n, rng)` is a Feistel network over the smallest power of two >= n (4 rounds of a
32-bit multiply-xorshift mix, keyed by rng), walked back into range(n) (cycle walking: under
2 evaluations a sample on average): a bijection of range(n) with O(1) memory and O(1) random
access, p[i].

``state_dict()`` says how to replay the iteration in progress: {"seed": n} (a seed drawn for
it) or {"torch_state": bytes} (the torch generator's state before its first draw). After
``load_state_dict()`` the next ``__iter__`` replays it; a torch.Generator given as `generator`
is set back to that state, so it goes on to the next epoch as it would have without the stop.
torch's global RNG is never set: a script resuming with generator=None restores it itself
(``torch.set_rng_state``), as it does for the rest of its training state.
"""

import itertools
import math
import os
import random
import sys

__all__ = ["Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler",
           "WeightedRandomSampler", "BatchSampler", "DistributedSampler", "Permutation",
           "draw_seed", "replay_state", "load_replay_state"]

TORCH_PERMUTATION_MAX = 1 << 24   # torch.randperm up to this many samples, then lazy
PYTHON_PERMUTATION_MAX = 1 << 20  # random.shuffle of a list up to this many, then lazy
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 16                  # a randperm tensor is read out this many indices at a time


class Permutation:
    """A pseudo-random permutation of range(n), evaluated lazily: p[i], iter(p), len(p), in
    O(1) memory. rng (a random.Random) draws the keys, so the same rng state gives the same
    permutation. See the module docstring for the construction."""

    ROUNDS = 4

    def __init__(self, n, rng):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        u = bits // 2
        self._v = v = bits - u
        self._vmask = (1 << v) - 1
        # per round: its key and the width of the half it writes (u and v bits in turn, so an
        # even number of rounds gives back the (u, v) split it started from)
        self._rounds = [(rng.getrandbits(32), (1 << (u if r % 2 == 0 else v)) - 1)
                        for r in range(self.ROUNDS)]

    def _enc(self, x):
        a, b = x >> self._v, x & self._vmask
        for key, mask in self._rounds:
            h = ((b ^ key) * 0x9E3779B1) & _M32
            h ^= h >> 15
            h = (h * 0x85EBCA77) & _M32
            h ^= h >> 13
            a, b = b, (a + h) & mask
        return (a << self._v) | b

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError("permutation index %r out of range(%d)" % (i, self.n))
        y = self._enc(i)
        while y >= self.n:  # cycle walking: the cycle through i comes back below n
            y = self._enc(y)
        return y

    def __iter__(self):
        enc, n = self._enc, self.n
        for i in range(n):
            y = enc(i)
            while y >= n:
                y = enc(y)
            yield y

    def __len__(self):
        return self.n


def permutation(n, torch=None, generator=None, rng=None):
    """A random permutation of range(n), as an indexable sequence (see the module docstring):
    with torch, torch.randperm(n, generator=generator) up to TORCH_PERMUTATION_MAX, else a
    Permutation keyed by one draw from `generator`; without, rng.shuffle of a list up to
    PYTHON_PERMUTATION_MAX, else a Permutation keyed by rng."""
    if torch is not None:
        if n <= TORCH_PERMUTATION_MAX:
            return _TorchPermutation(torch.randperm(n, generator=generator))
        return Permutation(n, random.Random(draw_seed(generator)))
    if n <= PYTHON_PERMUTATION_MAX:
        perm = list(range(n))
        rng.shuffle(perm)
        return perm
    return Permutation(n, rng)


class _TorchPermutation:
    """A torch.randperm tensor as a sequence of Python ints: read out in chunks, not as one
    list (8 bytes a sample instead of ~40)."""

    def __init__(self, tensor):
        self._t = tensor

    def __len__(self):
        return len(self._t)

    def __getitem__(self, i):
        return int(self._t[i])

    def __iter__(self):
        for chunk in self._t.split(_CHUNK):
            yield from chunk.tolist()

    def take(self, js):
        """[self[j % len(self)] for j in js] (js a range), gathered by torch in one go."""
        if not js:
            return []
        torch = _torch()
        picks = torch.arange(js.start, js.stop, js.step, dtype=torch.int64) % len(self._t)
        return self._t[picks].tolist()


def _torch():
    return sys.modules.get("torch")


def torch_source(generator):
    """torch, when draws for `generator` come from torch (a torch.Generator, or None with torch
    imported); else None."""
    torch = _torch()
    if torch is not None and (generator is None or isinstance(generator, torch.Generator)):
        return torch
    return None


def draw_seed(generator=None):
    """A 63-bit seed drawn from `generator` as torch's DataLoader draws its base seed: from a
    torch.Generator, or torch's global RNG when it is None and torch is imported; else from a
    random.Random-like object (getrandbits), or the ``random`` module when it is None."""
    torch = torch_source(generator)
    if torch is not None:
        return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item()) & ((1 << 63) - 1)
    if generator is None:
        return random.getrandbits(63)
    if hasattr(generator, "getrandbits"):
        return generator.getrandbits(63)
    raise TypeError("generator must be a random.Random (or anything with getrandbits), a "
                    "torch.Generator or None, not %r" % (generator,))


def torch_state(generator):
    """The state of a torch.Generator (None: torch's global RNG) as bytes, for a state_dict."""
    torch = _torch()
    st = torch.get_rng_state() if generator is None else generator.get_state()
    return bytes(st.numpy())


def torch_generator_at(state, generator=None):
    """`generator` (a new torch.Generator when None) set to `state` (bytes of torch_state)."""
    torch = _torch()
    g = torch.Generator() if generator is None else generator
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return g


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
    """A sampler whose iterations draw from `generator`; state_dict() replays the iteration in
    progress (the module docstring says what it holds)."""

    generator = None
    _state = None     # how to replay the iteration in progress (or last started)
    _pending = None   # a state loaded by load_state_dict(), used by the next __iter__

    def _start(self, seeded):
        """This iteration's source of draws, taken now (so state_dict() sees it):
        (torch, g) to draw with torch functions and generator g (None: torch's global RNG), or
        (None, rng) with rng a random.Random. seeded: with generator=None, torch's sampler draws
        one seed from the global RNG and uses a Generator of its own (RandomSampler) instead of
        drawing from the global RNG directly (the others)."""
        pending, self._pending = self._pending, None
        torch = torch_source(self.generator)
        if torch is None:
            if pending is not None and "seed" not in pending:
                raise ValueError("this sampler state replays torch's draws, but the sampler "
                                 "now draws in pure Python (torch is not imported, or generator= "
                                 "is not a torch.Generator): build it as when the state was saved")
            seed = pending["seed"] if pending is not None else draw_seed(self.generator)
            self._state = {"seed": seed}
            return None, random.Random(seed)
        if pending is not None:
            self._state = dict(pending)
            if "torch_state" in pending:  # the user's generator goes back to where it was
                return torch, torch_generator_at(pending["torch_state"], self.generator)
            if self.generator is None and seeded:
                return torch, torch.Generator().manual_seed(pending["seed"])
            raise ValueError("this sampler state does not replay how the sampler draws now "
                             "(torch or pure Python, which generator=): build it as it was when "
                             "the state was saved")
        if self.generator is None and seeded:
            seed = draw_seed(None)
            self._state = {"seed": seed}
            return torch, torch.Generator().manual_seed(seed)
        self._state = {"torch_state": torch_state(self.generator)}
        return torch, self.generator

    def state_dict(self):
        return None if self._state is None else dict(self._state)

    def load_state_dict(self, state):
        self._pending = None if state is None or state.get("seed", 0) is None else dict(state)


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
        torch, rng = self._start(seeded=True)
        n = len(self.data_source)
        if torch is not None:
            return self._torch_gen(torch, rng, n, self.num_samples)
        return self._gen(rng, n, self.num_samples)

    def _torch_gen(self, torch, g, n, count):
        # torch.utils.data.RandomSampler's calls, in its order
        if self.replacement:
            for size in [32] * (count // 32) + [count % 32]:
                yield from torch.randint(high=n, size=(size,), dtype=torch.int64,
                                         generator=g).tolist()
            return
        for _ in range(count // n):
            yield from permutation(n, torch, g)
        yield from itertools.islice(permutation(n, torch, g), count % n)

    def _gen(self, rng, n, count):
        if self.replacement:
            for _ in range(count):
                yield rng.randrange(n)
            return
        for _ in range(count // n):
            yield from permutation(n, rng=rng)
        yield from itertools.islice(permutation(n, rng=rng), count % n)

    def __len__(self):
        return self.num_samples


class SubsetRandomSampler(_Seeded):
    """The given indices in random order, without replacement."""

    def __init__(self, indices, generator=None):
        self.indices = indices
        self.generator = generator

    def __iter__(self):
        torch, rng = self._start(seeded=False)
        if torch is not None:
            perm = torch.randperm(len(self.indices), generator=rng).tolist()
        else:
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
        torch = _torch()
        if torch is not None:  # torch's tensor of weights (float64), so torch.multinomial takes it
            self.weights = torch.as_tensor(weights, dtype=torch.double)
            if self.weights.dim() != 1:
                raise ValueError("weights should be a 1d sequence but given weights have shape %s"
                                 % (tuple(self.weights.shape),))
        else:
            try:
                self.weights = [float(w) for w in weights]
            except TypeError:
                raise ValueError("weights should be a 1d sequence of numbers, not %r"
                                 % (weights,)) from None
        self.num_samples = num_samples
        self.replacement = replacement
        self.generator = generator
        if not replacement and num_samples > len(self.weights):
            raise ValueError("cannot draw %d samples without replacement from %d weights"
                             % (num_samples, len(self.weights)))

    def __iter__(self):
        torch, rng = self._start(seeded=False)
        if torch is not None:
            weights = self.weights
            if not isinstance(weights, torch.Tensor):  # built before torch was imported
                weights = torch.as_tensor(weights, dtype=torch.double)
            return iter(torch.multinomial(weights, self.num_samples, self.replacement,
                                          generator=rng).tolist())
        weights = [float(w) for w in self.weights]
        if self.replacement:
            return iter(rng.choices(range(len(weights)), weights=weights, k=self.num_samples))
        # without replacement: Efraimidis-Spirakis keys, the largest num_samples win
        keys = sorted(((rng.random() ** (1.0 / w) if w > 0 else -1.0), i)
                      for i, w in enumerate(weights))
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


def _inner(sampler):
    """The sampler under a batch sampler (threadloom's or torch's BatchSampler), else itself."""
    inner = getattr(sampler, "sampler", None)
    return inner if inner is not None and hasattr(sampler, "batch_size") else sampler


def replay_state(sampler, before):
    """How a DataLoader replays `sampler`'s iteration (a batch sampler: the sampler under it).
    One with state_dict() (threadloom's) says so once iter() has drawn (before=False). One
    without (torch's samplers) but with a torch.Generator as its `generator` is replayed from
    that generator's state, taken before iter() (before=True). None: the sampler is assumed to
    repeat its order when iterated again (sequential, or a fixed list)."""
    inner = _inner(sampler)
    sd = getattr(inner, "state_dict", None)
    if sd is not None:
        return None if before else sd()
    torch = _torch()
    g = getattr(inner, "generator", None)
    if before and torch is not None and isinstance(g, torch.Generator):
        return {"torch_state": torch_state(g)}
    return None


def load_replay_state(sampler, state):
    """Makes `sampler`'s next iteration replay the one replay_state() described."""
    inner = _inner(sampler)
    if hasattr(inner, "load_state_dict"):
        inner.load_state_dict(state)
    elif "torch_state" in state:
        torch_generator_at(state["torch_state"], inner.generator)


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


class DistributedSampler(Sampler):
    """This rank's share of the dataset, torch's DistributedSampler way: every rank shuffles
    with seed + epoch (call set_epoch each epoch): torch.randperm with a Generator seeded so
    when torch is imported, the very indices torch's gives, else random.Random(seed + epoch).
    Pads to a multiple of num_replicas by repeating indices (or drops the tail with
    drop_last), then takes every num_replicas-th index from `rank`. num_replicas / rank
    default to WORLD_SIZE / RANK from the environment. Every rank of a job must see torch
    imported, or none: the two shuffles differ."""

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
        order = range(n)
        if self.shuffle:
            torch = _torch()
            if torch is not None:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                order = permutation(n, torch, g)
            else:
                order = permutation(n, rng=random.Random(self.seed + self.epoch))
        # torch's: the order padded to total_size by repeating it from the start (or cut to
        # total_size with drop_last), then every num_replicas-th from `rank`; computed per
        # index, so a lazy permutation stays lazy
        js = range(self.rank, self.total_size, self.num_replicas)
        if isinstance(order, _TorchPermutation):
            return iter(order.take(js))
        return (order[j % n] for j in js)

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch = state.get("epoch", self.epoch)
        self.seed = state.get("seed", self.seed)
