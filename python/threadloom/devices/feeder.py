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

    # or build the batch in the slot: make(slot) returns the host batch, whose leaves may be
    # views of the slot (collated into it) or live elsewhere (copied in after the others)
    batch = feeder.fill(lambda slot: collate_into_the(slot, samples))

How: a batch (a bytes-like object, or a list/tuple/dict nesting them) is packed into one slot
of a StagingPool (page-locked, NUMA-local to the device; 256-byte aligned leaves), copied to
one DeviceBuffer with one H2D copy on the calling thread's copy stream (a high-priority stream
per thread, so feeder threads share no lock), and an event is recorded after it. The slot goes
back to the pool at once; the pool hands it out again only after that copy completed (the slot
cannot be overwritten under the copy). The DeviceBatch carries the device buffers (views of
one allocation, in the batch's structure) and the event: ``batch.wait(stream)`` makes the
consumer's stream wait for the copy (``cudaStreamWaitEvent``) and declares the buffer's use on
that stream, so the consumer's thread never blocks on the copy and the memory is not reused
before the consumer's work; ``batch.to_torch()`` gives torch tensors of each leaf's dtype and
shape (cuda: torch's current stream waits; sim: CPU tensors over the sim device's memory, which
the calling thread waits for, as host readers must). On sim devices, reading a buffer from the
host (``numpy.from_dlpack``) waits for the copy first.

Slots: ``slot_bytes=None`` sizes them from the first batch (its packed size plus a quarter,
rounded up to 64 KiB) and grows them (a new pool, at least twice as large) when a batch does
not fit; the old pool goes once its slots are back. ``passthrough=True`` is torch's pin_memory
rule for what goes to the device: tensors (memoryviews, threadloom Buffers, numpy arrays, CPU
torch tensors) do, everything else (str, bytes, numbers, None, ...) stays in the batch as it is.
"""

import queue
import sys
import threading

from threadloom import _core
from threadloom.devices import api as devices

_ALIGN = 256
_GRAIN = 64 << 10   # slot sizes chosen by the feeder are multiples of this

# struct format -> torch dtype name, for to_torch() of buffer leaves (torch leaves keep theirs)
_TORCH_DTYPES = {"?": "bool", "b": "int8", "B": "uint8", "h": "int16", "i": "int32",
                 "l": "int64", "q": "int64", "e": "float16", "f": "float32", "d": "float64"}


def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


class _Leaf:
    """One leaf of a batch on its way to the device. `src`: a 1-D 'B' memoryview of its bytes,
    or a contiguous CPU torch tensor; `format`: the struct format (a torch.dtype for torch
    leaves); `offset`: where it lies in the slot (set once placed)."""

    __slots__ = ("i", "src", "format", "shape", "nbytes", "offset")

    def __init__(self, i, src, fmt, shape, nbytes):
        self.i, self.src, self.format, self.shape, self.nbytes = i, src, fmt, shape, nbytes
        self.offset = None


def _is_tensor(x):
    """torch's pin_memory rule, for passthrough=True: what goes to the device."""
    if isinstance(x, (memoryview, _core.Buffer)):
        return True
    torch, np = _torch(), _numpy()
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device.type == "cpu"
    return np is not None and isinstance(x, np.ndarray) and x.dtype.kind in "biufc"


def _leaf(x, i, path):
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError("the torch tensor at %r is on %s: the feeder copies host tensors"
                            % (path, x.device))
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return _Leaf(i, t, x.dtype, tuple(x.shape), t.numel() * t.element_size())
    try:
        mv = memoryview(x)
    except TypeError:
        raise TypeError("a feeder batch is a bytes-like object (bytes, bytearray, numpy array, "
                        "threadloom Buffer) or a list/tuple/dict of them; %s at %r is not"
                        % (type(x).__name__, path)) from None
    if not mv.c_contiguous:
        flat = memoryview(mv.tobytes())  # a C-order copy
    elif mv.ndim == 1 and mv.format == "B":
        flat = mv
    else:
        flat = mv.cast("B")
    return _Leaf(i, flat, mv.format, tuple(mv.shape), mv.nbytes)


def _leaves(batch, out, path, passthrough):
    """Flattens batch into out (one _Leaf per leaf that goes to the device). Returns the
    structure with the _Leaf in place of each such leaf (passthrough leaves stay as they are)."""
    if isinstance(batch, dict):
        items = {k: _leaves(v, out, path + (k,), passthrough) for k, v in batch.items()}
        if type(batch) is dict:
            return items
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, (list, tuple)):
        items = [_leaves(v, out, path + (i,), passthrough) for i, v in enumerate(batch)]
        if isinstance(batch, list):
            return items if type(batch) is list else type(batch)(items)
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return tuple(items)
    if passthrough and not _is_tensor(batch):
        return batch
    leaf = _leaf(batch, len(out), path)
    out.append(leaf)
    return leaf


