"""threadloom on the GIL baseline (a Python built with the GIL, make test-torch): a DataLoader
says once that its threads take turns (threadloom.gilguard.warn_if_gil_on; the free-threaded
cases are in tests/python/test_gil_warning.py), and pool threads end their thread states as
threading.Thread does. Each case runs in a fresh process."""

import subprocess
import sys
import sysconfig

import pytest

gil_build = pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
                               reason="needs a Python built with the GIL")

LOADERS = """\
import warnings
import threadloom
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(3):
        for batch in threadloom.DataLoader(list(range(8)), batch_size=2, num_workers=2):
            pass
print([str(w.message) for w in seen if issubclass(w.category, threadloom.gilguard.GILWarning)])
"""


@gil_build
def test_dataloader_on_a_gil_build_warns_once():
    r = subprocess.run([sys.executable, "-c", LOADERS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    msgs = eval(r.stdout)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("threadloom.DataLoader: the GIL is on, so its 2 threads take turns")
    assert "built with the GIL" in msgs[0] and "free-threaded Python" in msgs[0]


# An object freed when its worker thread ends (a threading.local value, as a loader worker's
# dataset replica) that takes the GIL through PyGILState_Ensure/Release, as pybind11 code does
# (torch's tensor dealloc). Before python/src/pool.c ended its threads as threading.Thread
# does, 3.11 deleted the thread state twice: a segfault (torch tensors in a replica did it).
PROBE = """\
import ctypes, threading
import threadloom
api = ctypes.pythonapi
api.PyGILState_Ensure.restype = ctypes.c_int
api.PyGILState_Release.argtypes = [ctypes.c_int]
local = threading.local()
freed = []

class Probe:
    def __del__(self):
        api.PyGILState_Release(api.PyGILState_Ensure())
        freed.append(1)

def work(i):
    local.probe = Probe()

for _ in range(5):
    with threadloom.Executor(2) as ex:
        list(ex.map(work, range(4)))
print(len(freed))
"""


@gil_build
def test_objects_freed_at_worker_exit_may_take_the_gil():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) == 20   # 4 per round: 2 replaced by a thread's next task, 2 at its exit
