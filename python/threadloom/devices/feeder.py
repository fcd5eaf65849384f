"""The GPU feeder: host batches in, device batches out, the copies on a copy stream.

    feeder = Feeder("sim:0", slot_bytes=16 << 20)

    # as a stage of a threadloom.Pipeline (the stage's thread copies; Pipeline(pin=True) pins it)
    pipe = threadloom.Pipeline(paths, pin=True).map(load, workers=8).map(feeder, workers=2)
    for batch in pipe:
        x = batch.wait()          # the current stream waits for the copy; this thread does not
        ...

    # over any iterable, on a thread of its own pinned to the device's cores
    for batch in feeder.iter(host_batches):
        ...

    # producers that write straight into pinned staging (no host copy at all)
    slot = feeder.stage()          # a page-locked slot on the device's NUMA node
    memoryview(slot)[:n] = ...     # fill it (release the memoryview)
    batch = feeder.submit(slot, n)

How: a batch (a bytes-like object, or a list/tuple/dict nesting them) is packed into one slot
of a StagingPool (page-locked, NUMA-local to the device; 256-byte aligned leaves), copied to
one DeviceBuffer with one H2D copy on the calling thread's copy stream (a high-priority stream
per thread, so feeder threads share no lock), and an event is recorded after it. The slot goes
back to the pool at once; the pool hands it out again only after that copy completed (the slot
cannot be overwritten under the copy). The DeviceBatch carries the device buffers (views of
one allocation, in the batch's structure) and the event: ``batch.wait(stream)`` makes the
consumer's stream wait for the copy (``cudaStreamWaitEvent``) and declares the buffer's use on
that stream, so the consumer's thread never blocks on the copy and the memory is not reused
before the consumer's work. On sim devices, reading a buffer from the host
(``numpy.from_dlpack``) waits for the copy first.
"""

import queue
import threading

from threadloom import _core
from threadloom.devices import api as devices

_ALIGN = 256


