"""threadloom.devices: devices, streams, events and device memory, in torch.cuda's vocabulary.

    import threadloom
    for d in threadloom.devices():              # the selected backend's devices
        print(d, d.name, d.memory, d.numa_node, d.local_cpus)
    dev = threadloom.devices()[0]
    s = threadloom.devices.Stream(dev)          # from the calling thread's pool
    with s:                                      # this thread's current stream on dev
        buf = threadloom.devices.empty(1 << 20)  # device memory, stream-ordered (caching)
        s.copy(buf, host_bytes)                  # H2D; the host object is held until done
        ev = s.record_event()
    other.wait_event(ev)                         # other's later work waits; no host blocking

One API over three backends: ``cuda`` (real GPUs), ``sim`` (simulated devices in this process,
for CI and laptops: device memory is host memory, engines take modelled time) and ``none``.
``THREADLOOM_DEVICES=sim:8`` (options after the count: ``sim:8,h2d=25GB/s``), ``=cuda`` or
``=none`` chooses, or :func:`select` before first use; by default cuda where a driver and a GPU
are present, else none. :func:`backend` says which and why.

``threadloom.devices()`` (this module is callable) lists the devices; ``devices("sim")`` and
``devices("cuda")`` list one kind whatever the selection, so one process can use both. Every
object here may be used from many threads at once; streams come from per-thread pools, so
threads submitting work share no lock.

DLPack: ``DeviceBuffer.__dlpack__(stream=)`` exports cuda buffers as kDLCUDA (the consumer's
stream waits for the buffer's work) and sim buffers as kDLCPU (host memory: numpy and torch
read it after the calling thread waited), so ``numpy.from_dlpack(buf)`` works on sim and
``torch.from_dlpack(buf)`` on both. :func:`from_dlpack` takes a CUDA tensor (torch, cupy) in
place as a DeviceBuffer.

The GPU feeder (host batches to device batches, on a copy stream, handed over with an event)
is :class:`threadloom.devices.feeder.Feeder`.
"""

import sys
import types

from threadloom.devices.api import *  # noqa: F401,F403  (the public names, listed in api.__all__)
from threadloom.devices.api import BusyError, Error, devices  # noqa: F401
from threadloom.devices.feeder import Feeder  # noqa: F401

__all__ = ["Device", "DeviceBuffer", "Event", "Feeder", "StagingPool", "StagingSlot", "Stream",
           "backend", "configure_sim", "current_stream", "default_stream", "device", "empty",
           "from_dlpack", "select", "sim_buffer", "stream", "synchronize"]


class _Module(types.ModuleType):
    """threadloom.devices is also callable: threadloom.devices() lists the devices."""

    def __call__(self, kind=None):
        return devices(kind)


sys.modules[__name__].__class__ = _Module
