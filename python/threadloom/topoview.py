"""Text drawing of a topology and a placement plan, for `python -m threadloom topo`.

Packages contain NUMA nodes, which list their GPUs and then their cores with the planned threads
on each; runs of cores with nothing planned are folded into one line. Readable in a terminal on
anything from a 2-core VM to a 224-core server.
"""

TAGS = {"launch": "L", "loader": "l", "main": "m", "io": "i"}


def _who(s):
    if s["gpu"] is None:
        return "%s#%d" % (s["role"], s["rank"])
    return "%s gpu%d#%d" % (s["role"], s["gpu"], s["rank"])


def note(topo):
    """A line for the reader of a recorded or synthetic topology with fewer usable cores than
    its GPUs need (a launch thread each, and the main thread): every plan on it shares cores,
    which says more about the recording than about the machine. None otherwise."""
    gpus, cores = len(topo["gpus"]), topo["allowed_cores"]
    if topo["is_this_system"] or not gpus or cores > gpus:
        return None
    return ("note: %d cores for %d GPUs: too few for a launch thread per GPU, so every plan on "
            "this topology shares cores. Recordings made for hwloc's tests often trim the CPU "
            "part (nvidiaDGX2.xml keeps 4 of the DGX-2H's 48 cores and all 16 GPUs): read this "
            "as what the GPUs' placement looks like, not as a plan for the real machine."
            % (cores, gpus))


def draw(topo, plan=None, title="this machine"):
    """The drawing as one string. topo: a dict from threadloom.topology(); plan: a Plan or None."""
    out = []
    add = out.append
    add("%s: %d package(s), %d NUMA node(s), %d core(s) (%d usable), %d PU(s), %d NVIDIA GPU(s)" % (
        title, topo["packages"], topo["numa_nodes"], topo["cores"], topo["allowed_cores"],
        topo["pus"], len(topo["gpus"])))
    if note(topo):
        add(note(topo))
    on_core = {}
    if plan is not None:
        for s in plan.slots():
            on_core.setdefault(s["core"], []).append(s)
    width = max([len(c["pus"]) for c in topo["core_list"]] + [3])

    packages = sorted({c["package"] for c in topo["core_list"]})
    for pkg in packages:
        add("package %d" % pkg)
        nodes = sorted({c["numa_node"] for c in topo["core_list"] if c["package"] == pkg})
        for node in nodes:
            add("  NUMA node %s" % (node if node >= 0 else "?"))
            for g in topo["gpus"]:
                if g["numa_node"] == node and (node >= 0 or pkg == packages[0]):
                    add("    GPU %d  %s  %s%s" % (g["index"], g["pci_bus_id"], g["name"] or "(unnamed)",
                                                  "  (cuda%d)" % g["cuda_index"] if g.get("cuda_index", -1) >= 0 else ""))
            idle = []

            def flush_idle():
                if not idle:
                    return
                span = "%d" % idle[0] if len(idle) == 1 else "%d-%d" % (idle[0], idle[-1])
                add("    core %-9s %s" % (span, "-" if plan is not None else ""))
                idle.clear()

            for c in topo["core_list"]:
                if c["package"] != pkg or c["numa_node"] != node:
                    continue
                threads = on_core.get(c["index"], [])
                if c["allowed_pus"] == 0:
                    flush_idle()
                    add("    core %-4d PUs %-*s  x (not allowed for this process)" % (c["index"], width, c["pus"]))
                elif not threads and plan is not None:
                    idle.append(c["index"])
                elif plan is None:
                    add("    core %-4d PUs %s" % (c["index"], c["pus"]))
                else:
                    flush_idle()
                    tags = "".join(TAGS[s["role"]] for s in threads)
                    add("    core %-4d PUs %-*s  %-4s %s" % (c["index"], width, c["pus"], tags,
                                                          ", ".join(_who(s) for s in threads)))
            flush_idle()
    if plan is not None:
        add("legend: L launch thread (core reserved), l loader, m main, i checkpoint I/O, "
            "- nothing planned, x not allowed")
    return "\n".join(out)
