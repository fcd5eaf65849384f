"""Imported code like script code: the constants of modules imported from source or from .pyc
are made immortal once threadloom is imported or the launcher starts, unless turned off.

Each case runs in a child interpreter (the hook and immortality are per process), importing a
package written to tmp_path: from source (PYTHONDONTWRITEBYTECODE=1, nothing cached), from
__pycache__ next to the source, and from a .pyc alone (sourceless)."""

import compileall
import json
import py_compile
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import BIN, run_python

pytestmark = pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"),
                                reason="a GIL build has nothing to share")
LAUNCHER = BIN

MOD = '''\
SCALE = 1234567.25
def work(x):
    return (x * 0.75 + 123457) * SCALE - len((2.5, 9876543)) + len("a constant with spaces")
'''

PROBE = '''\
import json, sys
%s
import pkg.mod as m
consts = [c for c in m.work.__code__.co_consts if c is not None]
hook = sys.modules.get("threadloom.share")
print(json.dumps({"immortal": [sys.getrefcount(c) >= 2**32 - 1 for c in consts],
                  "scale": sys.getrefcount(m.SCALE) >= 2**32 - 1,
                  "consts": [repr(c) for c in consts],
                  "from_pyc": not hasattr(m, "FROM_SOURCE"),
                  "hook": hook.imports_shared() if hook else None}))
'''


def make_pkg(tmp_path, how):
    """how: 'source' | 'pycache' | 'sourceless' -> the directory to put on sys.path."""
    root = tmp_path / how
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text(MOD)
    if how != "source":
        # unchecked: the source changed below is not looked at, so FROM_SOURCE tells which ran
        assert compileall.compile_dir(
            str(root), quiet=1, legacy=(how == "sourceless"),
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    with open(root / "pkg" / "mod.py", "a") as f:
        f.write("FROM_SOURCE = True\n")
    if how == "sourceless":
        os.remove(root / "pkg" / "mod.py")
        os.remove(root / "pkg" / "__init__.py")
    return str(root)


def probe(tmp_path, how, first="import threadloom", env=None, launcher=False):
    path = make_pkg(tmp_path, how)
    script = tmp_path / ("probe_%s.py" % how)
    script.write_text(PROBE % first)
    extra = {"PYTHONPATH": path,
             "PYTHONDONTWRITEBYTECODE": "1"}
    extra.update(env or {})
    if launcher:
        e = dict(os.environ, **extra)
        r = subprocess.run([LAUNCHER, "run", str(script)], capture_output=True, text=True,
                           env=e, timeout=120)
    else:
        r = run_python(str(script), env_extra=extra)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["from_pyc"] == (how != "source"), out
    return out


def numbers(out):
    """The immortal flags of the constants other than the string (source compiles intern every
    string constant, immortal on 3.13t)."""
    return [imm for imm, c in zip(out["immortal"], out["consts"]) if not c.startswith("'")]


@pytest.mark.parametrize("how", ["source", "pycache", "sourceless"])
def test_imported_constants_are_immortal(tmp_path, how):
    out = probe(tmp_path, how)
    assert all(out["immortal"]) and out["scale"], out
    assert out["hook"]["on"] and out["hook"]["modules"] >= 2 and out["hook"]["constants"] >= 1


def test_without_the_hook_source_constants_stay_mortal(tmp_path):
    # What the hook is for: importlib compiles source with the builtin compile(), which
    # CPython 3.13t keeps from immortalizing constants (gh-118527), while code unmarshalled
    # from a .pyc goes through _PyCode_New's interning, which makes them immortal: there the
    # hook changes nothing (checked here so that a CPython that changes it is noticed).
    out = probe(tmp_path, "source", env={"THREADLOOM_SHARE_IMPORTS": "0"})
    assert out["hook"] == {"on": False, "modules": 0, "constants": 0}
    assert not any(numbers(out)) and not out["scale"], out
    out = probe(tmp_path, "pycache", first="import threadloom; threadloom.share_imports(False)")
    assert all(out["immortal"]) and out["scale"], out


def test_turned_off_and_on_from_the_api(tmp_path):
    out = probe(tmp_path, "source", first="import threadloom\n"
                "assert threadloom.share_imports(False) is True\n"
                "assert threadloom.share_imports(True) is False")
    assert all(out["immortal"]), out


def test_modules_imported_before_threadloom_are_not_touched(tmp_path):
    out = probe(tmp_path, "source", first="import pkg.mod\nimport threadloom")
    assert not any(numbers(out)), out


needs_launcher = pytest.mark.skipif(not os.access(LAUNCHER, os.X_OK),
                                    reason="no launcher %s: run make build" % LAUNCHER)


@needs_launcher
@pytest.mark.parametrize("how", ["source", "sourceless"])
def test_the_launcher_installs_it_before_user_code(tmp_path, how):
    out = probe(tmp_path, how, first="assert 'threadloom' not in sys.modules", launcher=True)
    assert all(out["immortal"]) and out["scale"], out
    assert out["hook"]["on"]


@needs_launcher
def test_the_launcher_honours_the_opt_out(tmp_path):
    out = probe(tmp_path, "source", first="assert 'threadloom._core' not in sys.modules",
                launcher=True, env={"THREADLOOM_SHARE_IMPORTS": "0"})
    assert not any(numbers(out)) and out["hook"] == {"on": False, "modules": 0,
                                                     "constants": 0}, out


def test_python_m_threadloom_run_shares_the_script_too(tmp_path):
    # runpy.run_path compiles a script with compile(): launch.py shares its constants, so the
    # script scales as under `threadloom run` and `python script.py`
    script = tmp_path / "s.py"
    script.write_text("import sys\n"
                      "def f(x):\n    return x * 0.75 + 1234567\n"
                      "print(all(sys.getrefcount(c) >= 2**32 - 1 for c in f.__code__.co_consts"
                      " if c is not None))\n")
    r = run_python("-m", "threadloom", "run", str(script))
    assert r.returncode == 0 and r.stdout.strip() == "True", (r.stdout, r.stderr)
    r = run_python("-m", "threadloom", "run", str(script),
                   env_extra={"THREADLOOM_SHARE_IMPORTS": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)


def test_import_overhead_is_recorded(tmp_path):
    # The stdlib imported after threadloom goes through the hook too (counted, never failing)
    code = ("import threadloom, json\n"
            "import email.message, xml.dom.minidom, decimal\n"
            "print(json.dumps(threadloom.imports_shared()))")
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["on"] and st["modules"] >= 5
