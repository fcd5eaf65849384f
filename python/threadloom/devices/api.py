"""threadloom.devices.api: backend selection, devices, streams, device memory (the names
threadloom.devices re-exports; see its docstring). The feeder (devices/feeder.py) builds on it."""

import sys
import threading

from threadloom import _core, errors
from threadloom._core import BusyError, DeviceBuffer, Error, Event, StagingPool, StagingSlot  # noqa: F401

Device = _core.Device

__all__ = ["Device", "DeviceBuffer", "Event", "StagingPool", "StagingSlot", "Stream",
           "backend", "configure_sim", "current_stream", "default_stream", "device", "empty", "from_dlpack",
           "select", "sim_buffer", "stream", "synchronize"]


def select(spec):
    """Selects the backend before first use: "cuda", "none" or "sim:N[,option=value...]"
    (options: h2d, d2h, pageable, d2d bandwidths like 25GB/s; mem=16GiB; cost=0 for devices
    whose operations are free; launch=1us, the CPU time each kernel/copy/memset submission
    costs its thread; spin=50us; poison=0). BusyError once another backend is in
    use; the same spec again is accepted."""
    _core.devices_select(spec)


def configure_sim(spec):
    """Configures the sim devices ("sim:N[,option=value...]") without selecting sim as the
    backend: devices("sim") then lists them next to the selected backend's. Once per process
    (the same spec again is accepted; BusyError for another)."""
    _core.sim_configure(spec)


def backend():
    """The selected backend (selecting the default now if nothing chose one):
    {"name": "cuda"|"sim"|"none", "count": n, "why": "THREADLOOM_DEVICES=sim:8"}."""
    return _core.devices_backend()


def devices(kind=None):
    """The devices of the selected backend, or of `kind` ("cuda", "sim"), as Device objects:
    index, kind, name, memory (bytes), numa_node, local_cpus (the CPU numbers of that node),
    pci_bus_id, compute_capability. [] for the none backend."""
    if backend()["name"] == "none" and kind is None:   # selects the default first, so
        return []                                       # THREADLOOM_DEVICES applies to kinds too
    return [_core.device(kind, i) for i in range(_core.device_count(kind))]


def device(spec=None):
    """A Device: "sim:3", "cuda:0", an index into devices(), a Device (returned as is), or None
    (the first device of the selected backend)."""
    if isinstance(spec, Device):
        return spec
    backend()    # the default selection first (THREADLOOM_DEVICES=sim:N), as devices() does
    if spec is None:
        return _core.device(None, 0)
    if isinstance(spec, int):
        return _core.device(None, spec)
    if isinstance(spec, str):
        kind, _, idx = spec.partition(":")
        if kind in ("cuda", "sim"):
            try:
                return _core.device(kind, int(idx or 0))
            except ValueError:
                pass
    raise ValueError("device must be 'cuda:N', 'sim:N', an int or a Device, not %r" % (spec,))


# -- streams: the calling thread's current stream per device ------------------------------------

_tls = threading.local()


def _state():
    st = getattr(_tls, "st", None)
    if st is None:
        st = _tls.st = {"current": {}, "default": {}}
    return st


class Stream(_core.Stream):
    """Stream(device, priority=0): an in-order queue of work on `device`, from the calling
    thread's pool (given back when the object dies). As torch.cuda.Stream: ``with s:`` makes it
    this thread's current stream for its device (what :func:`empty` and the feeder's consumer
    side use); launch(), copy(), memset(), alloc(), record_event(), wait_event(),
    wait_stream(), query(), synchronize(timeout=None), callback(fn); .handle / .cuda_stream is
    the backend's handle (a cudaStream_t on cuda)."""

    def __new__(cls, device=None, priority=0):
        return super().__new__(cls, globals()["device"](device), priority)

    def __init__(self, device=None, priority=0):
        pass

    def __enter__(self):
        cur = _state()["current"]
        stack = cur.setdefault(self.device, [])
        stack.append(self)
        return self

    def __exit__(self, *exc):
        stack = _state()["current"].get(self.device)
        if stack and stack[-1] is self:
            stack.pop()
        return False


