"""python -m threadloom: what threadloom sees, and running programs with it.

  python -m threadloom info [--json]     interpreter, GIL, libraries, GPUs, cores
  python -m threadloom run [--gil=P] (script.py | -m module) [args]   run with the GIL guard
  python -m threadloom topo [--xml FILE | --synthetic DESC] [--plan [--gpus N] [--loaders N]
                            [--io N] [--cpus LIST]] [--json]
  python -m threadloom slurm script|submit [OPTIONS] train.py [args]   an sbatch script for
                            one threadloom process per node (threadloom slurm script --help)

The commands are the table COMMANDS at the end of this file: a new command is one entry there
(its name, one line for --help, and the function that takes its arguments).
"""

import argparse
import json
import os
import runpy
import sys
import textwrap

from threadloom import _core, gilguard, placement, topoview
from threadloom import sysinfo as _info

PROG = "python -m threadloom"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":  # the launcher's --version line (interp/main.c)
        print("threadloom %s (Python %s)" % (_core.__version__, sys.version.split()[0]))
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        sys.stderr.write("%s\n%s: error: invalid choice: %r (choose from %s)\n"
                         % (usage().splitlines()[0], PROG, argv[0], ", ".join(COMMANDS)))
        return 2
    return entry[1](argv[1:])


def usage():
    """The text of `python -m threadloom --help`: every command of COMMANDS, one line each."""
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: %s {%s} [ARGS...]" % (PROG, ",".join(COMMANDS)), "",
             "threadloom: what it sees of this machine (or a recorded one), and running programs "
             "with it.", "", "commands:"]
    for name, (text, _) in COMMANDS.items():
        lines += textwrap.wrap(text, 99, initial_indent="  %-*s" % (width, name),
                               break_on_hyphens=False,
                               subsequent_indent=" " * (width + 2))
    lines += ["", "`%s COMMAND --help` describes one command; `%s --version` prints "
              "threadloom's and Python's versions." % (PROG, PROG)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# info and topo
# ---------------------------------------------------------------------------------------------

def info(argv):
    """``python -m threadloom info``: interpreter, GIL, libraries, GPUs, cores."""
    p = argparse.ArgumentParser(prog=PROG + " info", description=COMMANDS["info"][0])
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    d = _info.info()
    print(json.dumps(d, indent=2) if args.json else _info.format_info(d))
    return 0


def topo(argv):
    """``python -m threadloom topo``: the topology, and the placement plan with --plan."""
    pt = argparse.ArgumentParser(prog=PROG + " topo", description=COMMANDS["topo"][0])
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--xml", help="an hwloc XML file to read instead of this machine")
    src.add_argument("--synthetic", help='an hwloc synthetic machine, e.g. "pack:2 numa:2 core:28 pu:2"')
    pt.add_argument("--plan", action="store_true", help="place threadloom's threads and explain why")
    pt.add_argument("--gpus", type=int, help="GPUs to plan for (default: all)")
    pt.add_argument("--loaders", type=int, help="loader threads per GPU (default: auto)")
    pt.add_argument("--io", type=int, default=1, help="checkpoint I/O threads (default 1)")
    pt.add_argument("--cpus", help='restrict to these CPUs, e.g. "0-7,16" (as taskset)')
    pt.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = pt.parse_args(argv)
    try:
        t = _info.topology(args.xml, args.synthetic)
        pl = None
        if args.plan or args.gpus is not None or args.loaders is not None or args.cpus:
            pl = placement.plan(gpus=args.gpus, loaders_per_gpu=args.loaders, io_threads=args.io,
                                cpus=args.cpus, xml=args.xml, synthetic=args.synthetic)
    except Exception as e:  # threadloom.Error, ValueError: the message says what to do
        print("threadloom: %s" % e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"topology": t, "plan": pl.slots() if pl is not None else None}, indent=2))
        return 0
    title = args.xml or (args.synthetic and "synthetic %s" % args.synthetic) or "this machine"
    print(topoview.draw(t, pl, title=title))
    if pl is not None:
        print()
        print(pl)
    return 0