def _fill(structure, views):
    if isinstance(structure, _Leaf):
        return views[structure.i]
    if isinstance(structure, dict):
        items = {k: _fill(v, views) for k, v in structure.items()}
        return items if type(structure) is dict else type(structure)(items)
    if isinstance(structure, list):
        items = [_fill(v, views) for v in structure]
        return items if type(structure) is list else type(structure)(items)
    if isinstance(structure, tuple):
        items = [_fill(v, views) for v in structure]
        return type(structure)(*items) if hasattr(structure, "_fields") else tuple(items)
    return structure


def _round(n, grain):
    return -(-n // grain) * grain


def _place(leaves, slot):
    """Sets each leaf's offset: where it already lies in `slot` (None: no slot), the others
    packed after the last of those, 256-byte aligned. Returns (bytes used, the indices of the
    leaves found in the slot)."""
    end, found = 0, set()
    if slot is not None:
        base = slot.ptr
        for lf in leaves:
            if not lf.nbytes:
                continue
            if isinstance(lf.src, memoryview):
                off = slot.offset_of(lf.src)
            else:  # a torch tensor
                off = lf.src.data_ptr() - base
                if not 0 <= off <= slot.nbytes - lf.nbytes:
                    off = None
            if off is not None:
                lf.offset = off
                found.add(lf.i)
                end = max(end, off + lf.nbytes)
    for lf in leaves:
        if lf.offset is None:
            lf.offset = _round(end, _ALIGN)
            end = lf.offset + lf.nbytes
    return end, found


def _copy_in(leaves, slot, skip):
    """Copies the leaves into the slot at their offsets, but those whose index is in `skip`
    (already there). Every view made here is dropped here."""
    torch = _torch()
    with memoryview(slot) as dst:
        for lf in leaves:
            if lf.i in skip or not lf.nbytes:
                continue
            o = lf.offset
            if isinstance(lf.src, memoryview):
                dst[o:o + lf.nbytes] = lf.src
            else:
                with dst[o:o + lf.nbytes] as part:
                    torch.frombuffer(part, dtype=torch.uint8).copy_(
                        lf.src.reshape(-1).view(torch.uint8))


class DeviceBatch:
    """A batch on a device: ``data`` (the host batch's structure with a DeviceBuffer per leaf,
    views of ``buffer``; passthrough leaves as they were), ``layout`` ((offset, nbytes, format,
    shape) per leaf, in order; format is the struct format, or the torch.dtype of a torch
    leaf), ``event`` (recorded after the copy), ``start`` (a timing event recorded before it,
    or None) and ``device``."""

    __slots__ = ("data", "buffer", "event", "start", "device", "layout", "_structure")

    def __init__(self, data, buffer, event, device, layout, start=None, structure=None):
        self.data, self.buffer, self.event = data, buffer, event
        self.device, self.layout, self.start = device, layout, start
        self._structure = structure

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

    def to_torch(self):
        """The batch with a torch tensor per leaf, of the leaf's dtype and shape, views of one
        tensor over ``buffer`` (DLPack, no copy). cuda: tensors on the device whose use torch's
        current stream orders after the copy (DLPack's stream handshake; this thread does not
        block). sim: CPU tensors over the sim device's memory (host memory: this thread waits
        for the copy, as any host reader must). Leaves of a struct format torch has no dtype
        for stay DeviceBuffers."""
        torch = _torch()
        if torch is None:
            raise ImportError("DeviceBatch.to_torch() needs torch; without it use .wait() "
                              "(DeviceBuffers)")
        whole = torch.from_dlpack(self.buffer) if self.buffer.nbytes else None
        views = []
        for (off, nb, fmt, shape), buf in zip(self.layout, _flat(self.data, self._structure)):
            if not isinstance(fmt, torch.dtype):
                name = _TORCH_DTYPES.get(fmt[-1:] if len(fmt) == 2 and fmt[0] in "@=<" else fmt)
                if name is None:
                    views.append(buf)
                    continue
                fmt = getattr(torch, name)
            if nb == 0:
                views.append(torch.empty(shape, dtype=fmt, device=whole.device if whole is not
                                         None else "cpu"))
            else:
                views.append(whole[off:off + nb].view(fmt).view(shape))
        return _fill(self._structure, views) if self._structure is not None else views[0]

    def copy_time(self):
        """Seconds the copy took on the device (timing events), None while it runs or without
        timing (Feeder(timing=True))."""
        if self.start is None or not self.event.query():
            return None
        return self.start.elapsed_time(self.event) / 1e3

    def __repr__(self):
        return "<DeviceBatch %d bytes on %s>" % (self.buffer.nbytes, self.device)


def _flat(data, structure):
    """The DeviceBuffer of each leaf of `data`, in leaf order."""
    if structure is None:
        return [data]
    out = {}
    _walk(structure, data, out)
    return [out[i] for i in range(len(out))]


def _walk(st, d, out):
    # a module function, not a closure: a recursive closure is a reference cycle, which would
    # keep the batch's device memory until the garbage collector runs
    if isinstance(st, _Leaf):
        out[st.i] = d
    elif isinstance(st, dict):
        for k in st:
            _walk(st[k], d[k], out)
    elif isinstance(st, (list, tuple)):
        for a, b in zip(st, d):
            _walk(a, b, out)


class Feeder:
    """Feeder(device=None, *, slot_bytes=None, slots=4, priority=None, numa_node=-1,
    timeout=None, passthrough=False, timing=False).

    Copies host batches (leaves packed 256-byte aligned) to `device` through `slots`
    page-locked staging slots of `slot_bytes` (None: sized from the first batch, grown when one
    does not fit). priority: the copy streams' priority (default: the device's most urgent, so
    copies are not queued behind compute). timeout: seconds to wait for a free slot (None: as
    long as it takes). passthrough: leaves that are not tensors stay on the host (torch's
    pin_memory rule) instead of raising TypeError. timing: record a timing event before each
    copy (DeviceBatch.copy_time()). Callable (``feeder(batch)``, one per Pipeline item),
    iterable over a source (``feeder.iter(source)``), fed by producers that fill slots
    themselves (``stage()`` / ``submit()``), or by ones that build the batch in the slot
    (``fill(make)``). Thread-safe: any number of threads may feed one Feeder; each uses its own
    copy stream.
    """

    def __init__(self, device=None, *, slot_bytes=None, slots=4, priority=None, numa_node=-1,
                 timeout=None, passthrough=False, timing=False):
        self.device = devices.device(device)
        if slot_bytes is not None and int(slot_bytes) <= 0:
            raise ValueError("slot_bytes must be > 0 (or None: sized from the first batch)")
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.numa_node = numa_node
        # (pool, its slot size), replaced as one (under _lock) when the slots grow: a thread
        # reading it without the lock sees a pool and its own size, the old pair at worst (its
        # slots are as valid; a batch too large for them asks again, under the lock)
        self._pool = (None, None) if slot_bytes is None else (
            _core.StagingPool(self.device, int(slot_bytes), slots, numa_node), int(slot_bytes))
        self.priority = self.device.priority_range[1] if priority is None else priority
        self.timeout = timeout
        self.slots = slots
        self.passthrough = passthrough
        self.timing = timing
        self._tls = threading.local()
        self._lock = threading.Lock()  # guards _counters, grown, rerouted and replacing _pool
        # one [batches, bytes, bytes already in the slot] per feeding thread, summed in stats()
        self._counters = []
        self._auto = slot_bytes is None  # slots sized from the batches (and grown)
        self.grown = 0                 # pools replaced by a larger one (under _lock)
        self.rerouted = 0              # batches whose slot a leftover view kept (see fill)

    def _stream(self):
        s = getattr(self._tls, "stream", None)
        if s is None:
            s = self._tls.stream = devices.Stream(self.device, self.priority)
            c = self._tls.counter = [0, 0, 0]  # written by this thread only
            with self._lock:
                self._counters.append(c)
        return s

    @property
    def pool(self):
        """The current StagingPool (None before the first batch of slot_bytes=None)."""
        return self._pool[0]

    @property
    def slot_bytes(self):
        """The current slots' size (None before the first batch of slot_bytes=None)."""
        return self._pool[1]

    def _pool_for(self, nbytes):
        """The pool, made or replaced by a larger one when its slots hold fewer than nbytes."""
        pool, size = self._pool
        if pool is not None and (nbytes is None or nbytes <= size):
            return pool
        if nbytes is None:
            raise ValueError("this Feeder sizes its slots from the first batch (slot_bytes="
                             "None): pass stage(nbytes) or give slot_bytes")
        if not self._auto:
            raise ValueError("%d bytes do not fit the feeder's %d-byte slots: make slot_bytes "
                             "larger (or None: sized from the batches)" % (nbytes, self.slot_bytes))
        with self._lock:
            pool, size = self._pool
            if pool is None or nbytes > size:
                # a batch with no tensor (bytes, str: they stay on the host) packs to 0
                new = max(_GRAIN, _round(nbytes + nbytes // 4, _GRAIN))
                if pool is not None:
                    new = max(new, 2 * size)
                    self.grown += 1
                # the old pool goes when its last slot does (each slot holds it)
                self._pool = (_core.StagingPool(self.device, new, self.slots, self.numa_node),
                              new)
            return self._pool[0]

    def stage(self, nbytes=None, timeout=None):
        """A free staging slot of at least `nbytes` (default: the slot size; waiting for one
        as long as `timeout`, default the Feeder's) to fill and pass to submit()."""
        pool = self._pool_for(nbytes)
        return pool.acquire(self.timeout if timeout is None else timeout)

    def submit(self, slot, nbytes=None, *, _structure=None, _layout=None):
        """Copies the slot's first `nbytes` (default: all) to a new device buffer on this
        thread's copy stream and hands the slot back. Returns the DeviceBatch (``data`` is the
        buffer)."""
        s = self._stream()
        n = slot.nbytes if nbytes is None else nbytes
        try:
            buf = s.alloc(max(n, 1))
        except BaseException:
            slot.release()
            raise
        start = s.record_event(devices.Event(self.device, enable_timing=True)) \
            if self.timing else None
        slot.copy_to_device(buf, s, n)
        ev = s.record_event(devices.Event(self.device, enable_timing=True)) \
            if self.timing else s.record_event()
        c = self._tls.counter
        c[0] += 1
        c[1] += n
        if _structure is None:
            return DeviceBatch(buf, buf, ev, self.device, [(0, n, "B", (n,))], start)
        views = [buf.view(off, nb) for off, nb, _, _ in _layout]
        return DeviceBatch(_fill(_structure, views), buf, ev, self.device, _layout, start,
                           _structure)

    def __call__(self, batch):
        """Copies one host batch to the device; returns its DeviceBatch."""
        return self.fill(lambda slot: batch)

    def fill(self, make, nbytes=None):
        """Builds one batch in a staging slot and copies it: make(slot) returns the host batch
        (slot is None when there is no pool yet: slot_bytes=None before the first batch), whose
        leaves may already lie in the slot (views make wrote there, e.g. collated into it with
        threadloom.data.collate_into) or anywhere else (copied in after them). A batch larger
        than the slots grows them (slot_bytes=None) or raises ValueError. The batch must not be
        kept elsewhere: the slot goes to the copy once no view of it is alive (if one still is,
        the bytes go through another slot, and that one comes back when the view dies).
        Returns the DeviceBatch."""
        slot = self.stage(nbytes) if self.pool is not None or nbytes is not None else None
        target = slot
        try:
            batch = make(slot)
            leaves = []
            structure = _leaves(batch, leaves, (), self.passthrough)
            used, found = _place(leaves, slot)
            if slot is None or used > slot.nbytes:  # pack afresh into a slot it fits
                for lf in leaves:
                    lf.offset = None
                used, found = _place(leaves, None)
                if not self._auto and used > self.slot_bytes:
                    raise ValueError("a batch of %d bytes (packed) does not fit the feeder's "
                                     "%d-byte slots: make slot_bytes larger (or None: sized "
                                     "from the batches)" % (used, self.slot_bytes))
                target = self.stage(used)
            _copy_in(leaves, target, found)
            layout = [(lf.offset, lf.nbytes, lf.format, lf.shape) for lf in leaves]
            kept = sum(lf.nbytes for lf in leaves if lf.i in found)
            for lf in leaves:
                lf.src = None
            del batch, leaves, make  # the batch's views of the slot die here
            if target is not slot:
                _give_back(slot)
        except BaseException:
            _give_back(slot)
            if target is not slot:
                _give_back(target)
            raise
        try:
            out = self.submit(target, used, _structure=structure, _layout=layout)
        except BufferError:
            # a view of the slot outlived the batch (a collate_fn kept one): the copy may only
            # read a slot nobody can write, so the bytes go through another one; this one comes
            # back when that view dies
            other = self.stage(used)
            with memoryview(other) as dst, memoryview(target) as src:
                dst[:used] = src[:used]
            del target
            with self._lock:
                self.rerouted += 1
            out = self.submit(other, used, _structure=structure, _layout=layout)
        self._tls.counter[2] += kept
        return out

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
        """{"batches", "bytes"} copied so far, "in_place_bytes" (of those, bytes the batches
        were built with in the slot: no host copy), "slot_bytes", "grown" (times the slots were
        made larger), "rerouted" (see fill) and the staging pool's stats (None before the
        first batch of slot_bytes=None)."""
        with self._lock:
            counters = list(self._counters)
        pool, size = self._pool
        return {"batches": sum(c[0] for c in counters), "bytes": sum(c[1] for c in counters),
                "in_place_bytes": sum(c[2] for c in counters), "slot_bytes": size,
                "grown": self.grown, "rerouted": self.rerouted,
                "staging": pool.stats() if pool is not None else None}

    def close(self):
        """Frees the staging pool (after its pending copies); BusyError while slots are held."""
        if self.pool is not None:
            self.pool.close()


def _give_back(slot):
    """Hands a slot back unused. While a view of it lives, it is left to come back when the
    view dies (a StagingSlot that is dropped returns itself to its pool)."""
    if slot is None or not slot.nbytes:
        return
    try:
        slot.release()
    except BufferError:
        pass


class _Raise:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc
