"""Thread placement: which core each threadloom thread runs on, and pinning threads there.

    plan = threadloom.plan()                 # this machine, every GPU CUDA sees
    print(plan)                              # one line per thread, with the reason
    with threadloom.pin(gpu=3, role="loader"):
        ...                                  # this thread runs on a core local to GPU 3

Plans of other machines (``xml=`` a recorded hwloc topology, ``synthetic=`` an hwloc synthetic
description) are for looking at; pinning with them is refused.
"""

import os
import threading

from threadloom import _core, _cpus, errors

ROLES = ("main", "launch", "loader", "io")


def _cuda_bus_ids():
    """The visible GPUs' PCI bus ids in CUDA order, or None when CUDA sees no GPU."""
    try:
        n = _core.cuda_device_count()
    except _core.Error:
        return None
    return [_core.cuda_device_info(i)["pci_bus_id"] for i in range(n)]


def plan(gpus=None, loaders_per_gpu=None, io_threads=1, main_thread=True, cpus=None, xml=None,
         synthetic=None, device_nodes=None):
    """Plans thread placement and returns a ``threadloom._core.Plan``.

    gpus: how many GPUs to plan for (default: all). loaders_per_gpu: loader threads per GPU
    (default: the free cores shared out, at least one). io_threads: checkpoint I/O threads.
    cpus: restrict to these CPUs ("0-7,16"), as taskset would. xml / synthetic: plan for another
    machine. On this machine the GPUs are numbered as CUDA numbers them (CUDA_VISIBLE_DEVICES
    included), matched to the topology by PCI bus id. device_nodes: plan for other devices
    instead (sim devices, or any list of threadloom devices: see device_plan()), given the
    NUMA node each is local to (-1: none); GPU g of the plan is the g-th of them.
    """
    kw = dict(gpus=-1 if gpus is None else gpus,
              loaders_per_gpu=-1 if loaders_per_gpu is None else loaders_per_gpu,
              io_threads=io_threads, main_thread=bool(main_thread), cpus=cpus, xml=xml,
              synthetic=synthetic)
    if device_nodes is not None:
        return _core.Plan(device_nodes=list(device_nodes), **kw)
    if xml is None and synthetic is None and "HWLOC_XMLFILE" not in os.environ:
        ids = _cuda_bus_ids()
        if ids is not None:
            kw["gpu_bus_ids"] = ids
    return _core.Plan(**kw)


# The process's placement plans, made once each: loading the topology takes milliseconds, and a
# plan is read-only once made (claim() hands its slots out in turn with an atomic counter), so
# every pool that asks for the same plan shares it, whichever thread asks (the key holds the
# process's CPUs, never the asking thread's affinity: a pinned rank thread gets spmd's plan).
# Keys: "default", ("loader", threads, CPUs) or ("devices", ...). Guarded by _plans_lock; a
# plan is made outside it.
_plans = {}
_plans_lock = threading.Lock()


def _cached(key, make):
    """The plan of `key`, made by make() the first time; the key becomes the newest in _plans
    (device_plan_of looks for the device plan asked for last)."""
    with _plans_lock:
        p = _plans.pop(key, None)
        if p is not None:
            _plans[key] = p
    if p is None:
        p = make()
        with _plans_lock:
            p = _plans.setdefault(key, p)
    return p


def default_plan():
    """The process's plan for this machine (made on first use with the defaults of plan())."""
    return _cached("default", plan)


def loader_plan(threads):
    """The plan for `threads` loader threads on this machine without GPUs' launch slots (what a
    Pipeline or DataLoader with pin=True pins its workers with), made once per thread count and
    set of CPUs this process may use."""
    key = ("loader", threads, _cpus.process_cpus())
    return _cached(key, lambda: plan(gpus=0, loaders_per_gpu=threads, io_threads=0,
                                     main_thread=False))