def slurm(argv):
    """``python -m threadloom slurm``: its own parser (threadloom/cluster/slurm.py)."""
    from threadloom.cluster import slurm as _slurm
    return _slurm.main(argv)


# ---------------------------------------------------------------------------------------------
# python -m threadloom run
# ---------------------------------------------------------------------------------------------

RUN_DOC = """\
The launcher's `run`, from an interpreter that is already running. A run over several nodes
(the three cluster flags, or a SLURM step over several nodes, where SLURM supplies them) meets
the other nodes before the script starts: see threadloom.cluster.launch (the rendezvous is
threadloom.cluster.current(), the torchrun variables are exported, a watchdog aborts every node
when one fails, --log-dir DIR copies this node's output into DIR/node-<rank>.log).

Installs the same GIL guard as the C launcher (``threadloom run``), sets OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS to the allowed cores where unset, and runs the script
or module as ``__main__`` with runpy. What only the C launcher can do, because it must happen
before the interpreter starts, is not done here: the main thread is not pinned (threads it
starts would inherit its core) and os.cpu_count() is not capped (use ``-X cpu_count=N``)."""

RUN_USAGE = ("usage: python -m threadloom run [--gil=forbid|warn|allow] [--torchrun-env] "
             "[--no-pin] [--nnodes N --node-rank R --master HOST[:PORT]] [--rdzv-timeout S] "
             "[--watchdog-timeout S] [--log-dir DIR] (script.py | -m module) [args...]")

# cluster flags -> (launch() keyword, parser of the value)
CLUSTER_FLAGS = {"--nnodes": ("nnodes", int), "--node-rank": ("node_rank", int),
                 "--master": ("master", str), "--rdzv-timeout": ("rdzv_timeout", str),
                 "--watchdog-timeout": ("watchdog_timeout", str), "--log-dir": ("log_dir", str)}


def _fail(msg):
    sys.stderr.write("%s\n%s\n" % (RUN_USAGE, msg))
    return 2


def run(argv):
    """``python -m threadloom run``: the launcher's `run`, from an interpreter that is already
    running (see RUN_DOC). Returns the exit status."""
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
                print(RUN_USAGE + "\n\n" + RUN_DOC)
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
        from threadloom.cluster import launch
        launch.launch_or_exit(origin="python -m threadloom run", **cluster_kw)
    n = str(_info.usable_cpus())
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n)
    if torchrun:
        from threadloom.cluster.torchrun import apply_torchrun_env
        apply_torchrun_env()

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
    from threadloom import _core
    from threadloom.share import imports_shared
    real = getattr(runpy, "_get_code_from_file", None)
    if real is None or not imports_shared()["on"]:
        return runpy.run_path(path, run_name="__main__")

    def get_code(*args, **kwargs):
        code = real(*args, **kwargs)
        _core.share_code(code)
        return code

    runpy._get_code_from_file = get_code
    try:
        return runpy.run_path(path, run_name="__main__")
    finally:
        runpy._get_code_from_file = real


def contention(argv):
    """``python -m threadloom contention``: its own parser (threadloom/contention.py)."""
    from threadloom.contention import main as contention_main
    return contention_main(argv)


# ---------------------------------------------------------------------------------------------
# The commands: name -> (one line for --help, the function that runs it with its arguments and
# returns the exit status). `python -m threadloom --help` lists them in this order.
# ---------------------------------------------------------------------------------------------

COMMANDS = {
    "info": ("interpreter, GIL state, library versions, GPUs, cores", info),
    "topo": ("the hardware topology (this machine's or a recorded one) and the placement plan",
             topo),
    "run": ("run a script or module with the GIL guard, as the launcher's `run`; with "
            "--nnodes/--node-rank/--master (or in a multi-node SLURM step) the nodes meet first",
            run),
    "slurm": ("write (script) or submit (submit) an sbatch script for one threadloom process "
              "per node", slurm),
    "contention": ("run a script's work on N threads and name the shared objects whose reference "
                   "counts other threads write most, and what to do about each", contention),
}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m threadloom topo | head`
        sys.stderr.close()
        sys.exit(0)
