"""``python -m threadloom run``: the launcher's `run`, from an interpreter that is already running.

    python -m threadloom run [--gil=forbid|warn|allow] [--torchrun-env] [--no-pin]
                             [--nnodes N --node-rank R --master HOST[:PORT]]
                             [--rdzv-timeout S] [--watchdog-timeout S] [--log-dir DIR]
                             (script.py | -m module) [args...]

A run over several nodes (the three cluster flags, or a SLURM step over several nodes, where
SLURM supplies them) meets the other nodes before the script starts: see
threadloom.cluster_runtime.launch (the rendezvous is threadloom.cluster.current(), the torchrun
variables are exported, a watchdog aborts every node when one fails, --log-dir DIR copies this
node's output into DIR/node-<rank>.log).

Installs the same GIL guard as the C launcher (``threadloom run``), sets OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS to the allowed cores where unset, and runs the script
or module as ``__main__`` with runpy. What only the C launcher can do, because it must happen
before the interpreter starts, is not done here: the main thread is not pinned (threads it
starts would inherit its core) and os.cpu_count() is not capped (use ``-X cpu_count=N``).
"""

import os
import runpy
import sys

from threadloom import gilguard, launch_env

USAGE = ("usage: python -m threadloom run [--gil=forbid|warn|allow] [--torchrun-env] [--no-pin] "
         "[--nnodes N --node-rank R --master HOST[:PORT]] [--rdzv-timeout S] "
         "[--watchdog-timeout S] [--log-dir DIR] (script.py | -m module) [args...]")

# cluster flags -> (launch() keyword, parser of the value)
CLUSTER_FLAGS = {"--nnodes": ("nnodes", int), "--node-rank": ("node_rank", int),
                 "--master": ("master", str), "--rdzv-timeout": ("rdzv_timeout", str),
                 "--watchdog-timeout": ("watchdog_timeout", str), "--log-dir": ("log_dir", str)}


def _fail(msg):
    sys.stderr.write("%s\n%s\n" % (USAGE, msg))
    return 2


def main(argv):
    gil, torchrun = "forbid", False
    cluster_kw = {}
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        a = argv[i]
        flag = a.split("=", 1)[0]
        if flag in CLUSTER_FLAGS:
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                return _fail("threadloom: %s needs a value" % flag)
            key, conv = CLUSTER_FLAGS[flag]
            try:
                cluster_kw[key] = conv(value)
            except ValueError:
                return _fail("threadloom: %s takes an integer, not %r" % (flag, value))
            if value == "":
                return _fail("threadloom: %s needs a value" % flag)
        elif a == "--torchrun-env":
            torchrun = True
        elif a == "--no-pin":
            pass  # nothing is pinned from here anyway
        elif a.startswith("--gil=") or a == "--gil":
            if a == "--gil":
                i += 1
                a = "--gil=" + (argv[i] if i < len(argv) else "")
            gil = a[len("--gil="):]
            if gil not in gilguard.POLICIES:
                return _fail("threadloom: --gil takes forbid, warn or allow, not %r" % gil)
        elif a in ("--help", "--"):
            if a == "--help":
                print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].rstrip())
                return 0
            i += 1
            break
        else:
            return _fail("threadloom: unknown option %r" % a)
        i += 1
    rest = argv[i:]
    if not rest or (rest[0] == "-m" and len(rest) < 2):
        return _fail("threadloom: nothing to run: give a script or -m module")

    gilguard.install(gil, origin="python -m threadloom run")
    if cluster_kw or os.environ.get("SLURM_JOB_ID"):
        from threadloom import cluster_runtime
        cluster_runtime.launch_or_exit(origin="python -m threadloom run", **cluster_kw)
    n = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n)
    if torchrun:
        launch_env.apply_torchrun_env()

    if rest[0] == "-m":
        sys.argv = [rest[1]] + rest[2:]  # runpy puts the module's path in sys.argv[0]
        sys.path[0] = os.getcwd()
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(rest)
        sys.path[0] = os.path.dirname(os.path.abspath(rest[0]))
        _run_path(rest[0])
    return 0


def _run_path(path):
    """runpy.run_path(path) with the script's constants made immortal when imported code's are
    (threadloom.share_imports): runpy compiles a script with the builtin compile(), which
    leaves them mortal on 3.13t, where `python script.py` and `threadloom run` have them
    immortal (docs/design.md, "Shared data")."""
    from threadloom.share import _core, imports_shared
    real = getattr(runpy, "_get_code_from_file", None)
    if real is None or not imports_shared()["on"]:
        return runpy.run_path(path, run_name="__main__")

    def get_code(*args, **kwargs):
        code = real(*args, **kwargs)
        _core().share_code(code)
        return code

    runpy._get_code_from_file = get_code
    try:
        return runpy.run_path(path, run_name="__main__")
    finally:
        runpy._get_code_from_file = real
