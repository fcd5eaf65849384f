"""What the launchers do before user code (`threadloom run`, and `python -m threadloom run`):
launch(), and launch_or_exit() for their one-line failures.

What `threadloom run --nnodes N --node-rank R --master HOST[:PORT]` (or a multi-node SLURM step
without those flags) does, in launch():

1. CUDA_VISIBLE_DEVICES: when SLURM named the step's GPUs (SLURM_STEP_GPUS / SLURM_JOB_GPUS)
   but left CUDA_VISIBLE_DEVICES unset, it is set to them, before anything starts CUDA;
2. --log-dir DIR: this process's stdout and stderr also go to DIR/node-<rank>.log (a `tee`
   child per stream, so a process killed with SIGKILL still leaves its last lines);
3. cluster.rendezvous() with the flags (SLURM supplies what they leave out); the result is
   cluster.current(), and RANK/WORLD_SIZE/MASTER_ADDR/... are exported for torch.distributed;
4. a Watchdog (--watchdog-timeout S, 0 for none; runtime.py);
5. at exit: a clean leave (the store's `left/<rank>`), node 0 waiting for the others; an
   uncaught exception is reported to every node instead.
Under SLURM the job's preemption signal is caught from the start (preempt.py) until the
program's on_preempt() takes it.
"""

import atexit
import os
import signal as _signal
import subprocess
import sys

from threadloom import _core, errors
from threadloom.cluster.env import narrow_cuda_visible_devices, slurm_env
from threadloom.cluster.preempt import guard_preempt_signal
from threadloom.cluster.rendezvous import add_leave, rendezvous, set_current
from threadloom.cluster.runtime import (DEFAULT_WATCHDOG_TIMEOUT, Watchdog, first_line,
                                        flush_stdio, say)

DEFAULT_RDZV_TIMEOUT = 300.0


def _error(name, detail):
    return errors.error(name, detail)


def tee_to_log(log_dir, rank):
    """Sends this process's stdout and stderr (file descriptors 1 and 2) through `tee -a` into
    log_dir/node-<rank>.log as well. The tee processes ignore the signals SLURM and terminals
    send to the whole job (INT, TERM, HUP, USR1, USR2) and end when this process's copies of
    the descriptors close. Returns the log's path. Raises the threadloom error of the errno
    (NotFoundError, AccessDeniedError, ...) naming --log-dir when the directory or the log
    cannot be made, before anything is redirected."""
    path = os.path.join(log_dir, "node-%d.log" % rank)
    try:
        os.makedirs(log_dir, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise errors.from_errno(e.errno, "--log-dir %s: cannot write %s there: %s"
                                % (log_dir, os.path.basename(path), e.strerror or e),
                                hint="give --log-dir a directory this process can create and "
                                     "write to") from None
    flush_stdio()
    ignored = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGUSR1, _signal.SIGUSR2)
    old = {s: _signal.signal(s, _signal.SIG_IGN) for s in ignored}   # inherited by the tees
    try:
        for fd in (1, 2):
            r, w = os.pipe()
            try:
                subprocess.Popen(["tee", "-a", "-i", path], stdin=r, stdout=fd, close_fds=True)
            except FileNotFoundError:
                os.close(r)
                os.close(w)
                raise _error("ENOENT", "--log-dir needs the `tee` program (coreutils)") from None
            os.close(r)
            os.dup2(w, fd)
            os.close(w)
    finally:
        for s, h in old.items():
            _signal.signal(s, h if h is not None else _signal.SIG_DFL)
    # Both tees append to one file: each Python line must reach them in one write, or a line of
    # stdout and one of stderr interleave mid-line in the log. Line buffering without
    # write_through (which PYTHONUNBUFFERED=1 or -u turn on) does that for lines up to the
    # buffer's size; writes from C code or child processes are theirs to keep whole.
    for f in (sys.stdout, sys.stderr):
        try:
            f.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):
            pass
    return path


class _ExitState:
    failed = False   # an uncaught exception was reported: no clean leave
    left = False     # the leave ran (atexit, or before an os._exit)


