"""Checkpoints of device state on simulated devices (sim:8): DeviceBuffers and host views of sim
memory round-trip bit-exactly (also streamed through a budget smaller than the state, and back
onto a device with load(device=)); the snapshot holds what the caller's stream had queued before
save() and none of what it queued after; save() returns before the D2H copies are done; a
refused copy and a lost device fail the save clearly and leave the previous checkpoint. The
kill -9 test for device saves is in test_checkpoint.py; torch tensors in tests/torch."""

import os
import random

import pytest

import threadloom
from threadloom import devices
from device_backends import sim, sim_devices  # noqa: F401  (fixtures)

MiB = 1 << 20


def on_device(dev, data, stream=None):
    """A DeviceBuffer of dev holding `data`, written on `stream` (default: this thread's
    current stream of dev)."""
    s = stream or devices.current_stream(dev)
    buf = s.alloc(len(data))
    s.copy(buf, data)
    return buf


def read(buf):
    s = devices.current_stream(buf.device)
    out = bytearray(buf.nbytes)
    s.copy(out, buf)
    s.synchronize()
    return bytes(out)


@pytest.mark.parametrize("budget", [64 * MiB, 1 * MiB])
def test_device_state_round_trips_bit_exactly(tmp_path, budget):
    """Buffers on two devices next to host tensors, with a budget that holds the state and one
    that streams it (4 slots of 256 KiB for ~6 MiB); loaded to the host and onto a device."""
    d0, d1 = sim_devices()[0], sim_devices()[1]
    rng = random.Random(5)
    blobs = {"a": rng.randbytes(3 * MiB + 17), "b": rng.randbytes(1), "c": rng.randbytes(2 * MiB),
             "h": rng.randbytes(1000)}
    state = {"model": {"a": on_device(d0, blobs["a"]), "b": on_device(d1, blobs["b"])},
             "opt": [on_device(d0, blobs["c"]), memoryview(blobs["h"])], "step": 7}
    with threadloom.Checkpointer(tmp_path, staging_bytes=budget, chunk_bytes=256 << 10) as ck:
        fut = ck.save(state, 1)
        assert fut.result(60).endswith("step-1")
        assert fut.progress.wait_s >= 0
    got = threadloom.load(tmp_path)
    assert bytes(got["model"]["a"]) == blobs["a"] and bytes(got["model"]["b"]) == blobs["b"]
    assert bytes(got["opt"][0]) == blobs["c"] and bytes(got["opt"][1]) == blobs["h"]
    assert got["step"] == 7
    files = sorted(n for n in os.listdir(tmp_path / "step-1") if n.endswith(".safetensors"))
    assert len(files) == 3  # the host tensors, sim:0's, sim:1's: one device per file
    back = threadloom.load(tmp_path, device="sim:2")
    assert back["model"]["a"].device == sim_devices()[2]
    assert read(back["model"]["a"]) == blobs["a"] and read(back["opt"][1]) == blobs["h"]
    assert back["step"] == 7


def test_host_views_of_sim_memory_are_device_state(tmp_path):
    """A host view of a sim DeviceBuffer (what torch.from_dlpack gives of DataLoader batches) is
    copied D2H like the buffer: it lands in the device's file, and save() waits for its copy
    (host code may write such memory at any moment after save() returns)."""
    dev = sim_devices()[3]
    data = os.urandom(MiB)
    buf = on_device(dev, data)
    view = memoryview(threadloom.from_dlpack(buf))  # host memory of the sim device
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save({"v": view[4096:]}, 1)
        view[4096:8192] = bytes(4096)  # a host write right after save(): not in the snapshot
        ck.wait()
    got = threadloom.load(tmp_path)
    assert bytes(got["v"]) == data[4096:]
    assert devices.sim_buffer(view[10:20]).device == dev
    assert devices.sim_buffer(memoryview(bytearray(10))) is None


