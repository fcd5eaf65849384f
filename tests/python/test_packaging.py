"""threadloom as pip installs it: one version, the installed package and launcher (not the
checkout's), a wheel that works in a fresh venv once the sources are gone, the pinned test
packages, and clear errors for the wrong interpreter or the bare sources.

These run on the venv `make build` installed into (tests/python/conftest.py); the wheel test
builds a second copy from a copy of the sources, so it takes a build's time (~30 s here).
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

import threadloom
from conftest import BIN, ROOT, run_python

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
LAUNCHER_BUILT = FREE_THREADED and ".so" in (sysconfig.get_config_var("LDLIBRARY") or "")


def header_version():
    text = open(os.path.join(ROOT, "include", "threadloom", "common.h")).read()
    parts = [re.search(r"#define TL_VERSION_%s (\d+)" % p, text).group(1)
             for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def version_line():
    return "threadloom %s (Python %s)" % (threadloom.__version__, sys.version.split()[0])


# ---- one version ---------------------------------------------------------------------------

def test_version_has_one_source():
    assert threadloom.__version__ == header_version()
    assert importlib.metadata.version("threadloom") == threadloom.__version__
    assert threadloom._core.version() == threadloom.__version__
    # no second copy of it in the build files
    for name in ("CMakeLists.txt", "pyproject.toml"):
        assert threadloom.__version__ not in open(os.path.join(ROOT, name)).read(), name


def test_python_m_threadloom_version():
    r = run_python("-m", "threadloom", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == version_line()


@pytest.mark.skipif(not os.access(BIN, os.X_OK), reason="no `threadloom` beside %s" % sys.executable)
def test_threadloom_command_version():
    r = subprocess.run([BIN, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == version_line()


# ---- installed, not the checkout -----------------------------------------------------------

def test_tests_import_the_installed_package():
    here = os.path.realpath(os.path.dirname(threadloom.__file__))
    assert not here.startswith(os.path.realpath(os.path.join(ROOT, "python")) + os.sep)
    assert here == os.path.realpath(os.path.join(sysconfig.get_path("platlib"), "threadloom"))
    files = {str(f) for f in importlib.metadata.distribution("threadloom").files}
    assert "threadloom/__init__.py" in files
    assert any(f.startswith("threadloom/_core.") for f in files)


def test_threadloom_command_is_installed():
    """pip installs a `threadloom` command with the package: the C launcher where it can be
    built (a free-threaded Python with a shared libpython), else a script running `python -m
    threadloom`."""
    assert os.access(BIN, os.X_OK), BIN
    with open(BIN, "rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    assert is_elf == LAUNCHER_BUILT
    r = subprocess.run([BIN, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "threadloom %s" % threadloom.__version__ in r.stdout


@pytest.mark.skipif(not LAUNCHER_BUILT, reason="no C launcher for this interpreter")
def test_launcher_runs_this_venvs_python_and_package(tmp_path):
    r = subprocess.run([BIN, "run", "-c", "import sys, threadloom; print(sys.executable); "
                        "print(sys.prefix); print(threadloom.__file__)"],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    exe, prefix, init = r.stdout.split("\n")[:3]
    assert os.path.dirname(exe) == os.path.dirname(BIN)
    assert os.path.samefile(prefix, sys.prefix)
    assert os.path.samefile(init, threadloom.__file__)


def _copy_sources(dst):
    """The checkout's files that git does not ignore, else the tree without build outputs."""
    r = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True)
    if r.returncode == 0 and r.stdout:
        for rel in r.stdout.decode().split("\0"):
            if rel and os.path.isfile(os.path.join(ROOT, rel)):
                os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    else:
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            "build*", ".git", "__pycache__", "_core.*.so", "results"))


