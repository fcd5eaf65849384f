"""threadloom: one free-threaded Python process, dozens of threads, feeding every GPU.

The C runtime lives in ``threadloom._core``; this package is the thin Python layer over it.
Importing threadloom never turns the GIL back on: ``_core`` declares ``Py_mod_gil =
Py_MOD_GIL_NOT_USED`` and this package imports nothing that lacks it.
"""

from threadloom import _core
from threadloom._core import Arena, Buffer, from_dlpack  # noqa: F401
from threadloom._core import (  # noqa: F401  (the error classes are public API)
    AccessDeniedError,
    BusyError,
    CanceledError,
    ClosedError,
    CudaError,
    DeviceLostError,
    Error,
    InputOutputError,
    InvalidArgumentError,
    LibraryNotFoundError,
    NcclError,
    NoDeviceError,
    NoDriverError,
    NoSpaceError,
    NotBuiltError,
    NotFoundError,
    NotPermittedError,
    OutOfMemoryError,
    OutOfRangeError,
    ReadOnlyFilesystemError,
    TimedOutError,
    TopologyError,
    TryAgainError,
    UnknownError,
)
from threadloom import share as _share_module
from threadloom.share import ShareReport, imports_shared, share, share_imports
from threadloom.checkpoint import Checkpointer, CorruptCheckpointError, load
from threadloom.contention import contention
from threadloom import devices  # noqa: F401  (callable: threadloom.devices() lists them)
from threadloom.data import DataLoader, get_worker_info
from threadloom.executor import Executor
from threadloom.memory import arena, current_numa_node
from threadloom.pipeline import Pipeline
from threadloom.placement import Pinning, default_plan, pin, plan
from threadloom.spmd import spmd
from threadloom.sysinfo import info, topology

__version__ = _core.__version__

# Constants of modules imported from here on are made immortal like a script's (threadloom.share
# documents it; THREADLOOM_SHARE_IMPORTS=0 or share_imports(False) turns it off).
_share_module.install_from_env()

__all__ = ["Arena", "Buffer", "Checkpointer", "CorruptCheckpointError", "DataLoader", "Error", "Executor", "from_dlpack", "load", "Pipeline", "arena", "current_numa_node", "Pinning", "default_plan", "get_worker_info", "info", "pin", "plan", "spmd", "topology",
           "ShareReport", "devices", "contention", "imports_shared", "share", "share_imports",
           "__version__"] + [
    cls.__name__ for _, _, _, cls in _core.error_table()
]
