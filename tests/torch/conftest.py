"""tests/torch: threadloom next to torch in one interpreter (`make test-torch`).

They run twice (`make test-torch`): on the free-threaded venv build/venv (torch's cp313t
wheel) and on the GIL baseline, build/venv-gil (build/bootstrap.env's GIL_PYTHON: the system's
Python 3.11; a GIL build, so threads take turns there), both with torch from PyPI pinned in
requirements/pins.txt and threadloom pip-installed (`make build`, `make build-gil`); what is
checked is behaviour, never speed. Without torch every test here SKIPs, saying why. As in tests/python, the
package must be the installed one (tests/python/conftest.py: require_installed).
"""
import importlib.util
import os
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch does not import on %s" % sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "conftest.py")
    spec = importlib.util.spec_from_file_location("_tests_python_conftest", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.require_installed()


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
