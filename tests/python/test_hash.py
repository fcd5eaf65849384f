"""threadloom._core.xxh3_64 and Hasher: libxxhash's XXH3 64-bit hash, one-shot and streaming."""

import threading

import pytest

from threadloom import _core


def test_known_values():
    # reference values of XXH3_64bits (xxHash's own test vectors for the empty input and "abc")
    assert _core.xxh3_64(b"") == 0x2D06800538D394C2
    assert _core.xxh3_64(b"abc") == 0x78AF5F94892F3950
    assert _core.xxh3_64(b"abc", seed=1) != _core.xxh3_64(b"abc")


def test_streaming_matches_one_shot_across_chunk_sizes():
    data = bytes(range(256)) * 4099  # ~1 MiB, odd length: crosses the detach threshold
    want = _core.xxh3_64(data)
    for step in (1 << 10, 70_000, 1 << 20, len(data)):
        h = _core.Hasher()
        for i in range(0, len(data), step):
            h.update(memoryview(data)[i:i + step])
        assert h.digest() == want
        assert h.hexdigest() == "%016x" % want
    h.reset()
    assert h.digest() == _core.xxh3_64(b"")


def test_accepts_buffers_and_rejects_non_contiguous():
    import array
    a = array.array("f", [1.0, 2.0, 3.0])
    assert _core.xxh3_64(a) == _core.xxh3_64(a.tobytes())
    with pytest.raises(TypeError):
        _core.xxh3_64("text")
    with pytest.raises((BufferError, ValueError, TypeError)):
        _core.Hasher().update(memoryview(bytes(10))[::2])


def test_threads_hash_in_parallel():
    data = bytes(range(256)) * (1 << 14)
    want = _core.xxh3_64(data)
    got = []
    barrier = threading.Barrier(4)

    def run():
        barrier.wait()
        got.append(all(_core.xxh3_64(data) == want for _ in range(20)))

    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [True] * 4
