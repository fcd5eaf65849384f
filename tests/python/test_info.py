"""`python -m threadloom info` / `topo` and the dicts behind them."""

import json
import os

import threadloom
from conftest import ROOT, TOPOLOGIES, run_python


def test_info_dict_is_complete():
    d = threadloom.info()
    it = d["interpreter"]
    assert it["version"].count(".") == 2
    assert isinstance(it["gil_enabled"], bool)
    libs = d["libraries"]
    assert libs["hwloc"].startswith("2.")
    assert libs["mimalloc"].startswith("2.")
    # each CUDA/NCCL probe has a value or a reason, never neither
    for key in ("cuda_runtime", "cuda_driver", "nccl"):
        assert (libs[key] is None) != (libs[key + "_error"] is None), key
    assert d["gpus"] or d["gpus_error"]
    t = d["topology"]
    assert t["allowed_pus"] == len(os.sched_getaffinity(0))
    assert 1 <= t["allowed_cores"] <= t["cores"] <= t["pus"]


def test_info_command_text():
    r = run_python("-m", "threadloom", "info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("interpreter", "GIL: ", "hwloc", "mimalloc", "CUDA runtime:", "CUDA driver:",
                   "NCCL:", "GPUs", "cores", "NUMA node"):
        assert needle in out, needle
    if threadloom.info()["interpreter"]["free_threaded_build"]:
        assert "GIL: disabled" in out


def test_info_command_json():
    r = run_python("-m", "threadloom", "info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["topology"]["pus"] >= 1


def test_topo_command_on_recorded_dgx2():
    r = run_python("-m", "threadloom", "topo", "--xml", os.path.join(TOPOLOGIES, "nvidiaDGX2.xml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Tesla V100") == 16
    r = run_python("-m", "threadloom", "topo", "--json", "--xml",
                   os.path.join(TOPOLOGIES, "nvidiaDGX2.xml"))
    t = json.loads(r.stdout)["topology"]
    assert [g["numa_node"] for g in t["gpus"]] == [0] * 8 + [1] * 8
    assert t["is_this_system"] is False


def test_topo_plan_on_a_trimmed_recording_says_what_it_shows():
    # hwloc's nvidiaDGX2.xml keeps 4 of the DGX-2's 48 cores: the plan shares every core, and
    # the output says why, instead of looking like advice for a real DGX.
    r = run_python("-m", "threadloom", "topo", "--plan", "--xml",
                   os.path.join(TOPOLOGIES, "nvidiaDGX2.xml"))
    assert r.returncode == 0, r.stderr
    assert "note: 4 cores for 16 GPUs" in r.stdout and "trim" in r.stdout, r.stdout
    # A recording with cores enough for its GPUs gets no such note.
    r = run_python("-m", "threadloom", "topo", "--plan", "--xml",
                   os.path.join(TOPOLOGIES, "32em64t-2n8c2t-pci-wholeio.xml"))
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout
    assert "cannot hold" not in r.stdout


def test_readme_topo_example_runs():
    # The README's `topo --plan --xml` line names a recording whose plan holds (a launch
    # core per GPU, loaders on their own cores).
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = [l for l in readme.splitlines() if "topo --plan --xml" in l]
    assert lines, "README.md has no `topo --plan --xml` example"
    for line in lines:
        xml = line.split("--xml", 1)[1].split()[0]
        r = run_python("-m", "threadloom", "topo", "--plan", "--xml", xml, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "cannot hold" not in r.stdout and "too few cores" not in r.stdout, line


def test_topo_command_bad_file_says_what_to_do():
    r = run_python("-m", "threadloom", "topo", "--xml", "/nonexistent.xml")
    assert r.returncode == 1
    assert "TL_ENOENT" in r.stderr and "/nonexistent.xml" in r.stderr
    assert "Traceback" not in r.stderr


def test_usage_error():
    r = run_python("-m", "threadloom", "frobnicate")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr
    r = run_python("-m", "threadloom")
    assert r.returncode == 2 and "commands:" in r.stderr


def test_help_lists_every_command():
    # Each command has its line in --help (it described only info and topo), taken from the
    # one table a new command is added to, and its own --help.
    from threadloom import __main__ as cli
    r = run_python("-m", "threadloom", "--help")
    assert r.returncode == 0, r.stderr
    listed = [l.split()[0] for l in r.stdout.splitlines() if l.startswith("  ") and l[2] != " "]
    assert listed == list(cli.COMMANDS) and {"info", "topo", "run", "slurm"} <= set(listed)
    flat = " ".join(r.stdout.split())
    for name, (text, _) in cli.COMMANDS.items():
        assert " ".join(text.split()) in flat, name
        sub = run_python("-m", "threadloom", name, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout, (name, sub.stderr)


def test_hwloc_xmlfile_is_honoured():
    r = run_python("-m", "threadloom", "info",
                   env_extra={"HWLOC_XMLFILE": os.path.join(TOPOLOGIES, "96em64t-4n4d3ca2co-pci.xml"),
                              "HWLOC_THISSYSTEM": "0"})
    assert r.returncode == 0, r.stderr
    assert "4 NUMA node(s)" in r.stdout and "96 hardware thread(s)" in r.stdout
