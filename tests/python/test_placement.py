"""threadloom.plan / threadloom.pin and `python -m threadloom topo --plan`."""

import json
import os
import threading

import pytest

import threadloom
from conftest import TOPOLOGIES, run_python

XMLS = sorted(f for f in os.listdir(TOPOLOGIES) if f.endswith(".xml"))


def cpus_of(listing):
    """{0, 1, 5} from "0-1,5"."""
    out = set()
    for part in listing.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@pytest.mark.parametrize("xml", XMLS)
def test_plan_on_recorded_servers(xml):
    path = os.path.join(TOPOLOGIES, xml)
    topo = threadloom.topology(path)
    p = threadloom.plan(xml=path)
    slots = p.slots()
    assert len(slots) == len(p) and p.gpus == len(topo["gpus"])
    gpu_node = {g["index"]: g["numa_node"] for g in topo["gpus"]}
    hot = [s for s in slots if s["role"] in ("launch", "loader")]
    launch_cores = {s["core"] for s in slots if s["role"] == "launch"}
    for s in slots:
        assert s["why"] and s["cpus"]
        core = topo["core_list"][s["core"]]
        assert cpus_of(s["cpus"]) <= cpus_of(core["pus"])
        if s["gpu"] is not None and s["local"]:
            assert s["numa_node"] == gpu_node[s["gpu"]], s["why"]
    if len(hot) <= topo["allowed_cores"]:
        assert all(s["hot_on_core"] == 1 for s in hot)
    if topo["allowed_cores"] > len(launch_cores):
        assert not [s for s in slots if s["role"] == "loader" and s["core"] in launch_cores]
    text = str(p)
    assert text.startswith("placement plan: %d thread(s)" % len(p))
    assert all(s["why"] in text for s in slots)


def test_plan_arguments():
    p = threadloom.plan(synthetic="pack:2 core:4 pu:2", loaders_per_gpu=3, io_threads=2)
    roles = [s["role"] for s in p.slots()]
    assert roles.count("loader") == 3 and roles.count("io") == 2 and roles.count("main") == 1
    p = threadloom.plan(synthetic="pack:2 core:4 pu:2", main_thread=False, io_threads=0,
                        loaders_per_gpu=1)
    assert [s["role"] for s in p.slots()] == ["loader"]
    with pytest.raises(threadloom.NoDeviceError) as ei:
        threadloom.plan(synthetic="pack:1 core:2 pu:1", gpus=1)
    assert "What to do" in str(ei.value)
    with pytest.raises(threadloom.InvalidArgumentError):
        threadloom.plan(synthetic="pack:1 core:2 pu:1", cpus="7-9")
    with pytest.raises(threadloom.TopologyError) as ei:
        threadloom.plan(synthetic="pack:1 core:2")
    assert "ends with pu:N" in str(ei.value)
    with pytest.raises(ValueError):
        threadloom.plan(xml="a.xml", synthetic="pack:1")
    with pytest.raises(ValueError):
        p.find("driver")


