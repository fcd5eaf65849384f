"""tests/torch: threadloom next to torch in one interpreter (`make test-torch`).

They run on TORCH_PYTHON (build/bootstrap.env: Debian's python3-torch on the system's Python,
a GIL build, so threads take turns there; what is checked is behaviour, never speed), with the
extension built for it by `make build-torch`. Without torch every test here SKIPs, saying why.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="torch does not import on %s" % sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


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
