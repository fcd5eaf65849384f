"""`threadloom slurm script|submit` (python/threadloom/cluster/slurm.py), and threadloom's rendezvous
under a real SLURM: munge, slurmctld and four slurmd started by scripts/slurm-cluster.sh, each
slurmd in its own network namespace (so node 0's store is reached across addresses).

The first group parses generated scripts and needs nothing. The second (the `slurm_cluster`
fixture, tests/python/slurm_harness.py) runs real sbatch/srun jobs; it skips, saying why,
where the daemons cannot start (not root, packages missing).
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

import threadloom
from conftest import BIN, ROOT
from threadloom.cluster import slurm

JOB_PY = os.path.join(ROOT, "tests", "python", "slurm_jobs", "rendezvous_job.py")
REQUEUE_PY = os.path.join(ROOT, "tests", "python", "slurm_jobs", "requeue_job.py")


# ---------------------------------------------------------------------------------------------
# The generated script, parsed
# ---------------------------------------------------------------------------------------------

def parse(text):
    """(sbatch options {name: [values]}, srun words, launcher words after srun's options,
    other lines). The srun command may continue over lines ending in a backslash."""
    sbatch, rest = {}, []
    lines = text.splitlines()
    i = 0
    srun = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("#SBATCH "):
            k, sep, v = line[len("#SBATCH "):].partition("=")
            sbatch.setdefault(k, []).append(v if sep else True)
        elif line.startswith("srun "):
            joined = line
            while joined.endswith("\\"):
                i += 1
                joined = joined[:-1] + lines[i]
            assert srun is None, "two srun lines"
            srun = shlex.split(joined)
        else:
            rest.append(line)
        i += 1
    assert srun is not None, "no srun line in:\n" + text
    assert srun[-1] == "&", "srun must run in the background so the trap can forward signals"
    return sbatch, srun[:-1], rest


def srun_options(words):
    """srun's own options (up to the first word that is not an option) and the command."""
    k = 1
    while words[k].startswith("--"):
        k += 1
    return words[1:k], words[k:]


FULL = dict(program="train.py", args=("--lr", "0.1", "two words"), nodes=4, gpus_per_node=8,
            cpus_per_task=16, time="1-02:00:00", partition="gpu", job_name="train-7",
            log_dir="/scratch/logs", signal="SIGUSR1", signal_lead=300, requeue=True,
            launcher=("/opt/tl/bin/threadloom",), run_args=("--gil=warn",),
            env=(("NCCL_DEBUG", "INFO"), ("DATA", "/data/a b")), chdir="/scratch/run",
            sbatch_args=("--exclusive",), srun_args=("--mpi=none",))


def test_script_sets_every_option():
    text = slurm.batch_script(slurm.JobSpec(**FULL))
    sb, srun, rest = parse(text)
    assert text.startswith("#!/bin/bash\n")
    assert sb == {
        "--job-name": ["train-7"], "--nodes": ["4"], "--ntasks-per-node": ["1"],
        "--time": ["1-02:00:00"], "--output": ["%x-%j.out"],
        "--signal": ["B:USR1@300"], "--gpus-per-node": ["8"], "--cpus-per-task": ["16"],
        "--partition": ["gpu"], "--chdir": ["/scratch/run"], "--requeue": [True],
        "--open-mode": ["append"], "--exclusive": [True]}
    opts, cmd = srun_options(srun)
    assert set(opts) == {"--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=16",
                         "--output=/scratch/logs/%x-%j-%N-%t.out", "--mpi=none",
                         "--open-mode=append"}
    assert cmd == ["/opt/tl/bin/threadloom", "run", "--gil=warn", "train.py", "--lr", "0.1",
                   "two words"]
    # Exports: the user's, quoted; the trap forwards the chosen signal to srun.
    assert "export NCCL_DEBUG=INFO" in rest and "export DATA='/data/a b'" in rest
    assert "trap tl_forward USR1" in rest
    # SLURM opens the batch log (where the job starts: --chdir) before the script runs; the
    # script makes the nodes' log directory before srun opens their logs there.
    assert "mkdir -p /scratch/logs || exit 1" in rest
    # the launcher and on_preempt() learn the job's signal from the script
    assert "export THREADLOOM_PREEMPT_SIGNAL=USR1" in rest
    assert any('kill -USR1 "$tl_srun"' in line for line in rest)


