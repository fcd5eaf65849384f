"""threadloom.Checkpointer and threadloom.load: round trips, retention, verification, crash safety
(kill -9 at random points), disk errors (real tmpfs + fault injection), the safetensors format."""

import array
import errno
import json
import logging
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, run_python

import threadloom
from threadloom import _core
from threadloom.checkpoint import FileOps

MiB = 1 << 20


def f32(values, shape):
    return memoryview(array.array("f", values).tobytes()).cast("f", shape)


def mixed_state(seed=0):
    rng = random.Random(seed)
    return {
        "model": {
            "w": f32([rng.random() for _ in range(12)], [3, 4]),
            "b": array.array("d", [rng.random() for _ in range(5)]),
            "ids": memoryview(array.array("q", range(-3, 3)).tobytes()).cast("q", [2, 3]),
            "mask": memoryview(bytes([1, 0, 1])).cast("?"),
            "half": memoryview(bytes(8)).cast("e"),
            "layers": [memoryview(array.array("i", [i] * 7).tobytes()).cast("i") for i in range(3)],
        },
        "raw": bytes(range(200)),
        "buf": bytearray(b"\x00\xff" * 50),
        "scalar": f32([2.5], []),
        "empty": memoryview(b"").cast("f"),
        "opt": {"lr": 3e-4, "betas": (0.9, 0.999), "name": "adam", "none": None, "flag": True},
        "epoch": 7,
        "big": 10 ** 30,
        "odd": {1, 2, 3},
        "nan": float("nan"),
        7: "int key",
    }


def same(a, b):
    """Deep equality where tensors compare by format, shape and bytes."""
    if isinstance(b, (memoryview, array.array, bytes, bytearray)):
        mb = memoryview(b)
        assert isinstance(a, (memoryview, bytearray))
        ma = memoryview(a)
        if mb.format in ("B", "b", "c") and isinstance(b, (bytes, bytearray)):
            return bytes(ma) == bytes(mb)
        return ma.format.lstrip("@=<") == mb.format.lstrip("@=<").replace("l", "q") and \
            (ma.shape == mb.shape or mb.nbytes == 0) and ma.tobytes() == mb.tobytes()
    if isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(b, float) and b != b:
        return a != a
    return a == b


class FaultyOps(FileOps):
    """Fails one kind of call with `err` (an errno) once `after` bytes were written."""

    def __init__(self, call, err, after=0):
        self.call, self.err, self.after, self.written = call, err, after, 0

    def _boom(self, what):
        raise OSError(self.err, os.strerror(self.err), what)

    def pwrite(self, fd, data, offset):
        if self.call == "pwrite" and self.written + len(data) > self.after:
            self._boom("fd %r" % (fd,))
        self.written += len(data)
        super().pwrite(fd, data, offset)

    def open(self, path, *io):
        if self.call == "open":
            self._boom(path)
        return super().open(path, *io)

    def rename(self, src, dst):
        if self.call == "rename":
            self._boom(src)
        super().rename(src, dst)

    def mkdir(self, path):
        if self.call == "mkdir":
            self._boom(path)
        super().mkdir(path)


# ---------------------------------------------------------------------------------------------

def test_round_trip_mixed_state(tmp_path):
    state = mixed_state(1)
    with threadloom.Checkpointer(tmp_path, chunk_bytes=64, staging_bytes=256) as ck:
        fut = ck.save(state, 10, metadata={"run": "r1"})
        assert fut.result(30) == str(tmp_path / "step-10")
    got, info = threadloom.load(tmp_path, with_info=True)
    assert same(got, state)
    assert info["step"] == 10 and info["metadata"] == {"run": "r1"} and info["skipped"] == []
    assert isinstance(got["raw"], bytearray) and got["model"]["w"].shape == (3, 4)
    assert got["scalar"].shape == () and got["scalar"].tolist() == 2.5
    with pytest.raises(Exception, match="allow_pickle"):
        threadloom.load(tmp_path, allow_pickle=False)


def test_threadloom_buffer_and_numpy_style_objects(tmp_path):
    buf = threadloom.Arena(size=64 * MiB, pin="never").alloc(1000)
    memoryview(buf)[:] = bytes(range(250)) * 4

    class Host:  # a CPU DLPack object that also exports a buffer (what numpy arrays are)
        def __init__(self, data):
            self.data = data

        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("not imported through DLPack")

        def __buffer__(self, flags):
            return memoryview(self.data)

    class DlpackOnly:  # a CPU DLPack producer without a buffer: imported with from_dlpack
        def __init__(self, inner):
            self.inner = inner

        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, stream=None, max_version=None):
            return self.inner.__dlpack__(max_version=max_version)

    other = threadloom.Arena(size=64 * MiB, pin="never").alloc(256)
    memoryview(other)[:] = bytes(range(256))
    state = {"buf": buf, "host": Host(array.array("f", [1.0, 2.0])), "dl": DlpackOnly(other)}
    with threadloom.Checkpointer(tmp_path) as ck:
        fut = ck.save(state, 1)
        memoryview(other)[:] = bytes(256)  # staged before save() returned
        fut.result(30)
    got = ck.load()
    assert bytes(got["buf"]) == bytes(memoryview(buf))
    assert got["host"].tolist() == [1.0, 2.0]
    assert bytes(got["dl"]) == bytes(range(256))
    buf.free()
    other.free()


