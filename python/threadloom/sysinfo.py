"""What threadloom sees: the interpreter, the libraries below it, the GPUs and the cores.

``info()`` returns a dict; ``format_info()`` turns it into the text ``python -m threadloom
info`` prints. Every probe that can fail records *why* instead of raising, so the report is
complete on machines without a GPU, a driver or NCCL.
"""

import operator
import os
import sys
import sysconfig

from threadloom import _core, _cpus


def topology(xml=None, synthetic=None):
    """The machine's topology as a dict (see ``_core.topology``); ``xml`` loads an hwloc XML
    file instead (e.g. a recorded server), ``synthetic`` an hwloc synthetic description
    ("pack:2 numa:2 core:28 pu:2")."""
    return _core.topology(xml, synthetic)


def usable_cpus():
    """How many CPUs this process may run on: the same on every thread, also on one pinned to
    a core (a spmd rank, a loader worker); _cpus.process_cpus() says where the answer comes
    from."""
    return len(_cpus.process_cpus())


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def thread_limit():
    """(n, why): at most n more threads can this process start, by the kernel's limits: the
    smallest of kernel.threads-max, kernel.pid_max and RLIMIT_NPROC (each thread takes one of
    each), less the threads it runs already. why names the limit; (None, None) where no limit
    is known."""
    limits = []
    for name in ("threads-max", "pid_max"):
        v = _read_int("/proc/sys/kernel/" + name)
        if v is not None:
            limits.append((v, "kernel.%s=%d" % (name, v)))
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, "RLIMIT_NPROC=%d (ulimit -u)" % soft))
    except (ImportError, AttributeError, OSError):
        pass
    if not limits:
        return None, None
    n, why = min(limits)
    try:
        running = len(os.listdir("/proc/self/task"))
    except OSError:
        running = 1
    return max(0, n - running), why


def thread_count(n, what):
    """`n` as an int, checked as a number of threads to start: a TypeError unless it is an
    integer, a ValueError when the kernel would refuse that many threads (starting them one by
    one until it does takes minutes). `what` names the argument in the message. Callers check
    the lower bound themselves (their messages are torch's and concurrent.futures')."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError("%s must be an int (a number of threads), not %r (%s)"
                            % (what, n, type(n).__name__)) from None
    if n > 0:
        limit, why = thread_limit()
        if limit is not None and n > limit:
            raise ValueError("%s=%d is more threads than this process can start: at most %d more "
                             "(%s); use a few per CPU at most (this process may use %d CPUs)"
                             % (what, n, limit, why, usable_cpus()))
    return n


def _probe(fn, *args):
    """(value, None) or (None, reason) for a _core call that may raise threadloom.Error."""
    try:
        return fn(*args), None
    except _core.Error as e:
        return None, str(e)


def _interpreter():
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    return {
        "executable": sys.executable,
        "version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "free_threaded_build": free_threaded,
        "gil_enabled": gil,
    }


def info():
    """Everything ``python -m threadloom info`` reports, as a dict."""
    libs = {
        "threadloom": _core.version(),
        "hwloc": _core.hwloc_version(),
        "mimalloc": _core.mimalloc_version(),
        "numa_available": _core.numa_available(),
    }
    libs["cuda_runtime"], libs["cuda_runtime_error"] = _probe(_core.cuda_runtime_version)
    libs["cuda_driver"], libs["cuda_driver_error"] = _probe(_core.cuda_driver_version)
    libs["nccl"], libs["nccl_error"] = _probe(_core.nccl_version)

    topo, topo_error = _probe(_core.topology)
    count, gpu_error = _probe(_core.cuda_device_count)
    gpus = []
    for i in range(count or 0):
        dev, err = _probe(_core.cuda_device_info, i)
        if dev is None:
            gpus.append({"index": i, "error": err})
            continue
        # Join with the topology by PCI bus id: the NUMA node and cores local to the GPU.
        for t in (topo or {}).get("gpus", []):
            if t["pci_bus_id"] == dev["pci_bus_id"]:
                dev["numa_node"] = t["numa_node"]
                dev["local_cpus"] = t["local_cpus"]
        gpus.append(dev)
    backend, backend_error = _probe(_core.devices_backend)
    return {
        "interpreter": _interpreter(),
        "devices": backend or {"name": "none", "count": 0, "why": backend_error},
        "libraries": libs,
        "gpus": gpus,
        "gpus_error": gpu_error,
        "topology": topo,
        "topology_error": topo_error,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def format_info(d):
    """The report as text, one fact a line."""
    it, libs = d["interpreter"], d["libraries"]
    out = []
    add = out.append
    add("threadloom %s" % libs["threadloom"])
    add("")
    add("interpreter")
    add("  %s %s (%s)" % (it["implementation"], it["version"], it["executable"]))
    build = "free-threaded (--disable-gil)" if it["free_threaded_build"] else "GIL build"
    add("  build: %s" % build)
    add("  GIL: %s" % ("ENABLED" if it["gil_enabled"] else "disabled"))
    if not it["free_threaded_build"]:
        add("  note: threads will not run Python in parallel; use a free-threaded interpreter "
            "(scripts/bootstrap.sh builds one)")
    elif it["gil_enabled"]:
        add("  warning: the GIL was turned back on (PYTHON_GIL=1, -X gil=1, or an extension "
            "without Py_mod_gil); threads are serialized")
    add("")
    add("libraries")
    add("  hwloc %s, mimalloc %s, libnuma (NUMA %s)" % (
        libs["hwloc"], libs["mimalloc"], "available" if libs["numa_available"] else "not available"))
    add("  CUDA runtime: %s" % (libs["cuda_runtime"] or libs["cuda_runtime_error"]))
    add("  CUDA driver: %s" % (libs["cuda_driver"] or libs["cuda_driver_error"]))
    add("  NCCL: %s" % (libs["nccl"] or libs["nccl_error"]))
    dv = d["devices"]
    add("  devices: %s, %d device(s) (%s)" % (dv["name"], dv["count"], dv["why"]))
    add("")
    add("GPUs")
    if d["cuda_visible_devices"] is not None:
        add("  CUDA_VISIBLE_DEVICES=%s" % d["cuda_visible_devices"])
    if not d["gpus"]:
        add("  none: %s" % d["gpus_error"])
    for g in d["gpus"]:
        if "error" in g:
            add("  [%d] %s" % (g["index"], g["error"]))
            continue
        add("  [%d] %s, %.1f GiB, sm_%d%d, %d SMs, PCI %s, NUMA node %s, local cores %s" % (
            g["index"], g["name"], g["total_memory"] / 2**30, g["compute_capability"][0],
            g["compute_capability"][1], g["sm_count"], g["pci_bus_id"],
            g.get("numa_node", "?"), g.get("local_cpus", "?")))
    add("")
    add("cores")
    t = d["topology"]
    if t is None:
        add("  unknown: %s" % d["topology_error"])
    else:
        add("  %d package(s), %d NUMA node(s), %d core(s), %d hardware thread(s)" % (
            t["packages"], t["numa_nodes"], t["cores"], t["pus"]))
        add("  this process may use %d core(s), %d hardware thread(s)%s" % (
            t["allowed_cores"], t["allowed_pus"], "" if t["is_this_system"] else
            " (topology loaded from HWLOC_XMLFILE)"))
        if t["gpus"] and not d["gpus"]:
            add("  %d NVIDIA GPU(s) on the PCI bus that CUDA does not use" % len(t["gpus"]))
    return "\n".join(out)
