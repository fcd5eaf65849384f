"""Preemption: on the signal SLURM sends before the time limit, a final checkpoint on every
node, node 0's `scontrol requeue` once every node has saved, and an exit with PREEMPT_EXIT.

`#SBATCH --signal=B:USR2@120` (THREADLOOM_PREEMPT_SIGNAL names the signal; `threadloom slurm`
scripts set both). SIGUSR1 is not used by default because NCCL may install a handler for it.
Under SLURM the launchers catch the preemption signal until on_preempt takes it
(guard_preempt_signal: one line, then ignored), so a program without on_preempt is not killed
by it. What is saved is the caller's: a saver (any object with save(state, step), such as a
threadloom.Checkpointer) or a callable; this module imports neither.

Store keys used here: preempt/saved/<rank> ("ok" or "failed"), preempt/done (node 0's
requeue: "requeued", "not requeued ...", "failed: ...").
"""

import atexit
import os
import signal as _signal
import threading
import time

from threadloom import _core, errors
from threadloom.cluster.env import PREEMPT_SIGNAL_VAR
from threadloom.cluster.rendezvous import current, leave_job
from threadloom.cluster.runtime import first_line, flush_stdio, say
from threadloom.cluster.slurm import SlurmCommands

PREEMPT_EXIT = 75    # a node exits with this after a preemption checkpoint and requeue
                     # (EX_TEMPFAIL)
DEFAULT_PEER_TIMEOUT = 60.0   # how long node 0 waits for the other nodes' preemption checkpoints


def _error(name, detail):
    return errors.error(name, detail)


def _is_saver(save):
    """Whether `save` is a saver (save(state, step), e.g. a Checkpointer) rather than a
    callable that saves by itself."""
    return callable(getattr(save, "save", None))


