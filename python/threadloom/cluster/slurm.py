"""SLURM's commands: `threadloom slurm script|submit` (an sbatch script for one threadloom process
per node) and SlurmCommands, the scontrol calls the runtime makes (preemption's requeue).

    python -m threadloom slurm script [OPTIONS] train.py [ARGS...]   print the batch script
    python -m threadloom slurm submit [OPTIONS] train.py [ARGS...]   write it, sbatch it, print
                                                                     the job id

The script asks for N nodes with one task each (threadloom drives a node's GPUs with threads),
GPUs per node, cores per task, a time limit, per-node logs in the log directory (srun's
--output with %N; the script makes the directory, and the batch log, which SLURM opens before
the script runs, is %x-%j.out where the job starts: so the script runs as written wherever it
is submitted), a signal some seconds before the time limit (default USR2 120 s before, to the batch shell,
which forwards it to every task through srun) and --requeue; srun runs with
--kill-on-bad-exit=1, so one node that dies ends the step on every node. Each run of the script
exports a fresh random THREADLOOM_JOB_TOKEN (read from /dev/urandom on the node, never written
into the script), which cluster.rendezvous() turns into the job's store secret, and the signal
as THREADLOOM_PREEMPT_SIGNAL (for the launcher and cluster.on_preempt()). Logs are opened with
--open-mode=append, so the runs of a requeued job follow each other in them, each starting
with a line "threadloom: job J run N on NODES at TIME".

`JobSpec` holds the options; `batch_script(spec)` returns the text; `submit(spec)` runs sbatch.
Validation errors are InvalidArgumentError with a sentence saying what to change.
`SlurmCommands` is this part's backend table: tests point `scontrol` at another program.
"""

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import signal as _signal
import subprocess
import sys

from threadloom import _core, errors
from threadloom.cluster.env import PREEMPT_SIGNAL_VAR, TOKEN_VAR

# SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch --time).
_TIME_RE = re.compile(r"^(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")         # job names and partitions we write unquoted
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_SIGNAL_LEAD = 65535                              # sbatch's limit on --signal's @time


def _invalid(detail):
    return errors.error("EINVAL", detail)


def _slurm_hint(command):
    """What to check when a SLURM command (sbatch, scontrol, srun) fails."""
    return ("check that the SLURM controller answers (`scontrol ping`) and that this node's "
            "SLURM configuration names it (SLURM_CONF, else /etc/slurm/slurm.conf); otherwise "
            "%s's own message says what it refused (a partition, an account, a limit)" % command)


@dataclasses.dataclass
class JobSpec:
    """One threadloom job on SLURM. `program` and `args` are what `threadloom run` gets."""
    program: str                       # the script to run (train.py), or a module with -m
    args: tuple = ()                   # its arguments
    module: bool = False               # run `program` as a module (threadloom run -m program)
    nodes: int = 1                     # --nodes; one task per node
    gpus_per_node: int = 0             # --gpus-per-node (0: none asked for)
    cpus_per_task: int = 0             # --cpus-per-task (0: SLURM's default)
    time: str = "01:00:00"             # --time, in any of sbatch's formats
    partition: str = ""                # --partition ("" : the cluster's default)
    job_name: str = "threadloom"       # --job-name
    log_dir: str = "logs"              # per-node logs %x-%j-%N-%t.out (the batch log %x-%j.out
                                       # is where the job starts: see batch_script)
    signal: str = "USR2"               # sent to the batch shell (and forwarded) before the end
    signal_lead: int = 120             # ... this many seconds before the time limit
    requeue: bool = True               # --requeue (a preempted or failed node's job requeues)
    launcher: tuple = ()               # the command that runs `run`; () : find_launcher()
    run_args: tuple = ()               # options for `threadloom run` (e.g. --gil=warn)
    env: tuple = ()                    # ("NAME", "value") pairs exported before srun
    chdir: str = ""                    # --chdir ("" : the directory sbatch is run from)
    sbatch_args: tuple = ()            # further sbatch options, written as #SBATCH lines
    srun_args: tuple = ()              # further srun options


