"""The GPU feeder (threadloom.devices.Feeder): host batches to device batches on sim and on a GPU
(skipped without one), in a Pipeline, from many threads, with faults."""

import os
import random
import threading

import pytest

import threadloom
from threadloom import devices
from device_backends import dev, sim  # noqa: F401  (fixtures)

KiB = 1 << 10


def to_host(buf, stream):
    out = bytearray(buf.nbytes)
    stream.copy(out, buf)
    stream.synchronize()
    return bytes(out)


def test_feeder_round_trip_with_structure(dev):
    f = devices.Feeder(dev, slot_bytes=64 * KiB, slots=2)
    rng = random.Random(1)
    batch = {"x": rng.randbytes(1000), "y": [bytearray(rng.randbytes(17)), b"z" * 300]}
    out = f(batch)
    s = devices.Stream(dev)
    data = out.wait(s)
    assert set(data) == {"x", "y"} and len(data["y"]) == 2
    assert to_host(data["x"], s) == batch["x"]
    assert to_host(data["y"][0], s) == bytes(batch["y"][0])
    assert to_host(data["y"][1], s) == batch["y"][1]
    assert [off % 256 for off, *_ in out.layout] == [0, 0, 0]
    assert out.layout[0][1:] == (1000, "B", (1000,))
    assert f.stats()["batches"] == 1
    with pytest.raises(ValueError, match="does not fit"):
        f(b"x" * (65 * KiB))
    with pytest.raises(TypeError, match="bytes-like"):
        f({"x": 3})
    f.close()


def test_consumer_does_not_block_on_the_copy(sim):
    """With a 50 MB/s copy engine a 1 MiB batch takes 21 ms: the feeder returns and the
    consumer's wait() returns while the copy is still running (the event is not complete), and
    the consumer's stream still sees the bytes."""
    sim.sim_set("h2d=50MB/s")
    f = devices.Feeder(sim, slot_bytes=1 << 20)
    payload = os.urandom(1 << 20)
    out = f(payload)
    s = devices.Stream(sim)
    data = out.wait(s)
    assert out.event.query() is False  # the copy is still running: nothing blocked on it
    got = bytearray(len(payload))
    s.copy(got, data)
    s.synchronize()
    assert got == payload
    f.close()


def test_feeder_as_a_pipeline_stage(sim):
    sim.sim_set("h2d=200MB/s")
    f = devices.Feeder(sim, slot_bytes=64 * KiB, slots=3)
    items = [bytes([i]) * (4 * KiB + i) for i in range(40)]
    pipe = threadloom.Pipeline(items).map(lambda b: b[::-1], workers=2).map(f, workers=2)
    s = devices.Stream(sim)
    got = []
    for batch in pipe:
        got.append(to_host(batch.wait(s), s))
    assert got == [b[::-1] for b in items]
    st = f.stats()
    assert st["batches"] == 40 and st["staging"]["out"] == 0
    f.close()


def test_feeder_iter_pins_and_propagates_errors(dev):
    f = devices.Feeder(dev, slot_bytes=4 * KiB)
    s = devices.Stream(dev)
    got = [to_host(b.wait(s), s) for b in f.iter(bytes([i]) * 100 for i in range(10))]
    assert got == [bytes([i]) * 100 for i in range(10)]

    def bad():
        yield b"ok"
        raise RuntimeError("source broke")

    it = f.iter(bad())
    assert next(it).buffer.nbytes == 2
    with pytest.raises(RuntimeError, match="source broke"):
        next(it)
    # breaking out early stops the thread, and its slots come back
    for i, _ in enumerate(f.iter(iter(lambda: b"x" * 1000, None))):
        if i == 5:
            break
    s.synchronize()
    assert f.pool.stats()["out"] == 0
    f.close()


