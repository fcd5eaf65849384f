"""The tensor leaves of a checkpoint's state, both ways: what is a tensor and how its bytes and
safetensors dtype are taken (save), and how a tensor's bytes come back as a memoryview or a
torch tensor (load).

Saved as tensors: memoryview (format and shape give dtype and shape), array.array,
bytes/bytearray and threadloom.Buffer (uint8, 1-D), numpy arrays, CPU torch tensors (every
dtype safetensors has: bfloat16 and bool included; non-contiguous ones are made contiguous on
the calling thread, requires_grad ones detached) and other CPU objects with ``__dlpack__``
(imported with threadloom.from_dlpack). Device state is device.py's (it calls tensor_leaf for
host tensors); a leaf of a device threadloom does not save raises device_error's
NotImplementedError.
"""

import struct
import sys

from threadloom import _core

# ---------------------------------------------------------------------------------------------
# dtypes: struct format characters and torch dtypes <-> safetensors dtype names
# ---------------------------------------------------------------------------------------------

_KINDS = {"b": "I", "h": "I", "i": "I", "l": "I", "q": "I", "n": "I",
          "B": "U", "H": "U", "I": "U", "L": "U", "Q": "U", "N": "U",
          "e": "F", "f": "F", "d": "F", "?": "BOOL"}
LOAD_FORMATS = {"I8": "b", "U8": "B", "I16": "h", "U16": "H", "I32": "i", "U32": "I",
                "I64": "q", "U64": "Q", "F16": "e", "F32": "f", "F64": "d", "BOOL": "?"}


def dtype_of(fmt):
    """safetensors dtype of a struct format ('<f' -> 'F32'), or None when unsupported."""
    if sys.byteorder != "little":
        return None
    if len(fmt) == 2 and fmt[0] in "@=<":
        fmt = fmt[1:]
    kind = _KINDS.get(fmt)
    if kind is None:
        return None
    if kind == "BOOL":
        return "BOOL"
    return "%s%d" % (kind, 8 * struct.calcsize(fmt))


# Every safetensors dtype -> its item size in bytes (what a loaded manifest may name).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# safetensors dtype -> torch dtype name (uint16/32/64: torch 2.3 and later; as_torch says so)
TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
                "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
