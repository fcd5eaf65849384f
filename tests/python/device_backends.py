"""Fixtures for the device tests: one device per backend, so each test body runs on sim (always)
and on CUDA (skipped, saying why, without a GPU). Imported by tests/python/test_devices*.py.

The sim devices are configured for this process without selecting sim as its backend
(threadloom.devices.configure_sim), so the rest of the suite keeps the default backend. Tests
that slow a sim device's engines or inject faults restore it before they return."""

import pytest

from threadloom import devices

SIM_SPEC = "sim:8"  # spmd runs a rank per device; the DataLoader tests a loader per device
SIM_DEFAULTS = "h2d=55GB/s,d2h=55GB/s,pageable=9GB/s,d2d=2000GB/s"


def sim_devices():
    """The process's sim devices (configuring SIM_SPEC unless THREADLOOM_DEVICES chose sim)."""
    b = devices.backend()
    if b["name"] != "sim":
        try:
            devices.configure_sim(SIM_SPEC)
        except devices.BusyError:
            pass  # configured before, by this fixture or the user: use those
    return devices("sim")


def cuda_device_or_skip():
    try:
        ds = devices("cuda")
    except devices.Error as e:
        pytest.skip("no usable GPU: %s" % e)
    if not ds:
        pytest.skip("no usable GPU: the CUDA runtime lists none")
    return ds[0]


@pytest.fixture(params=["sim", pytest.param("cuda", marks=pytest.mark.gpu)])
def dev(request):
    """A device of each backend: sim:0, and cuda:0 where a GPU is present."""
    if request.param == "sim":
        return sim_devices()[0]
    return cuda_device_or_skip()


@pytest.fixture
def sim():
    """A sim device whose engines and faults the test may change; restored afterwards."""
    d = sim_devices()[-1]
    yield d
    d.sim_recover()
    d.sim_set(SIM_DEFAULTS)