def _parse_timeout(value, flag, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _error("EINVAL", "%s takes a number of seconds, not %r" % (flag, value)) from None
    if v < 0 or (v == 0 and not allow_zero) or v != v:
        raise _error("EINVAL", "%s must be %s, not %r" % (flag, ">= 0 (0: off)" if allow_zero
                                                           else "positive", value))
    return v


def _check_flags(nnodes, node_rank, master, se):
    if nnodes is not None and (not isinstance(nnodes, int) or nnodes < 1):
        raise _error("EINVAL", "--nnodes must be a positive integer, not %r" % (nnodes,))
    if node_rank is not None and (not isinstance(node_rank, int) or node_rank < 0):
        raise _error("EINVAL", "--node-rank must be an integer >= 0, not %r" % (node_rank,))
    if se is None:
        missing = [f for f, v in (("--nnodes", nnodes), ("--node-rank", node_rank),
                                  ("--master", master)) if v is None]
        if missing:
            raise _error("EINVAL", "outside SLURM a multi-node run needs --nnodes, --node-rank "
                         "and --master; missing %s" % ", ".join(missing))
    n = nnodes if nnodes is not None else se.nnodes
    r = node_rank if node_rank is not None else se.node_rank
    if r >= n:
        raise _error("EINVAL", "--node-rank %d is not below --nnodes %d (ranks are 0..%d)"
                     % (r, n, n - 1))
    if master is not None:
        host, sep, port = master.rpartition(":")
        if not master or master.startswith(":") or (sep and not host):
            raise _error("EINVAL", "--master takes HOST or HOST:PORT, not %r" % master)
        if sep and not port.isdigit() and "]" not in port and master.count(":") == 1:
            raise _error("EINVAL", "--master %r: the port %r is not a number" % (master, port))
        if sep and port.isdigit() and not 1 <= int(port) <= 65535:
            raise _error("EINVAL", "--master %r: port %s is outside 1-65535" % (master, port))
    return n, r


def launch(nnodes=None, node_rank=None, master=None, rdzv_timeout=None, watchdog_timeout=None,
           log_dir=None, environ=None):
    """The launcher's set-up before user code (see the module's docstring). Returns the
    Rendezvous (also cluster.current()), or None when this is not a multi-node run: no flag
    given and not a SLURM step over several nodes. Raises InvalidArgumentError for a bad flag
    combination, TimedOutError when the rendezvous does not complete."""
    env = os.environ if environ is None else environ
    rdzv_timeout = _parse_timeout(DEFAULT_RDZV_TIMEOUT if rdzv_timeout is None else rdzv_timeout,
                                  "--rdzv-timeout")
    watchdog_timeout = _parse_timeout(DEFAULT_WATCHDOG_TIMEOUT if watchdog_timeout is None
                                      else watchdog_timeout, "--watchdog-timeout",
                                      allow_zero=True)
    narrow_cuda_visible_devices(env)
    se = slurm_env(env)
    explicit = nnodes is not None or node_rank is not None or master is not None
    multi = se is not None and se.step_id != "" and se.nnodes > 1
    if not explicit and not multi:
        if log_dir:
            tee_to_log(log_dir, se.node_rank if se is not None else 0)
        if se is not None:
            guard_preempt_signal(env)   # after the tees: they must start with it ignored
        return None
    n, r = _check_flags(nnodes, node_rank, master, se)
    if log_dir:
        tee_to_log(log_dir, r)
    if se is not None:
        guard_preempt_signal(env)
    rv = rendezvous(n, r, master, timeout=rdzv_timeout, environ=env)
    set_current(rv)
    env.update(rv.torchrun_env())   # the launcher is the authority: stale values are replaced
    if watchdog_timeout:
        rv.watchdog = Watchdog(rv, timeout=watchdog_timeout).start()
    _install_exit_hooks(rv, rdzv_timeout)
    return rv


def _install_exit_hooks(rv, leave_timeout):
    state = _ExitState()
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if issubclass(exc_type, SystemExit):
            return
        state.failed = True
        reason = "node %d (%s) failed: %s: %s" % (rv.rank, rv.hosts[rv.rank], exc_type.__name__,
                                                   first_line(exc) if exc is not None else "")
        if rv.watchdog is not None:
            rv.watchdog.report_failure(reason)
        else:
            try:
                rv.abort(reason)
            except _core.Error:
                pass

    def leave(timeout=None):
        if state.left:   # once: at exit, or earlier through rendezvous.leave_job()
            return
        state.left = True
        if state.failed:
            if rv.server is not None:
                rv.server.close()
            return
        try:
            rv._leave(leave_timeout if timeout is None else timeout)
        except _core.Error as e:
            say("threadloom: leaving the job: %s" % first_line(e))

    sys.excepthook = excepthook
    add_leave(leave)
    atexit.register(leave)


def launch_or_exit(origin="threadloom run", **kw):
    """launch(**kw) for the launchers: a bad flag ends the process with status 2, a failed
    rendezvous with status 1, each with one line on stderr."""
    try:
        return launch(**kw)
    except _core.Error as e:
        flush_stdio()
        say("%s: %s" % (origin, e.detail or e))
        raise SystemExit(2 if isinstance(e, _core.InvalidArgumentError) else 1) from None
