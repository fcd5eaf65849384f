"""default_collate: a list of samples -> one batch, as torch's default_collate.

Runs on the loader thread that built the batch. Numbers and buffers are written straight into
that thread's heap of its NUMA node's arena (threadloom.arena(); page-locked when a GPU is
present), so pin_memory=True has nothing left to do for them.

    bool / int / float (all one type) -> one arena Buffer, format '?' / 'q' / 'd', shape (B,)
    mixed numbers                 -> torch's rule: torch.tensor(batch) after an int or bool
                                     (int + float: torch's default float dtype), float64 after
                                     a float; without torch, float64 if any is a float
    str, bytes                    -> the batch itself, a list (torch's rule, whatever the lengths)
    dict / Mapping                -> the same type of collated values
    namedtuple                    -> the same type; tuple -> list of collated fields; list and
                                     other sequences -> their type (torch's rule). A field is
                                     collated from a tuple, as torch's zip gives it, so strings
                                     inside a tuple or list come back as a tuple, as in torch
    torch.Tensor / numpy.ndarray  -> stacked with torch.stack / numpy.stack (a tensor when torch
                                     is loaded); numpy scalars -> torch.as_tensor(batch)
    equal-size buffers (bytearray, memoryview, array.array, Buffer, ...)
                                  -> one arena Buffer, shape (B, *item_shape), the items' format.
                                     torch has no rule for buffers (it collates them as
                                     sequences of ints): a threadloom extension.
With torch loaded, arena batches come back as torch tensors over the arena memory
(torch.frombuffer), so every leaf has torch's type and dtype (tests/torch checks each case);
without torch as memoryviews, which numpy.asarray / torch.frombuffer take without a copy.

Inside ``with collate_into(buffer):`` (a DataLoader with device= around each batch, with a
page-locked staging slot of the GPU feeder) the numbers, buffers and stacked tensors/arrays of
the batches this thread collates are written straight into `buffer`, each leaf at its own
aligned offset, while it has room (then the arena, as above): the batch is then already in
pinned memory in the layout the copy to the device takes, with no copy in between.
"""

import array
import collections.abc
import contextlib
import re
import struct
import sys
import threading
import warnings

from threadloom._core import OutOfMemoryError
from threadloom.memory import arena

__all__ = ["collate_into", "default_collate", "default_convert"]

_FORMATS = {bool: "?", int: "q", float: "d"}
_STR_OBJ = re.compile(r"[SaUO]")  # numpy dtypes of strings or objects: torch cannot hold them
_ERR = ("default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; "
        "found %s")
_NP_DTYPES = {"?": "bool", "q": "int64", "d": "float64", "B": "uint8", "b": "int8", "h": "int16",
              "H": "uint16", "i": "int32", "I": "uint32", "l": "int64", "L": "uint64",
              "Q": "uint64", "f": "float32", "e": "float16"}


def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


_fallbacks = [0]  # batches put in ordinary memory because the arena was full (a benign race)


_into = threading.local()  # this thread's collate_into target: .buffer, .offset, .align


@contextlib.contextmanager
def collate_into(buffer, align=256):
    """Within the block, this thread's default_collate writes each leaf it allocates into
    `buffer` (a writable bytes-like object, e.g. a StagingSlot) at the next multiple of `align`,
    while it fits; what does not fit goes to the arena as usual. Yields a list whose [0] is the
    bytes used so far (updated as leaves are placed). Each leaf is a view of a slice of
    `buffer` made on this thread: the buffer's exports end when the batch's leaves are dropped.
    Not reentrant (an inner block replaces the outer one until it ends)."""
    prev = getattr(_into, "state", None)
    state = _into.state = [0, buffer, align]
    try:
        yield state
    finally:
        _into.state = prev


def _alloc(nbytes):
    """A block for a leaf: a slice of the collate_into buffer when one is set and has room;
    else an arena Buffer; ordinary memory (a bytearray) when the arena is full, with one warning.
    A full arena is not an error for a loader: the batch is the same, only not NUMA-local and
    page-locked. (Each allocating thread takes 64 MiB segments of the arena, and a batch kept
    alive keeps its segment, so many short-lived loader threads can exhaust a small arena.)"""
    block = _take_into(nbytes)
    if block is not None:
        return block
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


def _take_into(nbytes):
    """The next `nbytes` of this thread's collate_into buffer (a memoryview slice), or None when
    no buffer is set or it has no room left."""
    st = getattr(_into, "state", None)
    if st is None:
        return None
    used, buf, align = st
    off = (used + align - 1) // align * align
    if off + nbytes > len(buf):
        return None
    st[0] = off + nbytes
    return memoryview(buf)[off:off + nbytes]