def _leaves(batch, out, path):
    """Flattens batch into out: (path, memoryview as bytes). Returns the structure with
    indices in place of leaves."""
    if isinstance(batch, dict):
        return {k: _leaves(v, out, path + (k,)) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [_leaves(v, out, path + (i,)) for i, v in enumerate(batch)]
        return type(batch)(items) if isinstance(batch, list) else tuple(items)
    try:
        mv = memoryview(batch)
    except TypeError:
        raise TypeError("a feeder batch is a bytes-like object (bytes, bytearray, numpy array, "
                        "threadloom Buffer) or a list/tuple/dict of them; %s at %r is not"
                        % (type(batch).__name__, path)) from None
    if not mv.c_contiguous:
        raise ValueError("the array at %r is not C-contiguous: make it contiguous first "
                         "(numpy.ascontiguousarray)" % (path,))
    out.append(mv)
    return _Leaf(len(out) - 1, mv.format, mv.shape, mv.nbytes)


class _Leaf:
    __slots__ = ("i", "format", "shape", "nbytes")

    def __init__(self, i, fmt, shape, nbytes):
        self.i, self.format, self.shape, self.nbytes = i, fmt, shape, nbytes


def _fill(structure, views):
    if isinstance(structure, dict):
        return {k: _fill(v, views) for k, v in structure.items()}
    if isinstance(structure, list):
        return [_fill(v, views) for v in structure]
    if isinstance(structure, tuple):
        return tuple(_fill(v, views) for v in structure)
    return views[structure.i]


class DeviceBatch:
    """A batch on a device: ``data`` (the host batch's structure with a DeviceBuffer per leaf,
    views of ``buffer``), ``layout`` ((offset, nbytes, format, shape) per leaf, in order),
    ``event`` (recorded after the copy) and ``device``."""

    __slots__ = ("data", "buffer", "event", "device", "layout")

    def __init__(self, data, buffer, event, device, layout):
        self.data, self.buffer, self.event = data, buffer, event
        self.device, self.layout = device, layout

    def wait(self, stream=None):
        """Makes `stream` (default: the calling thread's current stream of the device) wait for
        the copy, without blocking this thread, and declares the buffer's use there. Returns
        ``data``."""
        s = stream if stream is not None else devices.current_stream(self.device)
        self.event.wait(s)
        self.buffer.record_stream(s)
        return self.data

    def synchronize(self, timeout=None):
        """Blocks this thread until the copy completed (for host readers). Returns ``data``."""
        self.event.synchronize(timeout)
        return self.data

    def __repr__(self):
        return "<DeviceBatch %d bytes on %s>" % (self.buffer.nbytes, self.device)


class Feeder:
    """Feeder(device=None, *, slot_bytes, slots=4, priority=None, numa_node=-1, timeout=None).

    Copies host batches of at most `slot_bytes` (leaves packed 256-byte aligned) to `device`
    through `slots` page-locked staging slots. priority: the copy streams' priority (default:
    the device's most urgent, so copies are not queued behind compute). timeout: seconds to wait
    for a free slot (None: as long as it takes). Callable (``feeder(batch)``, one per Pipeline
    item), iterable over a source (``feeder.iter(source)``), or fed by producers that fill slots
    themselves (``stage()`` / ``submit()``). Thread-safe: any number of threads may feed one
    Feeder; each uses its own copy stream.
    """

    def __init__(self, device=None, *, slot_bytes, slots=4, priority=None, numa_node=-1,
                 timeout=None):
        self.device = devices.device(device)
        self.slot_bytes = int(slot_bytes)
        self.pool = _core.StagingPool(self.device, self.slot_bytes, slots, numa_node)
        self.priority = self.device.priority_range[1] if priority is None else priority
        self.timeout = timeout
        self.slots = slots
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._counters = []  # one [batches, bytes] per feeding thread, summed in stats()

    def _stream(self):
        s = getattr(self._tls, "stream", None)
        if s is None:
            s = self._tls.stream = devices.Stream(self.device, self.priority)
            c = self._tls.counter = [0, 0]  # batches, bytes: written by this thread only
            with self._lock:
                self._counters.append(c)
        return s

    def stage(self, timeout=None):
        """A free staging slot (waiting for one as long as `timeout`, default the Feeder's) to
        fill and pass to submit()."""
        return self.pool.acquire(self.timeout if timeout is None else timeout)

    def submit(self, slot, nbytes=None, *, _structure=None, _layout=None):
        """Copies the slot's first `nbytes` (default: all) to a new device buffer on this
        thread's copy stream and hands the slot back. Returns the DeviceBatch (``data`` is the
        buffer)."""
        s = self._stream()
        n = slot.nbytes if nbytes is None else nbytes
        buf = s.alloc(max(n, 1))
        slot.copy_to_device(buf, s, n)
        ev = s.record_event()
        c = self._tls.counter
        c[0] += 1
        c[1] += n
        if _structure is None:
            return DeviceBatch(buf, buf, ev, self.device, [(0, n, "B", (n,))])
        views = [buf.view(off, nb) for off, nb, _, _ in _layout]
        return DeviceBatch(_fill(_structure, views), buf, ev, self.device, _layout)

    def __call__(self, batch):
        """Copies one host batch to the device; returns its DeviceBatch."""
        views = []
        structure = _leaves(batch, views, ())
        layout, off = [], 0
        for mv in views:
            off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
            layout.append((off, mv.nbytes, mv.format, mv.shape))
            off += mv.nbytes
        if off > self.slot_bytes:
            raise ValueError("a batch of %d bytes (packed) does not fit the feeder's %d-byte "
                             "slots: make slot_bytes larger" % (off, self.slot_bytes))
        slot = self.stage()
        try:
            with memoryview(slot) as dst:
                for (o, nb, _, _), mv in zip(layout, views):
                    dst[o:o + nb] = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
        except BaseException:
            slot.release()
            raise
        return self.submit(slot, off, _structure=structure, _layout=layout)

    def iter(self, source, *, depth=None, pin=True):
        """Yields a DeviceBatch per host batch of `source`, copied ahead by a thread of its own
        (pinned to the device's local cores when `pin`), at most `depth` (default: slots)
        batches ahead. An exception in the source or a copy is re-raised here; breaking out of
        the loop stops the thread."""
        depth = depth or self.slots
        q = queue.Queue(maxsize=depth)
        stop = threading.Event()
        end = object()

        def run():
            if pin and self.device.local_cpu_list:
                try:
                    _core.pin_set(self.device.local_cpu_list, self.device.numa_node)
                except _core.Error:
                    pass  # a CPU set this process may not use: run unpinned
            try:
                for item in source:
                    if stop.is_set():
                        return
                    q.put(self(item))
            except BaseException as e:  # handed to the consumer
                q.put(_Raise(e))
                return
            q.put(end)

        t = threading.Thread(target=run, name="tl-feeder", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, _Raise):
                    raise item.exc
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a put on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()

    def stats(self):
        """{"batches", "bytes"} copied so far, and the staging pool's stats."""
        with self._lock:
            counters = list(self._counters)
        return {"batches": sum(c[0] for c in counters), "bytes": sum(c[1] for c in counters),
                "staging": self.pool.stats()}

    def close(self):
        """Frees the staging pool (after its pending copies); BusyError while slots are held."""
        self.pool.close()


class _Raise:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc
