"""threadloom.spmd on devices: 8 sim devices in CI (and the same bodies on CUDA GPUs where two or
more are present, skipped otherwise, saying why): each rank's device, stream and DeviceComm,
training to the CPU world's weights bit for bit, collectives on device buffers ordered on the
rank's stream, an exception in one rank, a lost device, a timeout. Rank coordination uses
barriers and events, never sleeps."""

import array
import random
import threading

import pytest

import threadloom
from threadloom import devices
from threadloom.comm import DeviceComm
from device_backends import sim_devices

WORLD = 8
DIM = 6


@pytest.fixture
def sim8():
    ds = sim_devices()
    if len(ds) < WORLD:
        pytest.skip("needs %d sim devices; THREADLOOM_DEVICES configured %d" % (WORLD, len(ds)))
    yield ds[:WORLD]
    for d in ds[:WORLD]:
        d.sim_recover()         # a test that lost a device gives it back


def cuda_world_or_skip():
    """Every GPU, when there are 2 or more (NCCL takes one rank per GPU)."""
    try:
        ds = devices("cuda")
    except devices.Error as e:
        pytest.skip("no usable GPU: %s" % e)
    if len(ds) < 2:
        pytest.skip("a CUDA world needs 2 or more GPUs (NCCL takes one rank per GPU); %d here"
                    % len(ds))
    return ds


@pytest.fixture(params=["sim", pytest.param("cuda", marks=pytest.mark.gpu)])
def world(request):
    """The devices of a world: 8 sim devices; on CUDA every GPU (2 or more)."""
    if request.param == "sim":
        ds = sim_devices()
        if len(ds) < WORLD:
            pytest.skip("needs %d sim devices" % WORLD)
        return ds[:WORLD]
    return cuda_world_or_skip()


# -- the context -------------------------------------------------------------------------------

def test_each_rank_gets_its_device_stream_and_comm(sim8):
    def fn(ctx):
        assert ctx.device == sim8[ctx.rank] and ctx.stream.device == ctx.device
        assert devices.current_stream(ctx.device) is ctx.stream      # current while fn runs
        assert isinstance(ctx.comm, DeviceComm) and ctx.comm.kind == "sim"
        assert ctx.comm.host is ctx.host_comm and ctx.comm.stream is ctx.stream
        slot = ctx.pinning.slot if ctx.pinning else None
        return ctx.host_comm.allreduce(ctx.rank), slot

    got = threadloom.spmd(fn, devices=sim8, timeout=60)
    assert [r for r, _ in got] == [sum(range(WORLD))] * WORLD
    for rank, (_, slot) in enumerate(got):
        assert slot is None or (slot["role"] == "launch" and slot["gpu"] == rank)


def test_devices_argument_is_checked(sim8):
    with pytest.raises(ValueError, match="twice"):
        threadloom.spmd(lambda ctx: None, devices=[sim8[0], sim8[0]])
    with pytest.raises(threadloom.NoDeviceError, match="sim:99"):
        threadloom.spmd(lambda ctx: None, devices=["sim:99"])
    with pytest.raises(ValueError, match="at least one"):
        threadloom.spmd(lambda ctx: None, devices=[])


# -- training: the same weights as the CPU world -----------------------------------------------

def _shards(world, n, seed):
    """Per rank: (xs, ys) of a linear target with noise, float32-exact inputs."""
    rng = random.Random(seed)
    true_w = [rng.uniform(-2, 2) for _ in range(DIM)]
    out = []
    for _ in range(world):
        xs = [list(array.array("f", [rng.uniform(-1, 1) for _ in range(DIM)])) for _ in range(n)]
        ys = [sum(a * b for a, b in zip(x, true_w)) + rng.gauss(0, 0.01) for x in xs]
        out.append((xs, ys))
    return out


