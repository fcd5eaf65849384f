"""A job of tests/python/test_slurm.py's requeue test: a small deterministic training run under
`threadloom run` on every node, preempted, requeued by SLURM and resumed.

    requeue_job.py CKPT_DIR --steps N --hold-at K

Node r keeps its checkpoints in CKPT_DIR/node-<r> (every "node" of the local cluster sees the
same file system). A run loads the newest checkpoint there ("resumed from step S") or starts
at step 0, and trains with cluster.on_preempt(Checkpointer, defer=True), calling check()
after every step. The first run (SLURM_RESTART_COUNT unset or 0) stops at step K, prints
"holding at step K" and waits (at most 120 s) for the preemption signal, which the test sends
to the batch shell; check() then saves step K on every node, node 0 runs `scontrol requeue`,
and the process exits with PREEMPT_EXIT. A run that reaches step N prints one JSON line:
{"rank", "step", "weights", "run"}.

train() is the whole model: the test runs it uninterrupted and compares the weights.
"""

import array
import json
import os
import sys

WIDTH = 8


def initial(rank):
    return [float(rank + i) for i in range(WIDTH)]


def train(weights, rank, start, stop):
    """The weights after steps start..stop-1 from `weights` (a list of floats): each step
    depends on the step number and on every weight, so a skipped, repeated or reordered step
    changes the result."""
    w = list(weights)
    for step in range(start, stop):
        total = sum(w)
        w = [(x * 0.75 + (step + 1) * 0.125 + total * 0.01 + rank) % 997.0 for x in w]
    return w


def main(argv):
    import threadloom
    from threadloom import cluster

    ckroot = argv[0]
    steps = int(argv[argv.index("--steps") + 1])
    hold_at = int(argv[argv.index("--hold-at") + 1])
    rv = cluster.current()
    if rv is None:
        print("no rendezvous: run me under `threadloom run` in a multi-node step", flush=True)
        return 3
    rank = rv.rank
    run = int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1
    ckdir = os.path.join(ckroot, "node-%d" % rank)
    cur = {}
    try:
        saved = threadloom.load(ckdir)
        cur["step"], cur["w"] = int(saved["step"]), [float(x) for x in saved["w"]]
        print("rank %d: run %d resumed from step %d" % (rank, run, cur["step"]), flush=True)
    except threadloom.NotFoundError:
        cur["step"], cur["w"] = 0, initial(rank)
        print("rank %d: run %d starts at step 0" % (rank, run), flush=True)

    ck = threadloom.Checkpointer(ckdir)
    pre = cluster.on_preempt(
        ck, state=lambda: ({"step": cur["step"], "w": array.array("d", cur["w"])}, cur["step"]),
        defer=True)
    while cur["step"] < steps:
        cur["w"] = train(cur["w"], rank, cur["step"], cur["step"] + 1)
        cur["step"] += 1
        print("rank %d: step %d" % (rank, cur["step"]), flush=True)
        pre.check()
        if run == 1 and cur["step"] == hold_at:
            print("rank %d: holding at step %d" % (rank, cur["step"]), flush=True)
            if not pre.requested.wait(120.0):
                print("rank %d: no preemption signal within 120 s" % rank, flush=True)
                return 4
            pre.check()   # saves, meets the other nodes, requeues (node 0), SystemExit(75)
    ck.close()
    print(json.dumps({"rank": rank, "step": cur["step"], "weights": cur["w"], "run": run}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
