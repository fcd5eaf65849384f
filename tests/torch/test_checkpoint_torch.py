"""threadloom.Checkpointer with torch tensors: a model's and an optimizer's state_dict round trip,
every dtype a state_dict holds, non-contiguous, 0-d, empty, shared-storage and requires_grad
tensors; the files read back with a safetensors reader written here from the spec."""

import json
import os
import struct

import pytest

import threadloom
from threadloom import _core

torch = pytest.importorskip("torch")

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8, "I32": torch.int32,
          "I8": torch.int8, "I16": torch.int16, "F64": torch.float64}


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


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


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
        assert isinstance(got["model"][k], torch.Tensor) and same(got["model"][k], v), k
    # Adam: {"state": {param index: {"step": tensor, "exp_avg": ..., "exp_avg_sq": ...}},
    # "param_groups": [{"lr": ..., "betas": (...), "params": [...], ...}]}
    saved, loaded = state["opt"], got["opt"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert set(loaded["state"]) == set(saved["state"]) and len(saved["state"]) == 6
    for i, s in saved["state"].items():
        assert set(loaded["state"][i]) == set(s)
        for name, v in s.items():
            assert same(loaded["state"][i][name], v), (i, name)

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
        assert same(got[k], v), k
        assert not got[k].requires_grad
    got["view_a"][4] = -1  # loaded views are separate tensors (sharing is not kept)
    assert got["view_b"][0] == 4

    files = files_of(tmp_path / "step-1")
    manifest = json.loads((tmp_path / "step-1" / "manifest.json").read_text())
    names = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64", "bool": "BOOL",
             "u8": "U8", "i8": "I8", "f64": "F64", "scalar": "F32", "empty_bf16": "BF16"}
    for k, dtype in names.items():
        assert files[k][0] == dtype, k
    for k, v in want.items():
        dtype, shape, data = files[k]
        assert shape == list(v.shape) and len(data) == v.numel() * v.element_size(), k
        assert same(from_file(files[k]), v), k
        assert manifest["tensors"][k]["xxh3_64"] == "%016x" % _core.xxh3_64(data)

    plain = threadloom.load(tmp_path)  # without framework=: memoryviews (BF16: raw bytes)
    assert plain["f32"].shape == (3, 4) and plain["f32"].format == "f"
    assert bytes(plain["bf16"]) == files["bf16"][2]
    assert same(torch.frombuffer(plain["i64"], dtype=torch.int64), want["i64"])


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
