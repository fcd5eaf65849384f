"""The `threadloom` launcher (interp/) and `python -m threadloom run`: scripts, modules, argv,
stdin, exit codes, signals, the GIL guard, main-thread pinning, CPU limits, torchrun env.

The launcher is the `threadloom` pip installed next to this interpreter (conftest.BIN;
THREADLOOM_BIN overrides); tests that need it SKIP when it is missing. The test extension without Py_mod_gil is
build/tests/python-ext/gil_needing*.so (THREADLOOM_TEST_EXT_DIR overrides). Nothing here imports
it into the pytest process: that would turn the GIL on for the rest of the run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest

from conftest import BIN, ROOT, run_python
from threadloom import gilguard

EXT_DIR = os.environ.get("THREADLOOM_TEST_EXT_DIR") or os.path.join(ROOT, "build", "tests", "python-ext")
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

needs_bin = pytest.mark.skipif(not os.access(BIN, os.X_OK),
                               reason="launcher not built (%s): run `make build`" % BIN)
needs_ext = pytest.mark.skipif(not os.path.isdir(EXT_DIR) or not any(
    f.startswith("gil_needing") for f in os.listdir(EXT_DIR)),
    reason="test extension gil_needing not built (%s): run `make build`" % EXT_DIR)


def _env(extra=None, drop=("PYTHON_GIL", "PYTHON_CPU_COUNT", "OMP_NUM_THREADS", "RANK",
                            "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                            "MASTER_ADDR", "MASTER_PORT")):
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    env.update(extra or {})
    return env


def tl(*args, env=None, **kw):
    """Runs the launcher; returns the CompletedProcess (text mode)."""
    return subprocess.run([BIN, *args], env=_env(env), capture_output=True, text=True,
                          timeout=120, **kw)


def script(tmp_path, text, name="s.py"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def parse_cpus(s):
    out = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


# ---- scripts, modules, argv, stdin ---------------------------------------------------------

@needs_bin
def test_script_argv_stdout_stdin(tmp_path):
    s = script(tmp_path, "import sys\nprint(sys.argv)\nprint(sys.stdin.read().upper(), end='')\n"
                         "print(sys.path[0] == %r)\n" % str(tmp_path))
    r = tl("run", s, "a", "--b", "-c", input="hello\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [repr([s, "a", "--b", "-c"]), "HELLO", "True"]
    assert r.stderr == ""


@needs_bin
def test_run_module_and_code(tmp_path):
    (tmp_path / "mymod.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    r = tl("run", "-m", "mymod", "x", "y", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "__main__ ['x', 'y']"
    r = tl("run", "-c", "import sys; print(sys.argv)", "z")
    assert r.stdout.strip() == "['-c', 'z']"


@needs_bin
def test_python_options_pass_through(tmp_path):
    r = tl("run", "-X", "cpu_count=3", "-c", "import os, sys; print(os.cpu_count(), sys.flags.optimize)")
    assert r.stdout.strip() == "3 0", r.stderr
    r = tl("run", "-O", "-c", "import sys; print(sys.flags.optimize)")
    assert r.stdout.strip() == "1"


@needs_bin
def test_executable_is_the_interpreter_and_threadloom_imports():
    r = tl("run", "-c", "import sys, threadloom; print(sys.executable); print(sys._is_gil_enabled())")
    assert r.returncode == 0, r.stderr
    exe, gil = r.stdout.split()
    assert os.path.samefile(exe, sys.executable) or "python3.13t" in exe
    assert gil == "False"


# ---- exit codes and exceptions -------------------------------------------------------------

@needs_bin
@pytest.mark.parametrize("code,status,err", [
    ("import sys; sys.exit(3)", 3, None),
    ("raise ValueError('boom')", 1, "ValueError: boom"),
    ("raise SystemExit('bye now')", 1, "bye now"),
    ("pass", 0, None),
])
def test_exit_codes(tmp_path, code, status, err):
    r = tl("run", script(tmp_path, code + "\n"))
    assert r.returncode == status, r.stderr
    if err:
        assert err in r.stderr
    if "ValueError" in code:
        assert "Traceback (most recent call last)" in r.stderr


@needs_bin
def test_unknown_command_and_bad_policy():
    assert tl("frobnicate").returncode == 2
    r = tl("--gil=maybe", "run", "-c", "pass")
    assert r.returncode == 2 and "forbid, warn or allow" in r.stderr
    assert tl("--help").returncode == 0


# ---- signals -------------------------------------------------------------------------------

HANDLERS = """\
import signal, sys
def usr1(sig, frame):
    print("got USR1", flush=True)
