"""Device state with torch: tensors over a sim device's memory (DataLoader(device="sim:N")
batches, load(device="sim:N", framework="torch")) are checkpointed as device state of that
device and come back bit-exactly, with their dtypes and shapes, onto a device; torch CUDA
tensors on a GPU (marked gpu, skipped without one), including an in-place update queued on
torch's stream right after save()."""
import os

import pytest
import torch

import threadloom
from threadloom import devices
from conftest import sim_device


def on_sim(t, dev):
    """A CPU tensor equal to t over the sim device's memory (the loader's kind of batch)."""
    n = t.numel() * t.element_size()
    s = devices.current_stream(dev)
    buf = s.alloc(max(n, 1))
    s.copy(buf, t.contiguous().view(-1).view(torch.uint8).numpy(), n)
    return torch.from_dlpack(buf)[:n].view(t.dtype).reshape(t.shape)


def test_sim_backed_tensors_round_trip_as_device_state(tmp_path):
    dev = sim_device(6)
    want = {"w": torch.randn(64, 33), "bf": torch.randn(7).to(torch.bfloat16),
            "mask": torch.rand(5) > 0.5, "i": torch.arange(10, dtype=torch.int64)}
    state = {k: on_sim(v, dev) for k, v in want.items()}
    state["host"] = torch.ones(3)
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save(state, 1).result(60)
    files = [n for n in os.listdir(tmp_path / "step-1") if n.endswith(".safetensors")]
    assert len(files) == 2  # the host tensor's file and sim:6's
    back = threadloom.load(tmp_path, framework="torch")
    for k, v in want.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    on_dev = threadloom.load(tmp_path, framework="torch", device=dev)
    for k, v in want.items():
        t = on_dev[k]
        assert t.dtype == v.dtype and t.shape == v.shape and torch.equal(t, v), k
        assert devices.sim_buffer(t).device == dev  # over the sim device's memory


def test_loader_batches_checkpoint_as_device_state(tmp_path):
    dev = sim_device(5)
    ds = [{"x": torch.full((4,), float(i)), "y": i} for i in range(16)]
    batches = list(threadloom.DataLoader(ds, batch_size=8, device=dev))
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save({"batches": batches}, 1).result(60)
    back = threadloom.load(tmp_path, framework="torch")
    for a, b in zip(batches, back["batches"]):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


@pytest.mark.gpu
def test_cuda_tensors_snapshot_on_a_side_stream(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no usable GPU for torch here")
    try:
        devices("cuda")
    except devices.Error as e:
        pytest.skip("no usable GPU: %s" % e)
    w = torch.randn(1 << 22, device="cuda:0")
    want = w.cpu()
    with threadloom.Checkpointer(tmp_path) as ck:
        fut = ck.save({"w": w, "t": w[::2]}, 1)
        w.mul_(0)                      # queued on torch's stream after save(): not in it
        fut.result(120)
    back = threadloom.load(tmp_path, framework="torch", device="cuda:0")
    assert back["w"].device.type == "cuda" and torch.equal(back["w"].cpu(), want)
    assert torch.equal(back["t"].cpu(), want[::2])