def _signal_number(sig):
    if isinstance(sig, int):
        try:
            return _signal.Signals(sig)
        except ValueError:
            raise _error("EINVAL", "%d is not a signal number of this system" % sig) from None
    name = str(sig).strip().upper()
    if name.isdigit():
        return _signal_number(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return _signal.Signals[name]
    except KeyError:
        raise _error("EINVAL", "unknown signal %r (USR2, TERM, ... or a number)" % (sig,)) from None


def preempt_signal(environ=None):
    """The job's preemption signal: THREADLOOM_PREEMPT_SIGNAL (a name such as USR2 or SIGTERM,
    or a number; `threadloom slurm` scripts export their --signal there), else SIGUSR2.
    Raises InvalidArgumentError naming the variable when it holds no catchable signal."""
    env = os.environ if environ is None else environ
    value = (env.get(PREEMPT_SIGNAL_VAR) or "").strip()
    if not value:
        return _signal.SIGUSR2
    try:
        sig = _signal_number(value)
    except _core.Error as e:
        raise _error("EINVAL", "%s=%r: %s; set it to the signal the job asks SLURM for "
                     "(--signal), e.g. USR2" % (PREEMPT_SIGNAL_VAR, value, e.detail)) from None
    if sig in (_signal.SIGKILL, _signal.SIGSTOP):
        raise _error("EINVAL", "%s=%r: %s cannot be caught; use USR2, TERM or another "
                     "catchable signal" % (PREEMPT_SIGNAL_VAR, value, sig.name))
    return sig


_guarded = set()   # signals the launcher's notice handles (added by launch(), on the main thread)


def guard_preempt_signal(environ=None):
    """What the launchers do under SLURM: until on_preempt() installs its handler, the job's
    preemption signal (preempt_signal()) prints one line and is otherwise ignored, instead of
    killing the process at the signal's default action (which, 120 s before the time limit,
    would fail the job with --kill-on-bad-exit and lose the time left). Returns the signal."""
    sig = preempt_signal(environ)
    _core.preempt_notice(int(sig))
    _guarded.add(int(sig))
    return sig


class Preemption:
    """What on_preempt() returns. `requested` is set when the signal arrived.

    Why a thread: CPython runs signal handlers on the main thread only, and only once that
    thread runs bytecode again; Linux delivers a process-directed signal to any thread, so a
    main thread blocked in a lock (Event.wait, a join, a collective) may never run the handler.
    The C-level handler, however, writes the signal number to the wakeup fd
    (signal.set_wakeup_fd) from whichever thread took it; the "threadloom-preempt" thread reads
    that fd and does the work (defer=False) or sets `requested` (defer=True, for check()).
    Bytes for other signals are passed on to the wakeup fd that was installed before (asyncio's).

    Several nodes (cluster.current() over more than one node): every node saves and reports it
    in the store (preempt/saved/<rank>); node 0 waits up to `peer_timeout` s for every report
    before it requeues, because `scontrol requeue` ends the step on every node at once; it
    then publishes preempt/done, which the other nodes wait for before they exit (a node that
    exited first with PREEMPT_EXIT would make `srun --kill-on-bad-exit` kill node 0 before it
    requeued). From the moment the work starts SIGTERM is ignored (SLURM sends it to every task
    when the job is requeued, and when it ends the job); SIGKILL after SLURM's KillWait still
    bounds the exit.

    Exit: when the program ends normally, an atexit hook (which runs before Python puts SIG_DFL
    back for signals whose handler was a Python function) sets the signal to SIG_IGN and no
    work starts any more: a late signal neither kills a finishing process (with
    --kill-on-bad-exit that would fail the whole job) nor requeues a job that is done. A work
    already under way is waited for; it ends the process itself.

    Thread-safety: check() and uninstall() on the main thread; `requested` from any thread."""

    def __init__(self, save, state, sig, requeue, defer, exit_status, commands, environ,
                 peer_timeout):
        self.save = save
        self.state = state
        self.signal = sig
        self.requeue = requeue
        self.defer = defer
        self.exit_status = exit_status
        self.commands = commands or SlurmCommands()
        self.environ = os.environ if environ is None else environ
        self.peer_timeout = peer_timeout
        self.requested = threading.Event()
        self._previous = None           # the signal's previous Python handler
        self._old_fd = -1               # the wakeup fd installed before ours
        self._socks = None              # (reader, writer) socketpair of the wakeup fd
        self._lock = threading.Lock()   # guards _working and _exiting
        self._working = False           # the work has started (it runs once)
        self._exiting = False           # the program is ending: the signal is ignored
        self._finished = threading.Event()   # set when the work is done; _status holds its result
        self._status = None

    def _install(self):
        import socket
        r, w = socket.socketpair()
        w.setblocking(False)
        self._socks = (r, w)
        self._previous = _signal.signal(self.signal, self._handler)
        self._old_fd = _signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="threadloom-preempt", daemon=True).start()
        atexit.register(self._at_exit)

    def _handler(self, signum, frame):
        if not self._exiting:
            self.requested.set()   # the main thread got to run it; the watcher does the work

    def _begin(self):
        """True when the caller is the one to do the work: not exiting, not yet started."""
        with self._lock:
            if self._exiting or self._working:
                return False
            self._working = True
            return True

    def _watch(self):
        r = self._socks[0]
        while True:
            try:
                data = r.recv(256)
            except OSError:
                return
            if not data:
                return   # uninstalled
            mine = self.signal.value in data
            others = bytes(b for b in data if b != self.signal.value)
            if others and self._old_fd >= 0:
                try:
                    os.write(self._old_fd, others)
                except OSError:
                    pass
            if not mine or self._exiting:
                continue
            self.requested.set()
            if not self.defer and self._begin():
                status = 1
                try:
                    status = self._work()
                    leave_job()
                    flush_stdio()
                finally:
                    os._exit(status)

    def _at_exit(self):
        with self._lock:
            self._exiting = True
            working = self._working
        if self._socks is not None:
            try:
                _signal.signal(self.signal, _signal.SIG_IGN)
            except (ValueError, OSError):
                pass   # not the main thread (atexit hooks run on it)
        if working and not self.defer:
            threading.Event().wait()   # the watcher's work ends the process (os._exit)

    def check(self):
        """With defer=True, call it between training steps: when the signal came, does the
        checkpoint and requeue and raises SystemExit; otherwise returns False."""
        if not self.requested.is_set():
            return False
        if self._begin():
            raise SystemExit(self._work())
        with self._lock:
            working = self._working
        if not working:
            return False   # the program is exiting
        self._finished.wait()
        raise SystemExit(self._status)

    def uninstall(self):
        """Puts the previous handler and wakeup fd back and stops the thread. Main thread."""
        if self._socks is None:
            return
        atexit.unregister(self._at_exit)
        _signal.set_wakeup_fd(self._old_fd)
        previous = self._previous if self._previous is not None else _signal.SIG_DFL
        _signal.signal(self.signal, previous)
        if previous == _signal.SIG_DFL and int(self.signal) in _guarded:
            _core.preempt_notice(int(self.signal))   # the launcher's notice was there before
        r, w = self._socks
        self._socks = None
        w.close()
        try:
            r.shutdown(2)
        except OSError:
            pass

    def _is_requeuer(self):
        rv = current()
        if rv is not None:
            return rv.rank == 0
        node = self.environ.get("SLURM_NODEID") or self.environ.get("SLURM_PROCID") or "0"
        return node == "0"

    def _save(self):
        if _is_saver(self.save):
            state, step = self.state()
            r = self.save.save(state, step)
            if hasattr(r, "result"):
                r.result()
            if callable(getattr(self.save, "wait", None)):
                self.save.wait()
            where = getattr(self.save, "directory", None)
            return "step %d%s" % (step, " in %s" % where if where is not None else "")
        r = self.save()
        if hasattr(r, "result"):
            r = r.result()
        return str(r) if r is not None else "done"

    def _requeue_job(self):
        """Runs scontrol requeue (when asked to). Returns (ok, what the other nodes read)."""
        name = self.signal.name
        if not self.requeue:
            return True, b"not requeued (requeue=False)"
        job = self.environ.get("SLURM_JOB_ID") or self.environ.get("SLURM_JOBID")
        if not job:
            say("threadloom: %s: not requeued: SLURM_JOB_ID is unset (not a SLURM job)" % name)
            return False, b"failed: SLURM_JOB_ID is unset on node 0"
        try:
            self.commands.requeue(job)
        except _core.Error as e:
            say("threadloom: %s: requeue failed: %s" % (name, e.detail or e))
            return False, b"failed: the requeue failed on node 0"
        say("threadloom: %s: requeued SLURM job %s (SLURM starts it again once it is eligible "
             "and resources are free; see EligibleTime in `scontrol show job %s`)"
             % (name, job, job))
        return True, b"requeued"

    def _meet(self, rv, saved):
        """The nodes' part of the work (see the class docstring). Returns False when this node
        must report a failure: node 0's requeue failed or the other nodes could not be met."""
        name = self.signal.name
        try:
            client = rv.connect(timeout=min(self.peer_timeout, 30.0),
                                io_timeout=self.peer_timeout + 30.0)
        except _core.Error as e:
            say("threadloom: %s: cannot reach the job's store to wait for the other nodes: %s"
                 % (name, first_line(e)))
            return self._requeue_job()[0] if rv.rank == 0 else False
        try:
            client.set("preempt/saved/%d" % rv.rank, b"ok" if saved else b"failed")
            if rv.rank != 0:
                done = client.wait("preempt/done", self.peer_timeout + self.commands.timeout
                                   + 30.0)
                if done.startswith(b"failed"):
                    say("threadloom: %s: node 0 %s" % (name, done.decode(errors="replace")))
                    return False
                return True
            peers = range(1, rv.world_size)
            missing = [r for r in peers if client.get("preempt/saved/%d" % r) is None]
            if missing:
                say("threadloom: %s: waiting up to %g s for node(s) %s to save before the "
                     "requeue" % (name, self.peer_timeout, _ranks_text(missing)))
            deadline = time.monotonic() + self.peer_timeout
            late, failed = [], []
            for r in peers:
                try:
                    v = client.wait("preempt/saved/%d" % r, max(deadline - time.monotonic(), 0.0))
                except _core.TimedOutError:
                    late.append(r)
                    continue
                if v != b"ok":
                    failed.append(r)
            if late:
                say("threadloom: %s: node(s) %s did not report a checkpoint within %g s; "
                     "requeueing without them (each node resumes from its newest complete "
                     "checkpoint)" % (name, _ranks_text(late), self.peer_timeout))
            if failed:
                say("threadloom: %s: the preemption checkpoint failed on node(s) %s"
                     % (name, _ranks_text(failed)))
            ok, done = self._requeue_job()
            client.set("preempt/done", done)
            return ok
        except _core.Error as e:
            say("threadloom: %s: lost the other nodes during the preemption: %s"
                 % (name, first_line(e)))
            return False
        finally:
            client.close()

    def _work(self):
        """Saves the final checkpoint (waiting until it is durable) and requeues the job from
        node 0, with the other nodes as the class docstring says. Returns exit_status, or 1
        when a step failed (each failure is one line on stderr). Called once (_begin())."""
        name = self.signal.name
        try:
            _core.signal_ignore(int(_signal.SIGTERM))
        except _core.Error:
            pass
        status = self.exit_status
        say("threadloom: %s: preemption: saving a final checkpoint" % name)
        saved = True
        try:
            say("threadloom: %s: checkpoint saved (%s)" % (name, self._save()))
        except Exception as e:  # noqa: BLE001 (reported, then the job is still requeued)
            say("threadloom: %s: the preemption checkpoint failed: %s: %s"
                 % (name, type(e).__name__, first_line(e)))
            status, saved = 1, False
        rv = current()
        if rv is not None and rv.world_size > 1:
            if not self._meet(rv, saved):
                status = 1
            leave_job(self.peer_timeout)   # node 0 waits for the others only so long
        elif self.requeue and self._is_requeuer():
            if not self._requeue_job()[0]:
                status = 1
        flush_stdio()
        self._status = status
        self._finished.set()
        return status


