"""threadloom: one free-threaded Python process, dozens of threads, feeding every GPU.

The C runtime lives in ``threadloom._core``; this package is the thin Python layer over it.
Importing threadloom never turns the GIL back on: ``_core`` declares ``Py_mod_gil =
Py_MOD_GIL_NOT_USED`` and this package imports nothing that lacks it.
"""


def _core_missing(err):
    """The ImportError for an _core that did not import: `err` itself where this interpreter's
    _core is there (it failed to load: a library missing, say), else one that says which
    interpreter threadloom was built for and how to install it for this one."""
    import glob
    import importlib.machinery
    import os
    import re
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.exists(os.path.join(here, "_core" + s))
           for s in importlib.machinery.EXTENSION_SUFFIXES):
        return err
    this = "%s (Python %d.%d%s)" % (sys.executable, sys.version_info[0], sys.version_info[1],
                                    "t" if "t" in getattr(sys, "abiflags", "") else "")
    python = sys.executable or "python"
    install = "%s -m pip install threadloom, or from a checkout %s -m pip install DIR" % (
        python, python)
    built = []
    for path in sorted(glob.glob(os.path.join(here, "_core.*"))):
        m = re.match(r"_core\.cpython-(\d)(\d+)(t?)-", os.path.basename(path))
        built.append("Python %s.%s%s" % m.groups() if m else os.path.basename(path))
    if built:
        msg = ("threadloom is built for %s, and this is %s: run it with the interpreter it was "
               "installed for, or install it for this one (%s)" % (" and ".join(built), this,
                                                                    install))
    elif os.path.exists(os.path.join(here, "..", "..", "pyproject.toml")):
        msg = ("threadloom was imported from its sources (%s), which hold no built extension: "
               "install the package (%s -m pip install %s) and import that one, with the "
               "sources off sys.path and PYTHONPATH" % (here, python,
                                                        os.path.dirname(os.path.dirname(here))))
    else:
        msg = ("threadloom's extension _core is missing from %s: reinstall threadloom for %s "
               "(%s)" % (here, this, install))
    return ImportError(msg, name="threadloom._core", path=here)


try:
    from threadloom import _core
except ImportError as e:
    raise _core_missing(e) from None
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
# The launcher loads gilguard by path before this package exists: bind it as an attribute here
# (threadloom.gilguard.GILWarning, for warning filters).
from threadloom import gilguard  # noqa: F401
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