def test_script_defaults_and_module():
    spec = slurm.JobSpec(program="pkg.train", module=True, launcher=("tl",))
    sb, srun, rest = parse(slurm.batch_script(spec))
    assert sb["--signal"] == ["B:USR2@120"] and sb["--requeue"] == [True]
    assert sb["--nodes"] == ["1"] and sb["--time"] == ["01:00:00"]
    assert sb["--output"] == ["%x-%j.out"] and "mkdir -p logs || exit 1" in rest
    for absent in ("--gpus-per-node", "--cpus-per-task", "--partition", "--chdir"):
        assert absent not in sb
    opts, cmd = srun_options(srun)
    assert cmd == ["tl", "run", "-m", "pkg.train"]
    assert "--kill-on-bad-exit=1" in opts and "--ntasks-per-node=1" in opts
    sb, _, _ = parse(slurm.batch_script(slurm.JobSpec(program="t.py", requeue=False,
                                                      signal="12", launcher=("tl",))))
    assert sb["--no-requeue"] == [True] and "--requeue" not in sb
    assert sb["--signal"] == ["B:USR2@120"]   # signal 12 is USR2 on Linux


def test_default_launcher_is_found():
    spec = slurm.validate(slurm.JobSpec(program="t.py"))
    assert spec.launcher == slurm.find_launcher()
    exe = spec.launcher[0]
    assert os.access(exe, os.X_OK), spec.launcher
    if len(spec.launcher) == 1:   # the `threadloom` pip installed with this package
        assert os.path.samefile(exe, BIN), (exe, BIN)
    else:
        assert spec.launcher[1:] == ("-m", "threadloom")


def test_default_launcher_is_this_installs_not_one_on_path_or_in_a_checkout(tmp_path):
    """The sbatch script runs the environment's own `threadloom`, not another on PATH or the
    checkout's build tree (which the installed package knows nothing of)."""
    if not os.access(BIN, os.X_OK):
        pytest.skip("no `threadloom` installed beside %s" % sys.executable)
    other = tmp_path / "threadloom"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    r = subprocess.run([sys.executable, "-c", "from threadloom.cluster import slurm; "
                        "print(slurm.find_launcher())"], capture_output=True, text=True,
                       env=dict(os.environ, PATH="%s:%s" % (tmp_path, os.environ["PATH"])),
                       cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr((BIN,))


def test_job_token_is_fresh_for_every_run_and_not_in_the_script():
    text = slurm.batch_script(slurm.JobSpec(program="t.py", launcher=("tl",)))
    assert not re.search(r"[0-9a-fA-F]{32}", text), "a token-like constant in the script"
    lines = [l for l in text.splitlines() if "THREADLOOM_JOB_TOKEN" in l]
    assert lines and lines[0].startswith("export THREADLOOM_JOB_TOKEN=")
    snippet = "\n".join(["set -u"] + lines + ['echo "$THREADLOOM_JOB_TOKEN"'])
    tokens = [subprocess.run(["bash", "-c", snippet], capture_output=True, text=True,
                             check=True).stdout.strip() for _ in range(2)]
    for t in tokens:
        assert re.fullmatch(r"[0-9a-f]{64}", t), t
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize("change, words", [
    (dict(nodes=0), "--nodes"),
    (dict(nodes="2"), "--nodes"),
    (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(time="1h"), "--time"),
    (dict(time=""), "--time"),
    (dict(signal="KILL"), "catch"),
    (dict(signal="NOPE"), "signal"),
    (dict(signal="99"), "signal"),
    (dict(signal_lead=70000), "--signal-lead"),
    (dict(job_name="my job"), "--job-name"),
    (dict(partition="a b"), "--partition"),
    (dict(log_dir="my logs"), "--log-dir"),
    (dict(env=(("THREADLOOM_JOB_TOKEN", "x" * 64),)), "fresh random token"),
    (dict(env=(("1BAD", "x"),)), "--env"),
    (dict(env=(("THREADLOOM_PREEMPT_SIGNAL", "TERM"),)), "change --signal instead"),
    (dict(args=("a\nb",)), "newline"),
    (dict(sbatch_args=("exclusive",)), "--sbatch-arg"),
    (dict(program=""), "program"),
])
def test_bad_options_say_what_to_fix(change, words):
    spec = slurm.JobSpec(**dict(dict(program="t.py", launcher=("tl",)), **change))
    with pytest.raises(threadloom.InvalidArgumentError) as e:
        slurm.batch_script(spec)
    assert words in str(e.value)


def _cli(*args, launcher=None, env=None):
    cmd = [launcher, "slurm", *args] if launcher else [sys.executable, "-m", "threadloom", "slurm", *args]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)


