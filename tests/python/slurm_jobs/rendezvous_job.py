"""A job step of tests/python/test_slurm.py: one task per node meets the others through
threadloom.cluster.rendezvous() and prints one JSON line of what it saw.

    rendezvous_job.py [--die-rank R] [--hold] [--hold-unhandled FILE]

--die-rank R: after the rendezvous, rank R kills itself with SIGKILL and the other ranks wait
on a store key nobody sets (as a rank waits for a collective), with a 300 s timeout; only
srun's --kill-on-bad-exit ends them early. --hold: every rank then prints "holding" and waits
for a signal; USR2 makes it print "got USR2" and exit 0 (checks the batch script's forwarding).
--hold-unhandled FILE: every rank prints "holding" and, handling no signal itself, waits until
FILE exists (polled; at most 120 s), then prints "released" (the launcher's notice keeps the
preemption signal from killing it meanwhile).
"""

import json
import os
import signal
import socket
import sys
import threading
import time

from threadloom import _core, cluster


def source_address(host):
    """The address this node uses to reach `host` (its own address on that network)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((socket.gethostbyname(host), 9))
        return s.getsockname()[0]
    finally:
        s.close()


def main():
    argv = sys.argv[1:]
    die_rank = int(argv[argv.index("--die-rank") + 1]) if "--die-rank" in argv else None
    hold = "--hold" in argv
    release = argv[argv.index("--hold-unhandled") + 1] if "--hold-unhandled" in argv else None
    got = threading.Event()
    if hold:
        signal.signal(signal.SIGUSR2, lambda *_: got.set())
    se = cluster.slurm_env()
    with cluster.rendezvous(timeout=60.0) as rv:
        print(json.dumps({
            "rank": rv.rank, "world": rv.world_size, "hosts": list(rv.hosts),
            "nodename": se.nodename, "node_rank": se.node_rank, "procid": se.rank,
            "ntasks": se.ntasks, "raw_nodelist": os.environ["SLURM_JOB_NODELIST"],
            "nodelist": list(_core.hostlist_expand(os.environ["SLURM_JOB_NODELIST"])),
            "master_addr": rv.master_addr, "store_port": rv.store_port,
            "address": source_address(rv.master_addr),
            "master_ip": socket.gethostbyname(rv.master_addr),
            "torchrun": rv.torchrun_env(),
            "job_id": se.job_id,
        }), flush=True)
        if die_rank is not None:
            if rv.rank == die_rank:
                print("rank %d: SIGKILL to myself" % rv.rank, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            print("rank %d: waiting for a key nobody sets" % rv.rank, flush=True)
            rv.store.wait("never-set", timeout=300.0)
            print("rank %d: the wait ended (it must not)" % rv.rank, flush=True)
            return 3
        if hold:
            print("holding", flush=True)
            if not got.wait(120.0):
                print("no USR2 within 120 s", flush=True)
                return 4
            print("got USR2", flush=True)
        if release:
            print("holding", flush=True)
            deadline = time.monotonic() + 120.0
            while not os.path.exists(release):
                if time.monotonic() > deadline:
                    print("not released within 120 s", flush=True)
                    return 4
                time.sleep(0.05)
            print("released", flush=True)
        print("rank %d: done" % rv.rank, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
