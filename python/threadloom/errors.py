"""threadloom's exceptions, made in one place.

The classes live in the extension (one per TL_E* code of the error table, see
include/threadloom/error.h), and so does the one function that makes an instance of them,
``_core.make_error``: the C layer's failures and the errors Python code detects read alike
("TL_ENAME: what (detail). What to do: hint.") and carry the same ``name``, ``code``, ``hint``
and ``detail``. This module only turns names into codes for Python callers.
"""

import os
import shlex

from threadloom import _core

CODES = {name: code for code, name, _, _ in _core.error_table()}


def error(name, detail="", *, what=None, hint=None, cls=None):
    """The threadloom exception for `name` ("TL_ETIMEDOUT" or "ETIMEDOUT") carrying `detail`,
    ready to raise. `what` and `hint` replace the error table's message and advice where a
    feature has more specific ones; `cls` is a subclass of the code's class to make instead
    (CorruptCheckpointError)."""
    if not name.startswith("TL_"):
        name = "TL_" + name
    return _core.make_error(CODES[name], detail, what=what, hint=hint, cls=cls)


def from_errno(errno, detail="", *, hint=None):
    """The threadloom exception for an errno value, translated as the C layer translates it
    (ENOSPC and EDQUOT -> NoSpaceError, EACCES -> AccessDeniedError, ...; others ->
    InputOutputError), with `errno` set. `hint` replaces the error table's advice where the
    caller knows better (a path that is not a directory is no disk failure)."""
    e = _core.make_error(_core.errno_code(errno), detail, hint=hint)
    e.errno = errno
    return e


def command_failed(argv, status, output, *, hint):
    """The InputOutputError for an external command (sbatch, scontrol, srun, ...) that failed:
    "<command> failed" with the command line, its exit status and its output (stderr, else
    stdout) as the detail. `hint`, which every caller gives, says what to check about that
    command: the error table's advice for TL_EIO is about disks, not about a program that
    refused."""
    cmd = " ".join(shlex.quote(str(a)) for a in argv)
    text = " ".join((output or "").split()) or "(no output)"
    return error("EIO", "%s failed with status %d: %s" % (cmd, status, text),
                 what="%s failed" % os.path.basename(str(argv[0])), hint=hint)
