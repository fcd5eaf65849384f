"""torch on the free-threaded interpreter: does the GIL stay off while a model trains?

torch's cp313t wheel declares Py_mod_gil, but every torch.optim optimizer imports torch._dynamo
(from its constructor on: add_param_group is wrapped in torch._disable_dynamo, step() in
_use_grad_for_differentiable), torch._dynamo probes for triton (torch/utils/_triton.py), and
triton's extension triton._C.libtriton does not declare Py_mod_gil: the GIL comes on. What is
checked here, each case in a child process (the GIL, once on, stays on):
- with triton installed (as torch's Linux wheels bring it): the GIL comes on at the optimizer's
  constructor, whatever the optimizer and its foreach/fused flags, and with TORCHDYNAMO_DISABLE=1;
  the GIL guard (`threadloom run`) and a DataLoader's GILWarning name triton and what to do;
- without triton (what docs/user-guide.md advises; here `import triton` blocked in the child,
  as tests/torch/conftest.py does for the whole run): SGD, Adam and AdamW train fed by a
  threadloom.DataLoader, under the guard's default (forbid), with the GIL off throughout.
"""

import importlib.machinery
import os
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.skipif(
    not sysconfig.get_config_var("Py_GIL_DISABLED"),
    reason="a Python built with the GIL has no GIL to keep off (the free-threaded venv runs these)")

# PathFinder, not importlib.util.find_spec: conftest.py blocks `import triton` in this process.
TRITON = importlib.machinery.PathFinder.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not TRITON, reason="triton is not installed for %s: nothing here turns the GIL on (what the "
                       "user guide advises)" % sys.executable)

BLOCK = 'import sys; sys.modules["triton"] = None   # as if uninstalled\n'

TRAIN = """\
import sys
import warnings
%s
import torch

import threadloom

kind, kw = sys.argv[1], eval(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
print("import", sys._is_gil_enabled())
opt = getattr(torch.optim, kind)(model.parameters(), lr=1e-2, **kw)
print("constructor", sys._is_gil_enabled())
data = [(torch.randn(8), torch.randn(1)) for _ in range(64)]
losses = []
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for epoch in range(3):
        for x, y in threadloom.DataLoader(data, batch_size=16, num_workers=2):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
print("training", sys._is_gil_enabled())
print("dynamo", "torch._dynamo" in sys.modules)
print("trained", losses[-1] < losses[0])
for w in seen:
    if issubclass(w.category, threadloom.gilguard.GILWarning):
        print("GILWarning", w.message)
"""


def run(tmp_path, prelude="", args=("Adam", "{}"), launcher=(), env_extra=None):
    """Runs TRAIN in a child: (returncode, {first word: rest of the line}, stderr)."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN % prelude)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, *launcher, str(script), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    return r.returncode, out, r.stderr


@needs_triton
@pytest.mark.parametrize("args,env", [
    (("Adam", "{}"), {}),
    (("Adam", "{'foreach': False}"), {}),
    (("AdamW", "{'fused': True}"), {}),
    (("SGD", "{'momentum': 0.9, 'foreach': True}"), {}),
    (("Adam", "{}"), {"TORCHDYNAMO_DISABLE": "1"}),
], ids=["adam", "adam-no-foreach", "adamw-fused", "sgd-foreach", "TORCHDYNAMO_DISABLE"])
def test_with_triton_an_optimizer_turns_the_gil_on(tmp_path, args, env):
    rc, out, err = run(tmp_path, args=args, env_extra=env)
    assert rc == 0, err[-3000:]
    assert out["import"] == "False"          # import torch leaves it off
    assert out["constructor"] == "True"      # the optimizer's constructor turned it on
    assert out["dynamo"] == "True" and out["trained"] == "True"
    assert "enabled to load module 'triton._C.libtriton'" in err   # CPython's own warning
    # the DataLoader then says so once, naming triton and what to do
    assert "importing 'triton._C.libtriton', which does not declare Py_mod_gil" in out["GILWarning"]
    assert "pip uninstall triton" in out["GILWarning"]


@needs_triton
def test_the_guard_names_triton_where_torch_imports_it(tmp_path):
    # forbid (the default) stops at the optimizer's constructor ...
    rc, out, err = run(tmp_path, launcher=("-m", "threadloom", "run"))
    assert rc == 1 and "constructor" not in out, (out, err[-3000:])
    assert "module 'triton._C.libtriton'" in err and "--gil=forbid stops here" in err
    where = err.split("imported at ", 1)[1].split(",", 1)[0]
    assert "/torch/utils/_triton.py:" in where     # torch's probe, not a file of triton's
    assert "pip uninstall triton" in err and "TORCHDYNAMO_DISABLE=1" in err
    # ... warn goes on with the GIL on, after one line
    rc, out, err = run(tmp_path, launcher=("-m", "threadloom", "run", "--gil=warn"))
    assert rc == 0 and out["training"] == "True", err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("threadloom: warning:")]
    assert len(lines) == 1 and "triton._C.libtriton" in lines[0] and "pip uninstall triton" in lines[0]


@pytest.mark.parametrize("args", [("SGD", "{'momentum': 0.9}"), ("Adam", "{}"),
                                  ("AdamW", "{'foreach': False}")], ids=lambda a: a[0] + a[1])
def test_without_triton_training_keeps_the_gil_off(tmp_path, args):
    # under the guard's default (forbid), which would stop the run if the GIL came on
    rc, out, err = run(tmp_path, prelude=BLOCK, args=args, launcher=("-m", "threadloom", "run"))
    assert rc == 0, err[-3000:]
    assert out["import"] == out["constructor"] == out["training"] == "False"
    assert out["dynamo"] == "True"           # torch._dynamo imported all the same
    assert out["trained"] == "True" and "GILWarning" not in out
    assert "GIL" not in err


COMPILE = BLOCK + """\
import torch
f = torch.compile(lambda x: (x * 2).sin().sum())
x = torch.linspace(0, 1, 64)
print("compiled", torch.allclose(f(x), (x * 2).sin().sum()))
print("gil", sys._is_gil_enabled())
"""


@pytest.mark.skipif(not any(os.access(os.path.join(p, "g++"), os.X_OK)
                            for p in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="no g++ on PATH: torch.compile's CPU backend needs a C++ compiler")
def test_without_triton_torch_compile_still_compiles_for_the_cpu(tmp_path):
    # what the user guide promises to someone who uninstalled triton
    s = tmp_path / "compile.py"
    s.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    r = subprocess.run([sys.executable, str(s)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == ["compiled True", "gil False"], r.stderr[-3000:]
