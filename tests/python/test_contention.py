"""threadloom.contention(): names the shared objects whose reference counts other threads write,
with paths from the module globals and the arguments, and stops naming them once shared."""

import os
import sys
import sysconfig
import textwrap
import time
import types

import pytest

import threadloom
from conftest import run_python

pytestmark = pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"),
                                reason="contention() needs a free-threaded interpreter")

WORKLOAD = textwrap.dedent('''\
    import time
    VOCAB = {("w%d" % i): i + 10**6 for i in range(2000)}
    WORDS = list(VOCAB)
    QUIET = [str(i) * 4 for i in range(100)]   # never read by the threads

    def tokenize(seconds=0.6):
        end = time.perf_counter() + seconds
        acc = k = 0
        while time.perf_counter() < end:
            for _ in range(500):
                acc = (acc * 31 + VOCAB[WORDS[(k * 7) % 2000]]) & 0xFFFFFFFF
                k += 1
        return acc
    ''')


def load(tmp_path, name="workload"):
    path = tmp_path / (name + ".py")
    path.write_text(WORKLOAD)
    mod = types.ModuleType(name)
    mod.__file__ = str(path)  # a program module: watched through its globals
    exec(compile(WORKLOAD, str(path), "exec"), mod.__dict__)
    sys.modules[name] = mod
    return mod


def test_names_the_shared_globals_and_stops_once_shared(tmp_path):
    mod = load(tmp_path, "workload_ct1")
    try:
        # a sampling budget of 20% of a core, not the default 5%: the passes over the watched
        # objects (66k in a full test session, ~7 ms each on a busy CI VM) gave 3 samples in
        # 0.6 s at 5%, and this test is about what is named, not about the default's pace
        r = threadloom.contention(mod.tokenize, threads=2, overhead=0.2)
        assert r.samples >= 5 and r.watched > 4000, str(r)
        paths = [h.path for h in r.hot]
        top = " ".join(paths[:4])
        assert "workload_ct1.VOCAB" in top or "workload_ct1.WORDS" in top, str(r)
        assert not any("QUIET" in p for p in paths), str(r)
        assert all(h.advice for h in r.hot)
        hot = next(h for h in r.hot if h.path.startswith(("workload_ct1.VOCAB",
                                                          "workload_ct1.WORDS")))
        assert "threadloom.share(workload_ct1." in hot.advice
        threadloom.share(mod.VOCAB)
        threadloom.share(mod.WORDS)
        r = threadloom.contention(mod.tokenize, threads=2, overhead=0.2)
        # immortal objects' counts are never written: not one of them can be named any more
        assert not any(p.startswith(("workload_ct1.VOCAB", "workload_ct1.WORDS"))
                       for p in (h.path for h in r.hot)), str(r)
    finally:
        sys.modules.pop("workload_ct1", None)


def test_arguments_are_named_by_parameter():
    data = {"records": [(i, "r%d" % i, i * 0.5) for i in range(3000)]}

    def work(dataset, seconds=0.5):
        end = time.perf_counter() + seconds
        acc = 0
        while time.perf_counter() < end:
            for rec in dataset["records"]:
                acc += rec[0]
        return acc

    r = threadloom.contention(work, threads=2, args=(data,))
    assert any(h.path.startswith("dataset") for h in r.hot), str(r)
    assert "dataset['records']" in str(r), str(r)


def test_errors_are_reraised_and_arguments_checked():
    def boom():
        raise KeyError("from a worker")

    with pytest.raises(KeyError, match="from a worker"):
        threadloom.contention(boom, threads=2)
    with pytest.raises(ValueError):
        threadloom.contention(boom, threads=0)
    with pytest.raises(ValueError):
        threadloom.contention(boom, overhead=0.9)


def test_command_line(tmp_path):
    path = tmp_path / "workload_cli.py"
    path.write_text(WORKLOAD + "\nif __name__ == '__main__':\n    raise SystemExit('not run')\n")
    r = run_python("-m", "threadloom", "contention", "--threads", "2", "--function",
                   "tokenize", str(path))
    assert r.returncode == 0, r.stderr
    assert "threadloom.contention: 2 thread(s)" in r.stdout
    assert "workload_cli.VOCAB" in r.stdout or "workload_cli.WORDS" in r.stdout, r.stdout
    r = run_python("-m", "threadloom", "contention", "--function", "nope", str(path))
    assert r.returncode == 2 and "no function 'nope'" in r.stderr
    r = run_python("-m", "threadloom", "contention", str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "no such script" in r.stderr
    assert os.path.exists(path)
