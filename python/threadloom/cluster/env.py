"""The environment of one node's process in a job: what SLURM tells it, and the variables
threadloom's own tools pass between the batch script, the launcher and the program.

``slurm_env()``: this task's SLURM variables (ranks, the node list expanded by the C host-list
parser, the GPUs and cores it may use), or None outside SLURM. ``narrow_cuda_visible_devices``:
the launcher's confinement of CUDA to the step's GPUs, before anything starts CUDA. The
torchrun variables the program gets are torchrun.py's (loaded by the C launcher before the
package).
"""

import dataclasses
import os
import socket

from threadloom import _core, errors

TOKEN_VAR = "THREADLOOM_JOB_TOKEN"                  # the job secret (batch scripts export it)
PREEMPT_SIGNAL_VAR = "THREADLOOM_PREEMPT_SIGNAL"    # the job's preemption signal (likewise)


def _error(name, detail):
    """The threadloom exception for TL_E<name> with `detail` (see threadloom.errors)."""
    return errors.error(name, detail)


@dataclasses.dataclass(frozen=True)
class SlurmEnv:
    """What SLURM told this task. Ranks count nodes, as threadloom runs one task per node."""
    job_id: str                 # SLURM_JOB_ID
    step_id: str                # SLURM_STEP_ID ("" outside a step, e.g. in the batch script)
    rank: int                   # SLURM_PROCID: this task's rank among all tasks of the step
    node_rank: int              # SLURM_NODEID: this node's index in nodelist
    ntasks: int                 # SLURM_NTASKS (SLURM_NPROCS on old versions)
    nnodes: int                 # SLURM_NNODES (SLURM_JOB_NUM_NODES), else len(nodelist)
    local_rank: int             # SLURM_LOCALID: this task's index on its node
    nodelist: tuple             # SLURM_JOB_NODELIST (SLURM_NODELIST) expanded, in order
    nodename: str               # SLURMD_NODENAME, else this host's name
    gpus: tuple                 # the physical GPUs this task may use (ids or UUIDs, as strings)
    gpu_source: str             # where gpus came from: CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS,
                                # SLURM_JOB_GPUS, or "" when none is set
    cpus: tuple                 # the cores this process may run on (sched_getaffinity)

    @property
    def master_addr(self):
        """The first node of the list: where rendezvous() looks for the store."""
        return self.nodelist[0]

    @property
    def cuda_visible_devices(self):
        """The CUDA_VISIBLE_DEVICES value that confines CUDA to this task's GPUs (CUDA then
        numbers them 0..len(gpus)-1), or None when SLURM named no GPUs."""
        return ",".join(self.gpus) if self.gpu_source else None


def _int_var(env, *names, default=None):
    for name in names:
        v = env.get(name)
        if v is None or v == "":
            continue
        try:
            return int(v)
        except ValueError:
            raise _error("EINVAL", "%s=%r is not an integer" % (name, v)) from None
    if default is None:
        raise _error("EINVAL", "%s is not set (is this a SLURM step? run under srun)" % names[0])
    return default


def _gpu_list(value):
    return tuple(g.strip() for g in value.split(",") if g.strip())


def slurm_env(environ=None):
    """Parses the SLURM environment of this task (default os.environ) into a SlurmEnv, or
    returns None when SLURM_JOB_ID is unset (not running under SLURM). Raises
    InvalidArgumentError naming the variable that is malformed.

    GPUs: SLURM confines a step's GPUs by setting CUDA_VISIBLE_DEVICES (gres/gpu) and names them
    in SLURM_STEP_GPUS / SLURM_JOB_GPUS; the first of those that is set wins, so a
    CUDA_VISIBLE_DEVICES narrowed by SLURM (or by the user) is always respected."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    raw_list = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    nodelist = tuple(_core.hostlist_expand(raw_list)) if raw_list else ()
    nodename = env.get("SLURMD_NODENAME") or socket.gethostname()
    if not nodelist:
        nodelist = (nodename,)
    nnodes = _int_var(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(nodelist))
    if nnodes != len(nodelist):
        raise _error("EINVAL", "SLURM_NNODES=%d but SLURM_JOB_NODELIST=%r names %d nodes"
                     % (nnodes, raw_list, len(nodelist)))
    rank = _int_var(env, "SLURM_PROCID")
    node_rank = _int_var(env, "SLURM_NODEID", default=rank)
    ntasks = _int_var(env, "SLURM_NTASKS", "SLURM_NPROCS", default=nnodes)
    local_rank = _int_var(env, "SLURM_LOCALID", default=0)
    if not 0 <= node_rank < nnodes:
        raise _error("EINVAL", "SLURM_NODEID=%d is outside the %d nodes of SLURM_JOB_NODELIST"
                     % (node_rank, nnodes))
    gpus, source = (), ""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(var) is not None:
            gpus, source = _gpu_list(env[var]), var
            break
    cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
    return SlurmEnv(job_id=str(job_id), step_id=env.get("SLURM_STEP_ID", ""), rank=rank,
                    node_rank=node_rank, ntasks=ntasks, nnodes=nnodes, local_rank=local_rank,
                    nodelist=nodelist, nodename=nodename, gpus=gpus, gpu_source=source, cpus=cpus)


def narrow_cuda_visible_devices(environ=None):
    """Sets CUDA_VISIBLE_DEVICES to the GPUs SLURM gave the step (SLURM_STEP_GPUS, else
    SLURM_JOB_GPUS) when it is unset; returns the value set, or None. Must run before CUDA
    starts (CUDA reads the variable once)."""
    env = os.environ if environ is None else environ
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or "CUDA_VISIBLE_DEVICES" in env:
        return None
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(var) is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(_gpu_list(env[var]))
            return env["CUDA_VISIBLE_DEVICES"]
    return None
