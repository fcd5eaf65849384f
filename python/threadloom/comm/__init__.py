"""threadloom.comm: the communicators between the ranks of a training world.

    CpuComm     host values, between the rank threads of one spmd() world (comm/cpu.py)
    NcclComm    CUDA tensors, one NCCL communicator per GPU thread (comm/nccl.py over _core)
    DeviceComm  ctx.comm of a world of devices: device buffers through NCCL on cuda and
                through the host collectives, ordered on the rank's stream, on sim
                (comm/device.py); host values through the CpuComm

Both take allreduce, broadcast, allgather, reduce_scatter and allreduce_buckets with the same
signatures (NcclComm's add stream=); the bucket planner and the reduction names they share are
comm/buckets.py. spmd() hands them to its ranks as ctx.comm / ctx.host_comm.
"""

from threadloom.comm.buckets import DEFAULT_BUCKET_BYTES
from threadloom.comm.cpu import CpuComm
from threadloom.comm.device import DeviceComm
from threadloom.comm.nccl import NcclComm

__all__ = ["CpuComm", "DEFAULT_BUCKET_BYTES", "DeviceComm", "NcclComm"]
