"""pytest configuration: the `gpu` marker, and helpers shared by the Python tests.

GPU tests are marked `gpu`; they SKIP (never pass) where no GPU is usable, saying why.
`make gpu-test` runs only them; `make test` runs everything.

The tests run against the installed package, as a user has it: `make build` pip-installs the
checkout into build/venv, and pytest runs on that venv's python. Nothing here puts the sources
(python/) on sys.path or PYTHONPATH, and the run stops when threadloom came from there anyway
(require_installed). BIN is the launcher installed beside that python.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPOLOGIES = os.path.join(ROOT, "tests", "data", "topologies")
# The `threadloom` pip installed with this interpreter's package (THREADLOOM_BIN overrides).
BIN = os.environ.get("THREADLOOM_BIN") or os.path.join(os.path.dirname(sys.executable), "threadloom")


def gil_python():
    """The GIL baseline's python with threadloom installed (build/venv-gil, `make build-gil`),
    or None."""
    try:
        with open(os.path.join(ROOT, "build", "bootstrap.env")) as f:
            for line in f:
                if line.startswith("GIL_PYTHON := "):
                    exe = line.split(":=", 1)[1].strip()
                    return exe if os.access(exe, os.X_OK) else None
    except OSError:
        pass
    return None


def require_installed():
    """Stops the run unless `import threadloom` finds an installed package (not python/ of a
    checkout): the tests check what pip installs. Also used by tests/torch/conftest.py."""
    import threadloom
    here = os.path.realpath(os.path.dirname(threadloom.__file__))
    for sources in {os.path.join(ROOT, "python"), os.path.join(os.getcwd(), "python")}:
        if os.path.commonpath([here, os.path.realpath(sources)]) == os.path.realpath(sources):
            pytest.exit("threadloom was imported from the sources (%s), not from an installed "
                        "package: run the tests with `make test` (it pip-installs this checkout "
                        "into build/venv), or `pip install .` into your venv and unset "
                        "PYTHONPATH" % here, returncode=4)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    require_installed()


def gpu_count_or_reason():
    """(n, None) with n >= 1 GPUs, or (0, reason)."""
    import threadloom
    try:
        return threadloom._core.cuda_device_count(), None
    except threadloom.Error as e:
        return 0, str(e)


@pytest.fixture
def require_gpu():
    n, why = gpu_count_or_reason()
    if n == 0:
        pytest.skip("no usable GPU: %s" % why)
    return n


def run_python(*args, env_extra=None, drop=("PYTHON_GIL",), timeout=120, **kw):
    """Runs this interpreter in a child process (which imports the same installed package)."""
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM (munge, slurmctld, 4 slurmd in network namespaces) for the whole session,
    from scripts/slurm-cluster.sh under build/slurm-test; see tests/python/slurm_harness.py.
    Skips where the machine cannot run it (not root, packages missing), saying why."""
    import slurm_harness
    c = slurm_harness.SlurmCluster(os.path.join(ROOT, "build", "slurm-test"), nodes=4)
    try:
        c.start()
    except slurm_harness.ClusterUnavailable as e:
        pytest.skip("no local SLURM cluster: %s" % e)
    except slurm_harness.ClusterError as e:
        pytest.fail(str(e))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def torch_stays_out():
    """tests/python runs without torch in the process: with torch loaded, batches collate into
    tensors and the heap the contention sampler reads grows tenfold, so one test importing torch
    changes what every later test sees. A test that needs torch asks in a child process (or lives
    in tests/torch); this fails the test that brought torch in, not the ones after it."""
    before = "torch" in sys.modules
    yield
    if not before and "torch" in sys.modules:
        pytest.fail("this test imported torch into the test process; ask in a child process "
                    "(run_python) or move the test to tests/torch", pytrace=False)