def test_snapshot_has_what_was_queued_before_save_and_not_after(tmp_path, sim):
    """On the caller's stream: a slow H2D copy queued before save() (100 ms) is in the
    snapshot (the side stream waited for it: the 10 ms D2H copy would be long done otherwise),
    a memset and a copy queued after save() are not (the caller's stream waits for the D2H
    copies: the memset would run as soon as the first copy is done, with the D2H)."""
    sim.sim_set("h2d=20MB/s,pageable=20MB/s,d2h=200MB/s")
    s = devices.current_stream(sim)
    before, after = os.urandom(2 * MiB), os.urandom(2 * MiB)
    w = s.alloc(2 * MiB)
    s.memset(w, 0)
    s.copy(w, before)            # 100 ms on the H2D engine, queued before save()
    with threadloom.Checkpointer(tmp_path) as ck:
        fut = ck.save({"w": w}, 1)
        s.memset(w, 0xAB)        # queued after save(): an in-place update
        s.copy(w, after)
        fut.result(60)
    assert bytes(threadloom.load(tmp_path)["w"]) == before
    assert read(w) == after


def test_save_returns_once_the_copies_are_queued(tmp_path, sim):
    """With a 10 MB/s copy engine the 4 MiB snapshot takes ~0.4 s on the device: save() has
    returned while the D2H engine has copied only part of it, and the writers finish the
    save once the copies are done."""
    sim.sim_set("d2h=10MB/s")
    w = on_device(sim, os.urandom(4 * MiB))
    devices.current_stream(sim).synchronize()
    with threadloom.Checkpointer(tmp_path, chunk_bytes=MiB) as ck:
        copied0 = sim.engine_stats()["d2h"]["bytes"]
        fut = ck.save({"w": w}, 1)
        copied = sim.engine_stats()["d2h"]["bytes"] - copied0
        assert copied < 4 * MiB and not fut.done()
        fut.result(60)
    assert sim.engine_stats()["d2h"]["bytes"] - copied0 >= 4 * MiB


def test_a_refused_copy_fails_the_save_and_the_checkpointer_goes_on(tmp_path, sim):
    w = on_device(sim, os.urandom(MiB))
    with threadloom.Checkpointer(tmp_path, chunk_bytes=256 << 10) as ck:
        ck.save({"w": w}, 1).result(60)
        sim.sim_inject("copy", 1)
        with pytest.raises(threadloom.CudaError, match="injected copy failure"):
            ck.save({"w": w}, 2)
        ck.save({"w": w}, 3).result(60)
    assert threadloom.Checkpointer(tmp_path).steps() == [1, 3]


def test_a_device_lost_during_the_copies_fails_the_save_only(tmp_path, sim):
    """The device is lost after save() returned, while its copies run: the future gets
    DeviceLostError, nothing of that step is kept, the previous checkpoint loads."""
    data = os.urandom(2 * MiB)
    w = on_device(sim, data)
    with threadloom.Checkpointer(tmp_path, chunk_bytes=512 << 10) as ck:
        ck.save({"w": w}, 1).result(60)
        sim.sim_set("d2h=20MB/s")
        fut = ck.save({"w": w}, 2)
        sim.sim_inject("lost")
        with pytest.raises(threadloom.DeviceLostError):
            fut.result(60)
    steps = threadloom.Checkpointer(tmp_path).steps()
    assert steps == [1]
    assert bytes(threadloom.load(tmp_path)["w"]) == data


def test_device_leaves_that_cannot_be_saved_say_why(tmp_path):
    class Gpu:  # a kDLCUDA tensor with no dtype/shape threadloom can store
        def __dlpack_device__(self):
            return (2, 0)

    class Npu:
        def __dlpack_device__(self):
            return (9, 0)

    with threadloom.Checkpointer(tmp_path) as ck:
        with pytest.raises(TypeError, match="numpy-style dtype"):
            ck.save({"w": Gpu()}, 1)
        with pytest.raises(NotImplementedError, match="DLPack device"):
            ck.save({"w": Npu()}, 1)