@pytest.mark.parametrize("via", ["python", "launcher"])
def test_cli_script(via):
    if via == "launcher" and not os.access(BIN, os.X_OK):
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    launcher = BIN if via == "launcher" else None
    r = _cli("script", "-N", "3", "--gpus-per-node", "2", "-c", "4", "-t", "30", "-p", "debug",
             "-J", "cli", "--signal", "USR1", "--signal-lead", "60", "--no-requeue",
             "--launcher", "/x/threadloom --no-pin", "--env", "A=1", "train.py", "--epochs", "3",
             launcher=launcher)
    assert r.returncode == 0, r.stderr
    sb, srun, rest = parse(r.stdout)
    assert sb["--nodes"] == ["3"] and sb["--gpus-per-node"] == ["2"]
    assert sb["--cpus-per-task"] == ["4"] and sb["--time"] == ["30"]
    assert sb["--partition"] == ["debug"] and sb["--job-name"] == ["cli"]
    assert sb["--signal"] == ["B:USR1@60"] and sb["--no-requeue"] == [True]
    assert "export A=1" in rest
    _, cmd = srun_options(srun)
    assert cmd == ["/x/threadloom", "--no-pin", "run", "train.py", "--epochs", "3"]
    bad = _cli("script", "--time", "1h", "t.py", launcher=launcher)
    assert bad.returncode == 1 and "--time '1h' is not a SLURM time" in bad.stderr


def test_submit_refuses_a_missing_program_or_sbatch(tmp_path):
    spec = slurm.JobSpec(program=str(tmp_path / "nope.py"), launcher=("tl",),
                         log_dir=str(tmp_path / "logs"))
    with pytest.raises(threadloom.InvalidArgumentError, match="does not exist"):
        slurm.submit(spec)
    prog = tmp_path / "t.py"
    prog.write_text("pass\n")
    spec = slurm.JobSpec(program=str(prog), launcher=("tl",), log_dir=str(tmp_path / "logs"))
    with pytest.raises(threadloom.NotFoundError, match="slurm-client"):
        slurm.submit(spec, sbatch=str(tmp_path / "no-sbatch"))


NO_CONTROLLER_CONF = """ClusterName=nocontroller
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=%d
MessageTimeout=2
AuthType=auth/none
NodeName=n1 CPUs=1
PartitionName=p Nodes=n1 Default=YES
"""


