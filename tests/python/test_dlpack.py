"""DLPack for host memory: Buffer.__dlpack__/__dlpack_device__ and threadloom.from_dlpack."""

import ctypes
import gc
import struct
import threading

import pytest

import threadloom

MiB = 1 << 20


@pytest.fixture
def arena():
    a = threadloom.Arena(size=64 * MiB, pin="never")
    yield a
    gc.collect()
    assert a.stats()["blocks_in_use"] == 0
    a.close()


def addr(view):
    """The address of a writable memoryview's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_device_and_round_trip(arena):
    b = arena.alloc(4096)
    assert b.__dlpack_device__() == (1, 0)
    m = threadloom.from_dlpack(b)
    assert isinstance(m, memoryview)
    assert m.format == "B" and m.shape == (4096,) and m.strides == (1,) and not m.readonly
    assert m.c_contiguous and m.nbytes == 4096
    assert addr(m) == b.ptr  # no copy
    m[:5] = b"hello"
    with memoryview(b) as direct:
        assert bytes(direct[:5]) == b"hello"
        direct[5:8] = b"abc"
    assert bytes(m[:8]) == b"helloabc"
    assert type(m.obj).__name__ == "DLPackTensor" and m.obj.ptr == b.ptr
    with pytest.raises(BufferError, match="DLPack exports"):
        b.free()
    m.release()
    gc.collect()
    b.free()  # the export is gone
    assert arena.stats()["blocks_in_use"] == 0


def test_block_outlives_the_buffer_object_while_imported(arena):
    b = arena.alloc(1000)
    ptr = b.ptr
    m = threadloom.from_dlpack(b)
    del b
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 1  # the tensor holds the Buffer
    m[0] = 7
    assert m[0] == 7 and addr(m) == ptr
    sub = m[10:20]  # a slice keeps the tensor alive too
    m.release()
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 1
    sub.release()
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("max_version,name", [(None, "dltensor"), ((0, 8), "dltensor"),
                                              ((1, 0), "dltensor_versioned"),
                                              ((1, 3), "dltensor_versioned"),
                                              ((2, 0), "dltensor_versioned")])
def test_capsule_names_and_consumption(arena, max_version, name):
    b = arena.alloc(64)
    cap = b.__dlpack__(max_version=max_version)
    assert type(cap).__name__ == "PyCapsule" and f'"{name}"' in repr(cap)
    m = threadloom.from_dlpack(cap)
    assert f'"used_{name}"' in repr(cap)
    assert m.nbytes == 64 and addr(m) == b.ptr
    with pytest.raises(BufferError, match="already consumed"):
        threadloom.from_dlpack(cap)  # a capsule is imported once
    del cap
    gc.collect()
    with pytest.raises(BufferError):
        b.free()  # the consumer still owns the tensor
    m.release()
    gc.collect()
    b.free()


def test_unconsumed_capsule_releases_its_reference(arena):
    b = arena.alloc(128)
    caps = [b.__dlpack__(), b.__dlpack__(max_version=(1, 0))]
    with pytest.raises(BufferError):
        b.free()
    caps.clear()
    gc.collect()
    b.free()
    b2 = arena.alloc(128)
    b2.__dlpack__(max_version=(1, 0))  # dropped at once, unconsumed
    del b2
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 0


def test_export_errors(arena):
    b = arena.alloc(16)
    with pytest.raises(BufferError, match="stream must be None"):
        b.__dlpack__(stream=0)
    with pytest.raises(BufferError, match="stream must be None"):
        b.__dlpack__(stream=-1)
    with pytest.raises(BufferError, match="kDLCPU"):
        b.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError):
        b.__dlpack__(dl_device=(1, 1))
    with pytest.raises(TypeError):
        b.__dlpack__(dl_device="cpu")
    with pytest.raises(BufferError, match="no copies"):
        b.__dlpack__(copy=True)
    with pytest.raises(TypeError):
        b.__dlpack__(None)  # keyword-only
    b.__dlpack__(dl_device=(1, 0), copy=False, stream=None)  # accepted, dropped unconsumed
    gc.collect()
    b.free()
    with pytest.raises(ValueError, match="freed"):
        b.__dlpack__()
    with pytest.raises(ValueError, match="freed"):
        threadloom.from_dlpack(b)
    assert b.__dlpack_device__() == (1, 0)


def test_free_refused_while_exported_and_memoryview_rule_kept(arena):
    b = arena.alloc(16)
    m = threadloom.from_dlpack(b)
    with pytest.raises(BufferError):
        b.free()
    with pytest.raises(BufferError):
        with b:
            pass
    m.release()
    gc.collect()
    v = memoryview(b)
    with pytest.raises(BufferError, match="memoryviews"):
        b.free()
    v.release()
    b.free()


# ---- a pure-Python producer (ctypes) for dtypes, shapes, strides, flags and devices ----------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DELETER_V = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))
DLManagedTensorVersioned._fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                                     ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER_V),
                                     ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]

_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Producer:
    """Owns the memory and the managed tensor; counts deleter calls. The capsule has no
    destructor, so only a consumer frees (which is what these tests check)."""

    def __init__(self, data, shape, code, bits, strides=None, device=(1, 0), flags=0, lanes=1,
                 offset=0, major=1):
        self.data = data  # a ctypes array
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        self.deleted = 0
        self._deleter = DELETER_V(self._delete)
        t = DLTensor(ctypes.cast(data, ctypes.c_void_p), DLDevice(*device), len(shape),
                     DLDataType(code, bits, lanes), self.shape,
                     self.strides if self.strides is not None else None, offset)
        self.managed = DLManagedTensorVersioned(major, 0, None, self._deleter, flags, t)

    def _delete(self, _ptr):
        self.deleted += 1

    def capsule(self):
        return _new_capsule(ctypes.addressof(self.managed), b"dltensor_versioned", None)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        assert stream is None and max_version == (1, 0)
        return self.capsule()

    def __dlpack_device__(self):
        d = self.managed.dl_tensor.device
        return (d.device_type, d.device_id)


@pytest.mark.parametrize("code,bits,fmt", [(0, 8, "b"), (0, 16, "h"), (0, 32, "i"), (0, 64, "q"),
                                           (1, 8, "B"), (1, 16, "H"), (1, 32, "I"), (1, 64, "Q"),
                                           (2, 16, "e"), (2, 32, "f"), (2, 64, "d"), (6, 8, "?")])
def test_dtypes_and_shapes(code, bits, fmt):
    n = 2 * 3 * 4
    raw = (ctypes.c_uint8 * (n * bits // 8))()
    p = Producer(raw, (2, 3, 4), code, bits)
    m = threadloom.from_dlpack(p)
    assert m.format == fmt and m.itemsize == bits // 8 == struct.calcsize(fmt)
    assert m.shape == (2, 3, 4) and m.c_contiguous
    assert m.strides == (12 * m.itemsize, 4 * m.itemsize, m.itemsize)
    assert addr(m) == ctypes.addressof(raw)
    one = True if fmt == "?" else 1
    m[1, 2, 3] = one
    assert m[1, 2, 3] == one
    assert struct.unpack_from(fmt, raw, (n - 1) * m.itemsize)[0] == one  # seen on the host
    assert p.deleted == 0
    m.release()
    gc.collect()
    assert p.deleted == 1


def test_zero_dim_offset_strides_of_extent_one_and_readonly():
    raw = (ctypes.c_double * 4)(0.5, 1.5, 2.5, 3.5)
    p = Producer(raw, (), 2, 64, offset=16)
    m = threadloom.from_dlpack(p)
    assert m.ndim == 0 and m.shape == () and m[()] == 2.5
    m[()] = 9.0
    assert raw[2] == 9.0
    del m
    gc.collect()
    assert p.deleted == 1
    # extent-1 dimensions may carry any stride; strides given and compact are fine
    p = Producer(raw, (1, 4), 2, 64, strides=(99, 1))
    assert threadloom.from_dlpack(p).tolist() == [[0.5, 1.5, 9.0, 3.5]]
    p = Producer(raw, (2, 2), 2, 64, flags=1)  # DLPACK_FLAG_BITMASK_READ_ONLY
    m = threadloom.from_dlpack(p)
    assert m.readonly and m.tolist() == [[0.5, 1.5], [9.0, 3.5]]
    with pytest.raises(TypeError):
        m[0, 0] = 1.0
    p = Producer(raw, (0, 5), 2, 64, strides=(7, 3))  # empty: strides do not matter
    assert threadloom.from_dlpack(p).nbytes == 0


def test_import_errors_leave_the_capsule_unconsumed():
    raw = (ctypes.c_int32 * 6)()
    p = Producer(raw, (2, 3), 0, 32, strides=(1, 2))  # column-major
    cap = p.capsule()
    with pytest.raises(BufferError, match="not compact row-major: dimension 1 has stride 2"):
        threadloom.from_dlpack(cap)
    assert '"dltensor_versioned"' in repr(cap) and p.deleted == 0
    with pytest.raises(BufferError, match="bfloat16"):
        threadloom.from_dlpack(Producer(raw, (3,), 4, 16))
    with pytest.raises(BufferError, match="complex64"):
        threadloom.from_dlpack(Producer(raw, (3,), 5, 64))
    with pytest.raises(BufferError, match="lanes"):
        threadloom.from_dlpack(Producer(raw, (3,), 2, 32, lanes=2))
    with pytest.raises(BufferError, match="ABI version 2.0"):
        threadloom.from_dlpack(Producer(raw, (3,), 2, 32, major=2))
    dev = Producer(raw, (6,), 0, 32, device=(2, 0))
    with pytest.raises(threadloom.InvalidArgumentError, match="pass CUDA tensors to NcclComm"):
        threadloom.from_dlpack(dev)  # asked through __dlpack_device__
    with pytest.raises(threadloom.InvalidArgumentError, match=r"device \(2, 0\)"):
        threadloom.from_dlpack(dev.capsule())  # seen in the tensor itself
    assert dev.deleted == 0
    with pytest.raises(TypeError):
        threadloom.from_dlpack(b"bytes")
    with pytest.raises(TypeError, match="not a DLPack capsule"):
        threadloom.from_dlpack(_new_capsule(ctypes.addressof(raw), b"other", None))


def test_unversioned_only_producer(arena):
    b = arena.alloc(32)

    class Old:  # a producer predating max_version
        def __dlpack__(self, stream=None):
            return b.__dlpack__()

        def __dlpack_device__(self):
            return (1, 0)

    m = threadloom.from_dlpack(Old())
    assert addr(m) == b.ptr and m.nbytes == 32
    del m
    gc.collect()
    b.free()


def test_many_threads_export_and_import_one_buffer(arena):
    b = arena.alloc(64 * 1024)
    held = threadloom.from_dlpack(b)  # keeps free() refused for the whole run
    n, rounds = 8, 200
    errors = []
    start = threading.Barrier(n + 1)
    running = threading.Event()
    running.set()

    def work(i):
        try:
            start.wait()
            for r in range(rounds):
                if r % 3 == 0:
                    m = threadloom.from_dlpack(b.__dlpack__(max_version=(1, 0)))
                elif r % 3 == 1:
                    m = threadloom.from_dlpack(b.__dlpack__())
                else:
                    m = threadloom.from_dlpack(b)
                assert addr(m) == b.ptr
                m[i * 8:(i + 1) * 8] = bytes([i]) * 8
                assert bytes(m[i * 8:(i + 1) * 8]) == bytes([i]) * 8
                m.release()
                if r % 10 == 0:
                    b.__dlpack__(max_version=(1, 0))  # dropped unconsumed
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def freer():
        start.wait()
        refused = 0
        while running.is_set():
            try:
                b.free()
                errors.append(AssertionError("free() succeeded while exported"))
                return
            except BufferError:
                refused += 1
        assert refused > 0

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    f = threading.Thread(target=freer)
    for t in threads + [f]:
        t.start()
    for t in threads:
        t.join()
    running.clear()
    f.join()
    assert not errors, errors
    assert bytes(held[:n * 8]) == b"".join(bytes([i]) * 8 for i in range(n))
    held.release()
    gc.collect()
    b.free()
    assert arena.stats()["blocks_in_use"] == 0


def test_many_threads_share_one_capsule_consumed_once(arena):
    b = arena.alloc(256)
    for _ in range(20):
        cap = b.__dlpack__(max_version=(1, 0))
        got, refused = [], []
        start = threading.Barrier(8)

        def take():
            start.wait()
            try:
                got.append(threadloom.from_dlpack(cap))
            except BufferError:
                refused.append(1)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 1 and len(refused) == 7
        got.clear()
        del cap
        gc.collect()
    b.free()


def test_consumer_protocol_by_hand_deleter_on_another_thread_detached(arena):
    # What torch/numpy do: rename the capsule, keep the managed tensor, call its deleter later,
    # here from another thread and detached (ctypes drops the thread state around the call).
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    set_name = ctypes.pythonapi.PyCapsule_SetName
    set_name.restype, set_name.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    b = arena.alloc(512)
    cap = b.__dlpack__(max_version=(1, 0))
    mt = ctypes.cast(get(cap, b"dltensor_versioned"), ctypes.POINTER(DLManagedTensorVersioned))
    assert (mt.contents.major, mt.contents.minor) == (1, 0) and mt.contents.flags == 0
    t = mt.contents.dl_tensor
    assert t.data == b.ptr and t.ndim == 1 and t.shape[0] == 512 and t.strides[0] == 1
    assert (t.device.device_type, t.device.device_id) == (1, 0)
    assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (1, 8, 1)
    used = b"used_dltensor_versioned"
    assert set_name(cap, used) == 0
    del cap  # consumed: its destructor must not call the deleter
    del b
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 1
    deleter = mt.contents.deleter
    th = threading.Thread(target=deleter, args=(mt,))
    th.start()
    th.join()
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 0
