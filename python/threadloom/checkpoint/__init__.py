"""threadloom.Checkpointer: asynchronous, crash-safe, checksummed checkpoints.

    ckpt = threadloom.Checkpointer("ckpt/", keep=3)
    fut = ckpt.save({"model": weights, "opt": opt_state, "epoch": 3}, step=1000)  # returns fast
    ...                                   # training goes on while I/O threads write
    fut.result()                          # 'ckpt/step-1000' once committed (or the error)
    state = threadloom.load("ckpt/")      # newest complete checkpoint, every checksum verified

How a save flows: save() walks the state on the calling (training) thread, lays the tensors out
in safetensors files, and copies their bytes, in file order, into fixed-size staging slots drawn
from a bounded budget (``staging_bytes``), helped by the idle I/O threads (``copy_threads``).
Each full slot goes to its file's queue; one I/O task
per file (on a threadloom.Executor) hashes the bytes (xxh3_64, streaming per tensor) and writes
them at their offset. save() returns once the last byte is staged; when the checkpoint is larger
than the budget, the training thread waits only for the slots the writers have yet to free. When
every file is written and fsynced, and the previous save has committed, the commit step writes
manifest.json, fsyncs the temporary directory, renames it to ``step-<N>``, fsyncs the parent,
points ``latest`` at it (temporary file, fsync, rename, fsync) and applies retention.

Crash safety: a directory named ``step-<N>`` is complete by construction (it only ever appears
through the rename); temporaries are ``.tmp-step-<N>-<random>``, removed by the next Checkpointer
on the directory and never loaded; retention renames a checkpoint to ``.del-...`` before deleting
it, so a crash mid-delete leaves no half checkpoint. One Checkpointer writes a directory at a time
(an flock on ``.lock``).

Tensors on this path are host objects with the buffer protocol: memoryview (format and shape give
dtype and shape), array.array, bytes/bytearray and threadloom.Buffer (uint8, 1-D), numpy arrays,
CPU torch tensors (any dtype safetensors has: bfloat16 and bool included; non-contiguous ones
are made contiguous on the calling thread, requires_grad ones detached), and other CPU objects
with ``__dlpack__`` (imported with threadloom.from_dlpack). Device state (threadloom
DeviceBuffers, torch CUDA tensors, kDLCUDA DLPack tensors, host views of sim device memory) is
snapshotted by D2H copies on a side stream into pinned staging of its device, ordered after the
caller's stream at save() (device.py); load(..., device=) puts tensors back on a device. Views
sharing one storage are stored (and loaded) as separate tensors. Every other leaf is stored in the manifest: JSON
values as they are, the rest pickled (base64). load(..., framework="torch") returns torch
tensors. The on-disk format is documented in docs/checkpoint-format.md.

The package, one file per concern (each imports only the ones above it in this list):
    leaves.py   tensor leaves both ways: bytes, dtype and shape out; memoryview or torch in
    device.py   device state: which leaves are, the D2H snapshot, tensors back on a device
    format.py   the format: safetensors header, manifest.json, the state tree; writer's and
                reader's side next to each other, and CorruptCheckpointError
    layout.py   the directory: step-N, latest, temporaries, retention
    fileops.py  FileOps, the file-system calls of a save (tests inject faults there)
    staging.py  the staging budget and the staging copy
    reader.py   load()
    writer.py   Checkpointer, Progress, one save's files and its commit
"""

from threadloom.checkpoint.fileops import FileOps
from threadloom.checkpoint.format import FORMAT, VERSION, CorruptCheckpointError
from threadloom.checkpoint.reader import load
from threadloom.checkpoint.writer import Checkpointer, Progress

__all__ = ["Checkpointer", "CorruptCheckpointError", "FileOps", "FORMAT", "Progress", "VERSION",
           "load"]