def test_pin_and_restore_on_this_machine():
    p = threadloom.plan(gpus=0, loaders_per_gpu=2)
    before = os.sched_getaffinity(0)
    out = {}

    def worker():
        with threadloom.pin(role="loader", rank=1, plan=p) as pin:
            out["inside"] = os.sched_getaffinity(0)
            out["pin"] = pin
        out["after"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    slot = p.slots()[p.find("loader", None, 1)]
    assert out["inside"] == cpus_of(slot["cpus"])
    assert out["pin"].cpus == slot["cpus"] and out["pin"].slot == slot
    assert out["pin"].refused is None
    assert out["after"] == before
    assert os.sched_getaffinity(0) == before  # the main thread was never touched


def test_pin_another_thread():
    p = threadloom.plan(gpus=0, loaders_per_gpu=2)
    ready, done = threading.Event(), threading.Event()
    seen = {}

    def worker():
        ready.set()
        done.wait(30)
        seen["affinity"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(30)
    pin = threadloom.pin(role="loader", rank=0, plan=p, thread=t)
    done.set()
    t.join()
    assert seen["affinity"] == cpus_of(pin.cpus)
    assert "only a thread itself" in pin.refused  # memory policy: the thread must do it
    with pytest.raises(RuntimeError):
        pin.restore()
    with pytest.raises(ValueError):
        threadloom.pin(role="loader", plan=p, thread=threading.Thread(target=print))


def test_many_threads_pin_in_turn():
    p = threadloom.plan(gpus=0, loaders_per_gpu=2, io_threads=0, main_thread=False)
    n = 16
    barrier = threading.Barrier(n)
    seen = [None] * n
    errors = []

    def worker(i):
        try:
            barrier.wait()
            pin = threadloom.pin(role="loader", plan=p)
            seen[i] = (pin.slot["id"], pin.shared, os.sched_getaffinity(0) == cpus_of(pin.cpus))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(ok for _, _, ok in seen)
    ids = [i for i, _, _ in seen]
    assert sorted(ids) == sorted([0, 1] * (n // 2))  # handed out in turn
    assert sum(1 for _, shared, _ in seen if not shared) == 2  # the first two got their own


def test_pin_refusals_are_explained():
    dgx = threadloom.plan(xml=os.path.join(TOPOLOGIES, "nvidiaDGX2.xml"))
    with pytest.raises(threadloom.InvalidArgumentError) as ei:
        threadloom.pin(gpu=0, role="launch", plan=dgx)
    assert "not this machine" in str(ei.value)
    cpu_only = threadloom.plan(gpus=0)
    with pytest.raises(threadloom.NoDeviceError) as ei:
        threadloom.pin(gpu=3, role="loader", plan=cpu_only)
    assert "gpu=None" in str(ei.value)
    with pytest.raises(threadloom.InvalidArgumentError) as ei:
        threadloom.pin(gpu=None, role="launch", plan=cpu_only)
    with pytest.raises(ValueError):
        threadloom.pin(role="driver", plan=cpu_only)
    with pytest.raises(threadloom.InvalidArgumentError):
        threadloom._core.pin_set("not-a-list")


def test_default_plan_is_shared():
    assert threadloom.default_plan() is threadloom.default_plan()


def test_topo_command_draws_the_plan():
    xml = os.path.join(TOPOLOGIES, "32em64t-2n8c2t-pci-wholeio.xml")
    r = run_python("-m", "threadloom", "topo", "--plan", "--xml", xml, "--gpus", "3", "--loaders", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "package 1" in out and "NUMA node 1" in out and "Tesla K40m" in out
    assert "launch gpu2#0" in out and "legend:" in out
    assert "reserved from loader work" in out  # the explanation follows the drawing
    r = run_python("-m", "threadloom", "topo", "--json", "--synthetic", "pack:1 core:4 pu:1", "--loaders", "3")
    d = json.loads(r.stdout)
    assert [s["role"] for s in d["plan"]].count("loader") == 3
    r = run_python("-m", "threadloom", "topo", "--plan", "--cpus", "999")
    assert r.returncode == 1 and "no usable core" in r.stderr


# ---- the process's CPUs, seen from a pinned thread --------------------------------------------

@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to 1 of")
def test_a_pinned_thread_sees_the_process_cpus(caplog):
    """spmd pins each rank thread to one core: an Executor, a DataLoader or a plan made there
    must still count (and key on) every CPU of the process, not the thread's one."""
    from threadloom import placement, sysinfo
    from threadloom.data import loader as loader_mod
    allowed = os.sched_getaffinity(0)
    out = {}

    def pinned():
        os.sched_setaffinity(0, {min(allowed)})
        try:
            out["cpus"] = sysinfo.usable_cpus()
            with threadloom.Executor() as ex:
                out["executor"] = ex._max_workers
            loader_mod._oversubscription_logged = False
            with caplog.at_level("WARNING", logger="threadloom.data"):
                threadloom.DataLoader(list(range(8)), num_workers=len(allowed))
            out["warned"] = [r.getMessage() for r in caplog.records]
            out["plan"] = placement.loader_plan(2)
        finally:
            os.sched_setaffinity(0, allowed)

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert out["cpus"] == len(allowed) == sysinfo.usable_cpus()
    assert out["executor"] == len(allowed)
    assert out["warned"] == []                    # num_workers == the process's CPUs: no warning
    assert out["plan"] is placement.loader_plan(2)  # one plan, whichever thread asks


def test_process_cpus_from_the_launcher_only_for_its_own_pid():
    from threadloom import _cpus
    assert _cpus.parse_cpu_list("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert _cpus._from_launcher("%d:0,1,3" % os.getpid(), os.getpid()) == {0, 1, 3}
    assert _cpus._from_launcher("1:0,1,3", os.getpid() if os.getpid() != 1 else 2) is None
    assert _cpus._from_launcher("%d:bad" % os.getpid(), os.getpid()) is None
    assert _cpus._from_launcher(None, os.getpid()) is None
    # in a child that inherited a value meant for another process: its own affinity
    r = run_python("-c", "from threadloom import sysinfo; print(sysinfo.usable_cpus())",
                   env_extra={"THREADLOOM_START_CPUS": "1:0-511"})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(os.sched_getaffinity(0))
