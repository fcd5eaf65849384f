"""The torchrun environment for one process driving every GPU of one node.

Libraries written for ``torchrun`` (torch.distributed's env:// rendezvous, Lightning,
Accelerate) read RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
MASTER_PORT. threadloom runs one process per node, so on a single node these are the values of
a world of one: rank 0 of 1 on 127.0.0.1:29500 (torchrun's default port). ``threadloom run
--torchrun-env`` applies them; a multi-node job's Rendezvous passes its per-node values to the
same functions. Only builtin modules are used: the C launcher loads this file by path before
the package (as it does gilguard.py), registered as threadloom.cluster.torchrun.
"""

import os

# (name, single-node value), in the order torchrun documents them.
TORCHRUN_VARS = (
    ("RANK", "0"),
    ("LOCAL_RANK", "0"),
    ("WORLD_SIZE", "1"),
    ("LOCAL_WORLD_SIZE", "1"),
    ("GROUP_RANK", "0"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29500"),
)


def torchrun_env(rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500):
    """The torchrun variables for node `rank` of `world_size` nodes, one process per node (so
    LOCAL_RANK 0, LOCAL_WORLD_SIZE 1, GROUP_RANK = RANK), as a dict of strings."""
    if not 0 <= rank < world_size:
        raise ValueError("rank must be in [0, world_size), got rank=%r world_size=%r" % (rank, world_size))
    return {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "MASTER_ADDR": str(master_addr),
            "MASTER_PORT": str(int(master_port))}


def apply_torchrun_env(environ=None, **kw):
    """Sets the variables of torchrun_env(**kw) that `environ` (default os.environ) lacks;
    variables already set (by torchrun, SLURM scripts or the user) are kept. Returns the dict of
    those it set."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in torchrun_env(**kw).items() if k not in env}
    env.update(added)
    return added
