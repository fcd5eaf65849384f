"""GPU tests: they SKIP without a usable GPU and never pass vacuously (run: make gpu-test)."""

import pytest

import threadloom
from threadloom import _core


@pytest.mark.gpu
def test_every_gpu_is_described(require_gpu):
    for i in range(require_gpu):
        g = _core.cuda_device_info(i)
        assert g["index"] == i
        assert g["name"]
        assert g["total_memory"] > 2**30
        assert g["compute_capability"][0] >= 5
        assert g["sm_count"] >= 1
    with pytest.raises(threadloom.NoDeviceError):
        _core.cuda_device_info(require_gpu)


@pytest.mark.gpu
def test_info_lists_gpus_with_locality(require_gpu):
    d = threadloom.info()
    assert len(d["gpus"]) == require_gpu
    assert d["libraries"]["cuda_driver"] is not None
    for g in d["gpus"]:
        assert "error" not in g
        assert "numa_node" in g, "GPU %s not found in the hwloc topology" % g["pci_bus_id"]


@pytest.mark.gpu
def test_arena_is_page_locked_with_a_gpu(require_gpu):
    a = threadloom.Arena(size=64 << 20, pin="require")
    s = a.stats()
    assert s["pinned"] is True, s["pin_detail"]
    with a.alloc(1 << 20) as b:
        memoryview(b)[:3] = b"gpu"
    a.close()
