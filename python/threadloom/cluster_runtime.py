"""The multi-node runtime around a rendezvous: the launcher's set-up, the watchdog, preemption.

What `threadloom run --nnodes N --node-rank R --master HOST[:PORT]` (or `python -m threadloom
run`, or a multi-node SLURM step without those flags) does before user code, in launch():

1. CUDA_VISIBLE_DEVICES: when SLURM named the step's GPUs (SLURM_STEP_GPUS / SLURM_JOB_GPUS)
   but left CUDA_VISIBLE_DEVICES unset, it is set to them, before anything starts CUDA;
2. --log-dir DIR: this process's stdout and stderr also go to DIR/node-<rank>.log (a `tee`
   child per stream, so a process killed with SIGKILL still leaves its last lines);
3. cluster.rendezvous() with the flags (SLURM supplies what they leave out); the result is
   cluster.current(), and RANK/WORLD_SIZE/MASTER_ADDR/... are exported for torch.distributed;
4. a Watchdog (--watchdog-timeout S, 0 for none): heartbeats into the store; node 0 watches
   every node's heartbeat; any node that stops for S seconds, or reports a failure (an uncaught
   exception in user code, a failed NCCL bootstrap), makes every node abort its NCCL
   communicators and spmd worlds and exit with ABORT_EXIT and one line naming the node;
   node 0 dying is seen by the others as the store's connection failing;
5. at exit: a clean leave (the store's `left/<rank>`), node 0 waiting for the others.

Preemption (on_preempt) is for user code: on the signal SLURM sends before the time limit
(`#SBATCH --signal=USR2@120`; THREADLOOM_PREEMPT_SIGNAL names it), a final checkpoint is saved
and made durable on every node, node 0 runs `scontrol requeue $SLURM_JOB_ID` once every node
has saved, and the processes exit with PREEMPT_EXIT. SIGUSR1 is not used by default because
NCCL may install a handler for it. Under SLURM the launchers catch the preemption signal until
on_preempt takes it (guard_preempt_signal: one line, then ignored), so a program without
on_preempt is not killed by it.

Store keys used here, beside the rendezvous' own: hb/<rank> (heartbeat counters), abort (JSON
{rank, host, reason}: the first reason wins), abort/count, abort_ack/<rank>, left/<rank>,
preempt/saved/<rank> ("ok" or "failed"), preempt/done (node 0's requeue: "requeued", "not
requeued ...", "failed: ...").
"""

import atexit
import json
import os
import signal as _signal
import subprocess
import sys
import threading
import time

from threadloom import _core, _runtime, cluster, errors

ABORT_EXIT = 70      # a node exits with this when the job aborts because of another node
PREEMPT_EXIT = 75    # ... and with this after a preemption checkpoint and requeue (EX_TEMPFAIL)
PREEMPT_SIGNAL_VAR = "THREADLOOM_PREEMPT_SIGNAL"   # the job's preemption signal (batch scripts)
DEFAULT_PEER_TIMEOUT = 60.0   # how long node 0 waits for the other nodes' preemption checkpoints
DEFAULT_WATCHDOG_TIMEOUT = 60.0
DEFAULT_RDZV_TIMEOUT = 300.0


def _error(name, detail):
    return errors.error(name, detail)


