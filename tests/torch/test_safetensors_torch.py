"""The safetensors library reads threadloom's checkpoint files (format version 2).

Every dtype threadloom writes (from buffers and numpy arrays: BOOL, U8, I8, U16, I16, U32, I32,
U64, I64, F16, F32, F64; from torch tensors: those and BF16), 0-d, empty and non-contiguous
tensors, over several shards: `safe_open` (torch and numpy), `safetensors.torch.load_file` and
`safetensors.deserialize` read each shard, with threadloom's `__metadata__`, to the values saved
and to what threadloom.load reads back. The example of docs/checkpoint-format.md ("Reading a
checkpoint without threadloom") runs against a checkpoint of a model and its optimizer.

safetensors ships abi3 wheels only, which a free-threaded Python cannot load: these run on the
GIL baseline (build/venv-gil), where requirements/pins.txt installs it, and skip on 3.13t.
"""

import fractions
import json
import os
import re
import sys
import sysconfig

import numpy as np
import pytest
import torch

import threadloom

if sysconfig.get_config_var("Py_GIL_DISABLED"):
    pytest.skip("safetensors has no free-threaded wheel (abi3 wheels only, which %s cannot load): "
                "the GIL baseline (build/venv-gil) runs these" % sys.executable,
                allow_module_level=True)
if os.environ.get("THREADLOOM_PINNED") == "1":
    import safetensors  # noqa: F401  (pinned for the GIL baseline: an ImportError is the answer)
else:
    pytest.importorskip("safetensors", reason="safetensors is not installed for %s" % sys.executable)
from safetensors import deserialize, safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")

# numpy dtype -> the safetensors dtype threadloom writes for an array of it
NUMPY = {np.bool_: "BOOL", np.uint8: "U8", np.int8: "I8", np.uint16: "U16", np.int16: "I16",
         np.uint32: "U32", np.int32: "I32", np.uint64: "U64", np.int64: "I64",
         np.float16: "F16", np.float32: "F32", np.float64: "F64"}
TORCH = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.uint16: "U16",
         torch.int16: "I16", torch.uint32: "U32", torch.int32: "I32", torch.uint64: "U64",
         torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.float32: "F32", torch.float64: "F64"}


