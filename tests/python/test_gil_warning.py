"""A DataLoader whose threads would take turns (the GIL is on) says so once, with the reason and
what to do (threadloom.gilguard.warn_if_gil_on). Each case runs in a fresh process: the GIL,
once on, stays on, and the warning is once per process."""

import os
import sysconfig

import pytest

from conftest import BIN, ROOT, run_python

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
EXT_DIR = os.environ.get("THREADLOOM_TEST_EXT_DIR") or os.path.join(ROOT, "build", "tests", "python-ext")
needs_ft = pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter")

# Two loaders, two epochs each; prints the GILWarnings caught, one per line: file:line message.
LOADERS = """\
import sys, warnings
warnings.simplefilter("always")
%s
import threadloom
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(2):
        loader = threadloom.DataLoader(list(range(16)), batch_size=4, num_workers=2)
        for epoch in range(2):
            for batch in loader:   # the line the warning points at
                pass
    threadloom.DataLoader(list(range(4)), batch_size=2, num_workers=0).__iter__()
for w in seen:
    if issubclass(w.category, threadloom.gilguard.GILWarning):   # bound under the launcher too
        print("%%s:%%d %%s" %% (w.filename, w.lineno, w.message))
"""


def loaders(tmp_path, prelude="", **kw):
    s = tmp_path / "loaders.py"
    s.write_text(LOADERS % prelude)
    r = run_python(str(s), **kw)
    assert r.returncode == 0, r.stderr
    return str(s), r.stdout.splitlines()


@needs_ft
def test_no_warning_while_the_gil_is_off(tmp_path):
    _, lines = loaders(tmp_path)
    assert lines == []


@needs_ft
def test_gil_asked_for_warns_once_at_the_users_line(tmp_path):
    path, lines = loaders(tmp_path, env_extra={"PYTHON_GIL": "1"})
    assert len(lines) == 1, lines
    where, msg = lines[0].split(" ", 1)
    assert where == "%s:%d" % (path, LOADERS.splitlines().index(
        "            for batch in loader:   # the line the warning points at") + 1)
    assert msg.startswith("threadloom.DataLoader: the GIL is on, so its 2 threads take turns")
    assert "PYTHON_GIL=1" in msg and "unset it" in msg


@needs_ft
@pytest.mark.skipif(not os.path.isdir(EXT_DIR), reason="test extension not built (%s)" % EXT_DIR)
def test_an_extension_that_turned_it_on_is_named_when_the_guard_saw_it(tmp_path):
    s = tmp_path / "ext.py"
    s.write_text(LOADERS % "import gil_needing")
    # under the guard (it names the module) ...
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    env["PYTHONPATH"] = EXT_DIR
    if os.access(BIN, os.X_OK):
        r = subprocess.run([BIN, "--gil=warn", "run", str(s)], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.splitlines()) == 1, r.stdout
        assert "importing 'gil_needing', which does not declare Py_mod_gil" in r.stdout
    # ... and without it, how to find it
    r = run_python(str(s), env_extra={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1, r.stdout
    assert "an extension module without Py_mod_gil" in r.stdout
    assert "threadloom run --gil=warn" in r.stdout
