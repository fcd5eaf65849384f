"""Asynchronous checkpoints: the training loop goes on while the checkpoint is written.

A training loop (a little Python work per step, and an update of the weights) saves its state
every --every steps with threadloom.Checkpointer, twice:

  sync:   ckpt.save(state, step=step).result()    # the loop waits until the files are on disk
  async:  ckpt.save(state, step=step)             # the loop waits only for the copy of the
                                                  # state into the staging memory
and prints, for each, how long each save held the loop (the stall), the whole run's time, and
for the async run how many steps ran while a checkpoint was being written. At the end it loads
the newest checkpoint of each run and checks it holds the weights of its step (verified
checksums; a save is complete or absent, never half-written).

    python examples/async_checkpoint.py [--state-mb 64] [--steps 60] [--every 10] [--dir DIR]
"""

import argparse
import array
import os
import sys
import tempfile
import time

import threadloom


def step_work(weights, step, work):
    """One training step: `work` iterations of Python arithmetic, then a weight update that
    marks the step in the weights (so a checkpoint of step s is recognisable)."""
    acc = 0.0
    for k in range(work):
        acc += (k * step) % 7 * 0.5
    weights[step % len(weights)] = float(step)
    weights[0] = float(step)
    return acc


def run(directory, mode, steps, every, state_mb, work):
    """Runs the loop saving with `mode` ("sync" or "async"); returns (seconds, stalls, steps run
    while a save was in flight)."""
    weights = array.array("d", bytes(state_mb << 20))          # state_mb MiB of float64
    stalls, overlapped = [], 0
    pending = []
    with threadloom.Checkpointer(directory, keep=2) as ckpt:
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            step_work(weights, step, work)
            pending = [f for f in pending if not f.done()]
            overlapped += bool(pending)                 # a save was being written meanwhile
            if step % every == 0:
                t = time.perf_counter()
                fut = ckpt.save({"weights": weights, "step": step}, step=step)
                if mode == "sync":
                    fut.result()                        # what a synchronous save costs
                else:
                    pending.append(fut)
                stalls.append(time.perf_counter() - t)
        loop_s = time.perf_counter() - t0
        ckpt.wait()                                     # raises if a save failed
    return loop_s, stalls, overlapped


def check(directory, every, steps):
    state = threadloom.load(directory)                 # the newest; every checksum verified
    w = memoryview(state["weights"])
    last = steps - steps % every
    ok = state["step"] == last and w[0] == float(last)
    print("  newest checkpoint: step-%d, weights[0] = %g: %s"
          % (state["step"], w[0], "matches its step" if ok else "WRONG"))
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-mb", type=int, default=64, help="MiB of state to save (64)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="save every N steps (10)")
    ap.add_argument("--work", type=int, default=100_000, help="Python iterations per step")
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    a = ap.parse_args(argv)
    if min(a.state_mb, a.steps, a.every) < 1 or a.every > a.steps or a.work < 0:
        ap.error("--state-mb, --steps and --every must be >= 1, --every <= --steps")
    tmp = None
    base = a.dir
    if base is None:
        tmp = tempfile.TemporaryDirectory(prefix="async_checkpoint-", dir=os.getcwd())
        base = tmp.name
    print("%d steps, a %d MiB state saved every %d steps (%d saves each run) into %s"
          % (a.steps, a.state_mb, a.every, a.steps // a.every, base))
    ok = True
    res = {}
    for mode in ("sync", "async"):
        d = os.path.join(base, mode)
        loop_s, stalls, overlapped = run(d, mode, a.steps, a.every, a.state_mb, a.work)
        res[mode] = (loop_s, stalls)
        print("%-5s: loop %.2f s, stall per save %.1f ms on average (max %.1f ms)%s"
              % (mode, loop_s, 1e3 * sum(stalls) / len(stalls), 1e3 * max(stalls),
                 "; %d step(s) ran while a checkpoint was being written" % overlapped
                 if mode == "async" else ""))
        ok = check(d, a.every, a.steps) and ok
    s_sync = sum(res["sync"][1]) / len(res["sync"][1])
    s_async = sum(res["async"][1]) / len(res["async"][1])
    print("async saves held the loop %.1fx less than sync ones; the loop ran %.2fx faster"
          % (s_sync / max(s_async, 1e-9), res["sync"][0] / res["async"][0]))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