def test_submit_without_a_controller_says_what_to_check(tmp_path):
    """The real sbatch against a configuration whose controller is not running: one line that
    gives sbatch's message and what to check about SLURM (scontrol ping, SLURM_CONF), not the
    disk advice of a plain I/O error."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed (apt-get install slurm-client)")
    with socket.socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text(NO_CONTROLLER_CONF % port)
    prog = tmp_path / "t.py"
    prog.write_text("pass\n")
    r = _cli("submit", "--log-dir", str(tmp_path / "logs"), "--launcher", "tl", str(prog),
             env={"SLURM_CONF": str(conf)})
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "sbatch failed" in err and "Unable to contact slurm controller" in err, err
    assert "scontrol ping" in err and "SLURM_CONF" in err and "dmesg" not in err, err


# ---------------------------------------------------------------------------------------------
# Real jobs on the local cluster
# ---------------------------------------------------------------------------------------------

def rendezvous_batch(cluster, nodes, name, nodelist=None, job_args=""):
    """A hand-written batch script (independent of slurm.py) that runs rendezvous_job.py on
    `nodes` nodes with the free-threaded interpreter."""
    lines = ["#!/bin/bash",
             "#SBATCH --job-name=%s" % name,
             "#SBATCH --nodes=%d" % nodes,
             "#SBATCH --ntasks-per-node=1",
             "#SBATCH --time=2",
             "#SBATCH --output=%s/%%x-%%j.out" % cluster.log_dir]
    if nodelist:
        lines.append("#SBATCH --nodelist=%s" % nodelist)
    lines += ["export THREADLOOM_JOB_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')",
              "srun --kill-on-bad-exit=1 --output=%s/%%x-%%j-%%t.out %s %s %s"
              % (cluster.log_dir, shlex.quote(cluster.python), shlex.quote(JOB_PY), job_args)]
    return "\n".join(lines) + "\n"


def task_reports(res, nodes):
    """The JSON line of each task, by rank, from its log <name>-<job>-<task>.out."""
    out = {}
    for name, text in res.logs.items():
        m = re.search(r"-%s-(?:[^-]+-)?(\d+)\.out$" % res.job_id, name)
        if not m:
            continue
        for line in text.splitlines():
            if line.startswith("{"):
                out[int(m.group(1))] = json.loads(line)
    assert sorted(out) == list(range(nodes)), "tasks that reported: %s\n%s" % (sorted(out), res.logs)
    return [out[t] for t in range(nodes)]


@pytest.mark.parametrize("nodes, nodelist, expect", [
    (2, None, "tl-n[01-02]"),
    (4, None, "tl-n[01-04]"),
    (3, "tl-n01,tl-n03,tl-n04", "tl-n[01,03-04]"),
])
def test_rendezvous_across_nodes(slurm_cluster, nodes, nodelist, expect):
    c = slurm_cluster
    job = c.sbatch(rendezvous_batch(c, nodes, "rdv%d" % nodes, nodelist), "rdv%d" % nodes)
    res = c.wait_job(job, timeout=90)
    assert res.state == "COMPLETED", c.describe(job, res.info)
    reports = task_reports(res, nodes)

    raw = reports[0]["raw_nodelist"]
    assert raw == expect == res.info["NodeList"]
    scontrol = c.run("scontrol", "show", "hostnames", raw).stdout.split()
    for rank, r in enumerate(reports):
        assert r["rank"] == r["node_rank"] == r["procid"] == rank
        assert r["world"] == r["ntasks"] == nodes
        assert r["nodelist"] == scontrol            # threadloom's expansion == SLURM's
        assert r["hosts"] == scontrol               # every node learned every node, by rank
        assert r["nodename"] == scontrol[rank]      # rank r runs on the r-th node
        assert r["master_addr"] == scontrol[0] and r["store_port"] == reports[0]["store_port"]
        assert r["torchrun"]["RANK"] == str(rank) and r["torchrun"]["WORLD_SIZE"] == str(nodes)
        assert r["torchrun"]["MASTER_PORT"] == reports[0]["torchrun"]["MASTER_PORT"]
        assert r["job_id"] == job
    # Every node has its own address, and node 0's is the store's: the rendezvous crossed them.
    addrs = [r["address"] for r in reports]
    assert len(set(addrs)) == nodes and addrs[0] == reports[0]["master_ip"]
    for rank in range(nodes):
        assert "rank %d: done" % rank in "".join(res.logs.values())


def test_a_dead_node_ends_the_job(slurm_cluster):
    """Rank 1 SIGKILLs itself after the rendezvous; ranks 0 and 2 wait 300 s on a key nobody
    sets. srun --kill-on-bad-exit must end them: the job fails within the wait's bound."""
    c = slurm_cluster
    job = c.sbatch(rendezvous_batch(c, 3, "die", job_args="--die-rank 1"), "die")
    res = c.wait_job(job, timeout=60)
    text = "".join(res.logs.values())
    assert res.state == "FAILED", c.describe(job, res.info)
    assert "rank 1: SIGKILL to myself" in text
    assert "the wait ended" not in text and "done" not in text
    assert re.search(r"-%s-1\.out" % job, " ".join(res.logs)), res.logs


