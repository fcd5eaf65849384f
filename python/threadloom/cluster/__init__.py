"""threadloom.cluster: one process per node, every node of a job meeting the others.

A threadloom job on several servers runs one process per node (``srun --ntasks-per-node=1
threadloom run train.py``); each process drives all of its node's GPUs with threads. This
package gives each of those processes:

- ``slurm_env()``: what SLURM told this task (ranks, node list expanded by the C hostlist
  parser, the GPUs and cores it may use), or None outside SLURM;
- ``rendezvous()``: node 0 runs a small key-value store over TCP, every node connects to it,
  proves it knows the job secret, registers, and waits for the others; the result carries the
  rank, the world size, every node's host and a free port on node 0 for torch.distributed;
- ``Rendezvous.torchrun_env()``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, ...
  for code written for torchrun; ``Rendezvous.nccl_bootstrap()``: one NCCL world over every
  GPU of every node;
- ``current()``: the Rendezvous the launcher made before user code (``threadloom run
  --nnodes ...`` or a multi-node SLURM step), with a Watchdog that takes every node down when
  one fails;
- ``on_preempt()``: a final checkpoint on every node and a requeue when SLURM's warning signal
  comes.

The package, one file per concern (each imports only the ones above it, and below the package
only errors, _runtime, _core and comm: it never imports spmd or checkpoint, whose objects it
aborts through _runtime and saves through duck typing):
    env.py         SLURM's environment in, CUDA_VISIBLE_DEVICES narrowing
    torchrun.py    the torchrun variables out (standard library only: the C launcher loads it
                   by path before the package)
    store.py       the job secret, the store's ports, its wire protocol, server and client
    rendezvous.py  rendezvous(), Rendezvous, the NCCL bootstrap, the launcher's current()
    runtime.py     the Watchdog
    slurm.py       `threadloom slurm script|submit`, and SlurmCommands (scontrol)
    preempt.py     on_preempt() and Preemption
    launch.py      what the launchers do before user code
"""

from threadloom.cluster.env import TOKEN_VAR, SlurmEnv, slurm_env
from threadloom.cluster.preempt import PREEMPT_EXIT, Preemption, on_preempt
from threadloom.cluster.rendezvous import (ABORT_KEY, NCCL_ID_BYTES, NcclBootstrap, Rendezvous,
                                           current, rendezvous)
from threadloom.cluster.runtime import ABORT_EXIT, Watchdog
from threadloom.cluster.slurm import SlurmCommands
from threadloom.cluster.store import (MAC, MAGIC, MAX_FRAME, MAX_KEY, MAX_STORE,
                                      MIN_TOKEN_CHARS, NONCE, PORT_BASE, PORT_SPAN, PORT_TRIES,
                                      StoreClient, StoreServer, job_secret, new_job_token,
                                      store_ports)
from threadloom.cluster.torchrun import torchrun_env

__all__ = ["ABORT_EXIT", "ABORT_KEY", "MAC", "MAGIC", "MAX_FRAME", "MAX_KEY", "MAX_STORE",
           "MIN_TOKEN_CHARS", "NCCL_ID_BYTES", "NONCE", "NcclBootstrap", "PORT_BASE", "PORT_SPAN",
           "PORT_TRIES", "PREEMPT_EXIT", "Preemption", "Rendezvous", "SlurmCommands", "SlurmEnv",
           "StoreClient", "StoreServer", "TOKEN_VAR", "Watchdog", "current", "job_secret",
           "new_job_token", "on_preempt", "rendezvous", "slurm_env", "store_ports",
           "torchrun_env"]