def train(ctx, shards, steps, lr):
    """Linear regression, data-parallel. One body for the CPU world and for devices: on devices
    the weights start from rank 0's (broadcast of a device buffer), the gradients go to the
    device behind a modelled 1 ms kernel and a copy the device runs late, are averaged there
    (ctx.comm on device buffers: ordered on ctx.stream) and come back."""
    xs, ys = shards[ctx.rank]
    rng = random.Random(1234 + ctx.rank)            # ranks start from different weights
    w = array.array("f", [rng.uniform(-1, 1) for _ in range(DIM)])
    b = array.array("f", [0.0])
    dev = ctx.device is not None
    if dev:
        s = ctx.stream
        # allocated for another stream, so reading them waits for nothing of s by itself:
        # ordering the reduction after s's work is the communicator's job
        side = devices.Stream(ctx.device)
        gw_dev, gb_dev = side.alloc(4 * DIM).cast("f"), side.alloc(4).cast("f")
        s.copy(gw_dev, w)
        ctx.comm.broadcast(gw_dev, src=0)           # rank 0's initial weights, on the device
        s.copy(w, gw_dev)
        s.synchronize()
    else:
        ctx.comm.broadcast(w, src=0)
    for _ in range(steps):
        gw = array.array("f", bytes(4 * DIM))
        gb = array.array("f", [0.0])
        for x, y in zip(xs, ys):
            err = sum(a * c for a, c in zip(w, x)) + b[0] - y
            for i in range(DIM):
                gw[i] += err * x[i] / len(xs)
            gb[0] += err / len(xs)
        if dev:
            s.launch(1_000_000)                     # the step's kernel: 1 ms of device time
            s.copy(gw_dev, gw)                      # queued behind it: lands 1 ms from now
            s.copy(gb_dev, gb)
            ctx.comm.allreduce_buckets([gw_dev, gb_dev], op="avg")
            s.copy(gw, gw_dev)
            s.copy(gb, gb_dev)
            s.synchronize()
        else:
            ctx.comm.allreduce_buckets([gw, gb], op="avg")
        for i in range(DIM):
            w[i] -= lr * gw[i]
        b[0] -= lr * gb[0]
    return bytes(w) + bytes(b)


def test_sim_world_trains_to_the_cpu_worlds_weights(sim8):
    shards = _shards(WORLD, 24, seed=7)
    cpu = threadloom.spmd(train, devices="cpu", cpu_world=WORLD, pin=False,
                          args=(shards, 15, 0.3), timeout=60)
    sim = threadloom.spmd(train, devices=sim8, args=(shards, 15, 0.3), timeout=60)
    assert len(set(cpu)) == 1 and len(set(sim)) == 1     # every replica identical
    assert sim[0] == cpu[0]                                # bit for bit
    w0 = array.array("f", cpu[0])
    assert any(abs(v) > 0.05 for v in w0[:DIM])            # and it trained


@pytest.mark.gpu
def test_cuda_world_trains_close_to_the_cpu_world():
    """The same body on CUDA GPUs through NCCL (its reduction order is its own: close, not
    bit-identical)."""
    world = cuda_world_or_skip()
    shards = _shards(len(world), 24, seed=7)
    cpu = threadloom.spmd(train, devices="cpu", cpu_world=len(world), pin=False,
                          args=(shards, 15, 0.3), timeout=120)
    gpu = threadloom.spmd(train, devices=world, args=(shards, 15, 0.3), timeout=120)
    a, b = array.array("f", cpu[0]), array.array("f", gpu[0])
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_collectives_on_device_buffers_wait_for_the_stream(world):
    """broadcast, allgather, reduce_scatter and allreduce on typed device buffers whose input
    copies are still queued behind a kernel when the collective is called."""
    n = len(world)

    def fn(ctx):
        s, r = ctx.stream, ctx.rank
        side = devices.Stream(ctx.device)      # x is another stream's: the comm must wait for s
        x = side.alloc(8 * n).cast("d")
        s.launch(2_000_000)                          # 2 ms: the copy below lands after it
        s.copy(x, array.array("d", [r * 10.0 + i for i in range(n)]))
        ctx.comm.allreduce(x, op="sum")
        gathered = s.alloc(8 * n * n).cast("d")
        ctx.comm.allgather(x, out=gathered)
        chunk = s.alloc(8).cast("d")
        ctx.comm.reduce_scatter(x, op="max", out=chunk)
        flag = s.alloc(8).cast("q")
        s.copy(flag, array.array("q", [100 + r]))
        ctx.comm.broadcast(flag, src=n - 1)
        out = [array.array("d", bytes(8 * n)), array.array("d", bytes(8 * n * n)),
               array.array("d", [0.0]), array.array("q", [0])]
        for host, d in zip(out, (x, gathered, chunk, flag)):
            s.copy(host, d)
        s.synchronize()
        return [a.tolist() for a in out]

    got = threadloom.spmd(fn, devices=world, timeout=60)
    total = [sum(r * 10.0 + i for r in range(n)) for i in range(n)]
    for r, (x, gathered, chunk, flag) in enumerate(got):
        assert x == total and gathered == total * n
        assert chunk == [total[r]] and flag == [100 + n - 1]