def term(sig, frame):
    print("got TERM", flush=True)
    sys.exit(5)
signal.signal(signal.SIGUSR1, usr1)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
while True:
    signal.pause()
"""


@needs_bin
def test_signals_reach_python_handlers(tmp_path):
    p = subprocess.Popen([BIN, "run", script(tmp_path, HANDLERS)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGUSR1)
        assert p.stdout.readline().strip() == "got USR1"
        p.send_signal(signal.SIGTERM)
        assert p.stdout.readline().strip() == "got TERM"
        assert p.wait(timeout=60) == 5
    finally:
        p.kill()
        p.communicate()


def _sigint_status(cmd, tmp_path):
    s = script(tmp_path, "import signal\nprint('ready', flush=True)\nwhile True:\n    signal.pause()\n",
               name="intr.py")
    p = subprocess.Popen([*cmd, s], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
        return rc, p.stderr.read()
    finally:
        p.kill()
        p.communicate()


@needs_bin
def test_sigint_is_keyboard_interrupt_like_python(tmp_path):
    rc, err = _sigint_status([BIN, "run"], tmp_path)
    want, _ = _sigint_status([sys.executable], tmp_path)
    assert "KeyboardInterrupt" in err
    assert rc == want  # python re-raises SIGINT on itself: -2


# ---- the GIL guard -------------------------------------------------------------------------

IMPORTS_IT = "import sys\nimport gil_needing\nprint('after', gil_needing.answer(), sys._is_gil_enabled())\n"
SWALLOWS_IT = "try:\n    import gil_needing\nexcept Exception:\n    pass\nprint('went on')\n"


@needs_bin
@needs_ext
def test_gil_forbid_is_the_default_and_names_the_module(tmp_path):
    s = script(tmp_path, IMPORTS_IT)
    r = tl("run", s, env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 1
    assert "after" not in r.stdout
    assert "'gil_needing'" in r.stderr and "Py_mod_gil" in r.stderr and "--gil=warn" in r.stderr
    assert "%s:2" % s in r.stderr                    # where it was imported
    assert "The global interpreter lock" not in r.stderr  # CPython's warning is replaced


SWALLOWS = {
    "except Exception": SWALLOWS_IT,
    "except BaseException": "try:\n    import gil_needing\nexcept BaseException:\n    pass\nprint('went on')\n",
    "suppress": "import contextlib\nwith contextlib.suppress(BaseException):\n    import gil_needing\n"
                "print('went on')\n",
    "in a function": "def f():\n    try:\n        import gil_needing\n    except BaseException as e:\n"
                     "        print('caught', type(e).__name__)\n    return 1\nf()\nprint('went on')\n",
    "re-raised as another": "try:\n    try:\n        import gil_needing\n    except BaseException:\n"
                            "        raise RuntimeError('x')\nexcept Exception:\n    pass\nprint('went on')\n",
}


@needs_bin
@needs_ext
@pytest.mark.parametrize("how", sorted(SWALLOWS))
def test_gil_forbid_cannot_be_swallowed(tmp_path, how):
    # `except BaseException` and contextlib.suppress used to defeat the guard: exit 0, GIL on,
    # nothing on stderr.
    r = tl("run", "--gil=forbid", script(tmp_path, SWALLOWS[how]), env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 1 and "went on" not in r.stdout, (r.stdout, r.stderr)
    assert "'gil_needing'" in r.stderr
    if how != "except Exception":
        assert "caught GILEnabledError at" in r.stderr


@needs_bin
@needs_ext
def test_gil_forbid_runs_finally_blocks_and_says_it_once(tmp_path):
    s = script(tmp_path, "try:\n    import gil_needing\nfinally:\n    print('cleanup')\n")
    r = tl("run", s, env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 1 and r.stdout.strip() == "cleanup"
    assert r.stderr.count("'gil_needing'") == 1 and "caught" not in r.stderr


@needs_bin
@needs_ext
def test_gil_forbid_in_a_thread_stops_the_process(tmp_path):
    s = script(tmp_path, "import threading\nt = threading.Thread(target=lambda: __import__('gil_needing'))\n"
                         "t.start(); t.join()\nprint('went on')\n")
    r = tl("run", s, env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 1 and "went on" not in r.stdout
    assert "'gil_needing'" in r.stderr


@needs_bin
@needs_ext
def test_gil_warn_prints_one_line_and_goes_on(tmp_path):
    r = tl("--gil=warn", "run", "-W", "error", script(tmp_path, IMPORTS_IT), env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "after 42 True"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "'gil_needing'" in lines[0]


@needs_bin
@needs_ext
def test_gil_allow_is_silent(tmp_path):
    r = tl("run", "--gil=allow", script(tmp_path, IMPORTS_IT), env={"PYTHONPATH": EXT_DIR})
    assert r.returncode == 0
    assert r.stdout.strip() == "after 42 True"
    assert r.stderr == ""


@needs_bin
def test_gil_off_for_a_normal_script_and_user_forced_gil_is_said(tmp_path):
    s = script(tmp_path, "import sys, threading, json\nprint(sys._is_gil_enabled())\n")
    r = tl("run", s)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "False", "")
    r = tl("run", s, env={"PYTHON_GIL": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "True"
    assert "PYTHON_GIL=1" in r.stderr


@needs_ext
@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter")
@pytest.mark.parametrize("pkg", ["vendor", "triton"])
def test_gil_guard_names_who_imported_a_packages_extension(tmp_path, pkg):
    # the extension inside a package whose __init__ imports it: the guard points at the line
    # that imported the package, not at the package's own files; triton (which torch imports
    # from its optimizers: tests/torch/test_gil_torch.py has the real one) gets its own advice
    d = tmp_path / pkg
    d.mkdir()
    so = next(f for f in os.listdir(EXT_DIR) if f.startswith("gil_needing"))
    shutil.copy(os.path.join(EXT_DIR, so), d / so)
    (d / "__init__.py").write_text("from . import gil_needing\n")
    s = script(tmp_path, "import sys\nimport %s\nprint('after', sys._is_gil_enabled())\n" % pkg)
    r = run_python("-m", "threadloom", "run", "--gil=warn", s, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "after True", r.stderr
    assert "module '%s.gil_needing'" % pkg in r.stderr and "imported at %s:2," % s in r.stderr
    if pkg == "triton":
        assert "pip uninstall triton" in r.stderr and "ask its authors" not in r.stderr
    else:
        assert "ask its authors to declare Py_mod_gil" in r.stderr


@needs_ext
@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter")
def test_python_m_threadloom_run_has_the_same_guard(tmp_path):
    s = script(tmp_path, IMPORTS_IT)
    env = {"PYTHONPATH": EXT_DIR}
    r = run_python("-m", "threadloom", "run", s, env_extra=env)
    assert r.returncode == 1 and "'gil_needing'" in r.stderr and "after" not in r.stdout
    r = run_python("-m", "threadloom", "run", "--gil=warn", s, env_extra=env)
    assert r.returncode == 0 and r.stdout.strip() == "after 42 True"
    assert len(r.stderr.splitlines()) == 1


@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter")
def test_python_m_threadloom_run_script_module_exit(tmp_path):
    s = script(tmp_path, "import sys\nprint(sys.argv, sys._is_gil_enabled())\nsys.exit(4)\n")
    r = run_python("-m", "threadloom", "run", s, "a")
    assert r.returncode == 4, r.stderr
    assert r.stdout.strip() == "%r False" % ([s, "a"],)
    (tmp_path / "mm.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    r = run_python("-m", "threadloom", "run", "-m", "mm", "q", cwd=str(tmp_path))
    assert r.stdout.strip() == "__main__ ['q']", r.stderr


# ---- refusing a GIL build ------------------------------------------------------------------

def _gil_python():
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and os.access(exe, os.X_OK):
            r = subprocess.run([exe, "-c", "import sysconfig; print(int(bool(sysconfig.get_config_var('Py_GIL_DISABLED'))))"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() == "0":
                return exe
    return None


def test_gil_build_refused_by_the_guard():
    exe = _gil_python()
    if exe is None:
        pytest.skip("no Python built with the GIL on this machine")
    code = ("import importlib.util as u\n"
            "s = u.spec_from_file_location('g', %r); g = u.module_from_spec(s); s.loader.exec_module(g)\n"
            "g.install('forbid')\n" % gilguard.__file__)
    r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "built with the GIL" in r.stderr and "scripts/bootstrap.sh" in r.stderr


def test_gil_build_gets_the_extension_but_no_launcher(tmp_path):
    exe, cmake = _gil_python(), shutil.which("cmake")
    if exe is None or cmake is None:
        pytest.skip("needs cmake and a Python built with the GIL")
    b = tmp_path / "b"
    r = subprocess.run([cmake, "-S", ROOT, "-B", str(b), "-DTL_PYTHON=" + exe,
                        "-DTL_WITH_CUDA=OFF"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "built with the GIL" in out and "launcher is not built" in out
    assert "scripts/bootstrap.sh" in out
    targets = subprocess.run([cmake, "--build", str(b), "--target", "help"],
                             capture_output=True, text=True, timeout=300).stdout
    assert "tl_core" in targets and "tl_interp" not in targets


# ---- pinning and CPU limits ----------------------------------------------------------------

AFFINITY = """\
import json, os, threading, subprocess, sys
import threadloom
main = [s for s in threadloom.plan().slots() if s["role"] == "main"][0]["cpus"]
got = {}
t = threading.Thread(target=lambda: got.update(a=sorted(os.sched_getaffinity(0))))
t.start(); t.join()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps({"main": sorted(os.sched_getaffinity(0)), "slot": main, "thread": got["a"],
                  "child": child, "cpu_count": os.cpu_count(), "omp": os.environ.get("OMP_NUM_THREADS"),
                  "usable": threadloom.sysinfo.usable_cpus()}))