def numpy_values(dtype, shape=(3, 5)):
    """An array of `dtype` with the type's extremes in it, as saved."""
    n = int(np.prod(shape))
    if dtype is np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        return np.array([lo + (hi - lo) * i // (n - 1) for i in range(n)], dtype).reshape(shape)
    a = np.linspace(-3, 3, n).astype(dtype)
    a.flat[0], a.flat[-1] = np.finfo(dtype).min, np.finfo(dtype).max
    return a.reshape(shape)


def torch_values(dtype):
    if dtype is torch.bfloat16:
        return torch.linspace(-3, 3, 15).reshape(3, 5).to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):   # few torch ops on these: via numpy
        return torch.from_numpy(numpy_values({torch.uint16: np.uint16, torch.uint32: np.uint32,
                                              torch.uint64: np.uint64}[dtype]))
    return torch.from_numpy(numpy_values(torch.empty(0, dtype=dtype).numpy().dtype.type))


def every_dtype_state():
    """{name: (saved value, its safetensors dtype, the values as a torch tensor)}."""
    out = {}
    for dtype, st in NUMPY.items():
        a = numpy_values(dtype)
        out["np." + st] = (a, st, torch.from_numpy(a.copy()))
    for dtype, st in TORCH.items():
        t = torch_values(dtype)
        out["torch." + st] = (t, st, t.clone())
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out["torch.transposed"] = (base.t(), "F32", base.t().contiguous())
    out["torch.bf16_sliced"] = (base.bfloat16()[1:3, ::2], "BF16", base.bfloat16()[1:3, ::2].clone())
    out["torch.scalar"] = (torch.tensor(2.5, dtype=torch.float64), "F64", torch.tensor(2.5, dtype=torch.float64))
    out["torch.empty"] = (torch.zeros(0, 4, dtype=torch.bfloat16), "BF16", torch.zeros(0, 4, dtype=torch.bfloat16))
    out["np.scalar"] = (np.array(7, np.int32), "I32", torch.tensor(7, dtype=torch.int32))
    out["np.empty"] = (np.zeros((2, 0), np.uint16), "U16", torch.zeros(2, 0, dtype=torch.uint16))
    out["bytes"] = (b"\x00\x01\xfe\xff", "U8", torch.tensor([0, 1, 254, 255], dtype=torch.uint8))
    return out


def same(got, want, where="tensor"):
    """Asserts that `got` is `want`: dtype, shape and values, exactly."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: "%s: %s" % (where, m))


@pytest.fixture(scope="module")
def every_dtype_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cases = every_dtype_state()
    with threadloom.Checkpointer(d, shard_bytes=256) as ck:     # several shards
        ck.save({k: v for k, (v, _, _) in cases.items()}, 3, metadata={"run": "every-dtype"}).result(60)
    step = d / "step-3"
    return d, step, json.loads((step / "manifest.json").read_text()), cases


def test_safe_open_reads_every_dtype_threadloom_writes(every_dtype_checkpoint):
    d, step, manifest, cases = every_dtype_checkpoint
    assert manifest["format_version"] == 2 and len(manifest["files"]) > 3
    seen = {}
    for entry in manifest["files"]:
        with safe_open(step / entry["name"], framework="pt") as f:
            assert f.metadata() == {"format": "threadloom-checkpoint", "format_version": "2",
                                    "step": "3"}
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    assert set(seen) == set(cases) == set(manifest["tensors"])
    for k, (_, st, want) in cases.items():
        assert manifest["tensors"][k]["dtype"] == st, k
        same(seen[k], want, k)
    # threadloom reads its own files to the same tensors
    mine = threadloom.load(d, framework="torch")
    for k, t in seen.items():
        same(mine[k], t, k)


def test_numpy_framework_load_file_and_deserialize_agree(every_dtype_checkpoint):
    _, step, manifest, cases = every_dtype_checkpoint
    for entry in manifest["files"]:
        path = step / entry["name"]
        pt = load_file(path)
        raw = dict(deserialize(path.read_bytes()))
        assert set(pt) == set(raw)
        for k, t in pt.items():
            same(t, cases[k][2], k)
            assert (raw[k]["dtype"], raw[k]["shape"]) == (cases[k][1], list(t.shape)), k
            assert bytes(raw[k]["data"]) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                if cases[k][1] == "BF16":   # numpy has no bfloat16
                    continue
                a = f.get_tensor(k)
                want = cases[k][2].numpy()
                assert a.dtype == want.dtype and a.shape == want.shape and np.array_equal(a, want), k


def test_the_safetensors_header_is_what_the_manifest_hashes(every_dtype_checkpoint):
    # version 2's header checksum covers exactly the bytes a safetensors reader parses first
    from threadloom import _core
    _, step, manifest, _ = every_dtype_checkpoint
    for entry in manifest["files"]:
        blob = (step / entry["name"]).read_bytes()
        n = int.from_bytes(blob[:8], "little")
        assert entry["header_bytes"] == 8 + n and (8 + n) % 8 == 0
        assert entry["header_xxh3_64"] == "%016x" % _core.xxh3_64(blob[:8 + n])
        assert len(blob) == entry["bytes"]


# -- the example of docs/checkpoint-format.md --------------------------------------------------

SECTION = "## Reading a checkpoint without threadloom"


def doc_blocks():
    """The ```python blocks of the format document's section on reading without threadloom,
    each marked `<!-- needs: safetensors -->`."""
    text = open(os.path.join(ROOT, "docs", "checkpoint-format.md"), encoding="utf-8").read()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"<!-- needs: (\w+) -->\n```python\n(.*?)\n```\n", section, re.S)
    assert len(blocks) == 2 and all(need == "safetensors" for need, _ in blocks)
    return [code for _, code in blocks]


def test_the_format_documents_example_opens_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7,
             "frac": fractions.Fraction(1, 3), "pair": (1, "x")}
    with threadloom.Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(saved, 7).result(60)
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "checkpoint_format_example"}
    for code in doc_blocks():
        exec(compile(code, "checkpoint-format.md", "exec"), ns)
    assert capsys.readouterr().out == "7 torch.float32 0.1\n"
    state = ns["open_checkpoint"]("ckpt")
    assert ns["open_checkpoint"]("ckpt", step=7)["step"] == 7
    want = threadloom.load(tmp_path / "ckpt", framework="torch")
    assert state["step"] == 7 and state["frac"] == fractions.Fraction(1, 3) and state["pair"] == (1, "x")
    for k, v in saved["model"].items():
        same(state["model"][k], v, k)
        same(want["model"][k], v, k)
    assert state["opt"]["param_groups"] == saved["opt"]["param_groups"]
    for i, s in saved["opt"]["state"].items():
        same(state["opt"]["state"][i]["momentum_buffer"], s["momentum_buffer"], i)
    for k, v in ns["model"].state_dict().items():      # the example's model got the weights
        same(v, saved["model"][k], k)
