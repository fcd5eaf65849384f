"""python -m threadloom: report what threadloom sees.

  python -m threadloom info [--json]     interpreter, GIL, libraries, GPUs, cores
  python -m threadloom run [--gil=P] (script.py | -m module) [args]   run with the GIL guard
  python -m threadloom topo [--xml FILE | --synthetic DESC] [--plan [--gpus N] [--loaders N]
                            [--io N] [--cpus LIST]] [--json]
  python -m threadloom slurm script|submit [OPTIONS] train.py [args]   an sbatch script for
                            one threadloom process per node (threadloom slurm script --help)
  python -m threadloom contention [--threads N] [--function main] script.py [args]   the shared
                            objects whose reference counts other threads write most
"""

import argparse
import json
import sys

from threadloom import placement, topoview
from threadloom import sysinfo as _info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":  # its arguments belong to the script: no argparse here
        from threadloom import launch
        return launch.main(argv[1:])
    if argv and argv[0] == "slurm":  # its own parser (threadloom/slurm.py)
        from threadloom import slurm
        return slurm.main(argv[1:])
    if argv and argv[0] == "contention":  # its own parser (threadloom/contention.py)
        from threadloom.contention import main as contention_main
        return contention_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m threadloom", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{info,topo,run,slurm,contention}")
    pi = sub.add_parser("info", help="interpreter, GIL state, library versions, GPUs, cores")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pt = sub.add_parser("topo", help="the hardware topology and the placement plan")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--xml", help="an hwloc XML file to read instead of this machine")
    src.add_argument("--synthetic", help='an hwloc synthetic machine, e.g. "pack:2 numa:2 core:28 pu:2"')
    pt.add_argument("--plan", action="store_true", help="place threadloom's threads and explain why")
    pt.add_argument("--gpus", type=int, help="GPUs to plan for (default: all)")
    pt.add_argument("--loaders", type=int, help="loader threads per GPU (default: auto)")
    pt.add_argument("--io", type=int, default=1, help="checkpoint I/O threads (default 1)")
    pt.add_argument("--cpus", help='restrict to these CPUs, e.g. "0-7,16" (as taskset)')
    pt.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)

    if args.cmd == "info":
        d = _info.info()
        print(json.dumps(d, indent=2) if args.json else _info.format_info(d))
        return 0
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m threadloom topo | head`
        sys.stderr.close()
        sys.exit(0)