def device_plan(devices, loaders_per_device=None):
    """The plan for driving `devices` (threadloom Devices, sim or cuda, in rank order): GPU g of
    the plan is devices[g], with a launch slot on its NUMA node reserved from loader work and
    `loaders_per_device` loader slots beside it (default: the free cores shared out). Made once
    per list of devices, loader count and set of CPUs this process may use. What spmd() pins its
    driver threads with (role "launch", gpu=rank), and loader threads of rank r pin to (role
    "loader", gpu=r)."""
    nodes = tuple(d.numa_node for d in devices)
    key = ("devices", tuple(str(d) for d in devices), nodes, loaders_per_device,
           _cpus.process_cpus())
    return _cached(key, lambda: plan(device_nodes=nodes, loaders_per_gpu=loaders_per_device))


def device_plan_of(device):
    """(plan, g): the device plan asked for last (device_plan(); spmd(devices=) asks for one
    for its ranks) whose devices include `device` (a threadloom Device), and the device's GPU
    index g in it; None when no device plan has it. What DataLoader(device=) pins its workers with
    (role "loader", gpu=g), so they take the loader slots beside the device's launch core
    instead of cores the plan reserved for launch threads."""
    name = str(device)
    with _plans_lock:
        for key in reversed(list(_plans)):  # insertion order (_cached): the newest first
            if isinstance(key, tuple) and key[0] == "devices" and name in key[1]:
                return _plans[key], key[1].index(name)
    return None


class Pinning:
    """The result of pin(): where the thread now runs. As a context manager it restores the
    thread's previous CPU affinity and memory policy on exit.

    Attributes: slot (the plan slot, a dict with its `why`), cpus, numa_node, refused (what was
    not done and why, or None), shared (True when every slot of this role and GPU was already
    handed out, so this thread shares a core)."""

    def __init__(self, slot, result, shared, previous):
        self.slot = slot
        self.cpus = result["cpus"]
        self.numa_node = result["numa_node"]
        self.refused = result["refused"]
        self.shared = shared
        self._previous = previous
        self._thread = threading.get_ident()

    def restore(self):
        """Puts back the affinity the thread had before pin(); only from the pinned thread."""
        if self._previous is None:
            raise RuntimeError("this pinning was applied to another thread: nothing to restore here")
        if threading.get_ident() != self._thread:
            raise RuntimeError("restore() must run on the thread that was pinned")
        _core.pin_set(self._previous, -1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self):
        s = self.slot
        who = "%s gpu%s #%d" % (s["role"], s["gpu"], s["rank"]) if s["gpu"] is not None else \
            "%s #%d" % (s["role"], s["rank"])
        extra = ", shared" if self.shared else ""
        extra += ", refused: %s" % self.refused if self.refused else ""
        return "<Pinning %s on CPUs %s, node %s%s>" % (who, self.cpus, self.numa_node, extra)


def pin(gpu=None, role="loader", rank=None, plan=None, thread=None):
    """Pins the calling thread (or `thread`, a started threading.Thread: CPU affinity only, as a
    thread's memory policy can only be set by itself) to a slot of the plan (default:
    default_plan()).

    role: "launch", "loader" (or "feeder"), "io" or "main". gpu: the CUDA index of the GPU the
    thread serves (None for io/main, and on machines without GPUs). rank: a particular slot of
    that role and GPU; by default the next one in turn. Returns a Pinning, usable as a context
    manager. Raises threadloom.InvalidArgumentError for a role/GPU the plan lacks, and the
    kernel's refusal (e.g. NotPermittedError) when the affinity cannot be set.
    """
    if role not in ROLES and role != "feeder":
        raise ValueError("role must be one of %s, not %r" % (", ".join(ROLES + ("feeder",)), role))
    p = plan if plan is not None else default_plan()
    if gpu is not None and p.gpus == 0:
        raise errors.error("ENODEV", "the plan covers no GPU, so gpu=%r cannot be pinned to: pass "
                           "gpu=None on machines without GPUs, or make a plan that includes GPUs"
                           % (gpu,))
    if rank is None:
        slot_id, shared = p.claim(role, gpu)
    else:
        slot_id, shared = p.find(role, gpu, rank), False
    if thread is not None:
        if thread.native_id is None:
            raise ValueError("thread %r has not started: start it before pinning it" % (thread,))
        result = p.pin(slot_id, tid=thread.native_id)
        return Pinning(p.slots()[slot_id], result, shared, None)
    previous = _core.pin_current()
    result = p.pin(slot_id)
    return Pinning(p.slots()[slot_id], result, shared, previous)
