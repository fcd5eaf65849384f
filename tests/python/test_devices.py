"""threadloom.devices: selection, devices, streams, events, copies, device memory, DLPack and
staging, each test on sim and on a GPU (skipped without one, saying why); fault injection on sim.
Concurrency tests use barriers and events, never sleeps for ordering."""

import array
import os
import random
import threading

import pytest

import threadloom
from threadloom import devices
from conftest import run_python
from device_backends import SIM_SPEC, dev, sim, sim_devices  # noqa: F401  (fixtures)

MiB = 1 << 20


# -- selection and discovery -----------------------------------------------------------------


def test_info_says_which_backend_and_why():
    r = run_python("-m", "threadloom", "info", env_extra={"THREADLOOM_DEVICES": "sim:3,cost=0"})
    assert r.returncode == 0, r.stderr
    assert "devices: sim, 3 device(s) (THREADLOOM_DEVICES=sim:3,cost=0)" in r.stdout
    d = threadloom.info()["devices"]
    assert set(d) == {"name", "count", "why"} and d["why"]


def test_selection_in_a_fresh_process():
    code = (
        "from threadloom import devices\n"
        "devices.select('sim:4,h2d=25GB/s')\n"
        "print([str(d) for d in devices()], devices.backend()['why'])\n"
        "try:\n"
        "    devices.select('cuda')\n"
        "except devices.BusyError as e:\n"
        "    print('busy:', e)\n")
    r = run_python("-c", code, drop=("PYTHON_GIL", "THREADLOOM_DEVICES"))
    assert r.returncode == 0, r.stderr
    assert "['sim:0', 'sim:1', 'sim:2', 'sim:3']" in r.stdout
    assert 'tl_devices_select("sim:4,h2d=25GB/s")' in r.stdout
    assert "busy: TL_EBUSY" in r.stdout and "before first use" in r.stdout


def test_bad_environment_is_a_clear_error():
    r = run_python("-c", "import threadloom; threadloom.devices()",
                   env_extra={"THREADLOOM_DEVICES": "sim:8,h2d=quick"})
    assert r.returncode != 0
    assert "InvalidArgumentError" in r.stderr
    assert "THREADLOOM_DEVICES=sim:8,h2d=quick" in r.stderr
    assert "give a bandwidth like 25GB/s" in r.stderr


def test_device_attributes(dev):
    assert dev == devices.device("%s:%d" % (dev.kind, dev.index))
    assert hash(dev) == hash(devices.device(str(dev)))
    assert dev.type == dev.kind in ("sim", "cuda")
    assert dev.memory > 0 and dev.name
    least, greatest = dev.priority_range
    assert least == 0 and greatest < 0
    if dev.numa_node >= 0:
        assert dev.local_cpus and all(isinstance(c, int) for c in dev.local_cpus)
    free, total = dev.mem_info()
    assert 0 < free <= total == dev.memory
    with pytest.raises(ValueError):
        devices.device("tpu:0")


def test_sim_devices_by_kind_next_to_the_default():
    ds = sim_devices()
    assert [d.kind for d in ds] == ["sim"] * len(ds)
    with pytest.raises(threadloom.NoDeviceError) as ei:
        devices.device("sim:%d" % len(ds))
    assert "sim device(s) exist" in str(ei.value)


# -- copies, streams, events -----------------------------------------------------------------


def test_copies_byte_for_byte(dev):
    s = devices.Stream(dev)
    rng = random.Random(7)
    arena = threadloom.Arena(size=64 * MiB)
    for n in (1, 7, 4096, MiB + 13, 4 * MiB):
        src = rng.randbytes(n)
        a, b = s.alloc(n), s.alloc(n)
        s.copy(a, src)                       # from bytes (pageable)
        s.copy(b, a)                         # device to device
        host = arena.alloc(n)                # to arena memory
        s.copy(host, b)
        back = bytearray(n)
        s.copy(back, a)
        s.synchronize()
        assert memoryview(host)[:n].tobytes() == src
        assert back == src
        s.memset(b, 0x5A)
        s.copy(back, b)
        s.synchronize()
        assert back == b"\x5a" * n
        host.free()
    with pytest.raises(ValueError, match="give nbytes"):
        s.copy(s.alloc(8), b"123")
    with pytest.raises(TypeError, match="two host objects"):
        s.copy(bytearray(3), b"abc")
    with pytest.raises(TypeError, match="writable"):
        s.copy(b"immutable", s.alloc(9))
    s.copy(s.alloc(8), b"12345678abc", nbytes=8)
    s.synchronize()
    arena.close()


