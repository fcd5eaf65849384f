"""tests/torch: threadloom next to torch in one interpreter (`make test-torch`).

They run twice (`make test-torch`): on the free-threaded venv build/venv (torch's cp313t
wheel) and on the GIL baseline, build/venv-gil (build/bootstrap.env's GIL_PYTHON: the system's
Python 3.11; a GIL build, so threads take turns there), both with torch from PyPI pinned in
requirements/pins.txt and threadloom pip-installed (`make build`, `make build-gil`); what is
checked is behaviour, never speed. Without torch every test here SKIPs, saying why
(`make test-torch` sets THREADLOOM_PINNED=1: the venvs have the pinned packages, so there torch,
and safetensors on the GIL baseline, must import). As in tests/python,
the package must be the installed one (tests/python/conftest.py: require_installed).

On the free-threaded venv the GIL must stay off through every test (else the threads of the
tests after it take turns, quietly): a test after which it is on fails. torch imports triton
(through torch._dynamo, from any torch.optim optimizer's constructor on), whose extension lacks
Py_mod_gil, so the run blocks `import triton` as a user without triton has it
(docs/user-guide.md, "torch on the free-threaded Python"); test_gil_torch.py checks, in child
processes, both what triton does and that training stays free-threaded without it.
"""
import importlib.util
import os
import sys
import sysconfig

import pytest

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
if FREE_THREADED:
    sys.modules.setdefault("triton", None)   # `import triton` raises ImportError, as uninstalled

if os.environ.get("THREADLOOM_PINNED") == "1":
    import torch  # noqa: F401  (an ImportError here is the answer)
else:
    torch = pytest.importorskip("torch", reason="torch does not import on %s" % sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "conftest.py")
    spec = importlib.util.spec_from_file_location("_tests_python_conftest", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.require_installed()


@pytest.fixture(autouse=True)
def gil_stays_off():
    """On a free-threaded build the GIL is off before and after each test (unless PYTHON_GIL=1
    or -X gil=1 asked for it)."""
    check = FREE_THREADED and getattr(sys.flags, "gil", None) != 1
    if check and sys._is_gil_enabled():
        pytest.fail("the GIL was already on when this test started: an earlier test (or conftest) "
                    "imported an extension without Py_mod_gil; this test's threads would take turns")
    yield
    if check and sys._is_gil_enabled():
        pytest.fail("this test turned the GIL on: it imported an extension without Py_mod_gil "
                    "(CPython's RuntimeWarning in the warnings summary names it)")


def sim_device(i):
    """Sim device i of this process (configuring sim:8, as tests/python's fixtures do, unless
    THREADLOOM_DEVICES chose sim)."""
    from threadloom import devices
    if devices.backend()["name"] != "sim":
        try:
            devices.configure_sim("sim:8")
        except devices.BusyError:
            pass
    return devices("sim")[i]