def find_launcher():
    """The command that runs `threadloom run ...` on the nodes, as an argument tuple: the
    `threadloom` script pip installed with this package (the C launcher, or `python -m
    threadloom` where it is not built: its RECORD says where, whatever the install scheme),
    else the `threadloom` beside this interpreter, else this interpreter with `-m threadloom`.
    Never one on PATH, which may belong to another environment."""
    from importlib import metadata
    try:
        files = metadata.distribution("threadloom").files or ()
    except metadata.PackageNotFoundError:  # not installed by pip (a vendored copy): no RECORD
        files = ()
    for f in files:
        if f.name == "threadloom" and f.parent.name == "bin":
            path = os.path.abspath(str(f.locate()))
            if os.access(path, os.X_OK):
                return (path,)
    beside = os.path.join(os.path.dirname(sys.executable), "threadloom")
    if os.access(beside, os.X_OK):
        return (beside,)
    return (sys.executable, "-m", "threadloom")


def _signal_name(sig):
    s = str(sig).upper()
    s = s[3:] if s.startswith("SIG") else s
    if s.isdigit():
        try:
            return _signal.Signals(int(s)).name[3:]
        except ValueError:
            raise _invalid("signal %s is not a signal number of this system; use a name such as "
                           "USR2" % sig) from None
    if not hasattr(_signal, "SIG" + s) or s in ("KILL", "STOP"):
        raise _invalid("signal %r is not one a job can catch; use USR1, USR2, TERM, INT, HUP or "
                       "another catchable signal name" % sig)
    return s


def validate(spec):
    """Raises InvalidArgumentError naming the first option that SLURM or threadloom would
    refuse; returns the spec with the signal name normalised and the launcher resolved."""
    def positive(name, v, low):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise _invalid("%s must be an integer >= %d, got %r" % (name, low, v))
    if not spec.program:
        raise _invalid("no program: give the script to run (train.py) or -m module")
    positive("--nodes", spec.nodes, 1)
    positive("--gpus-per-node", spec.gpus_per_node, 0)
    positive("--cpus-per-task", spec.cpus_per_task, 0)
    positive("--signal-lead", spec.signal_lead, 0)
    if spec.signal_lead > _MAX_SIGNAL_LEAD:
        raise _invalid("--signal-lead %d is over sbatch's limit of %d seconds"
                       % (spec.signal_lead, _MAX_SIGNAL_LEAD))
    if not _TIME_RE.match(spec.time or ""):
        raise _invalid("--time %r is not a SLURM time: use minutes, MM:SS, HH:MM:SS, D-HH, "
                       "D-HH:MM or D-HH:MM:SS (e.g. 02:00:00)" % spec.time)
    if not _NAME_RE.match(spec.job_name or ""):
        raise _invalid("--job-name %r: use letters, digits and _ . + - only" % spec.job_name)
    if spec.partition and not all(_NAME_RE.match(x) for x in spec.partition.split(",")):
        raise _invalid("--partition %r: give partition names of letters, digits and _ . + -, "
                       "separated by commas" % spec.partition)
    for opt, v in (("--log-dir", spec.log_dir), ("--chdir", spec.chdir)):
        if any(c.isspace() for c in v) or "\0" in v:
            raise _invalid("%s %r holds white space, which #SBATCH lines cannot carry: use a "
                           "path without spaces" % (opt, v))
    if not spec.log_dir:
        raise _invalid("--log-dir must name a directory (default logs)")
    for name, _ in spec.env:
        if not _ENV_RE.match(name):
            raise _invalid("--env %r: the name must be a shell variable name (letters, digits, "
                           "_; not starting with a digit)" % name)
        if name == PREEMPT_SIGNAL_VAR:
            raise _invalid("--env %s: the script exports the job's --signal there; change "
                           "--signal instead" % PREEMPT_SIGNAL_VAR)
        if name == TOKEN_VAR:
            raise _invalid("--env %s: the script makes a fresh random token for every job; a "
                           "fixed one would let any job that knows it join this job's "
                           "rendezvous" % TOKEN_VAR)
    for a in tuple(spec.args) + tuple(spec.sbatch_args) + tuple(spec.srun_args) + tuple(spec.run_args):
        if "\n" in a or "\0" in a:
            raise _invalid("argument %r holds a newline or NUL, which a batch script cannot "
                           "carry" % a)
    for a in spec.sbatch_args:
        if not a.startswith("-"):
            raise _invalid("--sbatch-arg %r is not an sbatch option (it must start with -)" % a)
    return dataclasses.replace(spec, signal=_signal_name(spec.signal),
                               launcher=tuple(spec.launcher) or find_launcher(),
                               args=tuple(spec.args))


