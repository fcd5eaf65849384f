"""threadloom.spmd: rank threads, the CPU communicator, failure propagation, timeouts."""

import array
import os
import random
import struct
import threading
import time
import traceback

import pytest

import threadloom
from conftest import ROOT, run_python

WORLDS = [1, 2, 4, 8]


def _cpus(spec):
    out = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _data(world, n, fmt, seed):
    rng = random.Random(seed)
    if fmt in "df":
        rows = [[rng.uniform(-100, 100) for _ in range(n)] for _ in range(world)]
        if fmt == "f":       # values exactly representable in float32
            rows = [list(array.array("f", r)) for r in rows]
        return rows
    return [[rng.randint(-1000, 1000) for _ in range(n)] for _ in range(world)]


def _ref_reduce(rows, op, fmt):
    acc = list(rows[0])
    for r in rows[1:]:
        if op in ("sum", "avg"):
            acc = [a + b for a, b in zip(acc, r)]
        elif op == "max":
            acc = [max(a, b) for a, b in zip(acc, r)]
        else:
            acc = [min(a, b) for a, b in zip(acc, r)]
    if op == "avg":
        acc = [a / len(rows) for a in acc]
    return list(array.array(fmt, acc))     # rounded as the buffer stores it


@pytest.fixture
def baseline_threads():
    n = threading.active_count()
    yield n
    deadline = time.monotonic() + 5
    while threading.active_count() > n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == n


