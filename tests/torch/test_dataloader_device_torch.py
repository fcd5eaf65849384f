"""DataLoader(device=...) with torch: every tensor leaf of every batch is a torch tensor of the
CPU batch's dtype and shape and equal to it, on the device: on sim, CPU tensors over the sim
device's memory (checked through the device allocator's bytes in use); on a GPU (marked gpu,
skipped without one) CUDA tensors. Compared with torch's own DataLoader for the same seed."""
import random

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import threadloom
from threadloom import devices
from conftest import sim_device


class Mixed(tud.Dataset):
    """Tensors (float32, bfloat16), numpy arrays, Python numbers and bools, strings."""

    def __len__(self):
        return 45

    def __getitem__(self, i):
        r = random.Random(i)
        return {"t": torch.arange(6, dtype=torch.float32).reshape(2, 3) * r.random(),
                "bf": torch.full((3,), float(i), dtype=torch.bfloat16),
                "n": np.full((4,), i, dtype=np.int16), "x": r.random(), "i": i,
                "flag": i % 3 == 0, "s": "s%d" % i}


def flat(batch):
    if isinstance(batch, dict):
        return [(k, v) for k in batch for v in [batch[k]]]
    return list(enumerate(batch))


def check(got, want, on):
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(w), n
        for k in w:
            if isinstance(w[k], torch.Tensor):
                t = g[k]
                assert isinstance(t, torch.Tensor), (n, k, type(t))
                assert t.device.type == on and t.dtype == w[k].dtype and t.shape == w[k].shape
                assert torch.equal(t.cpu(), w[k]), (n, k)
            else:
                assert g[k] == w[k], (n, k)


@pytest.mark.parametrize("nw", [0, 2])
def test_sim_batches_are_torch_tensors_over_device_memory(nw):
    dev = sim_device(2)
    want = list(tud.DataLoader(Mixed(), batch_size=8, shuffle=True, num_workers=0,
                               generator=torch.Generator().manual_seed(3)))
    before = dev.memory_stats()["bytes_in_use"]
    dl = threadloom.DataLoader(Mixed(), batch_size=8, shuffle=True, num_workers=nw,
                               generator=torch.Generator().manual_seed(3), device=dev)
    got = list(dl)
    check(got, want, "cpu")
    # the tensors are the sim device's memory: held batches keep their device blocks in use
    held = dev.memory_stats()["bytes_in_use"] - before
    assert held >= dl.stats()["device"]["bytes"], held
    del got
    assert dev.memory_stats()["bytes_in_use"] - before < held
    st = dl.stats()["device"]
    assert st["batches"] == 6 and st["in_place_bytes"] > 0


def test_pin_memory_device_and_the_to_idiom():
    """torch code that pins for a device and moves each batch there keeps working: the batch
    is there already (on sim, .to('cpu') of a CPU tensor is the tensor itself)."""
    dev = sim_device(1)
    dl = threadloom.DataLoader(Mixed(), batch_size=5, pin_memory=True, pin_memory_device="sim:1")
    for b in dl:
        x = b["t"].to("cpu", non_blocking=True)
        assert x.data_ptr() == b["t"].data_ptr()
    assert dl.stats()["device"]["device"] == str(dev)


@pytest.mark.gpu
def test_cuda_batches_are_cuda_tensors():
    try:
        cuda = devices("cuda")
    except devices.Error as e:
        pytest.skip("no usable GPU: %s" % e)
    if not cuda or not torch.cuda.is_available():
        pytest.skip("no usable GPU for threadloom and torch here")
    want = list(tud.DataLoader(Mixed(), batch_size=8, shuffle=True,
                               generator=torch.Generator().manual_seed(3)))
    dl = threadloom.DataLoader(Mixed(), batch_size=8, shuffle=True, num_workers=2,
                               generator=torch.Generator().manual_seed(3), device="cuda:0")
    got = list(dl)
    torch.cuda.synchronize()
    check(got, want, "cuda")
