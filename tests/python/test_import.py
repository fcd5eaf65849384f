"""Importing threadloom keeps the GIL off, and _core keeps no process-global state."""

import sys
import sysconfig

import pytest

from conftest import run_python

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
needs_ft = pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter")


@needs_ft
def test_import_keeps_gil_disabled():
    # A fresh process, warnings as errors: an extension without Py_mod_gil would re-enable the
    # GIL with a RuntimeWarning, which -W error turns into a failed import.
    r = run_python("-W", "error", "-c",
                   "import sys; assert not sys._is_gil_enabled(); import threadloom, threadloom.__main__;"
                   "threadloom.info(); print(sys._is_gil_enabled())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@needs_ft
def test_gil_state_is_really_observed():
    # The check above can fail: with the GIL forced on, the same probe reports True.
    r = run_python("-c", "import sys, threadloom; print(sys._is_gil_enabled())",
                   env_extra={"PYTHON_GIL": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_module_declares_no_gil_and_has_state():
    import threadloom._core as core
    # Multi-phase init: the module has a definition with state and exec slots.
    assert core.__spec__ is not None
    assert core.__version__ == core.version()


def test_import_in_subinterpreter():
    # A module with globals cannot be loaded in a second interpreter that has its own GIL;
    # ours declares Py_MOD_PER_INTERPRETER_GIL_SUPPORTED and keeps its state per module.
    try:
        import _interpreters as interpreters
    except ImportError:
        pytest.skip("this interpreter has no _interpreters module")
    interp = interpreters.create()
    try:
        code = ("import sys; sys.path[:0] = %r\n"
                "import threadloom._core as c\n"
                "assert issubclass(c.NoDriverError, c.Error)\n"
                "assert c.topology()['pus'] >= 1\n" % (sys.path,))
        err = interpreters.run_string(interp, code)
        assert err is None, err
    finally:
        interpreters.destroy(interp)