def test_results_and_context(baseline_threads):
    def fn(ctx, a, b=0):
        return (ctx.rank, ctx.world_size, ctx.device, a + b, threading.current_thread().name)

    got = threadloom.spmd(fn, devices="cpu", cpu_world=3, args=(1,), kwargs={"b": 2})
    assert got == [(r, 3, None, 3, "spmd-rank-%d" % r) for r in range(3)]
    assert threadloom.spmd(lambda ctx: ctx.world_size, devices="cpu") == [2, 2]   # default 2
    with pytest.raises(ValueError):
        threadloom.spmd(lambda ctx: None, devices="cpu", cpu_world=0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fmt", ["d", "f", "q", "i"])
def test_allreduce_matches_reference(world, fmt, baseline_threads):
    rows = _data(world, 37, fmt, seed=world * 100 + ord(fmt))
    ops = ["sum", "max", "min"] + (["avg"] if fmt in "df" else [])

    def fn(ctx):
        out = {}
        for op in ops:
            buf = array.array(fmt, rows[ctx.rank])
            assert ctx.comm.allreduce(buf, op=op) is buf            # in place
            out[op] = list(buf)
            mv = memoryview(array.array(fmt, rows[ctx.rank])).toreadonly()
            out[op + "-ro"] = list(ctx.comm.allreduce(mv, op=op))   # read-only: a new array
        return out

    for res in threadloom.spmd(fn, devices="cpu", cpu_world=world, pin=False):
        for op in ops:
            ref = _ref_reduce(rows, op, fmt)
            assert res[op] == ref, op
            assert res[op + "-ro"] == ref, op


@pytest.mark.parametrize("world", WORLDS)
def test_numbers_and_lists(world):
    rng = random.Random(world)
    nums = [rng.uniform(-5, 5) for _ in range(world)]
    lists = [[rng.randint(0, 9) for _ in range(5)] for _ in range(world)]

    def fn(ctx):
        c = ctx.comm
        return (c.allreduce(nums[ctx.rank]), c.allreduce(nums[ctx.rank], "max"),
                c.allreduce(lists[ctx.rank], "min"), c.allreduce(ctx.rank, "avg"))

    got = threadloom.spmd(fn, devices="cpu", cpu_world=world, pin=False)
    s = nums[0]
    for x in nums[1:]:
        s += x
    mins = [min(col) for col in zip(*lists)]
    assert all(g == (s, max(nums), mins, sum(range(world)) / world) for g in got)


@pytest.mark.parametrize("world", WORLDS)
def test_broadcast_allgather_reduce_scatter(world):
    rng = random.Random(7 * world)
    rows = [[rng.uniform(-1, 1) for _ in range(4 * world)] for _ in range(world)]
    src = world - 1

    def fn(ctx):
        c, r = ctx.comm, ctx.rank
        b = array.array("d", rows[r])
        c.broadcast(b, src=src)
        raw = threadloom.arena().alloc(8)
        memoryview(raw)[:] = bytes([r]) * 8
        c.broadcast(raw, src=0)
        obj = c.broadcast({"from": r}, src=src)
        gathered = c.allgather(array.array("d", rows[r][:3]))
        gbytes = c.allgather(bytes([r, r]))
        out = array.array("d", [0.0] * (3 * world))
        c.allgather(array.array("d", rows[r][:3]), out=out)
        glist = c.allgather([r])
        rs = c.reduce_scatter(array.array("d", rows[r]))
        rsl = c.reduce_scatter(list(rows[r]), op="max")
        c.barrier()
        ctx.barrier()
        return (list(b), bytes(raw), obj, list(gathered), gbytes, list(out), glist, list(rs), rsl)

    res = threadloom.spmd(fn, devices="cpu", cpu_world=world, pin=False)
    flat = []
    for row in rows:
        flat += row[:3]
    summed = _ref_reduce(rows, "sum", "d")
    maxed = _ref_reduce(rows, "max", "d")
    n = 4
    for r, (b, raw, obj, gathered, gbytes, out, glist, rs, rsl) in enumerate(res):
        assert b == rows[src]
        assert raw == bytes([0]) * 8
        assert obj == {"from": src}
        assert gathered == flat and out == flat
        assert gbytes == b"".join(bytes([i, i]) for i in range(world))
        assert glist == [[i] for i in range(world)]
        assert rs == summed[r * n:(r + 1) * n]
        assert rsl == maxed[r * n:(r + 1) * n]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_allreduce_buckets(world):
    rng = random.Random(3)
    shapes = [("d", 5), ("f", 3), ("d", 40), ("q", 4), ("d", 1)]
    grads = [[array.array(f, _data(1, n, f, rng.random())[0]) for f, n in shapes] + [[1.0 * r, 2.0]]
             for r in range(world)]

    def fn(ctx, bucket_bytes):
        mine = [array.array(g.typecode, g) if isinstance(g, array.array) else list(g)
                for g in grads[ctx.rank]]
        ops = ctx.comm.allreduce_buckets(mine[:3] + mine[4:], bucket_bytes=bucket_bytes)
        ctx.comm.allreduce_buckets([mine[3]], op="sum")
        assert ops[-1] is mine[-1]
        return [list(g) for g in mine]

    for bucket_bytes in (1, 64, 1 << 20):
        got = threadloom.spmd(fn, devices="cpu", cpu_world=world, pin=False, args=(bucket_bytes,))
        for i, (f, n) in enumerate(shapes):
            rows = [list(grads[r][i]) for r in range(world)]
            ref = _ref_reduce(rows, "sum" if f == "q" else "avg", f)
            for g in got:
                if f == "f":
                    assert g[i] == pytest.approx(ref, rel=1e-6)
                else:
                    assert g[i] == pytest.approx(ref, rel=1e-12)
        for g in got:
            assert g[-1] == pytest.approx([sum(range(world)) / world, 2.0])


def test_mismatched_calls_fail_every_rank(baseline_threads):
    def fn(ctx):
        ctx.comm.allreduce(array.array("d", [1.0] * (ctx.rank + 1)))

    with pytest.raises(ValueError, match="must match"):
        threadloom.spmd(fn, devices="cpu", cpu_world=2)

    def fn2(ctx):
        ctx.comm.allreduce(1) if ctx.rank == 0 else ctx.comm.barrier()

    with pytest.raises(ValueError, match="same collectives"):
        threadloom.spmd(fn2, devices="cpu", cpu_world=2)


def failing_rank(ctx, where):
    if ctx.rank == 2:
        time.sleep(0.05)               # the others are already waiting
        raise KeyError("rank two broke")
    if where == "barrier":
        ctx.barrier()
    else:
        ctx.comm.allreduce(array.array("d", [1.0, 2.0]))
    return "unreachable"


@pytest.mark.parametrize("where", ["barrier", "allreduce"])
def test_failure_propagates_and_joins(where, baseline_threads):
    seen = []

    def fn(ctx):
        try:
            return failing_rank(ctx, where)
        except threadloom.CanceledError as e:
            seen.append((ctx.rank, str(e)))
            raise

    with pytest.raises(KeyError, match="rank two broke") as ei:
        threadloom.spmd(fn, devices="cpu", cpu_world=4, args=(), timeout=30)
    frames = [fr.name for fr in traceback.extract_tb(ei.value.__traceback__)]
    assert "failing_rank" in frames
    assert any("rank 2 of 4" in n for n in getattr(ei.value, "__notes__", []))
    assert sorted(r for r, _ in seen) == [0, 1, 3]
    assert all("rank 2 failed with KeyError" in msg for _, msg in seen)


def test_timeout_names_missing_ranks(baseline_threads):
    errors = {}
    first_timeout = threading.Event()

    def fn(ctx):
        try:
            if ctx.rank in (1, 3):   # late: arrive only after the others have timed out
                first_timeout.wait(30)
            ctx.comm.allreduce(1.0)
        except threadloom.TimedOutError as e:
            errors[ctx.rank] = str(e)
            first_timeout.set()
            raise

    t0 = time.monotonic()
    with pytest.raises(threadloom.TimedOutError) as ei:
        threadloom.spmd(fn, devices="cpu", cpu_world=4, timeout=0.2)
    assert time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert "allreduce" in msg and "ranks [1, 3] did not arrive" in msg
    assert sorted(errors) == [0, 1, 2, 3]            # every rank failed with TimedOutError


def test_caller_is_not_left_waiting_on_a_refused_device():
    with pytest.raises(ValueError):
        threadloom.spmd(lambda ctx: None, devices=[])
    with pytest.raises((threadloom.NoDeviceError, ValueError)):
        threadloom.spmd(lambda ctx: None, devices=[0, 0])


@pytest.mark.parametrize("world", [2, 4])
def test_rank_threads_are_pinned_to_their_plan_slot(world, baseline_threads):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")

    def fn(ctx):
        return ctx.pinning.slot, os.sched_getaffinity(0)

    plan = threadloom.plan(gpus=0, loaders_per_gpu=world, io_threads=0, main_thread=False)
    loaders = [s for s in plan.slots() if s["role"] == "loader"]
    for rank, (slot, cpus) in enumerate(threadloom.spmd(fn, devices="cpu", cpu_world=world)):
        assert slot["role"] == "loader" and slot["rank"] == rank
        assert slot["cpus"] == loaders[rank]["cpus"]
        assert cpus == _cpus(slot["cpus"])
    assert threadloom.spmd(lambda ctx: ctx.pinning, devices="cpu", pin=False) == [None, None]


def test_example_trains_and_loss_decreases(tmp_path):
    p = run_python(os.path.join(ROOT, "examples", "train_threads.py"), "--steps", "60", "--ranks",
                   "2", "--ckpt-every", "20", "--ckpt-dir", str(tmp_path / "ckpt"))
    assert p.returncode == 0, p.stderr
    losses = [float(line.split()[-1]) for line in p.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 10
    assert "replicas identical: True" in p.stdout
    assert "checkpoints at steps [40, 60]" in p.stdout
    state = threadloom.load(str(tmp_path / "ckpt"))
    assert state["step"] == 60 and len(memoryview(state["w"])) == 8


def test_float32_stored_once():
    def fn(ctx):
        return list(ctx.comm.allreduce(array.array("f", [0.1 * (ctx.rank + 1)])))

    got = threadloom.spmd(fn, devices="cpu", cpu_world=3, pin=False)
    f = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    assert got == [[f(f(0.1) + f(0.2) + f(0.30000000000000004))]] * 3