def test_stream_context_and_current(dev):
    s, t = devices.Stream(dev), devices.Stream(dev, priority=-1)
    assert t.priority == max(-1, dev.priority_range[1])
    base = devices.current_stream(dev)
    assert base is devices.default_stream(dev) and base not in (s, t)
    with s:
        assert devices.current_stream(dev) is s
        with devices.stream(t):
            assert devices.current_stream(dev) is t
            buf = devices.empty(100, device=dev)
        assert devices.current_stream(dev) is s
    assert devices.current_stream(dev) is base
    seen = []
    th = threading.Thread(target=lambda: seen.append(devices.current_stream(dev)))
    th.start()
    th.join()
    assert seen[0] is not base  # every thread has its own default stream
    assert buf.nbytes == 100 and buf.device == dev
    assert isinstance(s.handle, int) and s.handle == s.cuda_stream


def test_event_orders_streams(dev):
    """b copies what a wrote only because it waits for a's event: a's copy comes after a 20 ms
    kernel, so without the wait b reads the allocation's fill."""
    a, b = devices.Stream(dev), devices.Stream(dev)
    n = MiB
    src = os.urandom(n)
    buf = a.alloc(n)
    buf.record_stream(b)
    a.launch(20_000_000)
    a.copy(buf, src)
    ev = a.record_event()
    ev.wait(b)
    out = bytearray(n)
    b.copy(out, buf)
    b.synchronize()
    assert ev.query() and out == src


def test_elapsed_time(dev):
    s = devices.Stream(dev)
    t0, t1 = devices.Event(dev, enable_timing=True), devices.Event(dev, enable_timing=True)
    s.launch(10_000_000)  # everything below is queued before it can start
    t0.record(s)
    s.launch(5_000_000)
    t1.record(s)
    t1.synchronize(timeout=10)
    ms = t0.elapsed_time(t1)
    if dev.kind == "sim":
        assert 4.999 < ms < 5.001  # modelled time is exact
    else:
        assert ms >= 4.9
    with pytest.raises(threadloom.InvalidArgumentError, match="TL_EVENT_TIMING"):
        devices.Event(dev).elapsed_time(t1)


def test_callbacks_run_in_order_after_the_work(dev):
    s = devices.Stream(dev)
    order = []
    for i in range(4):
        s.launch(1_000_000)
        s.callback(lambda i=i: order.append(i))
    s.synchronize()
    assert order == [0, 1, 2, 3]
    with pytest.raises(TypeError):
        s.callback(42)


