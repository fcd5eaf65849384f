"""threadloom.Checkpointer with torch tensors: a model's and an optimizer's state_dict round trip,
every dtype a state_dict holds, non-contiguous, 0-d, empty, shared-storage and requires_grad
tensors, numpy arrays of every dtype; the files read back with a safetensors reader written here
from the spec (the safetensors package has no free-threaded wheel; on the GIL baseline
test_safetensors_torch.py reads them with it); training resumed from a checkpoint is
bit-identical to the run that never stopped."""

import json
import os
import struct

import pytest

import threadloom
from threadloom import _core

torch = pytest.importorskip("torch")

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8, "I32": torch.int32,
          "I8": torch.int8, "I16": torch.int16, "F64": torch.float64, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}


def read_safetensors(path):
    """An independent reader: u64 LE header size, JSON header, tensors tiling the data section.
    Returns {name: (dtype, shape, bytes)}."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out, pos = {}, 0
    for (b, e), k in sorted((tuple(v["data_offsets"]), k) for k, v in header.items()):
        assert b == pos, "offsets are contiguous"
        out[k] = (header[k]["dtype"], header[k]["shape"], data[b:e])
        pos = e
    assert pos == len(data), "the tensors cover the data section"
    return out


def files_of(step_dir):
    """{tensor name: (dtype, shape, bytes)} over every shard of a checkpoint."""
    out = {}
    for name in sorted(os.listdir(step_dir)):
        if name.endswith(".safetensors"):
            out.update(read_safetensors(os.path.join(step_dir, name)))
    return out


def from_file(entry):
    """The torch tensor a file entry holds, decoded with torch.frombuffer (not threadloom)."""
    dtype, shape, data = entry
    if not data:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=DTYPES[dtype]).reshape(shape)


def same(got, want, where="tensor"):
    """Asserts that `got` is `want` bit for bit: dtype and shape, then the values
    (torch.testing.assert_close without tolerance says which differ), then the bytes
    (which also tell -0.0 from 0.0 and one NaN from another)."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: "%s: %s" % (where, m))
    def raw(t):
        t = t.resolve_neg().contiguous().view(-1)
        return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    assert torch.equal(raw(got), raw(want)), where


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)  # buffers too: running stats, an int64 counter
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(32, 8)).square().mean().backward()
        opt.step()
    return model, opt


def test_model_and_adam_state_dict_round_trip(tmp_path):
    model, opt = trained()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 3}
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save(state, 10).result(60)
    got = threadloom.load(tmp_path, framework="torch")
    assert got["epoch"] == 3
    for k, v in state["model"].items():
        assert isinstance(got["model"][k], torch.Tensor), k
        same(got["model"][k], v, k)
    # Adam: {"state": {param index: {"step": tensor, "exp_avg": ..., "exp_avg_sq": ...}},
    # "param_groups": [{"lr": ..., "betas": (...), "params": [...], ...}]}
    saved, loaded = state["opt"], got["opt"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert set(loaded["state"]) == set(saved["state"]) and len(saved["state"]) == 6
    for i, s in saved["state"].items():
        assert set(loaded["state"][i]) == set(s)
        for name, v in s.items():
            same(loaded["state"][i][name], v, (i, name))

    fresh, fresh_opt = trained(seed=1, steps=1)
    fresh.load_state_dict(got["model"])
    fresh_opt.load_state_dict(got["opt"])
    model.eval()
    fresh.eval()
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more step gives the same weights
        m.train()
        o.zero_grad()
        torch.manual_seed(7)
        m(torch.randn(32, 8)).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_dtypes_shapes_and_layouts(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(10, dtype=torch.int64)
    w = torch.randn(3, 5, requires_grad=True)
    state = {
        "f32": torch.randn(3, 4), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(-5, 5), "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(256, dtype=torch.uint8), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "f64": torch.randn(2, dtype=torch.float64),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([3, 2**64 - 1], dtype=torch.uint64),
        "transposed": base.t(), "sliced": base[1:3, ::2], "bf16_t": torch.randn(3, 2).bfloat16().t(),
        "scalar": torch.tensor(2.5), "scalar_i": torch.tensor(7), "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "view_a": shared[:6], "view_b": shared[4:],      # two views of one storage
        "param": w, "param_t": w.t(),                    # requires_grad (and a view of it)
        "neg_view": torch._neg_view(torch.arange(4.0)),  # lazily negated: is_neg() is True
    }
    assert not state["transposed"].is_contiguous() and not state["sliced"].is_contiguous()
    with threadloom.Checkpointer(tmp_path) as ck:
        fut = ck.save(state, 1)
        base.zero_()  # save() returned: the bytes are staged, later writes do not leak in
        shared.zero_()
        fut.result(60)
    base.copy_(torch.arange(24, dtype=torch.float32).reshape(4, 6))
    shared.copy_(torch.arange(10))
    want = {k: v.detach() for k, v in state.items()}

    got = threadloom.load(tmp_path, framework="torch")
    assert set(got) == set(want)
    for k, v in want.items():
        same(got[k], v, k)
        assert not got[k].requires_grad
    got["view_a"][4] = -1  # loaded views are separate tensors (sharing is not kept)
    assert got["view_b"][0] == 4

    files = files_of(tmp_path / "step-1")
    manifest = json.loads((tmp_path / "step-1" / "manifest.json").read_text())
    names = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64", "bool": "BOOL",
             "u8": "U8", "i8": "I8", "f64": "F64", "scalar": "F32", "empty_bf16": "BF16",
             "u16": "U16", "u32": "U32", "u64": "U64"}
    for k, dtype in names.items():
        assert files[k][0] == dtype, k
    for k, v in want.items():
        dtype, shape, data = files[k]
        assert shape == list(v.shape) and len(data) == v.numel() * v.element_size(), k
        same(from_file(files[k]), v, k)
        assert manifest["tensors"][k]["xxh3_64"] == "%016x" % _core.xxh3_64(data)

    plain = threadloom.load(tmp_path)  # without framework=: memoryviews (BF16: raw bytes)
    assert plain["f32"].shape == (3, 4) and plain["f32"].format == "f"
    assert bytes(plain["bf16"]) == files["bf16"][2]
    same(torch.frombuffer(plain["i64"], dtype=torch.int64), want["i64"])


def test_numpy_arrays_of_every_dtype_empty_and_0d(tmp_path):
    import numpy as np
    dtypes = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
              np.int64, np.float16, np.float32, np.float64]
    state = {np.dtype(d).name: np.arange(12).reshape(3, 4).astype(d) for d in dtypes}
    state["empty"] = np.zeros((2, 0), np.uint16)    # a zero in the shape, as torch.zeros(0, 4)
    state["empty_f"] = np.zeros(0, np.float32)
    state["scalar"] = np.array(7, np.int32)
    state["fortran"] = np.asfortranarray(np.arange(6.0).reshape(2, 3))   # written in C order
    with threadloom.Checkpointer(tmp_path) as ck:
        ck.save(state, 1).result(60)
    got = threadloom.load(tmp_path, framework="torch")
    for k, a in state.items():
        same(got[k], torch.from_numpy(a.copy(order="C")), k)


