"""threadloom._core.xxh3_64 and Hasher: the XXH3 64-bit hash, one-shot and streaming; libxxhash and
the AVX2 build of the same function give the same digests."""

import random
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


def avx2_or_skip():
    try:
        _core.xxh3_64(b"", impl="avx2")
    except ValueError as e:
        pytest.skip("no AVX2 XXH3 here: %s" % e)


def test_avx2_build_gives_the_library_digests():
    avx2_or_skip()
    rng = random.Random(7)
    blob = rng.randbytes(3 << 20)
    # every length up to 2 KiB (XXH3 has separate paths for 0-16, 17-128, 129-240 bytes and
    # for the stripes and blocks above), then odd lengths across blocks, at odd alignments
    lengths = list(range(2049)) + [rng.randrange(2049, len(blob) - 64) for _ in range(40)]
    for n in lengths:
        off = rng.randrange(64)
        data = memoryview(blob)[off:off + n]
        for seed in (0, rng.getrandbits(64)):
            assert _core.xxh3_64(data, seed, impl="avx2") == \
                _core.xxh3_64(data, seed, impl="libxxhash"), (n, off, seed)
    assert _core.xxh3_64(blob) == _core.xxh3_64(blob, impl="libxxhash")


def test_streaming_gives_the_library_digest_at_random_splits():
    rng = random.Random(11)
    blob = rng.randbytes(1 << 20)
    want = _core.xxh3_64(blob, impl="libxxhash")
    for _ in range(20):
        h, pos = _core.Hasher(), 0
        while pos < len(blob):
            k = rng.choice((1, 63, 64, 65, 255, 1024, 70_000, 300_000))
            h.update(memoryview(blob)[pos:pos + k])
            pos += k
        assert h.digest() == want


def test_impl_argument_is_checked():
    with pytest.raises(ValueError, match="impl"):
        _core.xxh3_64(b"abc", impl="sse9")
    with pytest.raises(TypeError):
        _core.xxh3_64(b"abc", 0, "avx2")  # keyword only