def test_unsupported_leaves_raise_clearly(tmp_path):
    class Npu:
        def __dlpack_device__(self):
            return (9, 0)  # no device threadloom saves from

        def __dlpack__(self, stream=None):
            raise AssertionError

    class CpuNoBuffer:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, stream=None):
            return "not a capsule"

    with threadloom.Checkpointer(tmp_path) as ck:
        with pytest.raises(NotImplementedError, match="copy it to the host first"):
            ck.save({"w": Npu()}, 1)
        with pytest.raises(TypeError, match="DLPack"):
            ck.save({"w": CpuNoBuffer()}, 1)
        with pytest.raises(TypeError, match="picklable"):
            ck.save({"lock": threading.Lock()}, 1)
        with pytest.raises(TypeError, match="format"):
            ck.save({"w": memoryview(b"abcd").cast("c")}, 1)
        with pytest.raises(ValueError):
            ck.save({}, -1)
        ck.save({}, 2).result(30)  # nothing half-done is left behind by the failures
    assert ck.steps() == [2]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_saves_retention_latest_and_same_step(tmp_path):
    with threadloom.Checkpointer(tmp_path, keep=2) as ck:
        futs = [ck.save({"x": f32([s], [1]), "step": s}, s) for s in range(5)]
        order = []
        for f in futs:
            f.add_done_callback(lambda f: order.append(f.result()))
        ck.wait()
        assert order == [str(tmp_path / ("step-%d" % s)) for s in range(5)]
        assert ck.steps() == [3, 4]
        assert (tmp_path / "latest").read_text() == "step-4\n"
        assert threadloom.load(tmp_path)["step"] == 4
        assert threadloom.load(tmp_path, 3)["x"].tolist() == [3.0]
        ck.save({"step": "again"}, 4).result(30)  # the same step again replaces it whole
        assert ck.steps() == [3, 4]
    assert threadloom.load(tmp_path)["step"] == "again"
    with pytest.raises(threadloom.NotFoundError):
        threadloom.load(tmp_path, 1)
    with pytest.raises(threadloom.NotFoundError):
        threadloom.load(tmp_path / "nowhere")


def test_one_writer_per_directory_and_stale_tmp_never_loaded(tmp_path):
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save({"v": 1}, 1).result(30)
        with pytest.raises(threadloom.BusyError):
            threadloom.Checkpointer(tmp_path)
    # what a crash mid-save leaves: a temporary directory with a plausible manifest
    stale = tmp_path / ".tmp-step-9-deadbeef"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    assert threadloom.load(tmp_path)["v"] == 1
    threadloom.Checkpointer(tmp_path).close()
    assert not stale.exists()


