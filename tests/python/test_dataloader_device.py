"""DataLoader(device=...) on simulated devices (sim:8): batches on the right device, byte for
byte the CPU path's batches for the same seed, from per-rank loaders on 8 threads, with the
copy engine slowed (staging slots are never reused under a copy) and with faults (a failed
copy, a lost device) that end the iteration with the error and no hang. Pure Python datasets:
without torch, batches are DeviceBuffers (tests/torch has the torch tensors)."""

import os
import random
import sys
import threading

import pytest

import threadloom
from threadloom import devices
from threadloom.data import DataLoader, IterableDataset, get_worker_info
from threadloom.data.collate import collate_into, default_collate
from device_backends import sim, sim_devices  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif("torch" in sys.modules, reason="torch is loaded here: these "
                                "tests check the DeviceBuffer batches of a process without it")


def host_bytes(buf):
    """The bytes of a DeviceBuffer, read back on this thread's current stream of its device
    (the stream the loader made wait for the batch's copy)."""
    s = devices.current_stream(buf.device)
    out = bytearray(buf.nbytes)
    s.copy(out, buf)
    s.synchronize()
    return bytes(out)


def leaves(batch, path=()):
    """(path, leaf) of a batch, in order."""
    if isinstance(batch, dict):
        for k in batch:
            yield from leaves(batch[k], path + (k,))
    elif isinstance(batch, (list, tuple)) and not (batch and isinstance(batch[0], str)):
        for i, v in enumerate(batch):
            yield from leaves(v, path + (i,))
    else:
        yield path, batch


def assert_same(cpu_batches, dev_batches, dev):
    """Every device batch has the CPU batch's structure, each tensor leaf its bytes on `dev`,
    every other leaf equal."""
    assert len(cpu_batches) == len(dev_batches)
    for n, (a, b) in enumerate(zip(cpu_batches, dev_batches)):
        assert isinstance(a, memoryview) or type(a) is type(b), n
        la, lb = list(leaves(a)), list(leaves(b))
        assert [p for p, _ in la] == [p for p, _ in lb], n
        for (path, x), (_, y) in zip(la, lb):
            if isinstance(x, memoryview):
                assert isinstance(y, devices.DeviceBuffer), (n, path, y)
                assert y.device == dev, (n, path, y.device)
                assert host_bytes(y) == x.tobytes(), (n, path)
            else:
                assert x == y, (n, path)


class Records:
    """Map-style samples: dicts, or tuples, of a float, an int, a 24-byte buffer and a str."""

    def __init__(self, n, kind="dict"):
        self.n, self.kind = n, kind

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        r = random.Random(i)
        rec = (r.random(), i, bytearray(r.randbytes(24)), "s%d" % i)
        if self.kind == "dict":
            return {"x": rec[0], "i": rec[1], "b": rec[2], "s": rec[3]}
        return rec


def both(make):
    """make(device=None) iterated on the host and on sim:0: (cpu batches, device batches)."""
    dev = sim_devices()[0]
    return list(make(None)), list(make(dev)), dev


