"""DataLoader(device=...): each batch delivered on a device through the GPU feeder.

    loader = threadloom.DataLoader(ds, batch_size=64, num_workers=4, device="cuda:0")
    for batch in loader:          # torch tensors on cuda:0 (DeviceBuffers without torch)
        ...

How (docs/design.md, "Data flow" steps 3-5): the thread that builds a batch (a worker, or the
consumer with num_workers=0) takes a page-locked staging slot of the loader's Feeder (NUMA-local
to the device) and collates into it (collate.collate_into: default_collate writes each number,
buffer and stacked tensor straight into the slot; what it cannot place there, e.g. a custom
collate_fn's output, is copied in after), then enqueues the slot's H2D copy on that thread's
copy stream and records an event after it (Feeder.fill). The consumer's thread gets the batch
in sampler order and hands it over (handover): with torch loaded, torch tensors of each leaf's
dtype and shape (cuda: on the device, torch's current stream waits for the event; sim: CPU
tensors over the sim device's memory, for which the thread waits, as any host reader of it
must); without torch, the DeviceBuffers (views of one allocation) in the batch's structure,
after the thread's current stream of the device was made to wait for the event. Either way a
failed copy or a lost device found by then ends the iteration with that error.

Only tensors go to the device (torch's pin_memory rule): memoryviews, threadloom Buffers, numpy
arrays and CPU torch tensors; strings, bytes and numbers stay in the batch as they are.

Stats: the loader's stats()["device"] (copies, bytes, bytes collated in place, device time of
the copies, the consumer's hand-over time, staging waits).
"""

import collections
import sys
import threading
import time

from threadloom import placement
from threadloom.data.collate import collate_into
from threadloom.devices import api as devices
from threadloom.devices.feeder import Feeder

__all__ = ["resolve", "worker_plan", "DeviceCollate", "Handover"]


def _spec(dev):
    """A device argument as devices.device takes it (a torch.device becomes its str)."""
    if dev is None or isinstance(dev, (int, str, devices.Device)):
        return dev
    if hasattr(dev, "type") and hasattr(dev, "index"):  # torch.device
        return str(dev) if dev.index is not None else "%s:0" % dev.type
    return dev


def resolve(device, pin_memory, pin_memory_device):
    """The Device a DataLoader delivers to, or None (host batches): `device`, or torch's
    pin_memory=True with pin_memory_device="cuda:N" / "sim:N" (torch pins host memory for that
    device and the training loop moves each batch there; threadloom moves it there itself, so
    that loop's .to(device, non_blocking=True) finds it on the device already). Raises
    ValueError for a device it cannot name, or two that disagree."""
    dev = None
    if device is not None:
        dev = _device(device, "device")
    if pin_memory_device:
        if not pin_memory:
            raise ValueError("pin_memory_device=%r applies with pin_memory=True (torch ignores "
                             "it otherwise): set pin_memory=True, or pass device=%r"
                             % (pin_memory_device, pin_memory_device))
        pdev = _device(pin_memory_device, "pin_memory_device")
        if dev is not None and pdev is not dev:
            raise ValueError("device=%r and pin_memory_device=%r name two devices: give one"
                             % (device, pin_memory_device))
        dev = pdev
    return dev


def _device(spec, what):
    try:
        return devices.device(_spec(spec))
    except ValueError:
        raise ValueError("%s=%r: a DataLoader delivers to 'cuda:N', 'sim:N', an index into "
                         "threadloom.devices(), a threadloom Device or a torch.device"
                         % (what, spec)) from None


def worker_plan(dev):
    """(plan, g): the placement plan and GPU index a device loader's workers pin to (role
    "loader", gpu=g): the loader slots of `dev` in the device plan asked for last that has it
    (spmd's, for a loader made in a rank), else in the plan of every device of its kind. Not the
    CPU-wide loader plan, whose slots ignore where the device is and which cores its launch
    thread keeps."""
    found = placement.device_plan_of(dev)
    if found is not None:
        return found
    ds = devices.devices(dev.kind)
    return placement.device_plan(ds), [str(d) for d in ds].index(str(dev))


