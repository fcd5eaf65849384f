"""A real SLURM for the tests: scripts/slurm-cluster.sh's daemons, and helpers to submit jobs
and wait for their states.

The `slurm_cluster` fixture (conftest.py) starts one cluster per test session under
build/slurm-test (4 nodes, each slurmd in its own network namespace) and stops it at the end,
after stopping whatever a killed earlier session left there. Where the machine cannot run it
(not root, packages missing, no namespaces: the script's exit status 3) the tests SKIP with
the script's reason; any other start failure FAILS with the daemons' logs.

    job = cluster.sbatch(text)                       # or cluster.submit_file(path)
    res = cluster.wait_job(job, {"COMPLETED"})       # fails with the logs on timeout
    res.state, res.exit_code, res.logs               # logs: {file name: text}
    cluster.wait_log(job, "holding", count=2)        # until 2 of a job's logs hold a line
    cluster.wait_info(job, lambda i: i["Restarts"] != "0", "requeue")   # any condition
    cluster.run("scancel", "--signal=USR2", "--batch", job)

Jobs write their logs to `cluster.log_dir` as <name>-<jobid>.out (batch) and
<name>-<jobid>-<node>-<task>.out (one per task); `logs(job)` reads them all.
"""

import dataclasses
import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "slurm-cluster.sh")

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
CANNOT_RUN = 3   # slurm-cluster.sh's exit status for "this machine cannot run a cluster"


def free_threaded_python():
    """The interpreter the jobs run: build/bootstrap.env's PYTHON, else this one."""
    try:
        with open(os.path.join(ROOT, "build", "bootstrap.env")) as f:
            for line in f:
                if line.startswith("PYTHON := "):
                    return line.split(":=", 1)[1].strip()
    except OSError:
        pass
    return sys.executable


class ClusterUnavailable(Exception):
    """The machine cannot run the cluster (the reason is the message): tests skip."""


class ClusterError(Exception):
    """The cluster could not start for a reason that is a bug (the message has the logs)."""


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str            # JobState from scontrol (COMPLETED, FAILED, RUNNING, ...)
    exit_code: str        # ExitCode, "status:signal"
    info: dict            # every field of `scontrol show job -o`
    logs: dict            # log file name -> text