FROM_TORCH = {"torch." + v: k for k, v in TORCH_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Saving: a leaf's bytes, dtype and shape
# ---------------------------------------------------------------------------------------------

class Tensor:
    """One tensor leaf on its way to disk: its bytes, where they go and their checksum."""

    __slots__ = ("key", "path", "source", "src", "dtype", "shape", "nbytes", "file", "begin",
                 "end", "hasher", "checksum", "device")

    def __init__(self, key, path, source, src, dtype, shape):
        self.key = key              # the safetensors name: the key path joined with "."
        self.path = path            # the key path, as a list of str/int
        self.source = source        # "memoryview", "bytes", "Buffer", ... (informational)
        self.src = src              # 1-D 'B' memoryview of the bytes, or a device.DeviceSource;
                                    # dropped once staged
        self.dtype = dtype
        self.shape = shape
        self.nbytes = len(src)
        self.file = None            # the writer's _File it is written to
        self.begin = self.end = 0   # data_offsets inside its file's data section
        self.hasher = _core.Hasher()
        self.checksum = None        # xxh3_64 once its last byte is hashed
        self.device = getattr(src, "device", None)  # a device leaf's Device (device.py), or None


def device_error(where, dev):
    """The error for a leaf on a device threadloom does not save."""
    return NotImplementedError(
        "state leaf %s lives on %s: threadloom saves host tensors, threadloom DeviceBuffers, "
        "CUDA tensors (torch, kDLCUDA DLPack) and sim device memory; copy it to the host first "
        "(e.g. t.cpu())" % (where, dev))


def torch_dtype(torch, t, where):
    """The safetensors dtype of torch tensor `t`; TypeError for sparse tensors and dtypes
    safetensors has not."""
    if t.layout != torch.strided:
        raise TypeError("state leaf %s is a %s torch tensor: only dense (strided) tensors can "
                        "be stored; convert it first (e.g. t.to_dense())" % (where, t.layout))
    dtype = FROM_TORCH.get(str(t.dtype))
    if dtype is None:
        raise TypeError("state leaf %s has torch dtype %s, which has no safetensors dtype "
                        "(supported: %s)" % (where, t.dtype, ", ".join(sorted(FROM_TORCH))))
    return dtype


def _torch_leaf(obj, where):
    """(source, flat, dtype, shape) when `obj` is a torch tensor, else None. torch's own DLPack
    export refuses what a state_dict holds (requires_grad, bool, non-contiguous in torch 1.13;
    bfloat16 has no buffer format), so the tensor is detached, made contiguous (a copy, on the
    calling thread, only when it is not), viewed as bytes and imported through DLPack: `flat`
    shares the tensor's memory (the staging copy reads it before save() returns)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu":
        raise device_error(where, "torch device %s" % obj.device)
    dtype = torch_dtype(torch, obj, where)
    shape = list(obj.shape)
    t = obj.detach().resolve_neg()  # a lazily negated view (torch._neg_view) becomes its values
    if not t.is_contiguous():
        t = t.contiguous()
    flat = _core.from_dlpack(t.reshape(-1).view(torch.uint8))
    return type(obj).__name__, flat, dtype, shape


def _as_tensor(obj, where):
    """(source, memoryview) when `obj` is a tensor leaf, else None. Raises for device tensors
    and for CPU DLPack objects threadloom cannot import."""
    source = None
    if isinstance(obj, _core.Buffer):
        source = "Buffer"
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        source = type(obj).__name__
    elif type(obj).__name__ == "array" and type(obj).__module__ == "array":
        source = "array"
    elif hasattr(obj, "__dlpack_device__"):
        dev = tuple(obj.__dlpack_device__())
        if dev[0] not in (1, 3):  # kDLCPU, kDLCUDAHost
            raise device_error(where, "DLPack device %r" % (dev,))
        source = type(obj).__name__
    if source is None:
        try:
            mv = memoryview(obj)
        except TypeError:
            return None
        source = type(obj).__name__
    else:
        try:
            mv = memoryview(obj)
        except TypeError:
            if not hasattr(obj, "__dlpack__"):
                raise TypeError("state leaf %s (%s) exports no buffer" % (
                    where, type(obj).__name__)) from None
            try:
                mv = _core.from_dlpack(obj)
            except (BufferError, TypeError, RuntimeError) as e:
                raise TypeError("state leaf %s (%s) is a CPU DLPack tensor threadloom cannot "
                                "import: %s" % (where, type(obj).__name__, e)) from e
    return source, mv


def tensor_leaf(obj, where):
    """(source, flat 1-D uint8 memoryview, dtype, shape) when `obj` is a tensor, else None."""
    got = _torch_leaf(obj, where)
    if got is not None:
        return got
    got = _as_tensor(obj, where)
    if got is None:
        return None
    source, mv = got
    if isinstance(obj, (bytes, bytearray)) or source == "Buffer":
        dtype, shape = "U8", [mv.nbytes]
    else:
        dtype = dtype_of(mv.format)
        if dtype is None:
            raise TypeError("state leaf %s has buffer format %r, which has no safetensors dtype "
                            "(supported: native little-endian b B h H i I l L q Q e f d ?)"
                            % (where, mv.format))
        shape = list(mv.shape)
    if mv.nbytes == 0:
        flat = memoryview(b"")  # memoryview cannot cast a view with a zero in its shape
    elif mv.c_contiguous:
        flat = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    else:
        flat = memoryview(mv.tobytes())  # a C-order copy, made now on the calling thread
    return source, flat, dtype, shape


# ---------------------------------------------------------------------------------------------
# Loading: a tensor's bytes as a memoryview or a torch tensor
# ---------------------------------------------------------------------------------------------

def as_loaded(buf, dtype, shape):
    """A loaded tensor's bytes as a memoryview of its format and shape (uint8 1-D ones as the
    bytearray itself; BF16 and F8, which have no struct format, as raw bytes)."""
    fmt = LOAD_FORMATS.get(dtype)
    if fmt == "B" and len(shape) == 1:
        return buf
    if fmt is None:  # BF16, F8: no struct format; the raw bytes
        return memoryview(buf)
    try:
        if 0 in shape:
            return memoryview(buf).cast(fmt)
        return memoryview(buf).cast(fmt, shape)
    except ValueError:  # F16 before Python 3.12: memoryview cannot cast to 'e'; the raw bytes
        return memoryview(buf)


def as_torch(buf, dtype, shape, key):
    """A CPU torch tensor over `buf` (no copy: torch.frombuffer keeps the bytearray alive)."""
    import torch
    tdtype = getattr(torch, TORCH_DTYPES.get(dtype, ""), None)
    if tdtype is None:
        raise TypeError("tensor %r has dtype %s, which torch %s has no dtype for; load without "
                        "framework='torch' to get it as a memoryview"
                        % (key, dtype, torch.__version__))
    if len(buf) == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(buf, dtype=tdtype).reshape(shape)