@pytest.mark.parametrize("nw", [0, 2, 4])
@pytest.mark.parametrize("kind", ["dict", "tuple"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_the_cpu_batches_on_the_device(nw, kind, shuffle):
    def make(dev):
        return DataLoader(Records(53, kind), batch_size=8, shuffle=shuffle, num_workers=nw,
                          generator=random.Random(7), device=dev)

    cpu, dev_batches, dev = both(make)
    assert_same(cpu, dev_batches, dev)


def test_iterable_dataset_and_drop_last():
    class Stream(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            k, n = (0, 1) if info is None else (info.id, info.num_workers)
            for i in range(k, 40, n):
                yield {"v": i * 0.5, "b": bytes([i]) * 8}

    for nw in (0, 3):
        cpu, dev_batches, dev = both(lambda d: DataLoader(Stream(), batch_size=6, drop_last=True,
                                                          num_workers=nw, device=d))
        assert len(cpu) == 6 if nw == 0 else len(cpu) >= 4
        assert_same(cpu, dev_batches, dev)


@pytest.mark.parametrize("nw", [0, 2])
def test_batches_without_tensors_stay_on_the_host(nw):
    """bytes and str are no tensors (torch's pin_memory rule): such a batch has nothing to copy,
    and the first batch sizes the slots (it made a 0-byte staging pool: ValueError)."""
    cpu, dev_batches, dev = both(lambda d: DataLoader([b"ab%d" % i for i in range(10)],
                                                      batch_size=4, num_workers=nw, device=d))
    assert dev_batches == cpu == [[b"ab0", b"ab1", b"ab2", b"ab3"],
                                  [b"ab4", b"ab5", b"ab6", b"ab7"], [b"ab8", b"ab9"]]


def test_collation_goes_straight_into_the_staging_slot():
    """default_collate writes the batches into the feeder's pinned slot: after the first batch
    (which sizes the slots; each worker that started before they existed builds one in the
    arena) every tensor byte was collated in place, no host copy; a custom collate_fn's output
    is copied in, and gives the same bytes."""
    dev = sim_devices()[0]
    dl = DataLoader(Records(64), batch_size=8, num_workers=2, device=dev)
    got = list(dl)
    st = dl.stats()["device"]
    first = sum(b.nbytes for b in got[0].values() if isinstance(b, devices.DeviceBuffer))
    tensor_bytes = sum(b.nbytes for batch in got for b in batch.values()
                       if isinstance(b, devices.DeviceBuffer))
    outside = tensor_bytes - st["in_place_bytes"]
    assert outside % first == 0 and 1 <= outside // first <= 2, (outside, first)
    assert st["batches"] == 8 and st["device"] == str(dev) and st["copies_timed"] == 8
    assert st["copy_s"] > 0 and st["staging_waits"] >= 0 and st["slot_bytes"] >= 4096

    def mine(samples):  # not default_collate: built in ordinary memory, copied in
        return [memoryview(bytes(s["b"])) for s in samples]

    dl2 = DataLoader(Records(16), batch_size=4, collate_fn=mine, device=dev)
    out = list(dl2)
    assert dl2.stats()["device"]["in_place_bytes"] == 0
    assert [host_bytes(b) for b in out[1]] == [bytes(Records(16)[4 + k]["b"]) for k in range(4)]


def test_collate_into_places_leaves_aligned_and_falls_back_when_full():
    slot = bytearray(1024)
    with collate_into(slot) as used:
        a = default_collate([1, 2, 3])                       # 24 bytes at 0
        b = default_collate([bytearray(b"ab"), bytearray(b"cd")])  # 4 bytes at 256
        c = default_collate([bytearray(600), bytearray(600)])      # 1200: no room, the arena
    assert used[0] == 260
    assert bytes(slot[:24]) == bytes(memoryview(a).cast("B"))
    assert bytes(slot[256:260]) == b"abcd"
    assert c.nbytes == 1200 and not isinstance(c.obj, bytearray)
    del a, b, c


def test_per_rank_loaders_on_eight_threads():
    """One loader per sim device, each iterated by its own thread at once (spmd's shape): every
    batch on its rank's device and equal to that rank's CPU batches."""
    devs = sim_devices()
    assert len(devs) == 8
    barrier = threading.Barrier(8)
    errors, done = [], []

    def rank(r):
        try:
            def make(d):
                return DataLoader(Records(40), batch_size=5, num_workers=2, rank=r, world_size=8,
                                  shuffle=True, generator=random.Random(3), device=d)
            cpu = list(make(None))
            barrier.wait()
            assert_same(cpu, list(make(devs[r])), devs[r])
            done.append(r)
        except BaseException as e:  # reported below
            errors.append((r, e))
            barrier.abort()

    ths = [threading.Thread(target=rank, args=(r,)) for r in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert not errors, errors
    assert sorted(done) == list(range(8))


def loader_slot_cpus(plan, gpu):
    from threadloom._cpus import parse_cpu_list
    return {parse_cpu_list(s["cpus"]) for s in plan.slots()
            if s["role"] == "loader" and s["gpu"] == gpu}


@pytest.mark.parametrize("iterable", [False, True])
def test_workers_pin_to_the_device_plans_loader_slots(iterable):
    """A device loader's workers run on its device's loader slots of a device plan: the one
    asked for last that has the device (spmd's), else the plan of every sim device; not the
    CPU-wide loader plan's cores, which ignore the launch cores a device plan keeps free."""
    from threadloom import placement
    devs = sim_devices()
    seen = set()
    lock = threading.Lock()

    class Where(IterableDataset):
        def __iter__(self):
            for i in range(16):
                with lock:
                    seen.add(frozenset(os.sched_getaffinity(0)))
                yield bytes([i]) * 8

    class WhereMap(Records):
        def __getitem__(self, i):
            with lock:
                seen.add(frozenset(os.sched_getaffinity(0)))
            return super().__getitem__(i)

    def run(dev):
        seen.clear()
        ds = Where() if iterable else WhereMap(32)
        list(DataLoader(ds, batch_size=4, num_workers=2, device=dev))
        return set(seen)

    # the plan of every sim device, asked for last (as the fallback makes it): GPU 3 of it
    everyone = placement.device_plan(devs)
    assert run(devs[3]) <= loader_slot_cpus(everyone, 3)
    # a rank list as spmd(devices=devs[2:6]) plans it: sim:3 is its GPU 1
    ranks = placement.device_plan(devs[2:6])
    assert placement.device_plan_of(devs[3]) == (ranks, 1)
    assert run(devs[3]) <= loader_slot_cpus(ranks, 1)
    assert placement.device_plan_of(devs[7]) == (everyone, 7)
    # asked for again (spmd's next run): the plan of every device is the newest again
    assert placement.device_plan(devs) is everyone
    assert placement.device_plan_of(devs[3]) == (everyone, 3)
    # pin=False: not pinned, whatever plans exist
    seen.clear()
    list(DataLoader(Where() if iterable else WhereMap(8), batch_size=4, num_workers=2,
                    device=devs[3], pin=False))
    assert seen == {frozenset(os.sched_getaffinity(0))}


def test_staging_slots_are_not_reused_under_a_slow_copy(sim):
    """A copy engine slowed to 20 MB/s (a 64 KiB batch takes ~3 ms), 4 workers collating far
    faster into 12 slots, 48 batches: the workers wait for slots (staging waits) and every
    batch still has the CPU path's bytes, so no slot was overwritten while its copy read it."""
    sim.sim_set("h2d=20MB/s")

    class Big:
        def __len__(self):
            return 384

        def __getitem__(self, i):
            return bytearray(random.Random(i).randbytes(8192))

    def make(d):
        return DataLoader(Big(), batch_size=8, num_workers=4, shuffle=True,
                          generator=random.Random(1), device=d)

    cpu = list(make(None))
    dl = make(sim)
    assert_same(cpu, list(dl), sim)
    st = dl.stats()["device"]
    assert st["staging_waits"] > 0, st


def run_with_deadline(fn, seconds=30):
    """fn() on a thread; its exception, or a failure when it does not end (a hang)."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as e:
            out["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the DataLoader hung"
    return out.get("exc")


@pytest.mark.parametrize("nw", [0, 2])
def test_a_failed_copy_ends_the_iteration_with_its_error(sim, nw):
    dl = DataLoader(Records(64), batch_size=4, num_workers=nw, device=sim)
    it = iter(dl)
    next(it)
    sim.sim_inject("copy", 1)
    exc = run_with_deadline(lambda: list(it))
    assert isinstance(exc, threadloom.CudaError), exc
    assert "injected copy failure" in str(exc)
    # the loader is usable again, and its slots came back
    assert len(list(dl)) == 16
    assert dl._feeder.pool.stats()["out"] == 0


@pytest.mark.parametrize("nw", [0, 3])
def test_a_lost_device_ends_the_iteration_without_hanging(sim, nw):
    sim.sim_set("h2d=50MB/s")
    dl = DataLoader(Records(400), batch_size=8, num_workers=nw, device=sim)
    it = iter(dl)
    next(it)
    sim.sim_inject("lost")
    exc = run_with_deadline(lambda: list(it))
    assert isinstance(exc, threadloom.DeviceLostError), exc
    assert "sim:%d" % sim.index in str(exc)


def test_device_arguments():
    dev = sim_devices()[1]
    # pin_memory_device (torch's spelling) delivers on the device too
    got = list(DataLoader(Records(8), batch_size=4, pin_memory=True,
                          pin_memory_device="sim:1"))
    assert got[0]["x"].device == dev
    # pin_memory=True alone: host batches in pinned arena memory, as before
    host = list(DataLoader(Records(8), batch_size=4, pin_memory=True))
    assert isinstance(host[0]["x"], memoryview)
    with pytest.raises(ValueError, match="applies with pin_memory=True"):
        DataLoader(Records(8), pin_memory_device="sim:1")
    with pytest.raises(ValueError, match="name two devices"):
        DataLoader(Records(8), device="sim:0", pin_memory=True, pin_memory_device="sim:1")
    with pytest.raises(ValueError, match="'cuda:N', 'sim:N'"):
        DataLoader(Records(8), device="tpu:0")
    with pytest.raises(threadloom.NoDeviceError, match="sim:9"):
        DataLoader(Records(8), device="sim:9")


def test_dropped_batches_give_their_device_memory_back_at_once():
    """No reference cycle holds a batch (the loader keeps only its copy's events for stats):
    the device blocks are back in the allocator's cache when the loop drops the batch, without
    waiting for the garbage collector."""
    import gc
    dev = sim_devices()[4]
    dl = DataLoader(Records(48), batch_size=8, num_workers=2, device=dev)
    base = dev.memory_stats()["bytes_in_use"]
    gc.disable()
    try:
        held = list(dl)
        in_use = dev.memory_stats()["bytes_in_use"] - base
        assert in_use >= dl.stats()["device"]["bytes"]
        del held
        assert dev.memory_stats()["bytes_in_use"] - base == 0
    finally:
        gc.enable()