def test_submit_runs_to_completion(slurm_cluster, tmp_path):
    """`threadloom slurm submit` through the launcher: the job's options reach SLURM, each node
    gets its own log, the rendezvous runs under the script's random token."""
    if not os.access(BIN, os.X_OK):
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    c = slurm_cluster
    logs = os.path.join(c.log_dir, "submit-%s" % os.getpid())
    r = _cli("submit", "-N", "2", "-t", "3", "-J", "submitted", "--log-dir", logs,
             "--chdir", c.log_dir, "--signal-lead", "30", "--launcher", BIN, JOB_PY,
             launcher=BIN, env=c.env())
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout
    res = c.wait_job(job, timeout=90)
    assert res.state == "COMPLETED", c.describe(job, res.info)
    info = res.info
    assert info["NumNodes"] == "2" and info["TimeLimit"] == "00:03:00"
    assert info["Requeue"] == "1" and info["JobName"] == "submitted"
    per_node = sorted(n for n in os.listdir(logs) if re.fullmatch(r"submitted-%s-.+-\d\.out" % job, n))
    assert len(per_node) == 2, os.listdir(logs)
    for t, name in enumerate(per_node):
        with open(os.path.join(logs, name)) as f:
            text = f.read()
        rep = json.loads(next(l for l in text.splitlines() if l.startswith("{")))
        assert rep["rank"] == t and rep["world"] == 2 and "rank %d: done" % t in text
    assert os.path.exists(os.path.join(c.log_dir, "submitted-%s.out" % job))   # --chdir


