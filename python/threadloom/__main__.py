"""python -m threadloom: report what threadloom sees.

  python -m threadloom info [--json]     interpreter, GIL, libraries, GPUs, cores
  python -m threadloom topo [--xml FILE] [--json]
"""

import argparse
import json
import sys

from threadloom import sysinfo as _info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m threadloom", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{info,topo}")
    pi = sub.add_parser("info", help="interpreter, GIL state, library versions, GPUs, cores")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pt = sub.add_parser("topo", help="the hardware topology (or an hwloc XML file's)")
    pt.add_argument("--xml", help="an hwloc XML file to read instead of this machine")
    pt.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)

    if args.cmd == "info":
        d = _info.info()
        print(json.dumps(d, indent=2) if args.json else _info.format_info(d))
        return 0
    try:
        t = _info.topology(args.xml)
    except Exception as e:  # threadloom.Error: the message says what to do
        print("threadloom: %s" % e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(t, indent=2))
        return 0
    print("%d package(s), %d NUMA node(s), %d core(s), %d PU(s); allowed: %d core(s), %d PU(s)" % (
        t["packages"], t["numa_nodes"], t["cores"], t["pus"], t["allowed_cores"], t["allowed_pus"]))
    for g in t["gpus"]:
        print("GPU %d  %s  %s  NUMA node %d  local PUs %s" % (
            g["index"], g["pci_bus_id"], g["name"] or "(unnamed)", g["numa_node"], g["local_cpus"]))
    if not t["gpus"]:
        print("no NVIDIA GPU on the PCI bus")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m threadloom topo | head`
        sys.stderr.close()
        sys.exit(0)
