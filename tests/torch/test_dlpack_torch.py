"""DLPack between threadloom and torch / numpy, both ways, without copies.

threadloom -> torch/numpy: an arena Buffer taken by torch.from_dlpack and numpy.from_dlpack is
the block itself (same address; a write through one is seen through the others), and keeps it
alive: the Buffer cannot be freed while a consumer holds it. torch/numpy -> threadloom:
threadloom.from_dlpack of a tensor or an array is a memoryview over its memory, of its dtype and
shape; what has no buffer format or is not C-contiguous is refused with a BufferError saying
what to do. Addresses are compared, so a copy anywhere fails the test."""

import ctypes
import gc
import threading

import numpy as np
import pytest
import torch

import threadloom

MiB = 1 << 20

# torch dtype -> (numpy dtype, buffer format): what every side calls the same element type
DTYPES = {torch.bool: (np.bool_, "?"), torch.uint8: (np.uint8, "B"), torch.int8: (np.int8, "b"),
          torch.uint16: (np.uint16, "H"), torch.int16: (np.int16, "h"),
          torch.uint32: (np.uint32, "I"), torch.int32: (np.int32, "i"),
          torch.uint64: (np.uint64, "Q"), torch.int64: (np.int64, "q"),
          torch.float16: (np.float16, "e"), torch.float32: (np.float32, "f"),
          torch.float64: (np.float64, "d")}


@pytest.fixture
def arena():
    a = threadloom.Arena(size=16 * MiB, pin="never")
    yield a
    gc.collect()
    assert a.stats()["blocks_in_use"] == 0
    a.close()


def addr(view):
    """The address of a memoryview's first byte (read-only ones too)."""
    return np.asarray(view).ctypes.data if view.nbytes else None


def test_a_buffer_is_the_same_memory_in_torch_and_numpy(arena):
    b = arena.alloc(4096)
    t = torch.from_dlpack(b)                       # 1-D uint8, as the Buffer exports it
    a = np.from_dlpack(b)
    assert t.dtype == torch.uint8 and t.shape == (4096,) and a.dtype == np.uint8
    assert t.data_ptr() == b.ptr == a.ctypes.data
    f = t.view(torch.float32)                      # consumers reinterpret in place
    f[:4] = torch.tensor([1.5, -2.0, 3.25, 8.0])
    assert a.view(np.float32)[:4].tolist() == [1.5, -2.0, 3.25, 8.0]
    a[16:20] = 7
    assert t[16:20].tolist() == [7] * 4
    with memoryview(b) as direct:
        assert direct[16] == 7 and bytes(direct[:4]) == np.float32(1.5).tobytes()
    with pytest.raises(BufferError, match="DLPack exports"):
        b.free()                                   # torch and numpy hold the block
    del t, f
    gc.collect()
    with pytest.raises(BufferError, match="DLPack exports"):
        b.free()                                   # numpy still does
    del a
    gc.collect()
    b.free()


def test_a_consumer_keeps_the_block_after_the_buffer_object_goes(arena):
    b = arena.alloc(64)
    t = torch.from_dlpack(b)
    ptr = b.ptr
    del b
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 1     # torch's tensor holds the Buffer
    t.fill_(3)
    assert t.data_ptr() == ptr and int(t.sum()) == 3 * 64
    del t
    gc.collect()
    assert arena.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_torch_tensors_and_numpy_arrays_are_viewed_in_place(dtype):
    np_dtype, fmt = DTYPES[dtype]
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)
    a = np.arange(24).reshape(2, 3, 4).astype(np_dtype)
    for src, ptr in ((t, t.data_ptr()), (a, a.ctypes.data)):
        m = threadloom.from_dlpack(src)
        assert m.format == fmt and m.shape == (2, 3, 4) and not m.readonly
        assert addr(m) == ptr                       # no copy
        w = np.asarray(m)         # (memoryview indexes format 'e' from Python 3.12 only)
        assert w.ctypes.data == ptr and w.dtype == np_dtype
        one = True if fmt == "?" else 1
        w[1, 2, 3] = one                            # writes reach the producer's memory
        assert src[1, 2, 3] == one
        src[0, 0, 0] = one
        assert w[0, 0, 0] == one


