"""default_collate: a list of samples -> one batch, written straight into arena memory.

Runs on the loader thread that built the batch, so every batch lands in that thread's heap of
its NUMA node's arena (threadloom.arena(); page-locked when a GPU is present): pin_memory=True
has nothing left to do and costs no copy.

    numbers (int / float / bool)  -> memoryview over a Buffer, format 'q' / 'd' / '?', shape (B,)
    equal-size buffers (bytes, bytearray, memoryview, array.array, Buffer, ...)
                                  -> memoryview over one Buffer, shape (B, *item_shape), the
                                     items' format (bytes: 'B', shape (B, n))
    bytes of unequal length, str  -> list (as torch does for strings)
    dict                          -> dict of collated values
    tuple / list                  -> list of collated fields (torch's rule), namedtuple -> same type
    torch.Tensor / numpy.ndarray  -> stacked with torch.stack / numpy.stack into arena memory,
                                     when torch / numpy import (they are optional)
With torch importable, numbers and buffers come back as torch tensors over the same arena
memory (torch.frombuffer), else as memoryviews, which numpy.asarray / torch.frombuffer accept
without a copy. Differences from torch: bytes of equal length are stacked (torch lists them).
"""

import array
import collections.abc
import struct
import sys
import warnings

from threadloom._core import OutOfMemoryError
from threadloom.memory import arena

__all__ = ["default_collate", "default_convert"]

_FORMATS = {bool: "?", int: "q", float: "d"}
_NP_DTYPES = {"?": "bool", "q": "int64", "d": "float64", "B": "uint8", "b": "int8", "h": "int16",
              "H": "uint16", "i": "int32", "I": "uint32", "l": "int64", "L": "uint64",
              "Q": "uint64", "f": "float32", "e": "float16"}


def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


_fallbacks = [0]  # batches put in ordinary memory because the arena was full (a benign race)


def _alloc(nbytes):
    """An arena Buffer; ordinary memory (a bytearray) when the arena is full, with one warning.
    A full arena is not an error for a loader: the batch is the same, only not NUMA-local and
    page-locked. (Each allocating thread takes 64 MiB segments of the arena, and a batch kept
    alive keeps its segment, so many short-lived loader threads can exhaust a small arena.)"""
    try:
        return arena().alloc(max(nbytes, 1))
    except OutOfMemoryError as exc:
        _fallbacks[0] += 1
        if _fallbacks[0] == 1:
            warnings.warn("threadloom.DataLoader: the arena is full, batches go to ordinary "
                          "memory (raise THREADLOOM_ARENA_MB, use persistent_workers=True, or "
                          "free old batches): %s" % exc, ResourceWarning, stacklevel=2)
        return bytearray(max(nbytes, 1))


def arena_fallbacks():
    """How many batches went to ordinary memory because the arena was full."""
    return _fallbacks[0]


def _wrap(buf, fmt, shape):
    """The batch over arena Buffer `buf`: a torch tensor when torch is loaded, else a memoryview."""
    view = memoryview(buf)[:_nbytes(fmt, shape)].cast(fmt, shape)
    torch = _torch()
    if torch is not None and fmt in _NP_DTYPES:
        return torch.frombuffer(buf, dtype=getattr(torch, {"?": "bool"}.get(fmt, _NP_DTYPES[fmt])),
                                count=_count(shape)).view(*shape)
    return view


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(fmt, shape):
    return struct.calcsize(fmt) * _count(shape)


def _numbers(batch, fmt):
    n = len(batch)
    buf = _alloc(8 * n)
    raw = memoryview(buf)
    if fmt == "?":
        raw[:n] = bytes(batch)
    else:
        raw[:8 * n] = memoryview(array.array(fmt, batch)).cast("B")
    return _wrap(buf, fmt, (n,))


def _stack_buffers(views):
    first = views[0]
    fmt, shape, size = first.format, first.shape, first.nbytes
    for v in views:
        if v.format != fmt or v.shape != shape:
            return None
    buf = _alloc(size * len(views))
    raw = memoryview(buf)
    off = 0
    for v in views:
        raw[off:off + size] = v.cast("B") if v.c_contiguous else v.tobytes()
        off += size
    out_shape = (len(views),) + tuple(shape)
    if fmt not in _NP_DTYPES:  # a struct format memoryview cannot cast to: bytes of the items
        return raw[:size * len(views)].cast("B", (len(views), size))
    return _wrap(buf, fmt, out_shape)


def default_convert(data):
    """What a loader without auto-batching (batch_size=None) does to each sample: numpy arrays
    become torch tensors when torch is loaded; everything else is returned as it is."""
    torch, np = _torch(), _numpy()
    if torch is not None and np is not None and isinstance(data, np.ndarray):
        return torch.as_tensor(data)
    return data


def default_collate(batch):
    """Collates a list of samples into one batch (see the module docstring)."""
    elem = batch[0]
    t = type(elem)
    torch, np = _torch(), _numpy()
    if torch is not None and isinstance(elem, torch.Tensor):
        out = torch.empty((len(batch),) + tuple(elem.shape), dtype=elem.dtype)
        return torch.stack(batch, 0, out=out)
    if np is not None and isinstance(elem, np.ndarray):
        out = np.stack(batch)
        return torch.from_numpy(out) if torch is not None else out
    if t in _FORMATS and all(type(x) is t for x in batch):
        return _numbers(batch, _FORMATS[t])
    if isinstance(elem, (int, float)) and not isinstance(elem, bool) and \
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in batch):
        return _numbers([float(x) for x in batch], "d")
    if isinstance(elem, str):
        return batch
    if isinstance(elem, collections.abc.Mapping):
        try:
            return t({k: default_collate([d[k] for d in batch]) for k in elem})
        except TypeError:
            return {k: default_collate([d[k] for d in batch]) for k in elem}
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # namedtuple
        return t(*(default_collate(list(s)) for s in zip(*batch)))
    if isinstance(elem, (tuple, list)):
        n = len(elem)
        if any(len(x) != n for x in batch):
            raise RuntimeError("each element in list of batch should be of equal size")
        return [default_collate(list(s)) for s in zip(*batch)]
    try:
        views = [memoryview(x) for x in batch]
    except TypeError:
        raise TypeError("default_collate: batch must contain tensors, numpy arrays, numbers, "
                        "buffers, dicts or lists; found %s" % t) from None
    out = _stack_buffers(views)
    if out is None:  # unequal sizes: torch keeps bytes as a list
        if isinstance(elem, (bytes, bytearray)):
            return batch
        raise RuntimeError("default_collate: buffers in a batch must have the same format and "
                           "shape; got %s%s and others" % (views[0].format, views[0].shape))
    return out