def _say(line):
    """One line to stderr, written with one write(2) (never interleaved mid-line)."""
    try:
        os.write(2, (line.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def _flush_stdio():
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None:
                f.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------------------------------------
# Watchdog
# ---------------------------------------------------------------------------------------------

class Watchdog:
    """Failure detection for one node of a job, on its own connection to the store.

    Every `interval` seconds (default timeout/5, at most 5 s) the watchdog thread adds to
    hb/<rank> and waits up to `interval` for the abort key. Node 0 also reads every node's
    heartbeat: a node whose counter has not moved for `timeout` seconds, and that has not left
    cleanly, is declared dead and the abort key published naming it. When the abort key
    appears, or this node loses the store (node 0 died or is unreachable: a request that
    fails or takes longer than timeout + interval), the watchdog aborts this node: it runs the
    hooks (add_hook), then aborts what this process registered as abortable (_runtime.abort_all:
    the NCCL communicators made through the rendezvous' bootstraps and every running spmd
    world, whose collectives raise CanceledError with the reason); then, with exit=True, writes one line naming the reason to
    stderr and ends the process with `exit_status` (os._exit: a rank stuck in a collective
    cannot be unwound). With exit=False it stops there; `aborted` is set and `reason` says why.

    Thread-safety: every method may be called from any thread."""

    def __init__(self, rv, timeout=DEFAULT_WATCHDOG_TIMEOUT, interval=None, *, exit=True,
                 exit_status=ABORT_EXIT):
        if not timeout or timeout <= 0:
            raise _error("EINVAL", "watchdog timeout must be positive, not %r" % (timeout,))
        self.rv = rv
        self.timeout = float(timeout)
        self.interval = float(interval) if interval else min(max(self.timeout / 5, 0.05), 5.0)
        if self.interval <= 0 or self.interval > 5.0:
            raise _error("EINVAL", "watchdog interval must be in (0, 5] seconds, not %r"
                         % (interval,))
        self.exit = exit
        self.exit_status = exit_status
        self.aborted = threading.Event()  # set once this node aborted
        self.reason = None                # why (the abort key's reason, or the lost store)
        self._stop = threading.Event()
        self._lock = threading.Lock()     # guards _fired, _hooks, _dead
        self._fired = False
        self._hooks = []
        self._dead = set()                # ranks this node's watchdog declared dead
        self._thread = None
        self._client = None               # the watchdog's own StoreClient (its thread's)

    def start(self):
        """Connects and starts the watchdog thread; returns self."""
        self._client = self.rv.connect(timeout=min(self.timeout, 60.0),
                                       io_timeout=self.timeout + self.interval)
        self._thread = threading.Thread(target=self._run, name="threadloom-watchdog", daemon=True)
        self._thread.start()
        return self

    def add_hook(self, fn):
        """fn(reason) runs (on the watchdog's thread) when this node aborts, before the exit."""
        with self._lock:
            self._hooks.append(fn)

    def stop(self):
        """Stops heartbeating and watching (a clean leave). Idempotent. Does not wait for the
        thread's wait on the abort key to time out: its request is interrupted."""
        self._stop.set()
        t = self._thread
        if self._client is not None and t is not None and t is not threading.current_thread():
            self._client.interrupt()
        if t is not None and t is not threading.current_thread():
            t.join(self.timeout + 2 * self.interval)
        if self._client is not None and (t is None or not t.is_alive()):
            self._client.close()

    def report_failure(self, reason):
        """This node failed (e.g. an uncaught exception): tells every node to abort, stops
        watching, and aborts this node's communicators, without exiting (the caller does).
        On node 0, whose exit takes the store down, waits (at most `timeout` seconds, 10 at
        most) until every other live node has seen the abort."""
        with self._lock:
            if self._fired:
                return
            self._fired = True
        self._stop.set()
        self.reason = reason
        try:
            self.rv.abort(reason)
            self.rv.store.set("abort_ack/%d" % self.rv.rank, b"1")
        except _core.Error:
            pass  # no store: the others see the store (or this node's heartbeat) go
        self._run_hooks(reason)
        self.aborted.set()
        if self.rv.rank == 0:
            self._wait_acks(self.rv.store)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self):
        rv, client = self.rv, self._client
        seen = {}   # rank -> (last heartbeat value, monotonic time it last changed)
        while not self._stop.is_set():
            try:
                client.add("hb/%d" % rv.rank)
                try:
                    data = client.wait(cluster.ABORT_KEY, self.interval)
                except _core.TimedOutError:
                    data = None
                if data is not None:
                    self._fire(json.loads(data)["reason"], client)
                    return
                if rv.rank == 0:
                    dead = self._check_peers(client, seen)
                    if dead is not None:
                        with self._lock:
                            self._dead.add(dead[0])
                        self._fire(rv.abort(dead[1], store=client), client)
                        return
            except (_core.Error, OSError, ValueError) as e:
                if self._stop.is_set():
                    return
                self._fire("lost the rendezvous store on node 0 (%s:%d): node 0 exited, was "
                           "killed or cannot be reached (%s)"
                           % (rv.master_addr, rv.store_port, _first_line(e)), None)
                return

    def _check_peers(self, client, seen):
        """(rank, reason) of a node whose heartbeat stopped, else None. Node 0 only."""
        now = time.monotonic()
        for r in range(1, self.rv.world_size):
            v = client.get("hb/%d" % r)
            prev = seen.get(r)
            if prev is None or prev[0] != v:
                seen[r] = (v, now)
                continue
            if now - prev[1] >= self.timeout and client.get("left/%d" % r) is None:
                what = "sent no heartbeat" if v is None else "stopped heartbeating"
                return r, ("node %d (%s) %s for %.1f s: killed, crashed or cut off"
                           % (r, self.rv.hosts[r], what, now - prev[1]))
        return None

    def _run_hooks(self, reason):
        with self._lock:
            hooks = list(self._hooks)
        for fn in hooks + [_abort_process]:
            try:
                fn(reason)
            except Exception as e:  # noqa: BLE001 (one failing hook must not stop the abort)
                _say("threadloom: watchdog hook %r failed: %s" % (fn, _first_line(e)))

    def _fire(self, reason, client):
        with self._lock:
            if self._fired:
                return
            self._fired = True
        self.reason = reason
        if client is not None:
            try:
                client.set("abort_ack/%d" % self.rv.rank, b"1")
            except _core.Error:
                pass
        self._run_hooks(reason)
        self.aborted.set()
        if not self.exit:
            return
        if self.rv.rank == 0 and client is not None:
            self._wait_acks(client)
        _flush_stdio()
        _say("threadloom: node %d (%s) aborts: %s" % (self.rv.rank, self.rv.hosts[self.rv.rank],
                                                     reason))
        os._exit(self.exit_status)

    def _wait_acks(self, client):
        """Node 0: waits until every node that is neither dead nor gone has seen the abort, so
        that the store's disappearance does not replace the reason in their messages."""
        deadline = time.monotonic() + min(self.timeout, 10.0)
        with self._lock:
            dead = set(self._dead)
        try:
            for r in range(1, self.rv.world_size):
                if r in dead or client.get("left/%d" % r) is not None:
                    continue
                try:
                    client.wait("abort_ack/%d" % r, max(deadline - time.monotonic(), 0.0))
                except _core.TimedOutError:
                    pass
        except _core.Error:
            pass


def _first_line(e):
    text = (getattr(e, "detail", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _abort_process(reason):
    """Aborts what this process registered as abortable (_runtime): the NCCL communicators of
    the job's bootstraps, running spmd worlds (their collectives raise CanceledError)."""
    _runtime.abort_all("threadloom.cluster: the job aborts: %s" % reason)


# ---------------------------------------------------------------------------------------------
# Preemption
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
            raise _error("ENOENT", "%s not found: install slurm-client on this node, or requeue "
                         "job %s by hand" % (self.scontrol, job_id)) from None
        except subprocess.TimeoutExpired:
            raise _error("ETIMEDOUT", "%s took more than %.0fs" % (" ".join(argv),
                                                                  self.timeout)) from None
        if p.returncode != 0:
            raise _error("EIO", "%s failed with status %d: %s" % (
                " ".join(argv), p.returncode, (p.stderr or p.stdout).strip() or "(no output)"))


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
                    _leave_job()
                    _flush_stdio()
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
        rv = cluster.current()
        if rv is not None:
            return rv.rank == 0
        node = self.environ.get("SLURM_NODEID") or self.environ.get("SLURM_PROCID") or "0"
        return node == "0"

    def _save(self):
        from threadloom.checkpoint import Checkpointer
        if isinstance(self.save, Checkpointer):
            state, step = self.state()
            self.save.save(state, step).result()
            self.save.wait()
            return "step %d in %s" % (step, self.save.directory)
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
            _say("threadloom: %s: not requeued: SLURM_JOB_ID is unset (not a SLURM job)" % name)
            return False, b"failed: SLURM_JOB_ID is unset on node 0"
        try:
            self.commands.requeue(job)
        except _core.Error as e:
            _say("threadloom: %s: requeue failed: %s" % (name, e.detail or e))
            return False, b"failed: the requeue failed on node 0"
        _say("threadloom: %s: requeued SLURM job %s (SLURM starts it again once it is eligible "
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
            _say("threadloom: %s: cannot reach the job's store to wait for the other nodes: %s"
                 % (name, _first_line(e)))
            return self._requeue_job()[0] if rv.rank == 0 else False
        try:
            client.set("preempt/saved/%d" % rv.rank, b"ok" if saved else b"failed")
            if rv.rank != 0:
                done = client.wait("preempt/done", self.peer_timeout + self.commands.timeout
                                   + 30.0)
                if done.startswith(b"failed"):
                    _say("threadloom: %s: node 0 %s" % (name, done.decode(errors="replace")))
                    return False
                return True
            peers = range(1, rv.world_size)
            missing = [r for r in peers if client.get("preempt/saved/%d" % r) is None]
            if missing:
                _say("threadloom: %s: waiting up to %g s for node(s) %s to save before the "
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
                _say("threadloom: %s: node(s) %s did not report a checkpoint within %g s; "
                     "requeueing without them (each node resumes from its newest complete "
                     "checkpoint)" % (name, _ranks_text(late), self.peer_timeout))
            if failed:
                _say("threadloom: %s: the preemption checkpoint failed on node(s) %s"
                     % (name, _ranks_text(failed)))
            ok, done = self._requeue_job()
            client.set("preempt/done", done)
            return ok
        except _core.Error as e:
            _say("threadloom: %s: lost the other nodes during the preemption: %s"
                 % (name, _first_line(e)))
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
        _say("threadloom: %s: preemption: saving a final checkpoint" % name)
        saved = True
        try:
            _say("threadloom: %s: checkpoint saved (%s)" % (name, self._save()))
        except Exception as e:  # noqa: BLE001 (reported, then the job is still requeued)
            _say("threadloom: %s: the preemption checkpoint failed: %s: %s"
                 % (name, type(e).__name__, _first_line(e)))
            status, saved = 1, False
        rv = cluster.current()
        if rv is not None and rv.world_size > 1:
            if not self._meet(rv, saved):
                status = 1
            _leave_job(self.peer_timeout)   # node 0 waits for the others only so long
        elif self.requeue and self._is_requeuer():
            if not self._requeue_job()[0]:
                status = 1
        _flush_stdio()
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

    save: a threadloom.Checkpointer, with `state` a callable returning (state, step) at the
    time of the signal; or a callable that saves and returns None, a value, or a Future (then
    waited for). requeue: on node 0 (cluster.current().rank, else SLURM_NODEID), run
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
    from threadloom.checkpoint import Checkpointer
    if isinstance(save, Checkpointer):
        if not callable(state):
            raise _error("EINVAL", "on_preempt(checkpointer, state=...): state must be a callable "
                         "returning (state, step) when the signal comes")
    elif not callable(save):
        raise _error("EINVAL", "on_preempt: save must be a Checkpointer or a callable, not %s"
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


# ---------------------------------------------------------------------------------------------
# The launcher's part
# ---------------------------------------------------------------------------------------------

def narrow_cuda_visible_devices(environ=None):
    """Sets CUDA_VISIBLE_DEVICES to the GPUs SLURM gave the step (SLURM_STEP_GPUS, else
    SLURM_JOB_GPUS) when it is unset; returns the value set, or None. Must run before CUDA
    starts (CUDA reads the variable once)."""
    env = os.environ if environ is None else environ
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or "CUDA_VISIBLE_DEVICES" in env:
        return None
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(var) is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g.strip() for g in env[var].split(",")
                                                   if g.strip())
            return env["CUDA_VISIBLE_DEVICES"]
    return None


def tee_to_log(log_dir, rank):
    """Sends this process's stdout and stderr (file descriptors 1 and 2) through `tee -a` into
    log_dir/node-<rank>.log as well. The tee processes ignore the signals SLURM and terminals
    send to the whole job (INT, TERM, HUP, USR1, USR2) and end when this process's copies of
    the descriptors close. Returns the log's path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "node-%d.log" % rank)
    _flush_stdio()
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


_leave_hooks = []   # the launcher's leave functions (one per launch()); run once each


def _leave_job(timeout=None):
    """Leaves the job now, as the launcher's atexit hook would (for exits by os._exit); node 0
    waits up to `timeout` s (default: the rendezvous timeout) for the others to leave."""
    while _leave_hooks:
        _leave_hooks.pop()(timeout)


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
    se = cluster.slurm_env(env)
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
    rv = cluster.rendezvous(n, r, master, timeout=rdzv_timeout, environ=env)
    cluster._set_current(rv)
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
                                                   _first_line(exc) if exc is not None else "")
        if rv.watchdog is not None:
            rv.watchdog.report_failure(reason)
        else:
            try:
                rv.abort(reason)
            except _core.Error:
                pass

    def leave(timeout=None):
        try:
            _leave_hooks.remove(leave)
        except ValueError:
            pass   # _leave_job popped it
        if state.left:
            return
        state.left = True
        if state.failed:
            if rv.server is not None:
                rv.server.close()
            return
        try:
            rv._leave(leave_timeout if timeout is None else timeout)
        except _core.Error as e:
            _say("threadloom: leaving the job: %s" % _first_line(e))

    sys.excepthook = excepthook
    _leave_hooks.append(leave)
    atexit.register(leave)


def launch_or_exit(origin="threadloom run", **kw):
    """launch(**kw) for the launchers: a bad flag ends the process with status 2, a failed
    rendezvous with status 1, each with one line on stderr."""
    try:
        return launch(**kw)
    except _core.Error as e:
        _flush_stdio()
        _say("%s: %s" % (origin, e.detail or e))
        raise SystemExit(2 if isinstance(e, _core.InvalidArgumentError) else 1) from None