def default_stream(dev=None):
    """The calling thread's own default stream for a device (one per thread and device, made on
    first use): threads never share it, unlike CUDA's legacy default stream."""
    d = device(dev)
    defaults = _state()["default"]
    s = defaults.get(d)
    if s is None:
        s = defaults[d] = Stream(d)
    return s


def current_stream(dev=None):
    """The calling thread's current stream for a device: the innermost ``with stream:`` on it,
    else its default_stream()."""
    d = device(dev)
    stack = _state()["current"].get(d)
    return stack[-1] if stack else default_stream(d)


class stream:
    """with threadloom.devices.stream(s): ... (torch.cuda.stream): s is the current stream of
    its device on this thread inside the block. stream(None) does nothing."""

    def __init__(self, s):
        self._s = s

    def __enter__(self):
        if self._s is not None:
            self._s.__enter__()
        return self._s

    def __exit__(self, *exc):
        if self._s is not None:
            self._s.__exit__(*exc)
        return False


def empty(nbytes, device=None, stream=None):
    """Device memory of `nbytes` from the device's caching allocator, for use on `stream`
    (default: the current stream of `device`, default: the first device)."""
    s = stream if stream is not None else current_stream(device)
    return s.alloc(nbytes)


def synchronize(dev=None):
    """Waits for all work queued on a device (default: every device of the selected
    backend that was used)."""
    if dev is not None:
        device(dev).synchronize()
        return
    for d in devices():
        d.synchronize()


def from_dlpack(obj, stream=None):
    """A DeviceBuffer over device memory, in place, keeping `obj` alive: a CUDA tensor (torch,
    cupy; kDLCUDA), whose producer orders its pending work before `stream` (default: the current
    stream of the tensor's device); or a host view of a sim device's memory (a torch tensor over
    a sim DeviceBuffer, which sim exports as kDLCPU: DataLoader(device="sim:N") batches), which
    becomes a buffer of that sim device again. Other host memory raises InvalidArgumentError:
    copy it with Stream.copy, or use threadloom.from_dlpack for host memory."""
    if not hasattr(obj, "__dlpack_device__"):  # a bytes-like object
        return _sim_or_raise(obj, obj, "host memory")
    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type in (1, 3):  # kDLCPU, kDLCUDAHost
        return _sim_or_raise(obj, None, "on DLPack device (%d, %d), not in a sim device's "
                             "memory" % (dev_type, dev_id))
    if stream is None:
        if dev_type != 2:
            raise _not_device(obj, "on DLPack device (%d, %d)" % (dev_type, dev_id))
        stream = current_stream(device("cuda:%d" % dev_id))
    return _core.import_dlpack(obj, stream)


def sim_buffer(obj):
    """The sim device memory `obj` (a bytes-like object, or a CPU DLPack tensor) lies in, as a
    DeviceBuffer of that sim device over exactly obj's bytes, or None when it is other memory.
    Cheap: one lookup in the sim devices' block maps."""
    if hasattr(obj, "__dlpack_device__") and not _is_buffer(obj):
        if tuple(obj.__dlpack_device__())[0] not in (1, 3):
            return None
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            if not obj.is_contiguous():
                return None
            # as bytes: torch exports neither bfloat16 nor (1.13) bool through DLPack buffers
            obj = obj.detach().reshape(-1).view(torch.uint8)
        view = _core.from_dlpack(obj)
    else:
        view = obj
    return _core.import_sim(view)


def _is_buffer(obj):
    try:
        memoryview(obj).release()
        return True
    except TypeError:
        return False


def _sim_or_raise(obj, view, what):
    buf = sim_buffer(obj if view is None else view)
    if buf is None:
        raise _not_device(obj, what)
    return buf


def _not_device(obj, what):
    return errors.error("EINVAL", "devices.from_dlpack takes device memory: CUDA tensors "
                        "(kDLCUDA), or host views of a sim device's memory; this %s is %s"
                        % (type(obj).__name__, what),
                        hint="copy host tensors with Stream.copy, or use threadloom.from_dlpack "
                             "for host memory")