def batch_script(spec):
    """The sbatch script for `spec` (validated first), as text."""
    spec = validate(spec)
    q = shlex.quote
    logs = spec.log_dir.rstrip("/") or "/"
    sb = [
        "--job-name=%s" % spec.job_name,
        "--nodes=%d" % spec.nodes,
        "--ntasks-per-node=1",
        "--time=%s" % spec.time,
        # The batch shell's log where the job starts (the directory sbatch runs in, or
        # --chdir), like SLURM's own slurm-<id>.out: SLURM opens it before the script runs,
        # so it cannot be in the log directory, which the script makes.
        "--output=%x-%j.out",
        "--signal=B:%s@%d" % (spec.signal, spec.signal_lead),
        "--open-mode=append",
    ]
    if spec.gpus_per_node:
        sb.append("--gpus-per-node=%d" % spec.gpus_per_node)
    if spec.cpus_per_task:
        sb.append("--cpus-per-task=%d" % spec.cpus_per_task)
    if spec.partition:
        sb.append("--partition=%s" % spec.partition)
    if spec.chdir:
        sb.append("--chdir=%s" % spec.chdir)
    sb.append("--requeue" if spec.requeue else "--no-requeue")
    sb.extend(spec.sbatch_args)

    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--open-mode=append",
            "--output=%s" % os.path.join(logs, "%x-%j-%N-%t.out")]
    if spec.cpus_per_task:
        srun.append("--cpus-per-task=%d" % spec.cpus_per_task)
    srun.extend(spec.srun_args)
    cmd = list(spec.launcher) + ["run"] + list(spec.run_args)
    cmd += ["-m", spec.program] if spec.module else [spec.program]
    cmd += list(spec.args)

    lines = ["#!/bin/bash",
             "# Generated by `threadloom slurm` on %s: one threadloom process per node."
             % datetime.datetime.now().strftime("%Y-%m-%d %H:%M")]
    lines += ["#SBATCH %s" % a for a in sb]
    lines += [
        "",
        "set -u",
        "# The logs are appended to (--open-mode=append): a requeued job's runs follow each other.",
        "echo \"threadloom: job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on "
        "$SLURM_JOB_NODELIST at $(date '+%Y-%m-%dT%H:%M:%S')\" >&2",
        "# A fresh secret for this run's rendezvous (never a fixed value); srun passes it on.",
        "export %s=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')" % TOKEN_VAR,
        'if [ ${#%s} -ne 64 ]; then echo "threadloom: could not read /dev/urandom for %s" >&2; '
        "exit 1; fi" % (TOKEN_VAR, TOKEN_VAR),
    ]
    lines += ["# The signal SLURM sends before the time limit, for on_preempt() and the launcher.",
              "export %s=%s" % (PREEMPT_SIGNAL_VAR, spec.signal)]
    lines += ["export %s=%s" % (k, q(v)) for k, v in spec.env]
    lines += [
        "# The nodes' logs go there (srun opens them; mkdir says why when it cannot).",
        "mkdir -p %s || exit 1" % q(logs),
        "",
        "# SLURM sends %s to this shell only (B:); srun forwards it to every task." % spec.signal,
        "tl_forwarded=0",
        "tl_forward() { tl_forwarded=1; echo \"threadloom: SIG%s: forwarding to the job step\" >&2; "
        "kill -%s \"$tl_srun\" 2>/dev/null; }" % (spec.signal, spec.signal),
        "trap tl_forward %s" % spec.signal,
        "",
        " ".join(q(a) for a in srun) + " \\",
        "    " + " ".join(q(a) for a in cmd) + " &",
        "tl_srun=$!",
        "# wait returns early when the trap runs; wait again until srun itself has ended.",
        "while :; do",
        "  tl_forwarded=0",
        "  wait \"$tl_srun\"; tl_rc=$?",
        "  [ \"$tl_forwarded\" = 1 ] || break",
        "done",
        "exit \"$tl_rc\"",
        "",
    ]
    return "\n".join(lines)


