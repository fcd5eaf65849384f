"""pytest configuration: the `gpu` marker, and helpers shared by the Python tests.

GPU tests are marked `gpu`; they SKIP (never pass) where no GPU is usable, saying why.
`make gpu-test` runs only them; `make test` runs everything.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPOLOGIES = os.path.join(ROOT, "tests", "data", "topologies")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


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
    """Runs this interpreter in a child process with the package importable."""
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
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