def test_generated_script_runs_as_written_from_a_fresh_directory(slurm_cluster, tmp_path):
    """`threadloom slurm script > job.sbatch`, then plain `sbatch job.sbatch` from a directory
    without logs/: SLURM opens the batch log before the script runs, so the script must not
    need a directory it has not made (it failed the job without any log when the batch log
    was logs/%x-%j.out)."""
    c = slurm_cluster
    fresh = os.path.join(c.log_dir, "fresh-%d" % os.getpid())
    os.makedirs(fresh)
    r = _cli("script", "-N", "2", "-t", "3", "-J", "fresh", "--launcher",
             "%s -m threadloom" % c.python, JOB_PY)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(fresh, "job.sbatch"), "w") as f:
        f.write(r.stdout)
    assert not os.path.exists(os.path.join(fresh, "logs"))
    sub = subprocess.run(["sbatch", "--parsable", "job.sbatch"], cwd=fresh, env=c.env(),
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    res = c.wait_job(job, timeout=90)
    assert res.state == "COMPLETED", c.describe(job, res.info)
    assert os.path.exists(os.path.join(fresh, "fresh-%s.out" % job))
    nodes = [n for n in os.listdir(os.path.join(fresh, "logs"))
             if n.startswith("fresh-%s-" % job)]
    assert len(nodes) == 2, res.logs


def test_submitted_job_forwards_the_signal_to_every_task(slurm_cluster):
    """The batch shell gets the signal (B:); its trap forwards it through srun. Sent here with
    `scancel --signal=USR2 --batch` instead of waiting for the time limit."""
    c = slurm_cluster
    spec = slurm.JobSpec(program=JOB_PY, args=("--hold",), nodes=2, time="3", job_name="usr2",
                         log_dir=c.log_dir, chdir=c.log_dir,
                         launcher=(c.python, "-m", "threadloom"))
    job, _ = slurm.submit(spec, path=os.path.join(c.log_dir, "usr2.sbatch"), environ=c.env())
    c.wait_log(job, "holding", count=2)   # both tasks wait for the signal
    c.run("scancel", "--signal=USR2", "--batch", job)
    res = c.wait_job(job, timeout=60)
    assert res.state == "COMPLETED", c.describe(job, res.info)
    batch = res.logs["usr2-%s.out" % job]
    tasks = [t for name, t in res.logs.items() if name != "usr2-%s.out" % job]
    assert "SIGUSR2: forwarding to the job step" in batch
    assert len(tasks) == 2 and all("got USR2" in t for t in tasks), res.logs


def test_preemption_signal_without_on_preempt_does_not_kill_the_job(slurm_cluster):
    """A program that never called on_preempt gets the forwarded USR2 (here sent at once, as
    SLURM does 120 s before the limit): under the launcher it writes one line per node and
    goes on, and the job completes instead of failing early."""
    if not os.access(BIN, os.X_OK):
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    c = slurm_cluster
    release = os.path.join(c.log_dir, "release-%d" % os.getpid())
    spec = slurm.JobSpec(program=JOB_PY, args=("--hold-unhandled", release), nodes=2, time="3",
                         job_name="nohandler", log_dir=c.log_dir, chdir=c.log_dir,
                         launcher=(BIN,))
    job, _ = slurm.submit(spec, path=os.path.join(c.log_dir, "nohandler.sbatch"), environ=c.env())
    c.wait_log(job, "holding", count=2)
    c.run("scancel", "--signal=USR2", "--batch", job)
    c.wait_log(job, "did not call threadloom.cluster.on_preempt(): ignored", count=2)
    open(release, "w").close()
    res = c.wait_job(job, timeout=60)
    assert res.state == "COMPLETED" and res.exit_code == "0:0", c.describe(job, res.info)
    tasks = [t for n, t in res.logs.items() if n != "nohandler-%s.out" % job]
    assert len(tasks) == 2 and all("released" in t and "done" in t for t in tasks), res.logs
    assert "User defined signal 2" not in "".join(res.logs.values())


def _load_requeue_job():
    import importlib.util
    spec = importlib.util.spec_from_file_location("requeue_job", REQUEUE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_preempted_job_checkpoints_is_requeued_and_resumes(slurm_cluster):
    """The whole preemption path on real SLURM: a 2-node job from slurm.batch_script (--requeue,
    --signal=B:USR2) runs requeue_job.py under the C launcher. The test sends USR2 to the batch
    shell as SLURM does at the time limit; the shell forwards it; every node checkpoints; node 0
    runs the real `scontrol requeue`; SLURM runs the job again (Restarts=1: it holds a requeued
    job for AuthInfo's cred_expire, 10 s on the local cluster, 120 s by default); each node
    resumes from its checkpoint and ends with the weights of an uninterrupted run."""
    if not os.access(BIN, os.X_OK):
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    c = slurm_cluster
    steps, hold = 40, 15
    ck = os.path.join(c.log_dir, "requeue-ckpt-%d" % os.getpid())
    spec = slurm.JobSpec(program=REQUEUE_PY, args=(ck, "--steps", str(steps), "--hold-at", str(hold)),
                         nodes=2, time="3", job_name="requeue", log_dir=c.log_dir,
                         chdir=c.log_dir, launcher=(BIN,))
    job, _ = slurm.submit(spec, path=os.path.join(c.log_dir, "requeue.sbatch"), environ=c.env())
    c.wait_log(job, "holding at step %d" % hold, count=2)
    c.run("scancel", "--signal=USR2", "--batch", job)
    requeued = c.wait_info(job, lambda i: i.get("Restarts", "0") != "0", "requeue (Restarts > 0)")
    # While SLURM holds it the job is PENDING (Reason=BeginTime); the poll may also catch the
    # first run's end or, on a slow machine, the second run.
    assert requeued["JobState"] in ("PENDING", "REQUEUED", "COMPLETING", "CONFIGURING", "RUNNING",
                                    "COMPLETED"), c.describe(job, requeued)
    res = c.wait_job(job, timeout=90)
    assert res.state == "COMPLETED" and res.exit_code == "0:0", c.describe(job, res.info)
    assert res.info["Restarts"] == "1" and res.info["Requeue"] == "1", res.info

    batch = res.logs["requeue-%s.out" % job]
    nodes = {int(re.search(r"-(\d+)\.out$", n).group(1)): t for n, t in res.logs.items()
             if n != "requeue-%s.out" % job}
    everything = c.describe(job, res.info)
    # --open-mode=append: both runs are in the logs.
    assert "run 1 on" in batch and "run 2 on" in batch, everything
    assert batch.count("SIGUSR2: forwarding to the job step") == 1, everything
    assert sorted(nodes) == [0, 1], everything
    model = _load_requeue_job()
    for rank, text in nodes.items():
        assert "rank %d: run 1 starts at step 0" % rank in text, everything
        assert "rank %d: holding at step %d" % (rank, hold) in text, everything
        assert "USR2: checkpoint saved (step %d in %s/node-%d)" % (hold, ck, rank) in text, everything
        assert "rank %d: run 2 resumed from step %d" % (rank, hold) in text, everything
        # Run 2 trained from the checkpoint on: steps hold+1.. only, none of run 1 repeated.
        run2 = text.split("run 2 resumed", 1)[1]
        assert "rank %d: step %d\n" % (rank, hold + 1) in run2
        assert "rank %d: step %d\n" % (rank, hold) not in run2, everything
        report = json.loads(next(l for l in run2.splitlines() if l.startswith("{")))
        assert report["rank"] == rank and report["step"] == steps and report["run"] == 2
        assert report["weights"] == model.train(model.initial(rank), rank, 0, steps), everything
        saved = threadloom.load(os.path.join(ck, "node-%d" % rank))
        assert saved["step"] == hold
        assert [float(x) for x in saved["w"]] == model.train(model.initial(rank), rank, 0, hold)
        for bad in ("aborts", "Traceback", "failed", "signal 12", "did not report"):
            assert bad not in text, everything
    assert "USR2: requeued SLURM job %s" % job in nodes[0], everything
    assert "requeued SLURM job" not in nodes[1], everything
    assert "User defined signal 2" not in batch, everything   # no task died of the signal


def test_cluster_script_is_idempotent_and_cleans_up_after_a_kill(slurm_cluster, tmp_path):
    """A second, 2-node cluster next to the session's: start twice is one cluster; daemons
    SIGKILLed (as by a killed test run) are replaced by the next start; stop leaves no daemon,
    namespace or bridge behind."""
    import signal
    import slurm_harness
    d = str(tmp_path / "c2")
    sh = lambda *a: subprocess.run(["bash", slurm_harness.SCRIPT, *a, "--dir", d],
                                   capture_output=True, text=True, timeout=120)
    try:
        r = sh("start", "--nodes", "2")
        assert r.returncode == 0, r.stderr
        pids = {f: int(open(os.path.join(d, "run", f)).read())
                for f in os.listdir(os.path.join(d, "run")) if f.endswith(".pid")}
        assert sorted(pids) == ["slurmctld.pid", "slurmd-tl-n01.pid", "slurmd-tl-n02.pid"]
        r = sh("start", "--nodes", "2")
        assert r.returncode == 0 and "already running" in r.stderr, r.stderr
        r = sh("start", "--nodes", "3")
        assert r.returncode == 1 and "stop it first" in r.stderr, r.stderr
        # Kill the controller and one node; status says down, start brings a whole new cluster.
        os.kill(pids["slurmctld.pid"], signal.SIGKILL)
        os.kill(pids["slurmd-tl-n02.pid"], signal.SIGKILL)
        assert sh("status").returncode == 1
        r = sh("start", "--nodes", "2")
        assert r.returncode == 0 and "running: 2 nodes" in r.stderr, r.stderr
        assert sh("status").returncode == 0
        for name, pid in pids.items():   # the old slurmd that survived was stopped, not reused
            assert not os.path.exists("/proc/%d" % pid) or \
                open("/proc/%d/stat" % pid).read().split()[2] == "Z", name
        conf = open(os.path.join(d, "slurm.conf")).read()
        bridge = re.search(r"ClusterName=tl(\d+)", conf).group(1)
    finally:
        r = sh("stop")
    assert r.returncode == 0, r.stderr
    assert sh("status").returncode == 1
    assert not [f for f in os.listdir(os.path.join(d, "run")) if f.endswith(".pid")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "tl%s-n" % bridge not in netns and "tlb%s" % bridge not in links
    assert "tlv%s-" % bridge not in links