def test_many_threads_submit_at_once(dev):
    T, rounds = 16, 20
    barrier = threading.Barrier(T)
    errors = []

    def work(k):
        try:
            s = devices.Stream(dev)
            rng = random.Random(k)
            barrier.wait()
            for r in range(rounds):
                src = rng.randbytes(4096 + r)
                buf = s.alloc(len(src))
                s.copy(buf, src)
                for _ in range(8):
                    s.launch(0)
                out = bytearray(len(src))
                s.copy(out, buf)
                s.record_event().synchronize(timeout=30)
                if out != src:
                    errors.append((k, r))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ths = [threading.Thread(target=work, args=(k,)) for k in range(T)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert errors == []
    assert dev.memory_stats()["blocks_in_use"] >= 0


def test_allocator_reuse_and_empty_cache(dev):
    s = devices.Stream(dev)
    before = dev.memory_stats()
    a = s.alloc(513)
    p = a.ptr
    a.free()
    b = s.alloc(600)  # same class (640 bytes), same stream: the same block at once
    assert b.ptr == p
    st = dev.memory_stats()
    assert st["cache_hits"] - before["cache_hits"] == 1
    assert st["bytes_in_use"] - before["bytes_in_use"] == 640
    del b
    dev.empty_cache()
    st = dev.memory_stats()
    assert st["blocks_cached"] == 0 and st["device_frees"] > before["device_frees"]


def test_buffer_freed_from_another_thread(dev):
    s = devices.Stream(dev)
    bufs = [s.alloc(4096) for _ in range(64)]
    t = threading.Thread(target=bufs.clear)
    in_use = dev.memory_stats()["blocks_in_use"]
    t.start()
    t.join()
    assert dev.memory_stats()["blocks_in_use"] == in_use - 64


def test_views_and_free_refusal(dev):
    s = devices.Stream(dev)
    buf = s.alloc(1000)
    v = buf.view(100, 50)
    assert v.nbytes == 50 and v.ptr == buf.ptr + 100
    with pytest.raises(BufferError, match="views or DLPack"):
        buf.free()
    with pytest.raises(ValueError):
        buf.view(990, 20)
    del v
    buf.free()
    assert buf.ptr == 0
    with pytest.raises(ValueError, match="freed"):
        s.copy(buf, b"x" * 1000)


# -- DLPack ------------------------------------------------------------------------------------


def test_dlpack_export(dev):
    s = devices.Stream(dev)
    n = MiB
    src = os.urandom(n)
    buf = s.alloc(n)
    s.launch(20_000_000)
    s.copy(buf, src)  # still queued behind the kernel when exported below
    if dev.kind == "sim":
        assert buf.__dlpack_device__() == (1, 0)
        view = threadloom.from_dlpack(buf)  # kDLCPU: the export waited for the copy
        assert view.tobytes() == src
        with pytest.raises(BufferError, match="kDLCPU"):
            buf.__dlpack__(stream=5)
        with pytest.raises(BufferError, match="DLPack exports"):
            buf.free()
        del view
        buf.free()
    else:
        assert buf.__dlpack_device__() == (2, dev.index)
        cap = buf.__dlpack__(stream=1, max_version=(1, 0))
        assert type(cap).__name__ == "PyCapsule"
        del cap
        s.synchronize()


def test_cast_types_the_export(dev):
    """cast(format) gives the elements a type: the DLPack export carries it (communicators
    reduce typed buffers; torch/numpy read them typed), over the same memory."""
    s = devices.Stream(dev)
    vals = array.array("f", [1.5, -2.0, 3.25, 8.0])
    buf = s.alloc(16)
    f = buf.cast("f")
    assert (buf.format, buf.itemsize, f.format, f.itemsize) == ("B", 1, "f", 4)
    assert f.ptr == buf.ptr and f.nbytes == 16 and "'f'" in repr(f)
    s.copy(f, vals)
    if dev.kind == "sim":
        m = threadloom.from_dlpack(f)
        assert m.format == "f" and m.tolist() == vals.tolist()
        assert threadloom.from_dlpack(buf.cast("q")).format == "q"
        del m
    else:
        imported = devices.from_dlpack(f, stream=s)     # kDLCUDA float32, 4 elements
        assert imported.nbytes == 16 and imported.ptr == f.ptr
        del imported
    out = array.array("f", bytes(16))
    s.copy(out, f)
    s.synchronize()
    assert out == vals
    with pytest.raises(ValueError, match="whole number of 8-byte"):
        s.alloc(12).cast("d")
    with pytest.raises(ValueError, match="element type DLPack can carry"):
        buf.cast("x")
    del f
    buf.free()


@pytest.mark.gpu
def test_import_cuda_tensor_in_place():
    """A CUDA tensor through DLPack (here a DeviceBuffer of cuda:0 as the producer: torch is not
    built for the free-threaded interpreter), taken in place and ordered on our stream."""
    from device_backends import cuda_device_or_skip
    d = cuda_device_or_skip()
    s = devices.Stream(d)
    src = os.urandom(4096)
    buf = s.alloc(4096)
    s.launch(5_000_000)
    s.copy(buf, src)
    imported = devices.from_dlpack(buf, stream=s)
    assert imported.ptr == buf.ptr and imported.nbytes == 4096
    assert imported.__dlpack_device__() == (2, d.index)
    out = bytearray(4096)
    s.copy(out, imported)
    s.synchronize()
    assert out == src
    with pytest.raises(BufferError):
        buf.free()  # the import holds an export of it
    del imported


def test_import_dlpack_refuses_sim_and_host():
    """import_dlpack takes CUDA tensors only; devices.from_dlpack takes sim memory back as a
    buffer of its device (sim exports it as kDLCPU), and refuses other host memory."""
    d = sim_devices()[0]
    s = devices.Stream(d)
    buf = s.alloc(16)
    with pytest.raises(threadloom.InvalidArgumentError, match="simulated"):
        threadloom._core.import_dlpack(buf, s)
    again = devices.from_dlpack(buf)
    assert again.device == d and again.ptr == buf.ptr and again.nbytes == 16
    part = devices.from_dlpack(memoryview(threadloom.from_dlpack(buf))[4:12])
    assert part.ptr == buf.ptr + 4 and part.nbytes == 8
    with pytest.raises(threadloom.InvalidArgumentError, match="CUDA tensors"):
        devices.from_dlpack(bytearray(16))
    with pytest.raises(threadloom.InvalidArgumentError, match="CUDA tensors"):
        devices.from_dlpack(threadloom.arena().alloc(64))


# -- staging ----------------------------------------------------------------------------------


def test_staging_slot_cannot_be_written_after_hand_back(dev):
    pool = devices.StagingPool(dev, 4096, slots=2)
    st = pool.stats()
    assert st["slots"] == 2 and st["pinned"] is True, st["pin_detail"]
    s = devices.Stream(dev)
    buf = s.alloc(4096)
    slot = pool.acquire()
    view = memoryview(slot)
    view[:5] = b"hello"
    with pytest.raises(BufferError, match="memoryviews of it are alive"):
        slot.copy_to_device(buf, s)
    view.release()
    slot.copy_to_device(buf, s, 5)
    with pytest.raises(ValueError, match="handed back"):
        memoryview(slot)
    with pytest.raises(ValueError, match="handed back"):
        slot.release()
    out = bytearray(5)
    s.copy(out, buf, nbytes=5)
    s.synchronize()
    assert out == b"hello"
    with pool.acquire() as a, pool.acquire() as b:
        with pytest.raises(threadloom.TimedOutError, match="2 held by producers"):
            pool.acquire(timeout=0.05)
        with pytest.raises(threadloom.BusyError):
            pool.close()
    assert pool.stats()["out"] == 0
    pool.close()
    with pytest.raises(threadloom.ClosedError):
        pool.acquire()


def test_staging_reuse_many_producer_threads(sim):
    """8 producer threads, 4 slots, a copy engine slowed to 64 MB/s: slots are reused all the
    time, yet every device batch holds exactly what its producer wrote."""
    sim.sim_set("h2d=64MB/s")
    pool = devices.StagingPool(sim, 65536, slots=4)
    results = {}
    barrier = threading.Barrier(8)

    def produce(k):
        s = devices.Stream(sim)
        barrier.wait()
        for r in range(12):
            payload = bytes([(k * 31 + r + i) & 0xFF for i in range(256)]) * 256
            slot = pool.acquire(timeout=30)
            with memoryview(slot) as m:
                m[:] = payload
            buf = s.alloc(len(payload))
            slot.copy_to_device(buf, s)
            results[(k, r)] = (buf, s.record_event(), payload)

    ths = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    check = devices.Stream(sim)
    for (k, r), (buf, ev, payload) in results.items():
        ev.wait(check)
        out = bytearray(len(payload))
        check.copy(out, buf)
        check.synchronize()
        assert out == payload, (k, r)
    st = pool.stats()
    assert st["acquires"] == 96 and st["out"] == 0 and st["waits"] > 0
    pool.close()


# -- fault injection (sim) ---------------------------------------------------------------------


def test_fault_out_of_memory(sim):
    s = devices.Stream(sim)
    sim.sim_inject("oom", 2)  # the allocator's retry after emptying its cache fails too
    with pytest.raises(threadloom.OutOfMemoryError) as ei:
        s.alloc(MiB)
    assert "injected out-of-memory" in str(ei.value) and "What to do" in str(ei.value)
    assert s.alloc(MiB).nbytes == MiB


def test_fault_failed_copy(sim):
    s = devices.Stream(sim)
    buf = s.alloc(4096)
    sim.sim_inject("copy", 1)
    with pytest.raises(threadloom.CudaError, match="injected copy failure") as ei:
        s.copy(buf, b"x" * 4096)
    assert ei.value.name == "TL_ECUDA"
    s.copy(buf, b"y" * 4096)  # the next one works
    out = bytearray(4096)
    s.copy(out, buf)
    s.synchronize(timeout=10)
    assert out == b"y" * 4096


def test_fault_lost_device_nothing_hangs(sim):
    sim.sim_set("h2d=10MB/s")
    s = devices.Stream(sim)
    pool = devices.StagingPool(sim, MiB, slots=2)
    buf = s.alloc(MiB)
    for _ in range(2):  # two 100 ms copies queued
        pool.acquire(timeout=5).copy_to_device(buf, s)
    ev = s.record_event()
    sim.sim_inject("lost")
    with pytest.raises(threadloom.DeviceLostError, match="injected device loss") as ei:
        ev.synchronize(timeout=10)
    assert "process must restart" in ei.value.hint
    with pytest.raises(threadloom.DeviceLostError):
        s.launch(0)
    with pytest.raises(threadloom.DeviceLostError):
        s.synchronize(timeout=10)
    for _ in range(2):  # the slots came back
        pool.acquire(timeout=5).release()
    sim.sim_recover()
    s.launch(0)
    s.synchronize(timeout=10)
    pool.close()