def submit(spec, path=None, sbatch="sbatch", environ=None):
    """Writes the batch script (to `path`, default <log_dir>/<job_name>.sbatch), creates the
    log directory, runs `sbatch --parsable` on it (in `environ`, default this process's, which
    sbatch passes on to the job) and returns (job_id, path). Raises
    InvalidArgumentError for a bad spec or a missing program, NotFoundError when sbatch is
    missing, and IOError-class threadloom errors with sbatch's message when it refuses."""
    text = batch_script(spec)
    spec = validate(spec)
    if not spec.module:
        prog = spec.program if os.path.isabs(spec.program) or not spec.chdir \
            else os.path.join(spec.chdir, spec.program)
        if not os.path.isfile(prog):
            raise _invalid("program %r does not exist (relative paths are read from %s, where "
                           "the job starts)" % (spec.program, spec.chdir or os.getcwd()))
    exe = shutil.which(sbatch, path=(environ or os.environ).get("PATH"))
    if exe is None:
        raise errors.error("ENOENT", "%r not found on PATH: install slurm-client (apt-get install "
                           "slurm-client) or pass --sbatch PATH" % sbatch)
    log_dir = spec.log_dir if os.path.isabs(spec.log_dir) or not spec.chdir \
        else os.path.join(spec.chdir, spec.log_dir)
    os.makedirs(log_dir, exist_ok=True)
    path = path or os.path.join(log_dir, "%s.sbatch" % spec.job_name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    argv = [exe, "--parsable", path]
    r = subprocess.run(argv, capture_output=True, text=True, env=environ)
    if r.returncode != 0:
        raise errors.command_failed(argv, r.returncode, r.stderr or r.stdout,
                                    hint=_slurm_hint("sbatch"))
    job_id = r.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise errors.command_failed(argv, 0, "printed %r, not a job id" % r.stdout.strip(),
                                    hint="check that %s is SLURM's sbatch (--sbatch PATH "
                                         "chooses another)" % exe)
    return job_id, path


# ---------------------------------------------------------------------------------------------
# scontrol: what the runtime runs
# ---------------------------------------------------------------------------------------------

class SlurmCommands:
    """The SLURM commands the runtime runs: the backend table of this part. Tests point
    `scontrol` at another program (one that records its arguments, or fails)."""

    def __init__(self, scontrol="scontrol", timeout=60.0):
        self.scontrol = scontrol
        self.timeout = timeout

    def requeue(self, job_id):
        """Runs `scontrol requeue <job_id>`. Raises NotFoundError when scontrol is missing,
        InputOutputError naming its status and stderr when it fails or TimedOutError."""
        argv = [self.scontrol, "requeue", str(job_id)]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise errors.error("ENOENT", "%s not found: install slurm-client on this node, or "
                               "requeue job %s by hand" % (self.scontrol, job_id)) from None
        except subprocess.TimeoutExpired:
            raise errors.error("ETIMEDOUT", "%s took more than %.0fs"
                               % (" ".join(argv), self.timeout)) from None
        if p.returncode != 0:
            raise errors.command_failed(argv, p.returncode, p.stderr or p.stdout,
                                        hint=_slurm_hint("scontrol"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _env_pair(s):
    name, sep, value = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("--env takes NAME=VALUE, got %r" % s)
    return name, value


def _parser():
    p = argparse.ArgumentParser(
        prog="threadloom slurm",
        description="Write (script) or submit (submit) an sbatch script that runs one threadloom "
                    "process per node.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{script,submit}")
    for name, help_ in (("script", "print the batch script"),
                        ("submit", "write the batch script and run sbatch on it; prints the "
                                   "job id")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("-N", "--nodes", type=int, default=1, help="nodes (one task each)")
        s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
        s.add_argument("-c", "--cpus-per-task", type=int, default=0,
                       help="cores per node's process (default: SLURM's)")
        s.add_argument("-t", "--time", default="01:00:00", help="time limit (default 01:00:00)")
        s.add_argument("-p", "--partition", default="", help="partition (default: the cluster's)")
        s.add_argument("-J", "--job-name", default="threadloom", help="job name")
        s.add_argument("--log-dir", default="logs",
                       help="directory of the nodes' logs, %%x-%%j-%%N-%%t.out (node name, task = "
                            "node rank), made by the script; default logs. The batch shell's "
                            "log, %%x-%%j.out, is where the job starts (here, or --chdir): SLURM "
                            "opens it before the script runs")
        s.add_argument("--signal", default="USR2",
                       help="signal sent before the time limit (default USR2)")
        s.add_argument("--signal-lead", type=int, default=120,
                       help="seconds before the time limit to send it (default 120)")
        s.add_argument("--no-requeue", dest="requeue", action="store_false",
                       help="do not requeue the job when it is preempted or a node fails")
        s.add_argument("--launcher", default=None,
                       help="command that runs `run` on the nodes (default: threadloom on PATH, "
                            "else the launcher built next to this package, else "
                            "`python -m threadloom`)")
        s.add_argument("--run-arg", dest="run_args", action="append", default=[],
                       help="an option for `threadloom run` (repeat), e.g. --run-arg=--gil=warn")
        s.add_argument("--env", action="append", type=_env_pair, default=[],
                       help="NAME=VALUE to export before srun (repeat)")
        s.add_argument("--chdir", default="", help="directory the job runs in (default: here)")
        s.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                       help="another sbatch option, as one word (repeat), e.g. "
                            "--sbatch-arg=--exclusive")
        s.add_argument("--srun-arg", dest="srun_args", action="append", default=[],
                       help="another srun option, as one word (repeat)")
        s.add_argument("-m", dest="module", action="store_true",
                       help="run PROGRAM as a module (threadloom run -m PROGRAM)")
        if name == "submit":
            s.add_argument("-o", "--script-out", default=None,
                           help="where to write the script (default LOG_DIR/JOB_NAME.sbatch)")
            s.add_argument("--sbatch", default="sbatch", help="the sbatch command (default sbatch)")
        s.add_argument("program", help="the Python script (or module, with -m) to run")
        s.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = JobSpec(
            program=args.program, args=tuple(args.args), module=args.module, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
            partition=args.partition, job_name=args.job_name, log_dir=args.log_dir,
            signal=args.signal, signal_lead=args.signal_lead, requeue=args.requeue,
            launcher=tuple(shlex.split(args.launcher)) if args.launcher else (),
            run_args=tuple(args.run_args), env=tuple(args.env), chdir=args.chdir,
            sbatch_args=tuple(args.sbatch_args), srun_args=tuple(args.srun_args))
        if args.cmd == "script":
            sys.stdout.write(batch_script(spec))
            return 0
        job_id, path = submit(spec, path=args.script_out, sbatch=args.sbatch)
    except _core.Error as e:
        print("threadloom slurm: %s" % e, file=sys.stderr)
        return 1
    print(job_id)
    print("threadloom slurm: submitted %s as job %s; logs: %s (the batch shell's), %s/ (one per "
          "node)" % (path, job_id, os.path.join(spec.chdir or ".", "%s-%s.out"
                                                % (spec.job_name, job_id)), spec.log_dir),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