@pytest.mark.skipif(not LAUNCHER_BUILT, reason="the launcher needs a free-threaded Python with a shared libpython")
def test_wheel_installs_in_a_fresh_venv_and_works_without_the_sources(tmp_path):
    """`pip wheel` of a copy of the sources, installed into a fresh venv; then the copy and its
    build are deleted: the launcher, `python -m threadloom` and the sbatch script still work
    and name nothing of them."""
    pytest.importorskip("scikit_build_core", reason="the pinned scikit-build-core is not installed")
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _copy_sources(str(src))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-cache-dir", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = os.listdir(dist)
    assert len(wheels) == 1 and wheels[0].startswith("threadloom-%s-" % threadloom.__version__)
    r = subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--no-deps", "--no-index", str(dist / wheels[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(src)
    shutil.rmtree(dist)

    launcher = str(venv / "bin" / "threadloom")
    with open(launcher, "rb") as f:
        image = f.read()
    for path in (str(src), ROOT):
        assert path.encode() not in image, "the launcher names %s" % path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHON_GIL")}
    run = dict(capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    r = subprocess.run([launcher, "--version"], **run)
    assert r.stdout.strip() == version_line(), r.stderr
    r = subprocess.run([launcher, "run", "-c", "import sys, threadloom; print(sys.executable); "
                        "print(threadloom.__file__); print(sys._is_gil_enabled())"], **run)
    assert r.returncode == 0, r.stderr
    exe, init, gil = r.stdout.split("\n")[:3]
    assert exe == str(venv / "bin" / os.path.basename(sys._base_executable))
    assert init.startswith(str(venv) + os.sep) and gil == "False"
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "threadloom", "--version"], **run)
    assert r.stdout.strip() == version_line(), r.stderr
    r = subprocess.run([py, "-m", "threadloom", "slurm", "script", "train.py"], **run)
    assert r.returncode == 0, r.stderr
    assert "\n    %s run train.py" % launcher in r.stdout, r.stdout   # srun's command
    assert ROOT not in r.stdout and str(src) not in r.stdout


# ---- the wrong interpreter, the bare sources -----------------------------------------------

def _gil_python():
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and os.access(exe, os.X_OK):
            r = subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() != sysconfig.get_config_var("EXT_SUFFIX"):
                return exe
    return None


def test_import_from_another_interpreter_says_which_it_needs():
    exe = _gil_python()
    if exe is None:
        pytest.skip("no other Python on this machine")
    platlib = os.path.dirname(os.path.dirname(threadloom.__file__))
    r = subprocess.run([exe, "-c", "import sys; sys.path.insert(0, %r); import threadloom" % platlib],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    built = "Python %d.%d%s" % (sys.version_info[0], sys.version_info[1], "t" if FREE_THREADED else "")
    assert last.startswith("ImportError: threadloom is built for %s, and this is %s" % (built, exe)), last
    assert "%s -m pip install threadloom" % exe in last
    assert "partially initialized" not in r.stderr


def test_import_from_the_sources_says_to_install():
    r = run_python("-c", "import threadloom", env_extra={"PYTHONPATH": os.path.join(ROOT, "python")})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "imported from its sources" in last and "-m pip install %s" % ROOT in last, last


# ---- the pinned packages -------------------------------------------------------------------

def test_test_packages_are_the_pinned_ones():
    """scripts/bootstrap.sh installs the packages it names at the versions of
    requirements/pins.txt, the one file with versions."""
    pins = {}
    for line in open(os.path.join(ROOT, "requirements", "pins.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    boot = open(os.path.join(ROOT, "scripts", "bootstrap.sh")).read()
    names = set()
    for var in ("ft_pkgs", "gil_pkgs"):
        names.update(re.search(r"^%s=\(([^)]*)\)" % var, boot, re.M).group(1).split())
    assert names and names <= set(pins), names - set(pins)
    wanted = re.search(r"^%s=\(([^)]*)\)" % ("ft_pkgs" if FREE_THREADED else "gil_pkgs"), boot,
                       re.M).group(1).split()
    for name in wanted:
        try:
            got = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail("%s (pinned %s) is not installed for %s: run make test" % (name, pins[name], sys.executable))
        assert got == pins[name], (name, got)


# ---- nothing runs the sources --------------------------------------------------------------

SOURCES_ON_PATH = re.compile(
    r"""os\.path\.join\((?:[^()]|\([^()]*\))*,\s*["']python["']\)"""   # os.path.join(..., "python")
    r"""|PYTHONPATH=["']?(?:\$\w+/|\$\{\w+\}/)?python\b"""                 # PYTHONPATH=python, =$here/python
    r"""|\$(?:here|ROOT|\{here\})/python[:"'\s]""")                         # "$here/python" in a script


def test_no_script_puts_the_sources_on_the_path():
    """Examples, benchmarks, scripts and tests import the installed package: a program that puts
    python/ of the checkout on sys.path or PYTHONPATH imports sources without the extension
    (threadloom then says to install them) or, worse, sources other than the ones installed."""
    allowed = {os.path.join("tests", "python", "conftest.py"),      # require_installed's check
               os.path.join("tests", "python", "test_packaging.py")}  # the bare-sources error
    found = []
    for top in ("bench", "examples", "scripts", "tests", "python", ".ci"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)
                if rel in allowed or not f.endswith((".py", ".sh", ".sbatch", "run")):
                    continue
                for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    if SOURCES_ON_PATH.search(line):
                        found.append("%s:%d: %s" % (rel, n, line.strip()))
    assert not found, "\n".join(found)
