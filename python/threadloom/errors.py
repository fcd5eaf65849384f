"""threadloom's exceptions, built from Python code.

The classes live in the extension (one per TL_E* code of the error table, see
include/threadloom/error.h); this module makes instances of them for errors that Python code
detects, with the same message shape, `name`, `code`, `hint` and `detail` as the C layer's.
"""

from threadloom import _core

CODES = {name: code for code, name, _, _ in _core.error_table()}


def error(name, detail=""):
    """The threadloom exception for `name` ("TL_ETIMEDOUT" or "ETIMEDOUT") carrying `detail`,
    ready to raise."""
    if not name.startswith("TL_"):
        name = "TL_" + name
    try:
        _core._raise_error(CODES[name], detail)
    except _core.Error as e:
        return e
    raise AssertionError("unreachable")  # pragma: no cover