def _ranks_text(ranks):
    return ", ".join(str(r) for r in ranks)


def on_preempt(save, *, state=None, signal=None, requeue=True, defer=False,
               exit_status=PREEMPT_EXIT, commands=None, environ=None,
               peer_timeout=DEFAULT_PEER_TIMEOUT):
    """Checkpoints and requeues the job when `signal` arrives. The signal: by default
    THREADLOOM_PREEMPT_SIGNAL, which `threadloom slurm` scripts export with their --signal,
    else SIGUSR2 (ask SLURM for it with `#SBATCH --signal=B:USR2@120` and forward it, as those
    scripts do, or `--signal=USR2@120`); SIGUSR1 is avoided because NCCL may use it.

    save: a saver, i.e. any object with save(state, step) (a threadloom.Checkpointer), with
    `state` a callable returning (state, step) at the time of the signal; its save() may return
    a Future (waited for), and a wait() it has is called next (the Checkpointer's: committed and
    fsynced). Or a callable that saves and returns None, a value, or a Future (then waited
    for). requeue: on node 0 (cluster.current().rank, else SLURM_NODEID), run
    `scontrol requeue $SLURM_JOB_ID` through `commands` (a SlurmCommands). Under the launcher
    on several nodes, node 0 requeues only once every node has saved, or after peer_timeout
    seconds, and the other nodes exit only after that (see Preemption).

    defer=False: the work runs on the "threadloom-preempt" thread as soon as the signal
    arrives, whatever the main thread is doing (blocked in a collective included), while the
    training threads go on: `state` must return something consistent (a copy made at a step
    boundary, or the state of a step that is finished). Then the process leaves the job cleanly
    and ends with os._exit(exit_status). defer=True: the signal only sets `requested`; the
    training loop calls Preemption.check() between steps, which does the work on its thread and
    raises SystemExit(exit_status). Either way the status is exit_status (default PREEMPT_EXIT)
    when the checkpoint and the requeue succeeded, else 1. Once the program exits normally the
    signal is ignored. Must be called from the main thread (it installs a signal handler and
    the wakeup fd). Returns the Preemption."""
    if _is_saver(save):
        if not callable(state):
            raise _error("EINVAL", "on_preempt(checkpointer, state=...): state must be a callable "
                         "returning (state, step) when the signal comes")
    elif not callable(save):
        raise _error("EINVAL", "on_preempt: save must be a Checkpointer or a callable, not %s "
                     "(as a Checkpointer counts any object with save(state, step))"
                     % type(save).__name__)
    sig = preempt_signal(environ) if signal is None else _signal_number(signal)
    if sig in (_signal.SIGKILL, _signal.SIGSTOP):
        raise _error("EINVAL", "on_preempt: %s cannot be caught; use USR2 or TERM" % sig.name)
    if not peer_timeout or peer_timeout <= 0:
        raise _error("EINVAL", "on_preempt: peer_timeout must be a positive number of seconds, "
                     "not %r" % (peer_timeout,))
    if threading.current_thread() is not threading.main_thread():
        raise _error("EINVAL", "on_preempt must be called from the main thread (Python installs "
                     "signal handlers there)")
    p = Preemption(save, state, sig, requeue, defer, exit_status, commands, environ,
                   float(peer_timeout))
    p._install()
    return p