def test_device_values_need_out_and_no_per_call_timeout(sim8):
    def fn(ctx):
        x = ctx.stream.alloc(16).cast("f")
        with pytest.raises(ValueError, match="needs out="):
            ctx.comm.allgather(x)
        with pytest.raises(ValueError, match="world's timeout"):
            ctx.comm.allreduce(x, timeout=5)
        with pytest.raises(TypeError, match=r"cast\('f'\)"):
            ctx.comm.allreduce(ctx.stream.alloc(16))          # bytes: no element type
        other = devices.Stream(sim8[(ctx.rank + 1) % WORLD]).alloc(16).cast("f")
        with pytest.raises(ValueError, match="this rank's device"):
            ctx.comm.allreduce(other)
        return ctx.comm.allreduce([1.0, ctx.rank], op="sum")   # host values: the host comm

    assert threadloom.spmd(fn, devices=sim8, timeout=60) == [[8.0, 28.0]] * WORLD


# -- failures ----------------------------------------------------------------------------------

def test_exception_in_one_rank_cancels_the_device_world(sim8):
    canceled = []

    def fn(ctx):
        g = ctx.stream.alloc(64).cast("f")
        for step in range(50):
            if ctx.rank == 3 and step == 4:
                raise RuntimeError("rank 3 gave up at step 4")
            try:
                ctx.comm.allreduce(g)
            except threadloom.CanceledError:
                canceled.append(ctx.rank)
                raise

    with pytest.raises(RuntimeError, match="gave up") as ei:
        threadloom.spmd(fn, devices=sim8, timeout=60)
    assert "rank 3 of 8 (device sim:3)" in "".join(getattr(ei.value, "__notes__", []))
    assert sorted(canceled) == [r for r in range(WORLD) if r != 3]


def test_lost_device_ends_the_world_with_a_clear_error(sim8):
    """sim:5 is lost at step 3 while every other rank is in a collective or heading there:
    rank 5's next wait raises DeviceLostError, the others are canceled, nothing hangs."""
    at_step_3 = threading.Barrier(WORLD)

    def fn(ctx):
        g = ctx.stream.alloc(256).cast("f")
        for step in range(50):
            ctx.stream.launch(100_000)
            if step == 3:
                at_step_3.wait(timeout=30)
                if ctx.rank == 5:
                    ctx.device.sim_inject("lost")
            ctx.comm.allreduce(g, op="avg")
        return "finished"

    with pytest.raises(threadloom.DeviceLostError) as ei:
        threadloom.spmd(fn, devices=sim8, timeout=60)
    msg = str(ei.value) + "".join(getattr(ei.value, "__notes__", []))
    assert "rank 5 of 8 (device sim:5)" in msg and "lost" in msg


def test_lost_device_after_the_last_collective_is_not_dropped(sim8):
    """Work still queued when fn returns fails the world: spmd waits for each rank's stream."""
    def fn(ctx):
        ctx.stream.launch(50_000_000 if ctx.rank == 2 else 0)     # 50 ms on sim:2
        if ctx.rank == 2:
            ctx.device.sim_inject("lost")
        return ctx.rank

    with pytest.raises(threadloom.DeviceLostError) as ei:
        threadloom.spmd(fn, devices=sim8, timeout=60)
    assert "rank 2 of 8 (device sim:2)" in "".join(ei.value.__notes__)


def test_timeout_names_the_missing_ranks(sim8):
    release = threading.Event()

    def fn(ctx):
        g = ctx.stream.alloc(16).cast("f")
        if ctx.rank in (2, 6):
            release.wait(30)                        # never joins before the others time out
            return None
        try:
            ctx.comm.allreduce(g)
        finally:
            if ctx.rank == 0:
                release.set()

    with pytest.raises(threadloom.TimedOutError) as ei:
        threadloom.spmd(fn, devices=sim8, timeout=0.5)
    assert "ranks [2, 6] did not arrive" in str(ei.value)