def test_many_threads_feed_one_feeder(sim):
    sim.sim_set("h2d=100MB/s")
    f = devices.Feeder(sim, slot_bytes=16 * KiB, slots=4)
    T, N = 8, 10
    barrier = threading.Barrier(T)
    out = {}

    def feed(k):
        rng = random.Random(k)
        barrier.wait()
        for r in range(N):
            payload = rng.randbytes(16 * KiB)
            out[(k, r)] = (f(payload), payload)

    ths = [threading.Thread(target=feed, args=(k,)) for k in range(T)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    s = devices.Stream(sim)
    for key, (batch, payload) in out.items():
        assert to_host(batch.wait(s), s) == payload, key
    st = f.stats()
    assert st["batches"] == T * N and st["staging"]["waits"] > 0
    f.close()


def test_failed_copy_reaches_the_producer_and_the_slot_comes_back(sim):
    f = devices.Feeder(sim, slot_bytes=4 * KiB, slots=1)
    sim.sim_inject("copy", 1)
    with pytest.raises(threadloom.CudaError, match="injected copy failure"):
        f(b"a" * 100)
    good = f(b"b" * 100)  # the only slot came back
    s = devices.Stream(sim)
    assert to_host(good.wait(s), s) == b"b" * 100
    assert f.pool.stats()["out"] == 0
    f.close()


def test_lost_device_fails_batches_without_hanging(sim):
    sim.sim_set("h2d=20MB/s")
    f = devices.Feeder(sim, slot_bytes=1 << 20, slots=2)
    batches = [f(bytes(1 << 20)) for _ in range(2)]  # two 50 ms copies queued
    sim.sim_inject("lost")
    for b in batches:
        with pytest.raises(threadloom.DeviceLostError):
            b.synchronize(timeout=10)
    with pytest.raises(threadloom.DeviceLostError):
        f(b"x")
    sim.sim_recover()
    assert f.pool.stats()["out"] == 0
    f.close()


def test_fill_builds_the_batch_in_the_slot(sim):
    """fill(make): leaves make wrote into the slot are copied from where they lie (no host
    copy: in_place_bytes), the others are packed after them; non-tensors stay on the host with
    passthrough=True, and the batch keeps its structure (a namedtuple stays one)."""
    import collections
    Pair = collections.namedtuple("Pair", "a b")
    f = devices.Feeder(sim, slot_bytes=64 * KiB, passthrough=True)
    extra = os.urandom(100)

    def make(slot):
        with memoryview(slot) as mv:
            mv[512:1024] = bytes(range(256)) * 2
        return Pair(memoryview(slot)[512:1024], {"x": memoryview(extra), "name": "n", "k": 3})

    out = f.fill(make)
    data = out.wait()
    assert isinstance(data, Pair) and data.b["name"] == "n" and data.b["k"] == 3
    assert out.layout[0][:2] == (512, 512) and out.layout[1][:2] == (1024, 100)
    s = devices.current_stream(sim)
    assert to_host(data.a, s) == bytes(range(256)) * 2
    assert to_host(data.b["x"], s) == extra
    assert f.stats()["in_place_bytes"] == 512 and f.pool.stats()["out"] == 0
    with pytest.raises(TypeError, match="bytes-like"):
        devices.Feeder(sim, slot_bytes=KiB)({"x": "not bytes"})
    f.close()


def test_slots_are_sized_from_the_first_batch_and_grow(sim):
    f = devices.Feeder(sim)
    assert f.pool is None and f.stats()["staging"] is None
    small = os.urandom(10 * KiB)
    a = f(small)
    assert f.slot_bytes == 64 * KiB and f.grown == 0
    big = os.urandom(100 * KiB)
    b = f(big)
    assert f.slot_bytes >= 128 * KiB and f.grown == 1
    s = devices.current_stream(sim)
    assert to_host(a.wait(s), s) == small and to_host(b.wait(s), s) == big
    with pytest.raises(ValueError, match="does not fit"):
        devices.Feeder(sim, slot_bytes=KiB)(big)
    with pytest.raises(ValueError, match="stage"):
        devices.Feeder(sim).stage()


def test_a_view_kept_past_fill_sends_the_bytes_through_another_slot(sim):
    """The copy may only read a slot nobody can write: when make's caller keeps a view of the
    slot, the batch goes through another slot, and the kept one comes back when the view dies."""
    f = devices.Feeder(sim, slot_bytes=4 * KiB, slots=2)
    kept = []

    def make(slot):
        v = memoryview(slot)[:8]
        v[:] = b"12345678"
        kept.append(v)
        return v

    out = f.fill(make)
    assert f.stats()["rerouted"] == 1 and f.pool.stats()["out"] == 1
    s = devices.current_stream(sim)
    assert to_host(out.wait(s), s) == b"12345678"
    kept.clear()
    assert f.pool.stats()["out"] == 0
    f.close()


def test_event_wait_takes_a_foreign_stream_handle(sim):
    """Event.wait(int): another library's stream (here a threadloom stream's raw handle, as
    torch.cuda.current_stream().cuda_stream would be) waits for the event."""
    sim.sim_set("h2d=20MB/s")
    a, b = devices.Stream(sim), devices.Stream(sim)
    buf = a.alloc(256 * KiB)
    payload = os.urandom(256 * KiB)
    a.copy(buf, payload)          # ~13 ms
    ev = a.record_event()
    ev.wait(b.handle)
    got = bytearray(len(payload))
    b.copy(got, buf)
    b.synchronize()
    assert got == payload