def make_feeder(dev, num_workers, prefetch_factor):
    """The loader's Feeder: slots sized from the first batch; one per thread that builds
    batches, plus prefetch_factor per worker (at most 8) for copies queued on the engine, so
    the engine still has work while the workers are descheduled for a while (torch's meaning of
    prefetch_factor: batches ready ahead per worker); a timing event per copy (copy time in
    stats). On the 2-core VM the busy fraction with 2 workers was 92-99% with 4 slots and 94-98%
    with 6 (this count): within the noise of a shared machine."""
    nw = max(num_workers, 1)
    return Feeder(dev, slots=nw + min(8, nw * (prefetch_factor or 1)), passthrough=True,
                  timing=True)


class Item:
    """A batch on its way to the consumer: the DeviceBatch and its sample count (counted on the
    host batch, where default_collate's structure is known)."""

    __slots__ = ("batch", "samples")

    def __init__(self, batch, samples):
        self.batch, self.samples = batch, samples


class DeviceCollate:
    """The collate_fn of a device loader's iteration: collate_fn(samples) built in a staging
    slot of `feeder` and copied to its device. Returns an Item. Called from any loader thread
    (each copies on its own stream)."""

    def __init__(self, collate_fn, feeder, count):
        self.collate_fn = collate_fn
        self.feeder = feeder
        self.count = count    # batch -> samples (the loader's rule)

    def __call__(self, samples):
        n = []
        collate, count = self.collate_fn, self.count

        def make(slot):
            if slot is None:  # the feeder's first batch: its size sets the slots'
                batch = collate(samples)
            else:
                with collate_into(slot):
                    batch = collate(samples)
            n.append(count(batch))
            return batch

        return Item(self.feeder.fill(make), n[0])


class Handover:
    """The consumer's side of one iteration: each Item becomes the batch the loop gets, and
    the device's numbers are kept for stats(). Called by the consumer's thread; stats() may
    come from any thread (a status display): `_lock` guards the counters and `_pending`."""

    def __init__(self, feeder):
        self._lock = threading.Lock()
        self.feeder = feeder
        self.torch = sys.modules.get("torch") is not None
        self.handover_s = 0.0      # the consumer's time in handover (the sim+torch host wait)
        self.batches = 0           # handed over
        self.bytes = 0             # their bytes on the device
        self.copy_s = 0.0          # device time of the copies measured so far
        self.timed = 0             # copies whose time is in copy_s
        self.timed_bytes = 0       # and their bytes
        # (start event, end event, bytes) of copies whose time is not known yet: the events,
        # not the batches, so a dropped batch's device memory is reusable at once
        self._pending = collections.deque()

    def __call__(self, item):
        t0 = time.perf_counter()
        b = item.batch
        b.event.query()  # raises the copy's error (failed copy, lost device) once it is known
        data = b.to_torch() if self.torch else b.wait()
        with self._lock:
            if b.start is not None:
                self._pending.append((b.start, b.event, b.buffer.nbytes))
            self.batches += 1
            self.bytes += b.buffer.nbytes
            self._collect()
            self.handover_s += time.perf_counter() - t0
        return data

    def _collect(self):
        """Adds the copy times that are known by now (under _lock)."""
        p = self._pending
        while p:
            start, end, nbytes = p[0]
            try:
                done = end.query()
            except Exception:  # a failed copy: its error reaches the consumer with its batch
                done = None
            if not done:
                if done is False and len(p) < 64:
                    return
                p.popleft()  # never waited for: not timed
                continue
            p.popleft()
            self.copy_s += start.elapsed_time(end) / 1e3
            self.timed += 1
            self.timed_bytes += nbytes

    def stats(self):
        with self._lock:
            self._collect()
            mine = (self.batches, self.bytes, self.copy_s, self.timed, self.timed_bytes,
                    self.handover_s)
        batches, nbytes, copy_s, timed, timed_bytes, handover_s = mine
        f = self.feeder.stats()
        st = f["staging"] or {}
        return {"device": str(self.feeder.device), "batches": batches,
                "bytes": nbytes, "copy_s": copy_s, "copies_timed": timed,
                "copy_gbs": timed_bytes / copy_s / 1e9 if copy_s > 0 else None,
                "handover_s": handover_s,
                # the loader's feeder, over every iteration so far
                "in_place_bytes": f["in_place_bytes"], "fed_bytes": f["bytes"],
                "slot_bytes": f["slot_bytes"], "grown": f["grown"], "rerouted": f["rerouted"],
                "staging_waits": st.get("waits", 0), "staging_wait_s": st.get("wait_s", 0.0)}