class SlurmCluster:
    def __init__(self, directory, nodes=4):
        self.dir = os.path.abspath(directory)
        self.nodes = nodes
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.log_dir = os.path.join(self.dir, "jobs")
        self.python = free_threaded_python()
        self._lock = None

    # -- daemons --------------------------------------------------------------------------

    def _script(self, *args, timeout=120):
        return subprocess.run(["bash", SCRIPT, *args, "--dir", self.dir], capture_output=True,
                              text=True, timeout=timeout)

    def start(self):
        """Stops what an earlier session left in the directory, then starts the cluster.
        Holds a lock on the directory until stop(), so two sessions never share it."""
        os.makedirs(self.dir, exist_ok=True)
        self._lock = open(os.path.join(self.dir, ".session.lock"), "w")
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError("another test session has held %s for 300 s" % self.dir)
                time.sleep(0.5)
        self._script("stop")
        r = self._script("start", "--nodes", str(self.nodes))
        if r.returncode == CANNOT_RUN:
            self._unlock()
            raise ClusterUnavailable(r.stderr.strip())
        if r.returncode != 0:
            logs = self.daemon_logs()
            self._script("stop")
            self._unlock()
            raise ClusterError("scripts/slurm-cluster.sh start failed (exit %d): %s\n%s"
                               % (r.returncode, r.stderr.strip(), logs))
        # Job ids start again at 1 (slurmctld -c): logs of an earlier session would be read
        # as this session's.
        shutil.rmtree(self.log_dir, ignore_errors=True)
        os.makedirs(self.log_dir)

    def stop(self):
        r = self._script("stop")
        self._unlock()
        return r

    def _unlock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def daemon_logs(self, tail=40):
        out = []
        for path in sorted(glob.glob(os.path.join(self.dir, "log", "*.log"))):
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            out.append("--- %s (last %d lines)\n%s" % (path, len(lines), "\n".join(lines)))
        return "\n".join(out)

    # -- clients --------------------------------------------------------------------------

    def env(self, extra=None):
        """The environment for SLURM clients and jobs: SLURM_CONF (the jobs' interpreter, the
        free-threaded venv, has threadloom installed)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k != "THREADLOOM_JOB_TOKEN"}
        env["SLURM_CONF"] = self.conf
        env.pop("PYTHON_GIL", None)
        env.update(extra or {})
        return env

    def run(self, *cmd, check=True, timeout=30, env=None):
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           env=env or self.env(), cwd=self.log_dir)
        if check and r.returncode != 0:
            raise AssertionError("%s failed (exit %d): %s" % (" ".join(cmd), r.returncode,
                                                              (r.stderr or r.stdout).strip()))
        return r

    def sbatch(self, text, name="job"):
        """Writes `text` to <log_dir>/<name>.sbatch, submits it, returns the job id."""
        path = os.path.join(self.log_dir, "%s.sbatch" % name)
        with open(path, "w") as f:
            f.write(text)
        return self.submit_file(path)

    def submit_file(self, path, *sbatch_args):
        r = self.run("sbatch", "--parsable", *sbatch_args, path)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id):
        """`scontrol show job -o` as a dict ({} once SLURM forgot the job)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        info = {}
        for word in r.stdout.split():
            k, sep, v = word.partition("=")
            if sep and k not in info:
                info[k] = v
        return info

    def logs(self, job_id):
        """{path under log_dir: text} of the job's logs there (and in subdirectories):
        <job name>-<job id>.out and <job name>-<job id>-<anything>.out."""
        out = {}
        name = self.job_info(job_id).get("JobName", "[^/]+")
        mine = re.compile(r"^%s-%s(-[^/]*)?\.out$" % (re.escape(name) if name != "[^/]+" else name,
                                                       re.escape(str(job_id))))
        for path in sorted(glob.glob(os.path.join(self.log_dir, "**", "*.out"), recursive=True)):
            if mine.search(os.path.basename(path)):
                with open(path, errors="replace") as f:
                    out[os.path.relpath(path, self.log_dir)] = f.read()
        return out

    def describe(self, job_id, info):
        parts = ["scontrol show job %s: %s" % (job_id, " ".join("%s=%s" % kv for kv in info.items()))]
        for name, text in self.logs(job_id).items():
            parts.append("--- %s\n%s" % (name, text))
        parts.append(self.daemon_logs(tail=15))
        return "\n".join(parts)

    def wait_job(self, job_id, states=TERMINAL, timeout=60.0, cancel_on_timeout=True):
        """Polls the job until its state is one of `states`; returns a JobResult. After
        `timeout` s raises AssertionError with the job's record and every log (and cancels the
        job, unless told not to)."""
        deadline = time.monotonic() + timeout
        info = {}
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return JobResult(job_id, state, info.get("ExitCode", ""), info, self.logs(job_id))
            if time.monotonic() > deadline:
                if cancel_on_timeout:
                    self.run("scancel", str(job_id), check=False)
                raise AssertionError("job %s not in %s after %.0f s (state %r)\n%s"
                                     % (job_id, sorted(states), timeout, state,
                                        self.describe(job_id, info)))
            time.sleep(0.2)

    def wait_info(self, job_id, pred, what, timeout=60.0):
        """Polls `scontrol show job` until pred(info) is true; returns that info. After
        `timeout` s raises AssertionError saying `what` was awaited, with the job's record and
        every log (the job is left alone)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info and pred(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError("job %s: no %s after %.0f s (state %r)\n%s"
                                     % (job_id, what, timeout, info.get("JobState"),
                                        self.describe(job_id, info)))
            time.sleep(0.2)

    def wait_log(self, job_id, text, timeout=60.0, count=1):
        """Polls the job's logs until `count` of them hold `text`; returns {file: text}.
        AssertionError with every log after `timeout` s or when the job ends first."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs(job_id)
            if sum(text in t for t in logs.values()) >= count:
                return logs
            info = self.job_info(job_id)
            if info.get("JobState") in TERMINAL or time.monotonic() > deadline:
                logs = self.logs(job_id)   # written just before the job ended?
                if sum(text in t for t in logs.values()) >= count:
                    return logs
                raise AssertionError("no log of job %s holds %r (state %r)\n%s"
                                     % (job_id, text, info.get("JobState"),
                                        self.describe(job_id, info)))
            time.sleep(0.2)
