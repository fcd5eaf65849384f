"""The multi-node runtime around a rendezvous: the watchdog that takes every node down when one
fails, and the few output helpers the launcher and preemption share.

A Watchdog (the launcher starts one with --watchdog-timeout S, 0 for none) heartbeats into the
store; node 0 watches every node's heartbeat; any node that stops for S seconds, or reports a
failure (an uncaught exception in user code, a failed NCCL bootstrap), makes every node abort
what it registered as abortable (_runtime.abort_all: the NCCL communicators of the job's
bootstraps, running spmd worlds) and exit with ABORT_EXIT and one line naming the node; node 0
dying is seen by the others as the store's connection failing. This module knows nothing of
what it aborts: the objects registered themselves.

Store keys used here, beside the rendezvous' own: hb/<rank> (heartbeat counters), abort (JSON
{rank, host, reason}: the first reason wins), abort/count, abort_ack/<rank>, left/<rank>.
"""

import json
import os
import sys
import threading
import time

from threadloom import _core, _runtime, errors
from threadloom.cluster.rendezvous import ABORT_KEY

ABORT_EXIT = 70      # a node exits with this when the job aborts because of another node
DEFAULT_WATCHDOG_TIMEOUT = 60.0


def _error(name, detail):
    return errors.error(name, detail)


def say(line):
    """One line to stderr, written with one write(2) (never interleaved mid-line)."""
    try:
        os.write(2, (line.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def flush_stdio():
    """Flushes Python's stdout and stderr (before one line written with os.write, or an exit
    that skips Python's own flush)."""
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
    world, whose collectives raise CanceledError with the reason); then, with exit=True,
    writes one line naming the reason to stderr and ends the process with `exit_status`
    (os._exit: a rank stuck in a collective cannot be unwound). With exit=False it stops
    there; `aborted` is set and `reason` says why.

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
                    data = client.wait(ABORT_KEY, self.interval)
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
                           % (rv.master_addr, rv.store_port, first_line(e)), None)
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
                say("threadloom: watchdog hook %r failed: %s" % (fn, first_line(e)))

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
        flush_stdio()
        say("threadloom: node %d (%s) aborts: %s" % (self.rv.rank, self.rv.hosts[self.rv.rank],
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


def first_line(e):
    """The first line of an error's detail (a threadloom error's) or message."""
    text = (getattr(e, "detail", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _abort_process(reason):
    """Aborts what this process registered as abortable (_runtime): the NCCL communicators of
    the job's bootstraps, running spmd worlds (their collectives raise CanceledError)."""
    _runtime.abort_all("threadloom.cluster: the job aborts: %s" % reason)