def _into_block(nbytes, ok=True):
    """A slice of this thread's collate_into buffer for a stacked tensor/array of `nbytes`, or
    None (no target, no room, or not `ok`: e.g. a CUDA tensor, or arrays numpy.stack would
    promote to another dtype). Empty results get None: frombuffer refuses empty buffers."""
    if not ok or nbytes == 0:
        return None
    return _take_into(nbytes)


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
    """What a loader without auto-batching (batch_size=None) does to each sample, as torch's
    default_convert: numpy arrays and scalars become torch tensors when torch is loaded (not
    arrays of str or objects), inside dicts, namedtuples, tuples (which become lists, torch's
    rule) and other sequences; everything else is returned as it is."""
    torch = _torch()
    t = type(data)
    if torch is not None and isinstance(data, torch.Tensor):
        return data
    if t.__module__ == "numpy" and t.__name__ not in ("str_", "string_", "bytes_"):
        if torch is None or (t.__name__ == "ndarray" and _STR_OBJ.search(data.dtype.str)):
            return data
        return torch.as_tensor(data)
    if isinstance(data, collections.abc.Mapping):
        try:
            return t({k: default_convert(data[k]) for k in data})
        except TypeError:
            return {k: default_convert(data[k]) for k in data}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return t(*(default_convert(d) for d in data))
    if isinstance(data, tuple):
        return [default_convert(d) for d in data]
    if isinstance(data, collections.abc.Sequence) and not isinstance(data, (str, bytes)):
        try:
            return t([default_convert(d) for d in data])
        except TypeError:
            return [default_convert(d) for d in data]
    return data


def _numbers_batch(batch, elem, torch):
    """A batch of Python numbers (elem is its first): one arena buffer when they all have
    elem's type (bool, int or float: format '?', 'q' or 'd'). Mixed, torch's rule when torch is
    loaded: torch.tensor(batch) after an int or bool (so int + float gives torch's default
    float dtype), float64 after a float; without torch, float64 if any is a float, else int64."""
    t = type(elem)
    if t in _FORMATS and all(type(x) is t for x in batch):
        return _numbers(batch, _FORMATS[t])
    if torch is not None:
        if isinstance(elem, float):
            return torch.tensor(batch, dtype=torch.float64)
        return torch.tensor(batch)
    if not all(isinstance(x, (int, float)) for x in batch):
        raise TypeError("default_collate: a batch of numbers holds %s" % sorted(
            {type(x).__name__ for x in batch}))
    if any(isinstance(x, float) for x in batch):
        return _numbers([float(x) for x in batch], "d")
    return _numbers([int(x) for x in batch], "q")


def _sequences(batch, elem, t):
    """torch's rule for a batch of sequences: each position collated across the batch (the
    positions are tuples, as torch's zip gives them); tuples give a list, other sequences their
    own type where it takes a list."""
    n = len(elem)
    if any(len(x) != n for x in batch):
        raise RuntimeError("each element in list of batch should be of equal size")
    fields = [default_collate(s) for s in zip(*batch)]
    if isinstance(elem, tuple):
        return fields
    try:
        return t(fields)
    except TypeError:
        return fields


def default_collate(batch):
    """Collates a list of samples into one batch (see the module docstring)."""
    elem = batch[0]
    t = type(elem)
    torch, np = _torch(), _numpy()
    if torch is not None and isinstance(elem, torch.Tensor):
        shape = (len(batch),) + tuple(elem.shape)
        into = _into_block(elem.element_size() * _count(shape), elem.is_cpu)
        if into is not None:
            out = torch.frombuffer(into, dtype=elem.dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=elem.dtype)
        return torch.stack(batch, 0, out=out)
    if np is not None and isinstance(elem, np.ndarray):
        if _STR_OBJ.search(elem.dtype.str):
            raise TypeError(_ERR % elem.dtype)
        shape = (len(batch),) + elem.shape
        into = _into_block(elem.dtype.itemsize * _count(shape), all(
            isinstance(x, np.ndarray) and x.dtype == elem.dtype and x.shape == elem.shape
            for x in batch))
        if into is not None:
            out = np.stack(batch, out=np.frombuffer(into, dtype=elem.dtype).reshape(shape))
        else:
            out = np.stack(batch)
        return torch.from_numpy(out) if torch is not None else out
    if torch is not None and np is not None and isinstance(elem, (np.bool_, np.number, np.object_)):
        return torch.as_tensor(batch)
    if isinstance(elem, (int, float)):  # bool too: an int, as torch treats it
        return _numbers_batch(batch, elem, torch)
    if isinstance(elem, (str, bytes)):  # as torch: the batch itself, even equal-length bytes
        return batch
    if isinstance(elem, collections.abc.Mapping):
        try:
            return t({k: default_collate([d[k] for d in batch]) for k in elem})
        except TypeError:
            return {k: default_collate([d[k] for d in batch]) for k in elem}
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # namedtuple
        return t(*(default_collate(s) for s in zip(*batch)))
    if isinstance(elem, (tuple, list)):
        return _sequences(batch, elem, t)
    try:
        views = [memoryview(x) for x in batch]
    except TypeError:
        if isinstance(elem, collections.abc.Sequence):
            return _sequences(batch, elem, t)
        raise TypeError(_ERR % t) from None
    out = _stack_buffers(views)
    if out is None:
        raise RuntimeError("default_collate: buffers in a batch must have the same format and "
                           "shape; got %s%s and others" % (views[0].format, views[0].shape))
    return out
