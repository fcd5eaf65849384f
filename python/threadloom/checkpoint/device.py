"""Device state in checkpoints: the D2H snapshot a save takes, and tensors back on a device on
load.

A state leaf is device state when it is a threadloom DeviceBuffer, a torch CUDA tensor (or
another kDLCUDA DLPack tensor with a numpy-style dtype and shape, e.g. cupy's), or a host view
of a sim device's memory (a torch tensor over a sim DeviceBuffer: the batches of
DataLoader(device="sim:N"), the tensors of load(device="sim:N", framework="torch")). Its bytes
are then copied device-to-host by the save, never read by the CPU:

1. At save(), on the calling thread (Snapshot): per device, a side stream of that thread is
   made to wait for the caller's current stream of the device (threadloom.devices.
   current_stream), and torch tensors are imported onto it (DLPack's handshake makes it wait
   for torch's current stream too). Work the caller queued before save() is in the snapshot.
2. The save's files are laid out per device (writer.py), and each chunk of a device's file is
   staged in a pinned slot of that device (staging.Staging: a StagingPool per device,
   NUMA-local to it, counted in the same budget) by D2H copies on the side stream; each copy
   records the slot's event. Host bytes in the same chunk (the safetensors header) are copied
   by the CPU as before.
3. When everything is queued (Snapshot.finish), the caller's streams wait for the side stream's
   last copy, so work the caller queues after save() (an optimizer's in-place update) cannot
   change bytes still being copied; save() returns then: the copies are ordered, not done. Host
   views of sim memory can be written by host code at any moment, so for them save() waits
   until their copies completed.
4. The writers wait for each slot's event before they hash and write it (the writers' threads
   block there, the training thread does not); a failed copy or a lost device fails the save
   with that error, and the previous checkpoint stays as it was.

DeviceBuffers keep no dtype: they are saved as U8 of their size. Torch tensors keep theirs.
"""

import sys

from threadloom.checkpoint.leaves import (TORCH_DTYPES, as_torch, device_error, dtype_of,
                                         tensor_leaf, torch_dtype)
from threadloom.devices import api as devices

__all__ = ["DeviceSource", "Snapshot", "leaf", "to_device"]


def _torch():
    return sys.modules.get("torch")


class DeviceSource:
    """A device leaf's bytes: `buf` (a DeviceBuffer of `device`, set at once for DeviceBuffers
    and sim views, by Snapshot for torch and DLPack tensors, which are imported onto the side
    stream), `obj` (what is imported), `torch_index` (the CUDA index of a torch tensor, whose
    current stream is the caller's too) and `host_view` (sim memory the host may write)."""

    __slots__ = ("device", "buf", "obj", "nbytes", "torch_index", "host_view")

    def __init__(self, device, nbytes, buf=None, obj=None, torch_index=None, host_view=False):
        self.device, self.nbytes, self.buf, self.obj = device, nbytes, buf, obj
        self.torch_index, self.host_view = torch_index, host_view

    def __len__(self):
        return self.nbytes


def leaf(obj, where):
    """(source, src, dtype, shape) when `obj` is a tensor, else None: src is a DeviceSource for
    device state, a 1-D uint8 memoryview for host tensors (leaves.tensor_leaf). Raises for
    tensors of devices threadloom does not save (torch's meta, mps, ...)."""
    if isinstance(obj, devices.DeviceBuffer):
        return "DeviceBuffer", DeviceSource(obj.device, obj.nbytes, buf=obj), "U8", [obj.nbytes]
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
        return _torch_leaf(torch, obj, where)
    if not isinstance(obj, (bytes, bytearray, memoryview)) and hasattr(obj, "__dlpack_device__") \
            and not (torch is not None and isinstance(obj, torch.Tensor)):
        kind = tuple(obj.__dlpack_device__())[0]
        if kind == 2:  # kDLCUDA
            return _dlpack_leaf(obj, where)
        if kind not in (1, 3):  # kDLCPU, kDLCUDAHost: host tensors below
            raise _unsupported(where, "DLPack device %r" % (tuple(obj.__dlpack_device__()),))
    got = tensor_leaf(obj, where)
    if got is None:
        return None
    source, flat, dtype, shape = got
    if flat.nbytes:
        buf = devices.sim_buffer(flat)
        if buf is not None:  # a host view of sim device memory: device state
            return source, DeviceSource(buf.device, flat.nbytes, buf=buf, host_view=True), \
                dtype, shape
    return got


_unsupported = device_error