"""


@needs_bin
def test_main_thread_pinned_to_the_plan_and_children_are_not(tmp_path):
    r = tl("run", script(tmp_path, AFFINITY))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    allowed = sorted(os.sched_getaffinity(0))
    assert set(d["main"]) == parse_cpus(d["slot"])
    assert d["thread"] == allowed          # a new thread gets the process's cores back
    assert d["child"] == str(allowed)      # so does a subprocess
    assert d["cpu_count"] == len(allowed)
    assert d["omp"] == str(len(allowed))
    # threadloom counts the process's CPUs (THREADLOOM_START_CPUS), not the pinned main thread's
    assert d["usable"] == len(allowed)


@needs_bin
def test_no_pin_and_user_limits_win(tmp_path):
    r = tl("--no-pin", "run", script(tmp_path, AFFINITY), env={"OMP_NUM_THREADS": "7", "PYTHON_CPU_COUNT": "5"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["main"] == sorted(os.sched_getaffinity(0))
    assert d["cpu_count"] == 5 and d["omp"] == "7"


@needs_bin
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict to 1")
def test_started_under_a_restricted_affinity(tmp_path):
    one = min(os.sched_getaffinity(0))
    r = subprocess.run([BIN, "run", "-c", "import os; from threadloom import sysinfo; print("
                        "os.cpu_count(), sorted(os.sched_getaffinity(0)), sysinfo.usable_cpus())"],
                       env=_env(), capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 [%d] 1" % one


# ---- info, topo, torchrun env --------------------------------------------------------------

@needs_bin
def test_info_and_topo_run():
    r = tl("info")
    assert r.returncode == 0, r.stderr
    assert "free-threaded" in r.stdout and "GIL: disabled" in r.stdout
    r = tl("topo", "--plan")
    assert r.returncode == 0, r.stderr
    assert "main" in r.stdout
    r = tl("info", "--json")
    assert json.loads(r.stdout)["interpreter"]["gil_enabled"] is False


@needs_bin
def test_torchrun_env(tmp_path):
    code = "import os; print(' '.join('%s=%s' % (k, os.environ.get(k)) for k in ('RANK','LOCAL_RANK','WORLD_SIZE','LOCAL_WORLD_SIZE','GROUP_RANK','MASTER_ADDR','MASTER_PORT')))"
    r = tl("run", "--torchrun-env", "-c", code)
    assert r.stdout.split() == ["RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "LOCAL_WORLD_SIZE=1",
                                "GROUP_RANK=0", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=29500"], r.stderr
    r = tl("run", "--torchrun-env", "-c", code, env={"MASTER_PORT": "1234"})
    assert "MASTER_PORT=1234" in r.stdout.split()
    r = tl("run", "-c", code)
    assert "RANK=None" in r.stdout.split()


def test_launch_env_values():
    from threadloom.cluster import torchrun as launch_env
    env = {"RANK": "9"}
    added = launch_env.apply_torchrun_env(env, rank=1, world_size=2, master_addr="n0", master_port=6000)
    assert env["RANK"] == "9" and "RANK" not in added
    assert added["GROUP_RANK"] == "1" and added["WORLD_SIZE"] == "2" and added["MASTER_PORT"] == "6000"
    with pytest.raises(ValueError):
        launch_env.torchrun_env(rank=2, world_size=2)


# ---- the main slot cache -------------------------------------------------------------------

@needs_bin
def test_main_slot_cache_is_written_used_and_healed(tmp_path):
    cache = tmp_path / "cache"
    env = {"THREADLOOM_CACHE": str(cache)}
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"
    first = tl("run", "-c", probe, env=env)  # plans, pins, writes the cache
    assert first.returncode == 0, first.stderr
    files = list((cache / "launcher").iterdir())
    assert len(files) == 1 and files[0].name.startswith("main-slot-")
    cpus, node = files[0].read_text().split()
    assert first.stdout.strip() == str(sorted(parse_cpus(cpus)))
    second = tl("run", "-c", probe, env=env)  # from the cache: same slot
    assert second.stdout == first.stdout and second.stderr == ""
    # A stale entry (a CPU this process may not use) is reported once, removed, and the next
    # start plans again.
    files[0].write_text("1023 0\n")
    stale = tl("run", "-c", probe, env=env)
    assert stale.returncode == 0
    assert "cached slot" in stale.stderr and "not pinned" in stale.stderr
    assert not files[0].exists()
    again = tl("run", "-c", probe, env=env)
    assert again.stdout == first.stdout and again.stderr == ""
    # Disabled: nothing is written.
    off = tmp_path / "off"
    r = tl("run", "-c", probe, env={"THREADLOOM_CACHE": str(off), "THREADLOOM_NO_SLOT_CACHE": "1"})
    assert r.stdout == first.stdout and not off.exists()