def test_unsupported_torch_tensors_raise_clearly(tmp_path):
    with threadloom.Checkpointer(tmp_path) as ck:
        with pytest.raises(TypeError, match="dtype"):
            ck.save({"c": torch.zeros(2, dtype=torch.complex64)}, 1)
        with pytest.raises(TypeError, match="dense"):
            ck.save({"s": torch.eye(3).to_sparse()}, 1)
        with pytest.raises(NotImplementedError, match="torch device meta"):
            ck.save({"m": torch.zeros(2, device="meta")}, 1)
        ck.save({"ok": torch.ones(2)}, 2).result(60)
    assert ck.steps() == [2]
    with pytest.raises(ValueError, match="framework"):
        threadloom.load(tmp_path, framework="jax")


# -- resuming a training run -------------------------------------------------------------------

class Regression(torch.utils.data.Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 4, generator=g) + 0.1 * torch.randn(n, 4, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DropNet(Net):
    """Net with dropout: its masks come from torch's global RNG, which the checkpoint keeps."""

    def forward(self, x):
        return torch.nn.functional.dropout(super().forward(x), 0.2, self.training)


OPTIMIZERS = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw-no-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
}
TOTAL = 40   # steps: 12 batches an epoch, so 3 epochs and a third


def training(kind, seed, stop=None, ckpt=None):
    """Trains TOTAL steps from scratch (seed: initial weights and RNG), or resumes from the
    checkpoint in `ckpt` when stop is None and ckpt is given; saves model, optimizer, scheduler,
    loader, RNG and losses to `ckpt` after step `stop` and returns there. Returns (losses,
    model) at the end."""
    torch.manual_seed(seed)
    model = DropNet()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    loader = threadloom.DataLoader(Regression(), batch_size=8, shuffle=True, num_workers=2,
                                   generator=torch.Generator().manual_seed(seed + 100))
    losses = []
    if stop is None and ckpt is not None:
        state = threadloom.load(ckpt, framework="torch")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        losses = state["losses"]
    while len(losses) < TOTAL:
        for x, y in loader:   # after load_state_dict, the first pass is the rest of the epoch
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == stop:
                with threadloom.Checkpointer(ckpt) as ck:
                    ck.save({"model": model.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "loader": loader.state_dict(),
                             "rng": torch.get_rng_state(), "losses": losses}, stop).result(60)
                loader.close()
                return losses, model
            if len(losses) == TOTAL:
                break
        sched.step()
    loader.close()
    return losses, model


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # resumed at an epoch's end
@pytest.mark.parametrize("stop", [5, 12, 30])   # mid-epoch 0, at an epoch's end, mid-epoch 2
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path, kind, stop):
    """Stopped after `stop` steps and resumed from the checkpoint by objects built from another
    seed: the same losses and the same weights, bit for bit, as the run that never stopped (on
    the free-threaded venv with the GIL off throughout: conftest.py checks it after each test)."""
    want_losses, want = training(kind, seed=0)
    head, _ = training(kind, seed=0, stop=stop, ckpt=tmp_path)
    assert head == want_losses[:stop]
    losses, got = training(kind, seed=1, ckpt=tmp_path)      # every state comes from the file
    assert losses == want_losses
    assert sum(want_losses[-8:]) < 0.8 * sum(want_losses[:8])   # and it trained
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        same(a, b, name)
