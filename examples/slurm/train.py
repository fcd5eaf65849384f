"""One process per node, threads inside: the program a SLURM job runs on each node.

    srun --ntasks-per-node=1 threadloom run examples/slurm/train.py      (see job.sbatch)

Each node's process meets the others with threadloom.cluster.rendezvous() (node 0 runs a small
authenticated store; every node proves it knows $THREADLOOM_JOB_TOKEN), exports the torchrun
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) for code written for torchrun, and
runs threadloom.spmd over its own GPUs, or a CPU world of --ranks threads without GPUs. The
ranks of all nodes shard one data set (global rank = node rank x ranks per node + local rank).

What is not built yet: gradients between nodes need the NCCL bootstrap (issue 10), so here the
ranks average gradients within their node only and the nodes compare results through the store
at the end. Without SLURM, give the layout yourself (that is how the test runs it):

    export THREADLOOM_JOB_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    python examples/slurm/train.py --nnodes 2 --node-rank 0 --master 127.0.0.1 &
    python examples/slurm/train.py --nnodes 2 --node-rank 1 --master 127.0.0.1
"""

import argparse
import array
import json
import os
import random
import socket
import sys

import threadloom
from threadloom import cluster

FEATURES = 4


def dataset(n, seed):
    rng = random.Random(seed)
    true_w = [rng.uniform(-1, 1) for _ in range(FEATURES)]
    data = []
    for _ in range(n):
        x = [rng.gauss(0, 1) for _ in range(FEATURES)]
        data.append((x, sum(a * b for a, b in zip(true_w, x))))
    return data


def train(ctx, data, node, nodes, steps, lr):
    world = nodes * ctx.world_size                      # every rank of every node
    grank = node * ctx.world_size + ctx.rank
    loader = threadloom.DataLoader(data, batch_size=16, shuffle=True, drop_last=True,
                                   rank=grank, world_size=world, collate_fn=list,
                                   generator=random.Random(0))
    w = array.array("d", [0.0] * FEATURES)
    it = iter(loader)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        g = array.array("d", [0.0] * FEATURES)
        for x, y in batch:
            err = sum(a * b for a, b in zip(w, x)) - y
            for j in range(FEATURES):
                g[j] += 2.0 * err * x[j] / len(batch)
        ctx.comm.allreduce_buckets([g])                  # within this node (see above)
        for j in range(FEATURES):
            w[j] -= lr * g[j]
    loader.close()
    return list(w)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnodes", type=int, help="nodes (default: SLURM_NNODES)")
    ap.add_argument("--node-rank", type=int, help="this node (default: SLURM_NODEID)")
    ap.add_argument("--master", help="node 0's host[:port] (default: SLURM's first node)")
    ap.add_argument("--ranks", type=int, default=2, help="rank threads per node without GPUs")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=120.0, help="rendezvous deadline (s)")
    a = ap.parse_args(argv)

    with cluster.rendezvous(a.nnodes, a.node_rank, a.master, timeout=a.timeout) as rv:
        env = rv.apply_torchrun_env()                    # for torch.distributed-style code
        print("node %d/%d on %s: store %s:%d, torch master port %d, nodes %s, RANK=%s WORLD_SIZE=%s"
              % (rv.rank, rv.world_size, socket.gethostname(), rv.master_addr, rv.store_port,
                 rv.master_port, ",".join(rv.hosts), env.get("RANK", os.environ.get("RANK")),
                 env.get("WORLD_SIZE", os.environ.get("WORLD_SIZE"))), flush=True)
        if rv.rank == 0:                                 # node 0 picks the seed for everyone
            rv.store.set("seed", str(random.SystemRandom().randrange(1 << 30)))
        seed = int(rv.store.wait("seed", a.timeout))
        data = dataset(4096, seed)                      # the same data set on every node
        ws = threadloom.spmd(train, args=(data, rv.rank, rv.world_size, a.steps, 0.05),
                             cpu_world=a.ranks, timeout=a.timeout)
        rv.store.set("result/%d" % rv.rank, json.dumps({"ranks": len(ws), "w": ws[0]}))
        results = [json.loads(rv.store.wait("result/%d" % r, a.timeout))
                   for r in range(rv.world_size)]
        spread = max(abs(r["w"][j] - results[0]["w"][j]) for r in results
                     for j in range(FEATURES))
        print("node %d: %d rank thread(s) trained %d steps on seed %d; weights %s; largest "
              "difference between nodes %.4f (nodes average nothing yet: NCCL bootstrap, issue 10)"
              % (rv.rank, len(ws), a.steps, seed, ["%.3f" % v for v in ws[0]], spread), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