def test_flipped_byte_is_detected_and_fallback(tmp_path, caplog):
    with threadloom.Checkpointer(tmp_path, keep=3) as ck:
        for s in (1, 2):
            ck.save({"a": f32([s] * 4, [4]), "enc": {"w": f32([s * 10.0] * 8, [2, 4])}}, s)
        ck.wait()
    shard = tmp_path / "step-2" / "shard-00001-of-00001.safetensors"
    manifest = json.loads((tmp_path / "step-2" / "manifest.json").read_text())
    hlen = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    b, _ = manifest["tensors"]["enc.w"]["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[8 + hlen + b + 5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(threadloom.CorruptCheckpointError, match=r"'enc\.w'.*shard-00001") as ei:
        threadloom.load(tmp_path)
    assert ei.value.key == "enc.w" and ei.value.step == 2 and ei.value.file == shard.name
    assert isinstance(ei.value, threadloom.Error) and ei.value.name == "TL_EIO"
    with caplog.at_level(logging.WARNING, logger="threadloom.checkpoint"):
        state, info = threadloom.load(tmp_path, fallback=True, with_info=True)
    assert info["step"] == 1 and [s for s, _ in info["skipped"]] == [2]
    assert state["a"].tolist() == [1.0] * 4
    assert any("step-1" in r.getMessage() for r in caplog.records)
    # a truncated file and a damaged manifest are reported too
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(threadloom.CorruptCheckpointError, match="truncated"):
        threadloom.load(tmp_path)
    (tmp_path / "step-1" / "manifest.json").write_text("{")
    with pytest.raises(threadloom.CorruptCheckpointError, match="no checkpoint .* loads"):
        threadloom.load(tmp_path, fallback=True)


def _flips(blob_len, rng, stride=1):
    """(offset, xor mask) for every `stride`-th byte of a blob, each with a seeded nonzero
    mask (a one-bit flip half the time: the damage that turns '2' into '3')."""
    for i in range(0, blob_len, stride):
        yield i, (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(1, 256)


def _canon(x):
    """A loaded state as plain comparable values (tensors as format, shape and bytes)."""
    if isinstance(x, (memoryview, bytearray, bytes)):
        m = memoryview(x)
        return ("tensor", m.format, m.shape, m.tobytes())
    if isinstance(x, dict):
        return ("dict", [(k, _canon(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_canon(v) for v in x])
    return (type(x).__name__, repr(x))


def _sweep(d, step, stride=1, seed=0):
    """Flips every `stride`-th byte of step-<step>'s manifest and safetensors headers, one at a
    time, and loads: {outcome: count} where outcome is "same" (the identical state),
    "changed" (a different state loaded without error) or "corrupt" (CorruptCheckpointError,
    and fallback=True then loads the previous checkpoint); anything else raises."""
    rng = random.Random(seed)
    ref = _canon(threadloom.load(d, step))
    prev = max(s for s in (int(n[5:]) for n in os.listdir(d) if n.startswith("step-"))
               if s < step)
    prev_ref = _canon(threadloom.load(d, prev))
    ck = d / ("step-%d" % step)
    targets = [(ck / "manifest.json", os.path.getsize(ck / "manifest.json"))]
    for name in sorted(os.listdir(ck)):
        if name.endswith(".safetensors"):
            blob = (ck / name).read_bytes()
            targets.append((ck / name, 8 + struct.unpack("<Q", blob[:8])[0]))
    out = {"same": 0, "changed": 0, "corrupt": 0}
    for path, n in targets:
        orig = path.read_bytes()
        for i, mask in _flips(n, rng, stride):
            damaged = bytearray(orig)
            damaged[i] ^= mask
            path.write_bytes(bytes(damaged))
            try:
                got = _canon(threadloom.load(d, step, allow_pickle=True))
            except threadloom.CorruptCheckpointError:
                out["corrupt"] += 1
                state, info = threadloom.load(d, step, fallback=True, with_info=True)
                assert info["step"] == prev and _canon(state) == prev_ref, (path.name, i)
            except Exception as e:
                raise AssertionError("flipping byte %d of %s (^%#x) raised %r, not "
                                     "CorruptCheckpointError" % (i, path.name, mask, e)) from e
            else:
                out["same" if got == ref else "changed"] += 1
        path.write_bytes(orig)
    return out


def sweep_state(s):
    return {"model": {"w": f32([s + i / 4 for i in range(6)], [2, 3]),
                      "b": memoryview(array.array("q", [s, -s]).tobytes()).cast("q"),
                      "raw": bytes([s] * 5)},
            "opt": {"lr": 1e-3 * s, "betas": (0.9, 0.999), "name": "adam"},
            "step": s, "seen": {s, s + 1}, 3: None}


def test_every_byte_of_the_manifest_and_headers_is_verified(tmp_path, caplog):
    # Every single-byte change of manifest.json or a safetensors header (__metadata__
    # included) either loads the identical state or raises CorruptCheckpointError, which
    # fallback=True handles. Before the manifest had a checksum: `model` -> `lodel`, step 2 ->
    # 3 and a changed lr loaded silently, and bare KeyErrors escaped fallback.
    with threadloom.Checkpointer(tmp_path, keep=0, shard_bytes=20) as ck:
        ck.save(sweep_state(1), 1, metadata={"run": "sweep"})
        ck.save(sweep_state(2), 2, metadata={"run": "sweep"})
    assert len([n for n in os.listdir(tmp_path / "step-2") if n.endswith(".safetensors")]) > 1
    with caplog.at_level(logging.CRITICAL, logger="threadloom.checkpoint"):
        out = _sweep(tmp_path, 2)
    assert out["changed"] == 0 and out["corrupt"] > 2000, out


V1 = os.path.join(ROOT, "tests", "data", "checkpoints", "v1")


def test_version_1_checkpoints_still_load(tmp_path, caplog):
    # tests/data/checkpoints/v1: written by the version-1 writer (README there). It loads as
    # it did; its manifest has no checksum, so a changed value can load (the documented
    # limit of version 1), but every damage that breaks its structure, a tensor, a header or
    # the agreement between them is a CorruptCheckpointError, never a KeyError.
    for s in (1, 2):
        state = threadloom.load(V1, s)
        assert _canon(state) == _canon(sweep_state(s))
    d = tmp_path / "v1"
    shutil.copytree(V1, d)
    with caplog.at_level(logging.CRITICAL, logger="threadloom.checkpoint"):
        out = _sweep(d, 2)
    assert out["corrupt"] > out["changed"] + out["same"], out


def test_budget_smaller_than_checkpoint_streams(tmp_path):
    rng = random.Random(5)
    state = {"t%d" % i: memoryview(rng.randbytes(MiB + i * 4099)) for i in range(8)}
    total = sum(len(v) for v in state.values())
    seen = []
    with threadloom.Checkpointer(tmp_path, staging_bytes=MiB, chunk_bytes=256 << 10,
                                 shard_bytes=3 * MiB, on_progress=seen.append) as ck:
        fut = ck.save(state, 3)
        p = fut.progress
        assert p.staged
        fut.result(60)
        assert ck._staging.created <= 4  # never more host memory than the budget
    assert p.done and p.bytes_written == p.total_bytes > total and p.fraction == 1.0
    assert p.wait_s > 0 and p.stall_s >= p.wait_s and p.eta == 0.0 and p.rate > 0
    assert len(seen) > 8 and seen[-1] is p
    assert len([n for n in os.listdir(tmp_path / "step-3") if n.endswith(".safetensors")]) >= 3
    got = threadloom.load(tmp_path)
    assert all(bytes(got[k]) == bytes(v) for k, v in state.items())


def test_progress_is_readable_while_running(tmp_path):
    gate, inside = threading.Event(), threading.Event()

    class SlowOps(FileOps):
        def pwrite(self, fd, data, offset):
            inside.set()
            assert gate.wait(30)
            super().pwrite(fd, data, offset)

    with threadloom.Checkpointer(tmp_path, file_ops=SlowOps(), chunk_bytes=MiB,
                                 staging_bytes=8 * MiB) as ck:
        fut = ck.save({"x": bytes(3 * MiB)}, 1)
        assert inside.wait(30)
        p = ck.progress
        assert p is fut.progress and not p.done and p.bytes_written == 0 and p.eta is None
        assert p.total_bytes > 3 * MiB and "step=1" in repr(p)
        gate.set()
        fut.result(30)
    assert p.done and p.bytes_written == p.total_bytes


# ---------------------------------------------------------------------------------------------
# Disk errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,err,cls", [
    ("pwrite", errno.ENOSPC, "NoSpaceError"),
    ("open", errno.EACCES, "AccessDeniedError"),
    ("mkdir", errno.EROFS, "ReadOnlyFilesystemError"),
    ("rename", errno.ENOSPC, "NoSpaceError"),
    ("pwrite", errno.EIO, "InputOutputError"),
])
@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_disk_errors_go_to_the_future(tmp_path, caplog, call, err, cls, io):
    ops = FaultyOps(None, err)
    state = {"w": bytes(3 * MiB), "n": 1}
    with threadloom.Checkpointer(tmp_path, file_ops=ops, chunk_bytes=MiB,
                                 staging_bytes=2 * MiB, io=io) as ck:
        ck.save(state, 1).result(30)
        before = (tmp_path / "step-1" / "manifest.json").read_bytes()
        ops.call, ops.after, ops.written = call, MiB, 0
        with caplog.at_level(logging.ERROR, logger="threadloom.checkpoint"):
            fut = ck.save(state, 2)  # returns: the error is the future's, not the caller's
            with pytest.raises(getattr(threadloom, cls)) as ei:
                fut.result(30)
        e = ei.value
        assert isinstance(e, threadloom.Error) and e.errno == err
        assert str(tmp_path) in str(e) and "step-1) is untouched" in str(e) and "What to do" in str(e)
        assert fut.progress.error is e and fut.progress.done
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        assert ck.steps() == [1] and (tmp_path / "latest").read_text() == "step-1\n"
        assert (tmp_path / "step-1" / "manifest.json").read_bytes() == before
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
        with pytest.raises(getattr(threadloom, cls)):
            ck.wait()
        ops.call = None
        ck.save(state, 3).result(30)  # later saves still run
    assert threadloom.load(tmp_path)["n"] == 1 and ck.steps() == [1, 3]


def mount(fstype, where, *opts):
    if os.geteuid() != 0:
        pytest.skip("mounting a %s needs root" % fstype)
    where.mkdir()
    r = subprocess.run(["mount", "-t", fstype, *opts, fstype, str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip("mount -t %s not permitted here: %s" % (fstype, r.stderr.strip()))


class LatestFails(FileOps):
    """ENOSPC while writing `latest`'s temporary: it exists (created), then the write fails,
    as on a full disk."""

    def __init__(self):
        self.armed = False

    def write_file(self, path, data):
        if self.armed and os.path.basename(path).startswith(".latest-"):
            super().close(super().open(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        super().write_file(path, data)


def test_enospc_writing_latest_leaves_no_temporary(tmp_path):
    ops = LatestFails()
    with threadloom.Checkpointer(tmp_path, file_ops=ops) as ck:
        ck.save({"v": 1}, 1).result(30)
        ops.armed = True
        with pytest.raises(threadloom.NoSpaceError, match="`latest` could not be updated"):
            ck.save({"v": 2}, 2).result(30)
        assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == [".lock"]
        assert (tmp_path / "latest").read_text() == "step-1\n" and ck.steps() == [1, 2]
        ops.armed = False
        ck.save({"v": 3}, 3).result(30)
    assert threadloom.load(tmp_path)["v"] == 3


def test_directory_errors_at_construction(tmp_path):
    # "" would silently mean the current directory: refused, like None.
    for bad in ("", None):
        with pytest.raises((threadloom.InvalidArgumentError, TypeError), match="directory"):
            threadloom.Checkpointer(bad)
    with pytest.raises(threadloom.InvalidArgumentError, match="directory"):
        threadloom.load("")
    # A path under a regular file: the errno's class and the directory, in one line.
    (tmp_path / "f").write_text("x")
    with pytest.raises(threadloom.Error, match="checkpoint directory") as ei:
        threadloom.Checkpointer(tmp_path / "f" / "ck")
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOTDIR
    # A read-only file system: ReadOnlyFilesystemError, whether the directory exists or not.
    mnt = tmp_path / "ro"
    mount("tmpfs", mnt, "-o", "ro,size=1m")
    try:
        for d in (mnt, mnt / "sub"):
            with pytest.raises(threadloom.ReadOnlyFilesystemError, match="load") as ei:
                threadloom.Checkpointer(d)
            assert str(d) in str(ei.value) and ei.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_enospc_on_a_real_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("mount -t tmpfs not permitted here: %s" % r.stderr.strip())
    try:
        with threadloom.Checkpointer(mnt, chunk_bytes=128 << 10, staging_bytes=MiB) as ck:
            ck.save({"w": bytes(100_000)}, 1).result(30)
            fut = ck.save({"w": bytes(2 * MiB)}, 2)
            with pytest.raises(threadloom.NoSpaceError, match="No space left"):
                fut.result(30)
            assert ck.steps() == [1] and [n for n in os.listdir(mnt) if n.startswith(".")] == [".lock"]
            ck.save({"w": bytes(200_000)}, 3).result(30)
        assert len(threadloom.load(mnt)["w"]) == 200_000
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_eacces_on_a_real_read_only_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root bypasses directory permissions; the fault-injection test covers EACCES")
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save({"v": 1}, 1).result(30)
        os.chmod(tmp_path, 0o555)
        try:
            with pytest.raises(threadloom.AccessDeniedError):
                ck.save({"v": 2}, 2).result(30)
        finally:
            os.chmod(tmp_path, 0o755)
    assert threadloom.load(tmp_path)["v"] == 1


# ---------------------------------------------------------------------------------------------
# The format, read by a reader written here from the safetensors spec
# ---------------------------------------------------------------------------------------------

ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
            "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors(path):
    """An independent reader: u64 LE header size, JSON header (starts with '{', may be padded
    with spaces), tensors whose data_offsets tile the data section exactly."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = blob[8:8 + n]
    assert raw[:1] == b"{" and (8 + n) % 8 == 0
    header = json.loads(raw.decode("utf-8"))
    meta = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    data = blob[8 + n:]
    spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items())
    pos = 0
    out = {}
    for (b, e), k in spans:
        assert b == pos, "offsets are contiguous"
        count = 1
        for d in header[k]["shape"]:
            count *= d
        assert e - b == count * ST_SIZES[header[k]["dtype"]]
        out[k] = (header[k]["dtype"], header[k]["shape"], data[b:e])
        pos = e
    assert pos == len(data), "the tensors cover the data section"
    return meta, out


def test_safetensors_files_parse_with_an_independent_reader(tmp_path):
    state = mixed_state(2)
    with threadloom.Checkpointer(tmp_path, shard_bytes=300) as ck:
        ck.save(state, 4).result(30)
    d = tmp_path / "step-4"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == "threadloom-checkpoint" and manifest["step"] == 4
    shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
    assert len(shards) > 1 and [f["name"] for f in manifest["files"]] == shards
    seen = {}
    for name in shards:
        meta, tensors = read_safetensors(d / name)
        assert meta["step"] == "4" and os.path.getsize(d / name) == \
            next(f["bytes"] for f in manifest["files"] if f["name"] == name)
        for k, (dtype, shape, data) in tensors.items():
            t = manifest["tensors"][k]
            assert (t["file"], t["dtype"], t["shape"]) == (name, dtype, shape)
            assert t["xxh3_64"] == "%016x" % _core.xxh3_64(data)
            seen[k] = data
    assert seen["model.w"] == memoryview(state["model"]["w"]).tobytes()
    assert seen["model.layers.1"] == memoryview(state["model"]["layers"][1]).tobytes()
    assert seen["raw"] == state["raw"]
    assert manifest["tensors"]["model.ids"]["dtype"] == "I64"
    assert manifest["tensors"]["model.half"]["dtype"] == "F16"
    assert manifest["tensors"]["model.mask"]["dtype"] == "BOOL"
    assert set(seen) == set(manifest["tensors"])


# ---------------------------------------------------------------------------------------------
# Write paths: O_DIRECT and io_uring give the same files as buffered writes, and fall back
# ---------------------------------------------------------------------------------------------

def odd_sizes_state():
    rng = random.Random(11)
    sizes = [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, MiB + 3, 2 * MiB]
    return {"t%d" % i: memoryview(rng.randbytes(n)) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("chunk", [64 << 10, 100_000])
def test_write_paths_give_identical_files(tmp_path, chunk):
    state = odd_sizes_state()
    files, progress = {}, {}
    for io in ("buffered", "direct", "uring"):
        d = tmp_path / io
        # shard_bytes makes several files, each with an unaligned end; a chunk of 100_000 bytes
        # is rounded up to whole 4 KiB blocks for the direct paths
        with threadloom.Checkpointer(d, io=io, chunk_bytes=chunk, staging_bytes=4 * chunk,
                                     shard_bytes=MiB + 4096) as ck:
            fut = ck.save(state, 1)
            fut.result(60)
            if io != "buffered":
                assert ck._staging.slot_bytes % _core.WFILE_ALIGN == 0
        p = progress[io] = fut.progress
        got, info = threadloom.load(d, with_info=True)
        assert all(bytes(got[k]) == bytes(v) for k, v in state.items())
        files[io] = {n: (d / "step-1" / n).read_bytes()
                     for n in os.listdir(d / "step-1") if n.endswith(".safetensors")}
        assert len(files[io]) >= 3
        assert p.direct_bytes + p.buffered_bytes == p.total_bytes
        if io == "buffered":
            assert p.io == "buffered" and p.io_why is None and p.direct_bytes == 0
        elif p.io == io:  # this file system takes O_DIRECT: only each file's tail is buffered
            assert p.io_why is None and p.buffered_bytes < 4096 * len(files[io])
            assert p.direct_bytes > 3 * MiB
        else:  # refused here: a lower mode, saying why
            assert p.io_why, (io, p.io)
    # the same bytes (headers, data, and so checksums) whichever way they were written
    assert files["buffered"] == files["direct"] == files["uring"]


def test_direct_io_falls_back_where_the_file_system_refuses_it(tmp_path):
    """ramfs refuses O_DIRECT (EINVAL from open), as tmpfs did before Linux 6.6; tmpfs is checked
    too and may take either path, but always round trips and says which."""
    state = odd_sizes_state()
    for fstype in ("ramfs", "tmpfs"):
        mnt = tmp_path / fstype
        mount(fstype, mnt)
        try:
            for io in ("direct", "uring"):
                with threadloom.Checkpointer(mnt / io, io=io, chunk_bytes=256 << 10) as ck:
                    fut = ck.save(state, 1)
                    fut.result(60)
                p = fut.progress
                if fstype == "ramfs":
                    assert p.io == "buffered" and "refuses O_DIRECT" in p.io_why
                    assert p.direct_bytes == 0 and p.buffered_bytes == p.total_bytes
                else:
                    assert p.io in (io, "direct", "buffered") and (p.io == io) == (not p.io_why)
                got = threadloom.load(mnt / io)
                assert all(bytes(got[k]) == bytes(v) for k, v in state.items())
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


def test_wfile_errors_and_close():
    with pytest.raises(ValueError, match="'buffered', 'direct' or 'uring'"):
        _core.WFile("/nonexistent/x", "fast")
    with pytest.raises(FileNotFoundError) as ei:
        _core.WFile("/nonexistent/dir/x", "direct")
    assert "open(/nonexistent/dir/x)" in ei.value.__notes__[0]
    with pytest.raises(ValueError, match="io must be"):
        threadloom.Checkpointer("/nonexistent/never-created", io="fast")
    with pytest.raises(ValueError, match="io_priority must be"):
        threadloom.Checkpointer("/nonexistent/never-created", io_priority="high")


def test_wfile_closed_while_threads_write(tmp_path):
    """close() waits for writes in progress; later writes raise ValueError (never a crash)."""
    f = _core.WFile(str(tmp_path / "f"), "direct")
    block = memoryview(mmap.mmap(-1, MiB))
    started = threading.Barrier(5)
    outcomes = []

    def writer(i):
        started.wait()
        for k in range(64):
            try:
                f.write(block, (i * 64 + k) * MiB)
            except ValueError:
                outcomes.append("closed")
                return
        outcomes.append("done")

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    started.wait()
    f.close()
    for t in ts:
        t.join()
    assert len(outcomes) == 4 and set(outcomes) <= {"closed", "done"}
    with pytest.raises(ValueError, match="closed"):
        f.sync()


# ---------------------------------------------------------------------------------------------
# Crash safety: kill -9 at random points during saves
# ---------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, threadloom
    d = sys.argv[1]
    if sys.argv[3] == "device":  # "w" is device state: a sim DeviceBuffer, set on the stream
        from threadloom import devices
        devices.configure_sim("sim:1,d2h=2GB/s")
        stream = devices.current_stream(devices("sim")[0])
        w = stream.alloc(1 << 20)
    def state(step):
        if sys.argv[3] == "device":
            stream.memset(w, step % 251)  # ordered after the previous save's D2H copies
        return {"w": w if sys.argv[3] == "device" else bytes([step % 251]) * (1 << 20),
                "v": memoryview(bytes([step % 7]) * 4096),
                "step": step, "tail": bytes(range(step % 256)) * 300}
    with threadloom.Checkpointer(d, keep=2, chunk_bytes=64 << 10, staging_bytes=256 << 10,
                                 shard_bytes=600 << 10, io=sys.argv[2]) as ck:
        ck.save(state(0), 0).result()
        print("ready", flush=True)
        step = 1
        while True:
            fut = ck.save(state(step), step)
            # one write(2) per line: callbacks run on several threads, and a pipe write this
            # small is atomic, so lines never interleave
            fut.add_done_callback(lambda f, s=step: os.write(1, b"committed %d\\n" % s))
            step += 1
""")


@pytest.mark.parametrize("io,where", [("direct", "host"), ("buffered", "host"),
                                      ("direct", "device")])
def test_kill9_at_random_points_leaves_a_loadable_checkpoint(tmp_path, io, where):
    """where="device": the 1 MiB tensor is a sim DeviceBuffer, snapshotted by D2H copies into
    pinned staging (the child's copy engine at 2 GB/s, so kills land during copies too)."""
    env = dict(os.environ)
    env.pop("PYTHON_GIL", None)
    mid_save = 0
    for seed in range(20):
        rng = random.Random(seed)
        d = tmp_path / ("s%d" % seed)
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(d), io, where],
                             stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.4))
        p.kill()
        out = p.communicate(timeout=30)[0]
        # Only whole lines: the kill can land in the middle of a print, leaving "committ" or
        # "committed" without its step at the end of the output.
        whole = out.split("\n")[:-1]
        committed = [int(line.split()[1]) for line in whole
                     if line.startswith("committed ") and line.split()[1].isdigit()]
        mid_save += any(n.startswith(".tmp-step-") for n in os.listdir(d))
        state, info = threadloom.load(d, with_info=True)
        s = info["step"]
        assert s >= max(committed, default=0), (seed, s, committed)
        assert state["step"] == s and bytes(state["w"]) == bytes([s % 251]) * (1 << 20)
        assert bytes(state["tail"]) == bytes(range(s % 256)) * 300
        with threadloom.Checkpointer(d) as ck:  # removes what the kill left
            steps = ck.steps()
        for step in steps:  # every complete one verifies
            threadloom.load(d, step)
        assert [n for n in os.listdir(d) if n.startswith(".") and n != ".lock"] == []
    print("killed mid-save in %d of 20 runs" % mid_save)
    assert mid_save >= 10  # the kills did land inside saves


def test_load_framework_argument(tmp_path):
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save({"w": f32([1.0, 2.0], [2])}, 1).result(30)
    with pytest.raises(ValueError, match="framework"):
        threadloom.load(tmp_path, framework="numpy")
    # in a child: torch imported here would change what later tests collate into
    r = run_python("-c", "import sys, threadloom\n"
                   "try:\n    import torch\n"
                   "except ImportError:\n    torch = None\n"
                   "try:\n    w = threadloom.load(sys.argv[1], framework='torch')['w']\n"
                   "except ImportError as e:\n    print(torch is None and 'needs torch' in str(e))\n"
                   "else:\n    print(torch is not None and w.tolist() == [1.0, 2.0])\n",
                   str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"   # tests/torch checks the tensors themselves


# ---------------------------------------------------------------------------------------------
# The staging copy with helper threads (checkpoint.staging.Copies)

from threadloom.checkpoint import staging as _staging  # noqa: E402


@pytest.mark.parametrize("copy_threads", [0, 1, 2])
@pytest.mark.parametrize("staging", ["holds it", "streams"])
def test_parallel_staging_copy_round_trips(tmp_path, monkeypatch, copy_threads, staging):
    """Tensors of odd sizes (empty, tiny, over a piece, over a slot) in pieces of 4 KiB copied by
    the saving thread and up to two helpers; with a small budget the copy runs in several
    batches (a batch ends where a slot must be waited for)."""
    monkeypatch.setattr(_staging, "COPY_PIECE", 4096)
    rng = random.Random(copy_threads)
    sizes = [0, 1, 7, 4095, 4096, 4097, 70000, 300001, 5, 0, 123457]
    state = {"t%02d" % i: memoryview(rng.randbytes(n)) for i, n in enumerate(sizes)}
    budget = (1 << 20) if staging == "holds it" else 64 << 10
    with threadloom.Checkpointer(tmp_path, staging_bytes=budget, chunk_bytes=16 << 10,
                                 shard_bytes=200000, copy_threads=copy_threads) as ck:
        for step in range(3):
            ck.save(state, step).result(60)
    got = threadloom.load(tmp_path)
    assert {k: bytes(v) for k, v in got.items()} == {k: bytes(v) for k, v in state.items()}


@pytest.mark.parametrize("copy_threads", [0, 2])
def test_save_never_reads_the_state_after_it_returned(tmp_path, monkeypatch, copy_threads):
    """save() returns only after every piece is copied, helpers' included: overwriting the state
    right after it returned never reaches the checkpoint (with many 4 KiB pieces and two helpers
    racing the saving thread)."""
    monkeypatch.setattr(_staging, "COPY_PIECE", 4096)
    state = {"a": bytearray(b"\x11" * (3 << 20)), "b": bytearray(b"\x22" * (1 << 20))}
    with threadloom.Checkpointer(tmp_path, keep=0, staging_bytes=8 << 20, chunk_bytes=1 << 20,
                                 copy_threads=copy_threads) as ck:
        futs = []
        for step in range(12):
            fill = 0x30 + step
            state["a"][:] = bytes([fill]) * len(state["a"])
            state["b"][:] = bytes([fill + 1]) * len(state["b"])
            futs.append(ck.save(state, step))
            state["a"][:] = b"\xee" * len(state["a"])   # the training step after save()
            state["b"][:] = b"\xee" * len(state["b"])
        for f in futs:
            f.result(60)
    for step in range(12):
        got = threadloom.load(tmp_path, step)
        assert set(bytes(got["a"])) == {0x30 + step}, step
        assert set(bytes(got["b"])) == {0x31 + step}, step


def test_copy_plan_copies_every_piece_once_with_many_threads():
    """Random copies between several buffers, cut into 4 KiB pieces, copied by 8 threads at
    once: every byte lands, each piece is copied by exactly one work() call."""
    rng = random.Random(7)
    srcs = [memoryview(rng.randbytes(300000)), bytes(rng.randbytes(5000)),
            memoryview(rng.randbytes(70000)).cast("B", [70000])]
    dsts = [bytearray(400000), memoryview(bytearray(90000))]
    plan = _core.CopyPlan(4096)
    want = [bytearray(d) for d in dsts]
    used = [set() for _ in dsts]
    for _ in range(60):
        si, di = rng.randrange(len(srcs)), rng.randrange(len(dsts))
        n = rng.randrange(0, min(20000, len(srcs[si])) + 1)
        so = rng.randrange(0, len(srcs[si]) - n + 1)
        do = rng.randrange(0, len(dsts[di]) - n + 1)
        if any(x in used[di] for x in range(do, do + n)):
            continue  # copies into overlapping ranges would race: a plan never has them
        used[di].update(range(do, do + n))
        plan.add(dsts[di], do, srcs[si], so, n)
        want[di][do:do + n] = bytes(srcs[si])[so:so + n]
    assert plan.nbytes > 100000 and plan.pieces == -(-plan.nbytes // 4096)  # pieces fill up
    counts = []
    ts = [threading.Thread(target=lambda: counts.append(plan.work())) for _ in range(8)]
    for t in ts:
        t.start()
    counts.append(plan.work())
    for t in ts:
        t.join(30)
    plan.close()
    assert sum(counts) == plan.pieces == plan.done == plan.claimed
    assert [bytes(d) for d in dsts] == [bytes(w) for w in want]
    assert plan.work() == 0  # closed: nothing handed out any more


def test_copy_plan_close_waits_for_pieces_other_threads_copy():
    """close() returns only once the piece another thread took is copied (a 64 MiB memcpy
    takes milliseconds: without the wait the destination would still be partly old)."""
    src = memoryview(bytes([0x5A]) * (64 << 20))
    for _ in range(3):
        dst = bytearray(len(src))
        plan = _core.CopyPlan(len(src))
        plan.add(dst, 0, src, 0, len(src))
        t = threading.Thread(target=plan.work)
        t.start()
        while plan.claimed == 0:
            time.sleep(0)
        plan.close()
        assert plan.done == 1 and dst.count(0x5A) == len(dst)
        t.join(30)


def test_copy_plan_one_destination_many_sources():
    """A staging slot's copies: one destination, a source per tensor, past the growths of the
    plan's buffer array (16, 32, 64 buffers; at the first, the destination's buffer is taken just
    before a source's grows the array). The destination was read through a pointer from before
    such a move until it was an index: one full-suite run saw "0-byte destination"; in this
    build the stale read usually goes unnoticed, so this checks the path, not that bug."""
    dst = bytearray(200)
    srcs = [bytes([i]) * 3 for i in range(60)]
    plan = _core.CopyPlan(1 << 20)
    for i, s in enumerate(srcs):
        plan.add(dst, 3 * i, s, 0, 3)
    plan.work()
    plan.close()
    assert bytes(dst[:180]) == b"".join(srcs)


def test_copy_plan_refuses_bad_copies():
    src, dst = b"abcdef", bytearray(4)
    plan = _core.CopyPlan(1024)
    with pytest.raises(ValueError, match="out of range"):
        plan.add(dst, 0, src, 0, 5)
    with pytest.raises(ValueError, match="out of range"):
        plan.add(dst, 2, src, 4, 3)
    with pytest.raises(ValueError, match=">= 0"):
        plan.add(dst, -1, src, 0, 1)
    with pytest.raises((TypeError, BufferError)):
        plan.add(b"read-only", 0, src, 0, 1)
    with pytest.raises(ValueError, match="piece_bytes"):
        _core.CopyPlan(0)
    plan.add(dst, 0, src, 2, 4)
    assert plan.work() == 1 and bytes(dst) == b"cdef"
    with pytest.raises(RuntimeError, match="before the first work"):
        plan.add(dst, 0, src, 0, 1)
    plan.close()
    plan.close()  # idempotent
    # the buffers are let go: the bytearray can be resized again
    dst.extend(b"!")
    assert bytes(dst) == b"cdef!"


def test_copies_start_helpers_only_for_big_batches():
    class Count:
        n = 0

        def submit(self, fn):
            self.n += 1   # never runs them: the saving thread copies everything itself

    small = _staging.Copies()
    small.plan.add(bytearray(100), 0, b"y" * 100, 0, 100)
    ex = Count()
    small.run(ex, 2)
    assert ex.n == 0 and small.plan.done == 1
    big = _staging.Copies()
    dst = bytearray(4 * _staging.COPY_PIECE)
    big.plan.add(dst, 0, b"z" * len(dst), 0, len(dst))
    ex = Count()
    big.run(ex, 2)
    assert ex.n == 2 and bytes(dst) == b"z" * len(dst) and big.plan.pieces == 4


def test_copy_threads_argument(tmp_path):
    for bad in (-1, 3, 1.5, True, "2"):
        with pytest.raises(ValueError, match="copy_threads must be an int from 0 to io_threads"):
            threadloom.Checkpointer(tmp_path, io_threads=2, copy_threads=bad)
    with threadloom.Checkpointer(tmp_path, io_threads=3) as ck:
        assert ck._copy_helpers == 3


@pytest.mark.parametrize("fail_at", [1, 3])
def test_an_error_while_staging_fails_that_save_only(tmp_path, monkeypatch, fail_at):
    """An exception inside save()'s staging (here: the n-th copy batch) raises from save(),
    fails that save's future, gives every staging slot back and closes every queue: later saves
    commit and close() returns (it used to wait forever for the broken save)."""
    state = {"t%d" % i: memoryview(bytes([i]) * (100 << 10)) for i in range(6)}
    calls = [0]
    real_run = _staging.Copies.run

    def run(self, executor, helpers):
        calls[0] += 1
        if calls[0] == fail_at:
            raise MemoryError("injected while staging")
        return real_run(self, executor, helpers)

    with threadloom.Checkpointer(tmp_path, keep=0, staging_bytes=128 << 10,
                                 chunk_bytes=32 << 10) as ck:
        ck.save(state, 1).result(30)
        monkeypatch.setattr(_staging.Copies, "run", run)
        calls[0] = 0
        with pytest.raises(MemoryError, match="injected"):
            ck.save(state, 2)
        monkeypatch.setattr(_staging.Copies, "run", real_run)
        broken = ck._last.future
        with pytest.raises(MemoryError):
            broken.result(30)
        assert ck.save(state, 3).result(30).endswith("step-3")
        assert ck._staging.created == len(ck._staging.free)  # every slot came back
    assert ck.steps() == [1, 3]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    got = threadloom.load(tmp_path, 3)
    assert {k: bytes(v) for k, v in got.items()} == {k: bytes(v) for k, v in state.items()}