def test_views_with_offsets_zero_dim_and_empty_tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    row = base[1]                                   # storage offset 4 elements
    m = threadloom.from_dlpack(row)
    assert addr(m) == row.data_ptr() == base.data_ptr() + 16 and m.tolist() == [4, 5, 6, 7]
    m[0] = -1
    assert base[1, 0] == -1
    s = torch.tensor(2.5, dtype=torch.float64)
    m = threadloom.from_dlpack(s)
    assert m.shape == () and m[()] == 2.5
    m[()] = 4.0
    assert float(s) == 4.0
    assert threadloom.from_dlpack(torch.zeros(0, 3)).nbytes == 0
    assert threadloom.from_dlpack(np.zeros((2, 0), np.int32)).nbytes == 0


def test_read_only_numpy_arrays_come_back_read_only():
    a = np.arange(6.0)
    a.flags.writeable = False                      # numpy sets DLPack's read-only flag
    m = threadloom.from_dlpack(a)
    assert m.readonly and addr(m) == a.ctypes.data and m.tolist() == a.tolist()
    with pytest.raises(TypeError):
        m[0] = 1.0


def test_what_has_no_in_place_view_is_refused_saying_what_to_do():
    t = torch.arange(12.0).reshape(3, 4)
    with pytest.raises(BufferError, match=r"not compact row-major.*\.contiguous\(\)"):
        threadloom.from_dlpack(t.t())
    with pytest.raises(BufferError, match=r"not compact row-major.*ascontiguousarray"):
        threadloom.from_dlpack(np.arange(12.0).reshape(3, 4)[:, ::2])
    with pytest.raises(BufferError, match="bfloat16.*no buffer-protocol format"):
        threadloom.from_dlpack(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(BufferError, match="complex64"):
        threadloom.from_dlpack(np.zeros(2, np.complex64))
    with pytest.raises(BufferError, match="detach"):   # torch's own refusal, as torch says it
        threadloom.from_dlpack(torch.zeros(2, requires_grad=True))
    m = threadloom.from_dlpack(t.t().contiguous())       # what the message says works
    assert m.shape == (4, 3)


def test_the_producer_lives_while_the_view_does():
    t = torch.arange(1000, dtype=torch.int64)
    ptr = t.data_ptr()
    m = threadloom.from_dlpack(t)
    del t
    gc.collect()
    assert addr(m) == ptr and m[999] == 999        # torch's storage is still there
    sub = m[10:20]
    m.release()
    assert sub.tolist() == list(range(10, 20))


def test_many_threads_import_and_export_at_once(arena):
    """16 threads: each views one shared torch tensor through threadloom.from_dlpack and writes
    its own slice, and exports its own arena Buffer to torch and numpy and back; every write
    lands once, in place. (Free-threaded: the threads really run at once.)"""
    threads, rounds = 16, 50
    shared = torch.zeros(threads * rounds, dtype=torch.int64)
    bufs = [arena.alloc(8 * rounds) for _ in range(threads)]
    start = threading.Barrier(threads)
    errors = []

    def work(k):
        try:
            start.wait()
            for r in range(rounds):
                m = threadloom.from_dlpack(shared)
                m[k * rounds + r] = k * 1000 + r
                mine = torch.from_dlpack(bufs[k]).view(torch.int64)
                mine[r] = r
                back = threadloom.from_dlpack(np.from_dlpack(bufs[k]).view(np.int64))
                assert back[r] == r and addr(back) == bufs[k].ptr
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert shared.tolist() == [k * 1000 + r for k in range(threads) for r in range(rounds)]
    for b in bufs:
        assert np.frombuffer(b, np.int64).tolist() == list(range(rounds))
    gc.collect()
    for b in bufs:
        b.free()                                    # every import's deleter ran