def _torch_leaf(torch, t, where):
    if t.device.type != "cuda":
        raise _unsupported(where, "torch device %s" % t.device)
    dtype = torch_dtype(torch, t, where)
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    dev = devices.device("cuda:%d" % index)
    return type(t).__name__, DeviceSource(dev, t.numel() * t.element_size(), obj=t,
                                          torch_index=index), dtype, list(t.shape)


def _dlpack_leaf(obj, where):
    dt = getattr(getattr(obj, "dtype", None), "char", None)
    shape = getattr(obj, "shape", None)
    dtype = dtype_of(dt) if isinstance(dt, str) else None
    if dtype is None or shape is None:
        raise TypeError("state leaf %s (%s) is a CUDA DLPack tensor without a numpy-style dtype "
                        "and shape threadloom can store; pass a torch tensor or a threadloom "
                        "DeviceBuffer" % (where, type(obj).__name__))
    itemsize = int(getattr(obj.dtype, "itemsize", 0))
    n = itemsize
    for d in shape:
        n *= int(d)
    dev_id = tuple(obj.__dlpack_device__())[1]
    return type(obj).__name__, DeviceSource(devices.device("cuda:%d" % dev_id), n, obj=obj), \
        dtype, [int(d) for d in shape]


class Snapshot:
    """The device side of one save (the calling thread only): side streams, their waits, the
    D2H copies into staging slots, and the waits back (see the module docstring)."""

    def __init__(self, tensors):
        self.sides = {}        # Device -> the side Stream of this save
        self.torch = set()     # (Device, CUDA index) of torch tensors: torch's stream waits too
        self.host_view = set()  # Devices with host views: save() waits for their copies
        torch = None
        for t in tensors:
            src = t.src
            if not isinstance(src, DeviceSource):
                continue
            side = self._side(src.device)
            if src.host_view:
                self.host_view.add(src.device)
            if src.buf is not None or src.nbytes == 0:
                continue
            obj = src.obj
            if src.torch_index is not None:
                torch = torch or _torch()
                self.torch.add((src.device, src.torch_index))
                x = obj.detach()
                if not x.is_contiguous():
                    x = x.contiguous()  # a kernel on torch's current stream, before the import
                obj = x.reshape(-1).view(torch.uint8)
            # the producer (torch) orders its queued work before the side stream
            src.buf = devices.from_dlpack(obj, stream=side)
            src.obj = None

    def _side(self, dev):
        side = self.sides.get(dev)
        if side is None:
            side = self.sides[dev] = devices.Stream(dev)
            side.wait_stream(devices.current_stream(dev))
        return side

    def copy(self, src, pos, n, slot, offset):
        """Queues the D2H copy of src's bytes [pos, pos+n) into the staging slot (a device
        slot of Staging) at `offset`; the copy records the slot's event."""
        buf = src.buf if pos == 0 and n == src.buf.nbytes else src.buf.view(pos, n)
        slot[0].copy_from_device(buf, self.sides[src.device], n, offset)

    def finish(self):
        """After the last copy is queued: the caller's streams wait for the copies; host views
        are waited for here."""
        for dev, side in self.sides.items():
            done = side.record_event()
            done.wait(devices.current_stream(dev))
            for d, index in self.torch:
                if d == dev:
                    done.wait(_torch().cuda.current_stream(index).cuda_stream)
            if dev in self.host_view:
                done.synchronize()


def to_device(buf, dtype, shape, key, dev, framework):
    """A loaded tensor (`buf`: its verified bytes, a bytearray) on device `dev`. framework None:
    a DeviceBuffer of its bytes, copied on the calling thread's current stream of the device
    (later work there is ordered after the copy; the bytearray is held until it is done).
    "torch": a tensor of its dtype and shape: on cuda by torch's own copy, on sim a CPU tensor
    over the sim device's memory (this thread waits for the copy, as host readers must)."""
    if framework == "torch" and dev.kind == "cuda":
        return as_torch(buf, dtype, shape, key).to("cuda:%d" % dev.index)
    s = devices.current_stream(dev)
    n = len(buf)
    dbuf = s.alloc(max(n, 1))
    if n:
        s.copy(dbuf, buf, n)
    if framework != "torch":
        return dbuf if n == dbuf.nbytes else dbuf.view(0, n)
    torch = _torch()
    name = TORCH_DTYPES.get(dtype)
    if name is None or n == 0:  # a clear TypeError, or an empty tensor
        return as_torch(buf, dtype, shape, key)
    whole = torch.from_dlpack(dbuf)
    return whole[:n].view(getattr(torch, name)).reshape(shape)
